"""The local rate limiter (Linkerd ``HTTPLocalRateLimitPolicy`` semantics, GCRA) and its document parser.

Time is a fake clock the tests move by hand: every sequence is exact and nothing sleeps.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator

import pytest

from meshlib.errors import ConfigError
from meshlib.security.ratelimit import (
    DEFAULT_MAX_IDENTITIES,
    Limit,
    Override,
    RateLimiter,
    RateLimitError,
    RateLimits,
    Verdict,
    parse_rate_limits,
)

pytestmark = pytest.mark.one_library

ALICE = "spiffe://prod.example/ns/shop/sa/alice"
BOB = "spiffe://prod.example/ns/shop/sa/bob"
WEB = "spiffe://prod.example/ns/shop/sa/web"


class Clock:
    """A clock that only moves when told to."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter(limits: RateLimits, **kwargs: object) -> tuple[RateLimiter, Clock]:
    clock = Clock()
    return RateLimiter(limits, clock=clock, **kwargs), clock  # type: ignore[arg-type]


def admitted(rl: RateLimiter, identity: str | None, n: int) -> int:
    return sum(rl.check(identity).allowed for _ in range(n))


# -- GCRA sequences -------------------------------------------------------------------------------------------------


def test_gcra_burst_of_one_second_then_one_per_interval() -> None:
    rl, clock = limiter(RateLimits(identity=Limit(4)))
    assert [rl.check(ALICE).allowed for _ in range(5)] == [True, True, True, True, False]
    refused = rl.check(ALICE)
    assert refused == Verdict(False, 0.25, "identity", ALICE)
    assert refused.retry_after == "1"
    clock.t += 0.125
    assert rl.check(ALICE) == Verdict(False, 0.125, "identity", ALICE)
    clock.t += 0.125
    assert rl.check(ALICE) == Verdict(True, 0.0, "identity", ALICE)
    assert rl.check(ALICE).retry_after_s == 0.25
    clock.t += 0.5  # two intervals: two cells back
    assert admitted(rl, ALICE, 3) == 2
    clock.t += 10  # long idle: a full burst again, never more
    assert admitted(rl, ALICE, 10) == 4


def test_gcra_rate_that_is_not_a_binary_fraction_rounds_the_interval_up() -> None:
    rl, clock = limiter(RateLimits(total=Limit(3)))
    assert admitted(rl, None, 4) == 3
    verdict = rl.check(None)
    assert verdict == Verdict(False, 0.333333334, "total", "*")  # T = ceil(1e9/3) ns: never faster than 3/s
    clock.t += 0.333333333
    assert not rl.check(None).allowed
    clock.t += 0.000000001
    assert rl.check(None).allowed


def test_gcra_explicit_burst_and_fractional_rate() -> None:
    rl, clock = limiter(RateLimits(identity=Limit(2, burst=1)))
    assert rl.check(ALICE).allowed
    assert rl.check(ALICE) == Verdict(False, 0.5, "identity", ALICE)
    clock.t += 0.5
    assert rl.check(ALICE).allowed
    slow, _ = limiter(RateLimits(identity=Limit(0.5)))  # one every 2 s, burst ceil(0.5) = 1
    assert admitted(slow, ALICE, 3) == 1
    assert slow.check(ALICE).retry_after_s == 2.0
    assert slow.check(ALICE).retry_after == "2"


def test_retry_after_header_rounds_up_to_whole_seconds() -> None:
    assert Verdict(False, 0.001, "total", "*").retry_after == "1"
    assert Verdict(False, 1.0, "total", "*").retry_after == "1"
    assert Verdict(False, 1.2, "total", "*").retry_after == "2"
    assert Verdict(True, 0.0, "total", "*").retry_after == "0"


def test_time_never_goes_back() -> None:
    rl, _ = limiter(RateLimits(identity=Limit(1)))
    assert rl.check(ALICE, now=50.0).allowed
    # an older time counts as the newest seen: the request is refused, not admitted by a fresh window
    assert rl.check(ALICE, now=10.0) == Verdict(False, 1.0, "identity", ALICE)
    assert rl.check(ALICE, now=51.0).allowed


