"""The settings classes: :class:`MeshConfig`, :class:`ServiceConfig` and :class:`ResilienceSettings`.

Immutable and validated at construction (a bad value raises :class:`~meshlib.errors.ConfigError` naming the
field). :meth:`MeshConfig.policy_for`, :meth:`~MeshConfig.resilience_for` and :meth:`~MeshConfig.tls_for` answer
per service (by :func:`service_key`) from tables built once, at construction. Reading ``MESHLIB_*`` variables
into these classes is :mod:`meshlib._config.env`'s job; :meth:`MeshConfig.from_env` delegates to it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from meshlib._config.parse import (
    FILE_PATH_EXPECTED,
    FRACTION_EXPECTED,
    HEADER_NAME_EXPECTED,
    INNER_TRANSPORT_EXPECTED,
    INNER_TRANSPORTS,
    MAX_DURATION,
    NAMESPACE_EXPECTED,
    PERCENT_EXPECTED,
    XDS_MODE_EXPECTED,
    control_character,
    is_header_name,
    is_namespace,
)
from meshlib.errors import ConfigError
from meshlib.policy import DEFAULT_POLICY, Policy
from meshlib.resilience.hedging import HedgeSettings
from meshlib.resilience.outlier import FailurePercentageEjection, SuccessRateEjection
from meshlib.security.tls import DEFAULT_RELOAD_INTERVAL, TLSSettings

if TYPE_CHECKING:
    from meshlib._connection_age import ConnectionAge
    from meshlib.balance.slow_start import SlowStart


def service_key(host: str) -> str:
    """The ``<NAME>`` part of ``MESHLIB_SERVICE_<NAME>`` for a request host (``user-api`` -> ``USER_API``)."""
    return host.upper().replace("-", "_").replace(".", "_")


def _check(owner: str, name: str, value: object, ok: bool, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{owner}.{name}", value, expected)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return not math.isnan(value)
    return isinstance(value, int) and not isinstance(value, bool)  # no math.isnan(): 10**400 overflows a float


#: The largest count a setting accepts (failures before a breaker opens, in-flight requests, retries per
#: second...): far above any useful value, and small enough for every float computation made with it.
MAX_COUNT = 10**9
_COUNT_EXPECTED = f"an integer >= 1 (at most {MAX_COUNT:,})"
_DURATION_LIMIT = f"at most 720h (30 days, {MAX_DURATION:.0f}s)"


def _is_duration(value: object, *, allow_zero: bool = False) -> bool:
    """A number of seconds above zero (or zero) and at most :data:`~meshlib._config.parse.MAX_DURATION`."""
    if not _is_number(value) or not isinstance(value, (int, float)):
        return False
    return (value >= 0 if allow_zero else value > 0) and value <= MAX_DURATION  # no float(): 10**400 overflows


#: Envoy's ``upstream.zone_routing.min_cluster_size`` default: below 6 healthy endpoints, no zone routing.
DEFAULT_MIN_CLUSTER_SIZE = 6


@dataclass(frozen=True, slots=True)
class ZoneSettings:
    """Zone-aware routing settings of one service (``MESHLIB_ZONE*``, read by ``zone_settings_from_env``).

    ``zone``: this client's zone (``None``: zone-aware routing off). ``failover``: use priority failover
    (:class:`~meshlib.balance.locality.FailoverPicker`) instead of Envoy's proportional zone-aware routing;
    ``failover_order`` is the ordered list of zones to fail over to (empty: every other zone at one level).
    """

    zone: str | None = None
    min_cluster_size: int = DEFAULT_MIN_CLUSTER_SIZE
    failover: bool = False
    failover_order: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        """Whether a zone picker should be built at all (a local zone is set)."""
        return self.zone is not None


@dataclass(frozen=True, slots=True)
class ResilienceSettings:
    """Per-service resilience machinery settings, read by the transport's budget, breakers and limits.

    Unlike :class:`~meshlib.policy.Policy` (rules of one call, overridable per call), these size state shared
    by every call to a service, so they are set per client and per service only. Defaults and sources:

    * ``retry_budget_fraction=0.2``, ``retry_budget_min_per_second=10``, ``retry_budget_ttl=10 s`` -- retries
      may add at most 20 % of requests plus 10 retries/s, over a 10 s window: Finagle's ``RetryBudget()``
      defaults, also Linkerd's ``retryBudget`` and tower's ``Budget``. The ratio is a fraction (0.2 = 20 %),
      like Finagle's ``percentCanRetry``, although its variable is ``MESHLIB_RETRY_BUDGET_PERCENT`` (which takes
      ``0.2`` or ``20%``); the TTL is bounded to 1..60 s as in Finagle.
    * ``breaker_failures=5``, ``breaker_reset=10 s`` -- an endpoint's breaker opens after 5 consecutive
      failures (Envoy's and Finagle's failure-accrual count) and lets one probe through after 10 s.
    * ``outlier_failures=5``, ``outlier_base_ejection=30 s``, ``outlier_max_ejection=300 s``,
      ``outlier_max_percent=10`` -- Envoy's outlier detection: eject after 5 consecutive gateway failures
      for 30 s x ejection count, at most 300 s, never more than 10 % of endpoints (at least one). A
      percentage (0-100), as every ``*_percent`` field; fractions (0-1) are named ``*_fraction``.
    * ``outlier_interval=10 s`` -- how often the rate-based detectors sweep (Envoy ``interval``, gRFC A50).
    * ``outlier_success_rate_*`` -- success-rate ejection (Envoy ``success_rate_*``, A50), **on** as in Envoy:
      ``enforcement_percent=100``, ``minimum_hosts=5``, ``request_volume=100``, ``stdev_factor=1900``
      (thousandths: eject below mean - 1.9 x stdev).
    * ``outlier_failure_percentage_*`` -- failure-percentage ejection (Envoy ``failure_percentage_*``, A50),
      **off** as in Envoy (``enforcement_percent=0``): ``threshold=85``, ``minimum_hosts=5``,
      ``request_volume=50``. An enforcement of 0 turns a detector off (no counting, no sweep).
    * ``max_inflight=1024`` -- concurrent requests per service before :class:`OverloadedError`: Envoy's
      ``max_requests`` circuit-breaker threshold.
    * ``adaptive_concurrency=False`` -- replace the fixed ``max_inflight`` by a limit learnt from latency
      (:class:`~meshlib.resilience.adaptive.AdaptiveConcurrencyLimit`, Netflix's Gradient2). Its bounds:
      ``adaptive_min_limit`` (default 3, Envoy's ``min_concurrency``), ``adaptive_initial_limit`` (default 20,
      Gradient2's) and ``adaptive_max_limit`` (default: ``max_inflight``; the fixed limit is always the
      ceiling, so any larger bound is lowered to it); ``None`` means the default, clamped into the bounds set.
      ``adaptive_window=0.1 s`` and ``adaptive_window_samples=10``: the shortest window the limit averages
      latency over before it moves (Envoy's 100 ms update interval) and the fewest samples in it (Netflix's
      ``windowSize``). See :meth:`adaptive_bounds`.
    * ``max_connection_age=0`` (off) and ``max_connection_age_jitter=0.1`` -- a pooled connection older than
      the age (each drawn within +/- the jitter fraction, gRFC A9's +/-10 %) is retired once idle, never
      mid-request (Envoy's ``max_connection_duration``, off by default as in Envoy and gRPC). See
      :mod:`meshlib._connection_age` and :meth:`connection_age`.
    * ``hedge`` -- :class:`~meshlib.resilience.hedging.HedgeSettings`: the hedging budget (hedges at most 5 %
      of requests, Finagle's ``maxExtraLoad``) and the latency window a percentile delay is read from (30 s,
      at least 100 samples). Whether a call hedges is its policy's (``Policy.hedge``).
    * ``slow_start_window=0`` (off), ``slow_start_aggression=1.0``, ``slow_start_min_weight_percent=10`` --
      Envoy's ``slow_start_config``: an endpoint that joins after the first set has its balancing weight ramped
      over the window (:mod:`meshlib.balance.slow_start`, :attr:`slow_start`).

    Invalid values raise :class:`meshlib.ConfigError` naming the field.
    """

    retry_budget_fraction: float = 0.2
    retry_budget_min_per_second: int = 10
    retry_budget_ttl: float = 10.0
    breaker_failures: int = 5
    breaker_reset: float = 10.0
    outlier_failures: int = 5
    outlier_base_ejection: float = 30.0
    outlier_max_ejection: float = 300.0
    outlier_max_percent: float = 10.0
    max_inflight: int = 1024
    adaptive_concurrency: bool = False
    adaptive_initial_limit: int | None = None
    adaptive_min_limit: int | None = None
    adaptive_max_limit: int | None = None
    adaptive_window: float = 0.1
    adaptive_window_samples: int = 10
    outlier_interval: float = 10.0
    outlier_success_rate_enforcement_percent: int = 100
    outlier_success_rate_minimum_hosts: int = 5
    outlier_success_rate_request_volume: int = 100
    outlier_success_rate_stdev_factor: int = 1900
    outlier_failure_percentage_enforcement_percent: int = 0
    outlier_failure_percentage_threshold: int = 85
    outlier_failure_percentage_minimum_hosts: int = 5
    outlier_failure_percentage_request_volume: int = 50
    hedge: HedgeSettings = field(default_factory=HedgeSettings)
    slow_start_window: float = 0.0
    slow_start_aggression: float = 1.0
    slow_start_min_weight_percent: float = 10.0
    max_connection_age: float = 0.0
    max_connection_age_jitter: float = 0.1

    def __post_init__(self) -> None:
        own = "ResilienceSettings"
        from meshlib.balance.slow_start import slow_start_problem  # here: meshlib.balance imports discovery

        problem = slow_start_problem(
            self.slow_start_window, self.slow_start_aggression, self.slow_start_min_weight_percent
        )
        if problem is not None:
            name, expected = problem
            _check(own, f"slow_start_{name}", getattr(self, f"slow_start_{name}"), False, expected)
        ratio = self.retry_budget_fraction
        _check(own, "retry_budget_fraction", ratio, _is_number(ratio) and 0 <= ratio <= 1, FRACTION_EXPECTED)
        floor = self.retry_budget_min_per_second
        ok = _is_int(floor) and 0 <= floor <= MAX_COUNT
        _check(own, "retry_budget_min_per_second", floor, ok, f"an integer >= 0 (at most {MAX_COUNT:,})")
        ttl = self.retry_budget_ttl
        _check(own, "retry_budget_ttl", ttl, _is_number(ttl) and 1 <= ttl <= 60, "a duration from 1s to 60s")
        for name in ("breaker_failures", "outlier_failures", "max_inflight"):
            count = getattr(self, name)
            _check(own, name, count, _is_int(count) and 1 <= count <= MAX_COUNT, _COUNT_EXPECTED)
        for name in ("breaker_reset", "outlier_base_ejection", "outlier_max_ejection"):
            seconds = getattr(self, name)
            _check(own, name, seconds, _is_duration(seconds), f"a duration greater than zero, {_DURATION_LIMIT}")
        base, most = self.outlier_base_ejection, self.outlier_max_ejection
        _check(own, "outlier_max_ejection", most, most >= base, f"a duration >= outlier_base_ejection ({base})")
        percent = self.outlier_max_percent
        ok = _is_number(percent) and 0 <= percent <= 100
        _check(own, "outlier_max_percent", percent, ok, PERCENT_EXPECTED)
        adaptive = self.adaptive_concurrency
        _check(own, "adaptive_concurrency", adaptive, isinstance(adaptive, bool), "a bool")
        for name in ("adaptive_initial_limit", "adaptive_min_limit", "adaptive_max_limit"):
            count = getattr(self, name)
            ok = count is None or (_is_int(count) and 1 <= count <= MAX_COUNT)
            _check(own, name, count, ok, _COUNT_EXPECTED)
        samples = self.adaptive_window_samples
        ok = _is_int(samples) and 1 <= samples <= 10_000
        _check(own, "adaptive_window_samples", samples, ok, "an integer from 1 to 10,000")
        window = self.adaptive_window
        ok = _is_number(window) and 0.001 <= window <= 60
        _check(own, "adaptive_window", window, ok, "a duration from 1ms to 60s")
        # Checked among the adaptive settings only: MAX_INFLIGHT (an xDS cluster's max_requests too) lowers them
        # all when smaller (adaptive_bounds), it never makes them invalid.
        low, first, high = self.adaptive_min_limit, self.adaptive_initial_limit, self.adaptive_max_limit
        if low is not None and high is not None:
            expected = f"an integer no larger than ADAPTIVE_MAX_LIMIT ({high})"
            _check(own, "adaptive_min_limit", low, low <= high, expected)
        if first is not None:
            floor = 3 if low is None else low
            ok = floor <= first and (high is None or first <= high)
            expected = f"an integer from the adaptive minimum ({floor}) to ADAPTIVE_MAX_LIMIT ({high})"
            _check(own, "adaptive_initial_limit", first, ok, expected if high is not None else f"an integer >= {floor}")
        interval = self.outlier_interval
        _check(
            own,
            "outlier_interval",
            interval,
            _is_duration(interval),
            f"a duration greater than zero, {_DURATION_LIMIT}",
        )
        for name in _OUTLIER_PERCENTS:  # whole numbers, as Envoy's (50.0 is taken as 50)
            percent = getattr(self, name)
            ok = _is_number(percent) and 0 <= percent <= 100 and float(percent).is_integer()
            _check(own, name, percent, ok, "a whole percentage from 0 to 100 such as 85 or 85%")
            object.__setattr__(self, name, int(percent))
        for name in _OUTLIER_COUNTS:
            count = getattr(self, name)
            ok = _is_int(count) and 0 <= count <= MAX_COUNT
            _check(own, name, count, ok, f"an integer >= 0 (at most {MAX_COUNT:,})")
        _check(own, "hedge", self.hedge, isinstance(self.hedge, HedgeSettings), "a meshlib.resilience.HedgeSettings")
        age = self.max_connection_age
        ok = _is_duration(age, allow_zero=True)
        _check(own, "max_connection_age", age, ok, f"a duration, 0 for no maximum, {_DURATION_LIMIT}")
        jitter = self.max_connection_age_jitter
        ok = _is_number(jitter) and 0 <= jitter <= 0.5
        _check(own, "max_connection_age_jitter", jitter, ok, "a fraction from 0 to 0.5 such as 0.1, or up to 50%")

    def connection_age(self) -> ConnectionAge | None:
        """A new :class:`~meshlib._connection_age.ConnectionAge` for one service's pools (``None``: no maximum)."""
        if not self.max_connection_age:
            return None
        from meshlib._connection_age import ConnectionAge

        return ConnectionAge(self.max_connection_age, self.max_connection_age_jitter)

    @property
    def slow_start(self) -> SlowStart:
        """The balancer's :class:`~meshlib.balance.slow_start.SlowStart` from the ``slow_start_*`` fields."""
        from meshlib.balance.slow_start import SlowStart

        return SlowStart(self.slow_start_window, self.slow_start_aggression, self.slow_start_min_weight_percent)

    def adaptive_bounds(self) -> tuple[int, int, int]:
        """``(min, initial, max)`` of the adaptive limit: the fields set, the defaults (3, 20, ``max_inflight``)
        for the others, clamped so that min <= initial <= max. The fixed ``max_inflight`` is always the ceiling:
        a larger bound is lowered to it."""
        most = self.max_inflight if self.adaptive_max_limit is None else min(self.adaptive_max_limit, self.max_inflight)
        least = min(3 if self.adaptive_min_limit is None else self.adaptive_min_limit, most)
        start = 20 if self.adaptive_initial_limit is None else self.adaptive_initial_limit
        return least, min(max(start, least), most), most

    @property
    def outlier_success_rate(self) -> SuccessRateEjection | None:
        """The success-rate detector these settings ask for (``None``: off, enforcement 0)."""
        if not self.outlier_success_rate_enforcement_percent:
            return None
        return SuccessRateEjection(
            stdev_factor=self.outlier_success_rate_stdev_factor,
            enforcement_percentage=self.outlier_success_rate_enforcement_percent,
            minimum_hosts=self.outlier_success_rate_minimum_hosts,
            request_volume=self.outlier_success_rate_request_volume,
        )

    @property
    def outlier_failure_percentage(self) -> FailurePercentageEjection | None:
        """The failure-percentage detector these settings ask for (``None``: off, enforcement 0)."""
        if not self.outlier_failure_percentage_enforcement_percent:
            return None
        return FailurePercentageEjection(
            threshold=self.outlier_failure_percentage_threshold,
            enforcement_percentage=self.outlier_failure_percentage_enforcement_percent,
            minimum_hosts=self.outlier_failure_percentage_minimum_hosts,
            request_volume=self.outlier_failure_percentage_request_volume,
        )


_OUTLIER_PERCENTS = (
    "outlier_success_rate_enforcement_percent",
    "outlier_failure_percentage_enforcement_percent",
    "outlier_failure_percentage_threshold",
)
_OUTLIER_COUNTS = (
    "outlier_success_rate_minimum_hosts",
    "outlier_success_rate_request_volume",
    "outlier_success_rate_stdev_factor",
    "outlier_failure_percentage_minimum_hosts",
    "outlier_failure_percentage_request_volume",
)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """One mesh service: its logical name, discovery target, and settings that override the mesh defaults.

    ``variable`` is where the target came from (an environment variable or a constructor argument), so a
    bad target can be reported against it.
    """

    name: str
    target: str
    lb: str | None = None
    hash_header: str | None = None
    variable: str = ""
    #: This service's policy layer (``MESHLIB_SERVICE_<NAME>__TIMEOUT``...): set fields override the mesh's.
    policy: Policy | None = None
    #: This service's complete resilience settings, or ``None`` for the mesh-wide ones.
    resilience: ResilienceSettings | None = None
    #: This service's complete TLS settings (``MESHLIB_SERVICE_<NAME>__TLS_*`` over ``MESHLIB_TLS_*``), or
    #: ``None`` for the mesh-wide ones.
    tls: TLSSettings | None = None
    #: Send every call over TLS whatever the URL's scheme (``http://`` is upgraded to ``https://``): set for an
    #: xDS cluster whose control plane asks for upstream TLS (gRFC A29), so such a call never goes out in
    #: plaintext.
    tls_required: bool = False
    #: How long connecting to one endpoint may take (seconds; ``None``: bounded by the call's deadline only): a
    #: Consul resolver's ``ConnectTimeout``, Envoy's cluster ``connect_timeout``. A slow connect then fails over
    #: to another endpoint while the call still has time.
    connect_timeout: float | None = None

    def __post_init__(self) -> None:
        _check("ServiceConfig", "tls_required", self.tls_required, isinstance(self.tls_required, bool), "a bool")
        timeout = self.connect_timeout
        ok = timeout is None or (
            isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and 0 < timeout < float("inf")
        )
        _check("ServiceConfig", "connect_timeout", timeout, ok, "a finite number of seconds > 0, or None")
        header = self.hash_header
        ok = header is None or (isinstance(header, str) and is_header_name(header))
        _check("ServiceConfig", "hash_header", header, ok, HEADER_NAME_EXPECTED)


@dataclass(frozen=True, slots=True)
class MeshConfig:
    """All mesh settings of one client. Immutable; build it with :meth:`from_env`.

    Defaults and where they come from:

    * ``lb="p2c_ewma"`` -- Linkerd's and Finagle's default balancer (P2C over peak-EWMA latency).
    * ``ewma_decay=10 s``, ``default_rtt=30 ms`` -- Linkerd's peak-EWMA decay and its ``MIN_DEFAULT_RTT``.
    * ``ttl_min=5 s`` / ``ttl_max=300 s`` -- DNS answers are cached for their TTL clamped to this range
      (Envoy/Finagle poll every 5 s; Linkerd clamps TTLs the same way).
    * ``max_stale=3600 s`` -- how long the last good endpoint set keeps serving while discovery fails
      (Consul's agent cache serves stale for days; an hour bounds how wrong we can be).
    * ``dns_timeout=2 s`` -- one DNS query's lifetime, all nameservers included.
    * ``policy`` -- the mesh-wide call policy, :data:`~meshlib.policy.DEFAULT_POLICY` overridden by
      ``MESHLIB_TIMEOUT``, ``MESHLIB_RETRIES``...; always complete (every field set).
    * ``resilience`` -- the mesh-wide :class:`ResilienceSettings`.
    * ``tls`` -- the mesh-wide :class:`~meshlib.security.tls.TLSSettings` (``MESHLIB_TLS_*``), or ``None``:
      then services without TLS settings of their own connect with the client's httpx ``verify=``/``cert=``.
    * ``tls_reload_interval=5 s`` -- how often certificate files are checked for changes (0: never); see
      :data:`~meshlib.security.tls.DEFAULT_RELOAD_INTERVAL`.
    * ``admin_addr=None`` -- ``MESHLIB_ADMIN_ADDR``: the loopback ``(ip, port)`` of the admin endpoint
      (``/status``, ``/metrics``; see :mod:`meshlib.admin`), or ``None`` for none (the default).
    * ``propagate_to=()`` -- ``MESHLIB_PROPAGATE_TO``: hosts outside the mesh that may receive the mesh's
      trace, baggage and deadline headers (see :mod:`meshlib.telemetry.propagation`); none by default.
    * ``inner_transport="httpx"`` -- ``MESHLIB_INNER_TRANSPORT``: each endpoint's pooled transport, ``httpx``
      (``httpx.HTTPTransport`` / ``AsyncHTTPTransport``) or ``aiohttp`` (``httpx-aiohttp``, ``AsyncClient`` only,
      the ``aiohttp`` extra); a client's ``inner_transport=`` argument overrides it.
    * ``routes_file=None`` -- ``MESHLIB_ROUTES_FILE``: a file of Gateway API HTTPRoute documents, watched and
      hot-reloaded (:class:`meshlib.control.file.FileSource`); ``None``: no routes.
    * ``routes_reload_interval=1 s`` -- ``MESHLIB_ROUTES_RELOAD_INTERVAL``: how often the routes file is checked
      for a new version (one ``stat()``; 0: loaded once, never reloaded). 1 s is kubelet-ConfigMap-update
      scale and Envoy's file-based xDS reacts within that too.
    * ``namespace=None`` -- ``MESHLIB_NAMESPACE``: the client's own Kubernetes namespace (an RFC 1123 label),
      which Gateway API consumer routes (GAMMA) are matched against; ``None``: unknown.
    * ``xds=None`` -- ``MESHLIB_XDS``: ``"all"`` routes every host the xDS control plane (``GRPC_XDS_BOOTSTRAP``)
      has a Listener for, from a wildcard LDS subscription; other hosts pass through. ``None``: only services
      whose target is ``xds:///name`` are steered by xDS.
    * ``mirror_concurrency=16`` -- ``MESHLIB_MIRROR_CONCURRENCY``: mirrored requests (``RequestMirror``) one
      client keeps in flight; more are dropped and counted, so a slow or hung mirror never holds more
      (Envoy sends shadows without a limit; a bounded share of threads and sockets is the library's due).

    :meth:`policy_for` and :meth:`resilience_for` answer per service from tables built at construction.
    """

    services: Mapping[str, ServiceConfig] = field(default_factory=lambda: MappingProxyType({}))
    lb: str = "p2c_ewma"
    hash_header: str = "x-meshlib-hash-key"
    dns_servers: tuple[tuple[str, int], ...] | None = None
    dns_timeout: float = 2.0
    ttl_min: float = 5.0
    ttl_max: float = 300.0
    max_stale: float = 3600.0
    ewma_decay: float = 10.0
    default_rtt: float = 0.030
    policy: Policy = DEFAULT_POLICY
    resilience: ResilienceSettings = field(default_factory=ResilienceSettings)
    tls: TLSSettings | None = None
    tls_reload_interval: float = DEFAULT_RELOAD_INTERVAL
    admin_addr: tuple[str, int] | None = None
    propagate_to: tuple[str, ...] = ()
    inner_transport: str = "httpx"
    routes_file: str | None = None
    routes_reload_interval: float = 1.0
    namespace: str | None = None
    mirror_concurrency: int = 16
    xds: str | None = None
    #: The environment the settings were read from (``Client(environ=...)`` or ``os.environ``), for sources that
    #: read their own ecosystem's variables (``CONSUL_*``). Kept out of repr and comparisons: it holds secrets.
    environ: Mapping[str, str] | None = field(default=None, repr=False, compare=False)
    _service_policies: Mapping[str, Policy] = field(init=False, repr=False, compare=False)
    _service_resilience: Mapping[str, ResilienceSettings] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        transport = self.inner_transport
        ok = transport in INNER_TRANSPORTS
        _check("MeshConfig", "inner_transport", transport, ok, INNER_TRANSPORT_EXPECTED)
        header = self.hash_header
        _check(
            "MeshConfig",
            "hash_header",
            header,
            isinstance(header, str) and is_header_name(header),
            HEADER_NAME_EXPECTED,
        )
        for name in ("dns_timeout", "ttl_min", "ttl_max", "max_stale", "ewma_decay", "default_rtt"):
            seconds = getattr(self, name)
            _check(
                "MeshConfig", name, seconds, _is_duration(seconds), f"a duration greater than zero, {_DURATION_LIMIT}"
            )
        interval = self.tls_reload_interval
        ok = _is_duration(interval, allow_zero=True)
        _check("MeshConfig", "tls_reload_interval", interval, ok, f"a duration (0: never), {_DURATION_LIMIT}")
        routes = self.routes_file
        ok = routes is None or (isinstance(routes, str) and bool(routes) and control_character(routes) is None)
        _check("MeshConfig", "routes_file", routes, ok, FILE_PATH_EXPECTED)
        interval = self.routes_reload_interval
        ok = _is_duration(interval, allow_zero=True)
        _check("MeshConfig", "routes_reload_interval", interval, ok, f"a duration (0: never), {_DURATION_LIMIT}")
        mirrors = self.mirror_concurrency
        ok = _is_int(mirrors) and 1 <= mirrors <= 10_000
        _check("MeshConfig", "mirror_concurrency", mirrors, ok, "an integer from 1 to 10,000")
        namespace = self.namespace
        _check("MeshConfig", "namespace", namespace, namespace is None or is_namespace(namespace), NAMESPACE_EXPECTED)
        _check("MeshConfig", "xds", self.xds, self.xds in (None, "all"), XDS_MODE_EXPECTED)
        if not self.policy.complete:
            object.__setattr__(self, "policy", self.policy.resolved())
        policies = {key: self.policy.merge(svc.policy) for key, svc in self.services.items() if svc.policy is not None}
        resilience = {key: svc.resilience for key, svc in self.services.items() if svc.resilience is not None}
        object.__setattr__(self, "_service_policies", MappingProxyType(policies))
        object.__setattr__(self, "_service_resilience", MappingProxyType(resilience))

    def policy_for(self, key: str) -> Policy:
        """The complete call policy of service ``key`` (:func:`service_key` of the host): mesh ⊕ service layer."""
        return self._service_policies.get(key, self.policy)

    def resilience_for(self, key: str) -> ResilienceSettings:
        """The resilience settings of service ``key`` (:func:`service_key` of the host)."""
        return self._service_resilience.get(key, self.resilience)

    def tls_for(self, key: str) -> TLSSettings | None:
        """The TLS settings of service ``key``: its own, else the mesh-wide ones (``None``: none configured)."""
        svc = self.services.get(key)
        if svc is not None and svc.tls is not None:
            return svc.tls
        return self.tls

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        services: Mapping[str, str | ServiceConfig] | None = None,
        lb: str | None = None,
        dns_servers: str | list[str] | tuple[str, ...] | None = None,
        policy: Policy | None = None,
        tls: TLSSettings | None = None,
    ) -> MeshConfig:
        """Read ``MESHLIB_*`` from ``environ`` (default ``os.environ``); arguments given here win.

        ``policy`` overrides the set fields of the environment's mesh-wide policy (per-service variables
        still override it for their service). ``tls`` replaces the environment's mesh-wide ``MESHLIB_TLS_*``
        settings (per-service variables still apply on top of it).
        """
        # Imported when called, not at module level: the reader builds these classes, so it imports this module.
        from meshlib._config.env import mesh_config_from_env

        return mesh_config_from_env(
            cls, environ, services=services, lb=lb, dns_servers=dns_servers, policy=policy, tls=tls
        )

    def service(self, host: str) -> ServiceConfig | None:
        """The service a request host names, or ``None`` when the host is not in the mesh."""
        return self.services.get(service_key(host))
