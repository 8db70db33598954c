"""Micro-benchmark (not a test): :meth:`meshlib.security.authz.PolicySet.evaluate` on a 10-policy set.

``python -m benchmarks.authz`` prints microseconds per evaluation for three requests: one allowed by the last
ALLOW policy (every DENY and ALLOW policy tried first: the allow path's worst case), one denied by the last DENY
policy (the denial path: every DENY policy tried) and one denied because no ALLOW policy matched (every policy
tried). The set has 4 DENY policies, 5 ALLOW policies and 1 AUDIT policy, with principals, namespaces, paths,
methods, ports, an IP block and a header condition, as a real workload's file would.
"""

from __future__ import annotations

import time

from meshlib.security.authz import AuthzRequest, PolicySet, parse_policies

RUNS = 200_000

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-dev, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {namespaces: ["dev", "test-*"]}}]
    to: [{operation: {methods: ["POST", "PUT", "DELETE"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-debug-header, namespace: shop}
spec:
  action: DENY
  rules:
  - when: [{key: "request.headers[x-debug]", values: ["*"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-blocked, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/blocked"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-writes, namespace: shop}
spec:
  action: AUDIT
  rules:
  - to: [{operation: {methods: ["DELETE"]}}]
"""
POLICIES += "".join(
    f"""---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: allow-{index}, namespace: shop}}
spec:
  rules:
  - from:
    - source: {{principals: ["cluster.local/ns/team{index}/sa/*"]}}
    - source: {{ipBlocks: ["10.{index}.0.0/16"]}}
    to: [{{operation: {{methods: ["GET", "POST"], paths: ["/api/v{index}/*"], ports: ["8080"]}}}}]
"""
    for index in range(5)
)

HEADERS = {"host": "shop", "user-agent": "bench", "accept": "*/*"}
ALLOWED = AuthzRequest("spiffe://cluster.local/ns/team4/sa/web", "192.0.2.7", "GET", "/api/v4/items", 8080, HEADERS)
DENIED = AuthzRequest("spiffe://cluster.local/ns/shop/sa/blocked", "192.0.2.7", "GET", "/api/v4/items", 8080, HEADERS)
UNMATCHED = AuthzRequest("spiffe://cluster.local/ns/other/sa/web", "192.0.2.7", "GET", "/api/v4/items", 8080, HEADERS)


def measure(policies: PolicySet, request: AuthzRequest) -> float:
    """Microseconds per ``evaluate`` (best of three runs of :data:`RUNS`)."""
    evaluate = policies.evaluate
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(RUNS):
            evaluate(request)
        best = min(best, time.perf_counter() - start)
    return best / RUNS * 1e6


def main() -> None:
    policies = parse_policies(POLICIES, source="benchmarks/authz.py")
    assert len(policies) == 10
    cases = (("allow (last ALLOW policy)", ALLOWED, True), ("deny (last DENY policy)", DENIED, False))
    cases += (("deny (no ALLOW policy matched)", UNMATCHED, False),)
    print(f"PolicySet.evaluate, {len(policies)} policies, best of 3 x {RUNS:,} runs")
    for label, request, allowed in cases:
        decision = policies.evaluate(request)
        assert decision.allowed is allowed, (label, decision)
        print(f"  {label:32} {measure(policies, request):6.2f} us   {decision.reason}")


if __name__ == "__main__":
    main()
