"""A small compiler of discovery chains for the Consul double: the compiled ``Chain`` objects Consul returns from
``/v1/discovery-chain/<service>`` for the config entries the tests need, in the shape of the documented examples
(``tests/fixtures/consul/chain-*.json``: node keys ``resolver:<target>``, target IDs
``[<subset>.]<service>.<namespace>.<partition>.<datacenter>``).

It compiles only what the live tests use (a resolver with subsets and failover, a splitter over subsets, a router
with path prefixes); anything else is written by hand as a chain document."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

TRUST_DOMAIN = "11111111-2222-3333-4444-555555555555.consul"


def target_id(service: str, subset: str = "", dc: str = "dc1") -> str:
    return f"{subset + '.' if subset else ''}{service}.default.default.{dc}"


def target(
    service: str, subset: str = "", *, filter: str = "", dc: str = "dc1", only_passing: bool = False
) -> dict[str, Any]:
    ident = target_id(service, subset, dc)
    sni = f"{subset + '.' if subset else ''}{service}.default.{dc}.internal.{TRUST_DOMAIN}"
    found: dict[str, Any] = {
        "ID": ident,
        "Service": service,
        "ServiceSubset": subset,
        "Namespace": "default",
        "Partition": "default",
        "Datacenter": dc,
        "MeshGateway": {},
        "Subset": {"Filter": filter, "OnlyPassing": only_passing} if filter or only_passing else {},
        "ConnectTimeout": "5s",
        "SNI": sni,
        "Name": sni,
    }
    return found


def resolver(
    ident: str, failover: Sequence[str] = (), *, connect_timeout: str = "5s", lb: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    node: dict[str, Any] = {
        "Type": "resolver",
        "Name": ident,
        "Resolver": {"ConnectTimeout": connect_timeout, "Target": ident},
    }
    if failover:
        node["Resolver"]["Failover"] = {"Targets": list(failover)}
    if lb is not None:
        node["LoadBalancer"] = dict(lb)
    return node


def chain(
    service: str, start: str, nodes: Mapping[str, Any], targets: Sequence[Mapping[str, Any]], *, protocol: str = "http"
) -> dict[str, Any]:
    return {
        "ServiceName": service,
        "Namespace": "default",
        "Partition": "default",
        "Datacenter": "dc1",
        "Protocol": protocol,
        "StartNode": start,
        "Nodes": dict(nodes),
        "Targets": {t["ID"]: dict(t) for t in targets},
    }


def subsets(service: str, versions: Sequence[str]) -> list[dict[str, Any]]:
    """One target per version subset (``Service.Meta.version == <v>``), as a resolver's ``Subsets`` compile."""
    return [target(service, v, filter=f"Service.Meta.version == {v}") for v in versions]


def split(service: str, weights: Mapping[str, float]) -> dict[str, Any]:
    """A ``service-splitter`` over version subsets: ``{"v1": 90, "v2": 10}``."""
    targets = subsets(service, list(weights))
    nodes: dict[str, Any] = {f"resolver:{t['ID']}": resolver(t["ID"]) for t in targets}
    nodes[f"splitter:{service}"] = {
        "Type": "splitter",
        "Name": service,
        "Splits": [
            {"Weight": weight, "NextNode": f"resolver:{target_id(service, version)}"}
            for version, weight in weights.items()
        ],
    }
    return chain(service, f"splitter:{service}", nodes, targets)


def route_prefixes(service: str, prefixes: Mapping[str, str]) -> dict[str, Any]:
    """A ``service-router``: each path prefix to another service (its default resolver), the rest to ``service``
    (Consul appends the catch-all route)."""
    own = target(service)
    routes = [
        {
            "Definition": {
                "Match": {"HTTP": {"PathPrefix": prefix}},
                "Destination": {"Service": other},
            },
            "NextNode": f"resolver:{target_id(other)}",
        }
        for prefix, other in prefixes.items()
    ]
    routes.append(
        {
            "Definition": {"Match": {"HTTP": {"PathPrefix": "/"}}, "Destination": {"Service": service}},
            "NextNode": f"resolver:{own['ID']}",
        }
    )
    others = [target(other) for other in dict.fromkeys(prefixes.values())]
    nodes: dict[str, Any] = {f"resolver:{t['ID']}": resolver(t["ID"]) for t in [own, *others]}
    nodes[f"router:{service}"] = {"Type": "router", "Name": service, "Routes": routes}
    return chain(service, f"router:{service}", nodes, [own, *others])


def failover(service: str, to: Sequence[str], *, connect_timeout: str = "5s") -> dict[str, Any]:
    """A ``service-resolver`` whose target fails over to the services ``to``, in order."""
    own = target(service)
    own["ConnectTimeout"] = connect_timeout  # Consul copies the resolver's ConnectTimeout onto its targets
    others = [target(other) for other in to]
    node = resolver(own["ID"], [t["ID"] for t in others], connect_timeout=connect_timeout)
    return chain(service, f"resolver:{own['ID']}", {f"resolver:{own['ID']}": node}, [own, *others])