# -- total, identity, overrides ---------------------------------------------------------------------------------------


def test_identity_limit_is_per_caller_and_total_is_shared() -> None:
    rl, _ = limiter(RateLimits(total=Limit(5), identity=Limit(3)))
    assert admitted(rl, ALICE, 3) == 3
    assert rl.check(ALICE) == Verdict(False, pytest.approx(1 / 3), "identity", ALICE)  # type: ignore[arg-type]
    assert admitted(rl, BOB, 2) == 2
    assert rl.check(BOB) == Verdict(False, 0.2, "total", "*")


def test_a_request_refused_by_identity_takes_nothing_from_the_total() -> None:
    rl, _ = limiter(RateLimits(total=Limit(4), identity=Limit(2)))
    assert admitted(rl, ALICE, 2) == 2
    assert admitted(rl, ALICE, 50) == 0  # alice floods over her own limit...
    assert admitted(rl, BOB, 2) == 2  # ...and the total still has bob's share


def test_a_request_refused_by_the_total_takes_nothing_from_the_identity() -> None:
    rl, clock = limiter(RateLimits(total=Limit(1), identity=Limit(1)))
    assert rl.check(ALICE).allowed
    assert rl.check(BOB) == Verdict(False, 1.0, "total", "*")
    clock.t += 0.5
    assert rl.check(BOB) == Verdict(False, 0.5, "total", "*")
    clock.t += 0.5
    assert rl.check(BOB).allowed  # bob's refused requests did not spend his own bucket


def test_both_refusing_reports_the_later_one() -> None:
    rl, _ = limiter(RateLimits(total=Limit(4), identity=Limit(1)))
    assert rl.check(ALICE).allowed
    assert admitted(rl, BOB, 1) == 1
    assert admitted(rl, "spiffe://prod.example/ns/shop/sa/carol", 1) == 1
    assert admitted(rl, "spiffe://prod.example/ns/shop/sa/dave", 1) == 1
    assert rl.check(ALICE) == Verdict(False, 1.0, "identity", ALICE)  # total: 0.25 s, identity: 1 s
    rl2, _ = limiter(RateLimits(total=Limit(1), identity=Limit(1, burst=2)))
    assert rl2.check(ALICE).allowed
    assert rl2.check(ALICE) == Verdict(False, 1.0, "total", "*")


def test_override_replaces_the_identity_limit_and_is_shared_by_its_clients() -> None:
    limits = RateLimits(
        total=Limit(100),
        identity=Limit(1),
        overrides=(Override(Limit(3), (WEB, "/ns/ops/sa/probe")),),
    )
    rl, _ = limiter(limits)
    assert admitted(rl, WEB, 2) == 2
    assert rl.check(WEB) == Verdict(True, 0.0, "override", WEB)
    assert rl.check("spiffe://other.example/ns/ops/sa/probe") == Verdict(
        False,
        pytest.approx(1 / 3),
        "override",
        "spiffe://other.example/ns/ops/sa/probe",  # type: ignore[arg-type]
    )  # a path matches in any trust domain, and shares the entry's one bucket (Linkerd)
    assert rl.check(ALICE) == Verdict(True, 0.0, "identity", ALICE)
    assert not rl.check(ALICE).allowed
    # a full ID matches only in its own trust domain: this caller has the identity limit
    stranger = "spiffe://other.example/ns/shop/sa/web"
    assert [rl.check(stranger).limit for _ in range(2)] == ["identity", "identity"]


def test_the_total_still_applies_to_override_clients() -> None:
    rl, _ = limiter(RateLimits(total=Limit(2), overrides=(Override(Limit(2), (WEB,)),)))
    assert admitted(rl, ALICE, 1) == 1
    assert rl.check(WEB).allowed
    assert rl.check(WEB) == Verdict(False, 0.5, "total", "*")


def test_a_client_in_two_overrides_gets_the_last_one() -> None:
    rl, _ = limiter(RateLimits(overrides=(Override(Limit(1), (WEB,)), Override(Limit(3), (WEB,)))))
    assert admitted(rl, WEB, 5) == 3


def test_callers_without_identity_share_one_bucket() -> None:
    rl, _ = limiter(RateLimits(identity=Limit(2)))
    assert rl.check(None) == Verdict(True, 0.0, "identity", "")
    assert rl.check("").allowed  # an empty identity is no identity
    assert rl.check(None) == Verdict(False, 0.5, "identity", "")
    assert rl.check(ALICE).allowed  # identified callers have their own buckets
    assert len(rl) == 1  # the no-identity bucket is not in the bounded table


def test_no_limit_admits_everything_and_total_only_names_total() -> None:
    rl, _ = limiter(RateLimits())
    assert all(rl.check(ALICE) == Verdict(True, 0.0, None, ALICE) for _ in range(100))
    rl2, _ = limiter(RateLimits(total=Limit(1)))
    assert rl2.check(ALICE) == Verdict(True, 0.0, "total", "*")
    assert len(rl2) == 0


# -- bounded memory -------------------------------------------------------------------------------------------------


def test_100000_identities_keep_the_table_bounded_and_everyone_admitted() -> None:
    rl, clock = limiter(RateLimits(identity=Limit(10)))
    peak = 0
    for n in range(100_000):
        identity = f"spiffe://prod.example/ns/load/sa/c{n}"
        assert rl.check(identity).allowed
        assert rl.check(identity).allowed
        clock.t += 0.001  # 1000 new callers a second, each full again after 0.2 s
        peak = max(peak, len(rl))
    assert peak == DEFAULT_MAX_IDENTITIES
    assert len(rl) <= DEFAULT_MAX_IDENTITIES


def test_a_full_table_of_busy_callers_refuses_the_newcomer_rather_than_forget_one() -> None:
    rl, clock = limiter(RateLimits(identity=Limit(2)), max_identities=100)
    for n in range(100):
        assert rl.check(f"spiffe://td/c{n}").allowed
    clock.t += 0.25
    assert rl.check("spiffe://td/new") == Verdict(False, 0.25, "identity", "spiffe://td/new")
    assert len(rl) == 100
    assert not [n for n in range(100) if admitted(rl, f"spiffe://td/c{n}", 2) != 1]  # nobody got a fresh burst
    clock.t += 0.75  # c0 (admitted least recently) is full again: forgotten for the newcomer
    assert rl.check("spiffe://td/new").allowed
    assert len(rl) == 100 - 32 + 1  # every bucket is full by now: one sweep forgot 32 of them


def test_forgetting_full_buckets_changes_no_decision() -> None:
    """Bounded (25 buckets) and unbounded limiters see the same traffic and decide the same, though the
    bounded one forgets constantly: the least recently admitted of 25 was admitted >= 1.25 s ago, so its
    bucket (burst 4 at 4/s: full 1 s after its last request at the latest) is full when it is forgotten."""
    rng = random.Random(12)
    bounded, clock = limiter(RateLimits(identity=Limit(4)), max_identities=25)
    reference = RateLimiter(RateLimits(identity=Limit(4)), clock=clock)
    callers = [f"spiffe://td/c{n}" for n in range(30)]
    decisions = 0
    for _ in range(200):
        for caller in callers:
            for _ in range(rng.randint(1, 7)):  # bursts over and under the limit
                assert bounded.check(caller) == reference.check(caller)
                decisions += 1
            clock.t += rng.choice((0.05, 0.0625))
        assert len(bounded) <= 25
    assert len(reference) == 30
    assert decisions > 20_000


def test_no_caller_exceeds_its_rate_under_eviction_pressure() -> None:
    """Many more callers than buckets, random times and bursts: in every window each caller got at most
    burst + window/T requests (the GCRA bound)."""
    rng = random.Random(7)
    rl, clock = limiter(RateLimits(identity=Limit(4)), max_identities=8)
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(20_000):
        caller = f"spiffe://td/c{rng.randrange(40)}"
        if rl.check(caller).allowed:
            times[caller].append(clock.t)
        clock.t += rng.choice((0.0, 0.0, 0.015625, 0.03125, 0.25))
        assert len(rl) <= 8
    for stamps in times.values():
        for i, start in enumerate(stamps):
            for j in range(i, min(len(stamps), i + 40)):
                assert j - i + 1 <= 4 + (stamps[j] - start) / 0.25, stamps[i : j + 1]
    assert sum(map(len, times.values())) > 1000


# -- threads and fork -------------------------------------------------------------------------------------------------


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Threads switch every microsecond (not every 5 ms), so an unlocked read-modify-write would interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


@pytest.mark.usefixtures("busy_switching")
def test_threads_never_get_more_than_the_allowance() -> None:
    rl, _ = limiter(RateLimits(total=Limit(2000), identity=Limit(120)))  # a frozen clock: allowance is exact
    barrier = threading.Barrier(8)
    counts = [0] * 8

    def work(index: int) -> None:
        barrier.wait()
        for n in range(1000):
            counts[index] += rl.check(f"spiffe://td/t{index}-{n % 2}").allowed

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(count == 240 for count in counts)  # two identities per thread, 120 each
    rl2, _ = limiter(RateLimits(total=Limit(1000), identity=Limit(1000)))
    totals = [0] * 8
    barrier = threading.Barrier(8)

    def flood(index: int) -> None:
        barrier.wait()
        for _ in range(500):
            totals[index] += rl2.check(f"spiffe://td/t{index}").allowed

    threads = [threading.Thread(target=flood, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sum(totals) == 1000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_child_forked_while_the_lock_is_held_can_check() -> None:
    rl, _ = limiter(RateLimits(total=Limit(1)))
    rl._lock.acquire()  # as if another thread were inside check() at fork time
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            signal.alarm(10)  # a deadlocked child dies (SIGALRM) instead of hanging the suite
            os._exit(0 if rl.check(ALICE).allowed else 1)
    finally:
        rl._lock.release()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# -- configuration ---------------------------------------------------------------------------------------------------

POLICY = """\
apiVersion: policy.linkerd.io/v1alpha1
kind: HTTPLocalRateLimitPolicy
metadata:
  namespace: emojivoto
  name: web-rl
spec:
  targetRef:
    group: policy.linkerd.io
    kind: Server
    name: web-http
  total:
    requestsPerSecond: 100
  identity:
    requestsPerSecond: 20
  overrides:
  - requestsPerSecond: 25
    clientRefs:
    - kind: ServiceAccount
      name: special-client
    - kind: ServiceAccount
      namespace: ops
      name: prober
"""


def test_parse_linkerd_document() -> None:
    limits = parse_rate_limits(POLICY, source="limits.yaml", trust_domain="prod.example")
    assert limits == RateLimits(
        total=Limit(100),
        identity=Limit(20),
        overrides=(
            Override(
                Limit(25),
                ("spiffe://prod.example/ns/emojivoto/sa/special-client", "spiffe://prod.example/ns/ops/sa/prober"),
            ),
        ),
        name="emojivoto/web-rl",
    )
    anywhere = parse_rate_limits(POLICY.encode(), source="limits.yaml")
    assert anywhere.overrides[0].clients == ("/ns/emojivoto/sa/special-client", "/ns/ops/sa/prober")
    rl = RateLimiter(anywhere, clock=Clock())
    assert admitted(rl, "spiffe://any.example/ns/ops/sa/prober", 30) == 25


def test_parse_skips_other_kinds_and_reads_json() -> None:
    other = "apiVersion: policy.linkerd.io/v1beta3\nkind: Server\nmetadata: {name: web-http}\nspec: {}\n---\n"
    assert parse_rate_limits(other + POLICY, source="f").total == Limit(100)
    text = (
        '{"apiVersion": "policy.linkerd.io/v1alpha1", "kind": "HTTPLocalRateLimitPolicy", "metadata": {"name": "a"},'
        ' "spec": {"targetRef": {"group": "policy.linkerd.io", "kind": "Server", "name": "s"}}}'
    )
    assert parse_rate_limits(text, source="f") == RateLimits(name="default/a")


@pytest.mark.parametrize(
    ("change", "where", "expected"),
    [
        (("requestsPerSecond: 100", "requestsPerSecond: 0"), "spec.total.requestsPerSecond", "from 1 to"),
        (("requestsPerSecond: 100", "requestsPerSecond: '100'"), "spec.total.requestsPerSecond", "an integer"),
        (("requestsPerSecond: 100", "requestsPerSecond: 4294967296"), "spec.total.requestsPerSecond", "4,294,967,295"),
        (("requestsPerSecond: 20", "requestsPerSecond: 101"), "spec.identity.requestsPerSecond", "at most total"),
        (("requestsPerSecond: 25", "requestsPerSecond: 200"), "spec.overrides[0].requestsPerSecond", "at most total"),
        (
            ("kind: ServiceAccount\n      name: special", "kind: Deployment\n      name: special"),
            "spec.overrides[0].clientRefs[0]",
            "ServiceAccount",
        ),
        (("namespace: ops", "namespace: Ops!"), "spec.overrides[0].clientRefs[1].namespace", "namespace"),
        (("kind: Server", "kind: Pod"), "spec.targetRef", "a Server"),
        (("group: policy.linkerd.io\n", "group: ''\n"), "spec.targetRef", "a Server"),
        (("v1alpha1", "v1beta1"), "apiVersion", "policy.linkerd.io/v1alpha1"),
        (("  total:", "  totl:"), "spec.totl", "unknown fields are refused"),
        (
            ("  - requestsPerSecond: 25\n    clientRefs:", "  - clientRefs:"),
            "spec.overrides[0].requestsPerSecond",
            "required",
        ),
    ],
)
def test_parse_errors_name_source_document_field_value_and_expectation(
    change: tuple[str, str], where: str, expected: str
) -> None:
    text = POLICY.replace(*change, 1)
    assert text != POLICY
    with pytest.raises(RateLimitError) as caught:
        parse_rate_limits(text, source="/etc/mesh/limits.yaml")
    message = str(caught.value)
    assert message.startswith("/etc/mesh/limits.yaml, document 1")
    assert where in message
    assert expected in message
    assert isinstance(caught.value, ConfigError)


def test_parse_missing_rps_and_clientrefs_are_named() -> None:
    with pytest.raises(RateLimitError, match=r"spec\.identity\.requestsPerSecond=None .*required"):
        parse_rate_limits(POLICY.replace("requestsPerSecond: 20", "{}"), source="f")
    with pytest.raises(RateLimitError, match=r"spec\.overrides\[0\]\.clientRefs=None .*required"):
        parse_rate_limits(POLICY.split("    clientRefs:", maxsplit=1)[0], source="f")


def test_parse_refuses_no_policy_two_policies_bad_yaml_and_bombs() -> None:
    with pytest.raises(RateLimitError, match=r"0 HTTPLocalRateLimitPolicy documents.*exactly one"):
        parse_rate_limits("", source="f")
    with pytest.raises(RateLimitError, match="2 HTTPLocalRateLimitPolicy documents"):
        parse_rate_limits(POLICY + "---\n" + POLICY, source="f")
    with pytest.raises(RateLimitError, match="valid YAML"):
        parse_rate_limits("spec: [", source="f")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 10) + "]\n" for p, c in zip("abcdef", "bcdefg", strict=True)
    )
    with pytest.raises(RateLimitError, match="nodes"):
        parse_rate_limits(bomb, source="f")
    with pytest.raises(RateLimitError, match="trust_domain"):
        parse_rate_limits(POLICY, source="f", trust_domain="Prod Example")


def test_constructor_refuses_bad_values() -> None:
    for bad in (0, -1, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ConfigError, match=r"Limit\.requests_per_second"):
            Limit(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Limit\.burst"):
        Limit(10, burst=0)
    with pytest.raises(ConfigError, match=r"Override\.clients"):
        Override(Limit(1), WEB)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"Override\.clients"):
        Override(Limit(1), ("web",))
    with pytest.raises(ConfigError, match=r"RateLimits\.total"):
        RateLimits(total=10)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_identities"):
        RateLimiter(RateLimits(), max_identities=0)
