"""CDS: validate an xDS ``Cluster`` as gRPC's proxyless client does and map it onto meshlib's settings.

:func:`validate_cluster` is a pure function: a ``envoy.config.cluster.v3.Cluster`` message in, a frozen
:class:`ClusterUpdate` out, or :class:`~meshlib.control.xds.resources.errors.XdsResourceError` naming the field
(the ADS client NACKs with it). The rules are gRPC's, field by field (gRPC validates what it supports, NACKs
unsupported *values* of supported fields, and ignores fields it does not know: ``doc/grpc_xds_features.md``):

* discovery type (gRFC A27, A37; grpc-go ``xdsresource/unmarshal_cds.go``): ``EDS`` with an ADS or self
  ``eds_config`` (``service_name`` required for ``xdstp:`` names), ``LOGICAL_DNS`` with exactly one locality of
  one endpoint with a host and a port, or ``cluster_type`` ``envoy.clusters.aggregate`` with a non-empty
  prioritized ``clusters`` list. ``STATIC`` (the proto default), ``STRICT_DNS``, ``ORIGINAL_DST`` and any other
  ``cluster_type`` are NACKed, as gRPC does.
* balancing: ``load_balancing_policy`` when set (gRFC A52: the first policy of the list meshlib supports;
  none supported is a NACK; at most 16 levels of ``wrr_locality`` nesting), else ``lb_policy``: ``ROUND_ROBIN``,
  ``RING_HASH`` (A42: ``XX_HASH`` only, ring sizes at most 8M and min <= max), ``LEAST_REQUEST`` (A48:
  ``choice_count`` >= 2, capped at 10); anything else is NACKed. meshlib's own balancers are reachable as
  custom policies: a ``xds.type.v3.TypedStruct`` (or ``udpa.type.v1.TypedStruct``) whose ``type_url`` is
  ``type.googleapis.com/meshlib.<name>`` (:data:`MESHLIB_POLICY_PREFIX`), e.g. ``meshlib.p2c_ewma``; gRPC
  uses the same convention (the part of the type URL after the last ``/`` names a registered policy) and
  skips the entry when it does not know the name, so a list ``[meshlib.p2c_ewma, round_robin]`` gives gRPC
  clients round robin and meshlib P2C.
* slow start (Envoy, not gRPC): ``round_robin_lb_config.slow_start_config`` with ``lb_policy: ROUND_ROBIN``,
  ``least_request_lb_config.slow_start_config`` with ``LEAST_REQUEST``, or the ``slow_start_config`` of a
  top-level ``RoundRobin`` / ``LeastRequest`` entry of ``load_balancing_policy`` (one nested in ``wrr_locality``
  is not read). Window a valid duration of at most 720 h, aggression's ``default_value`` above 0 (its
  ``runtime_key`` is ignored), ``min_weight_percent`` 0..100 (default 10); see :class:`SlowStartConfig`.
* ``circuit_breakers`` (A32): ``max_requests`` of the first ``DEFAULT``-priority threshold, default 1024.
* ``outlier_detection`` (A50): durations valid and >= 0, percentages <= 100; success-rate and
  failure-percentage settings with Envoy's defaults, applied by meshlib's detectors, and consecutive-failure
  ejection, which gRPC lacks. See :class:`OutlierSettings`.
* ``transport_socket`` (A29): ``envoy.transport_sockets.tls`` with an ``UpstreamTlsContext`` whose
  certificates come from certificate-provider instances (bootstrap ``certificate_providers``) and whose SAN
  matchers are kept; see :class:`UpstreamTls`.
* ``lrs_server``: must be ``self`` if set; recorded (meshlib does not report load).
* ``max_connection_duration`` of the cluster's ``common_http_protocol_options`` (in
  ``typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]``, else the
  deprecated ``Cluster.common_http_protocol_options``): the maximum age of the service's pooled connections
  (``ResilienceSettings.max_connection_age``, :mod:`meshlib._connection_age`), a valid duration, 0 or unset for none,
  capped at meshlib's longest duration. gRPC ignores the field; Envoy drains its upstream connections by it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from meshlib._config.model import MAX_COUNT, ResilienceSettings
from meshlib._config.parse import MAX_DURATION
from meshlib.control.xds.resources.errors import XdsResourceError
from meshlib.resilience.outlier import FailurePercentageEjection, SuccessRateEjection
from meshlib.security.tls import TLSSettings

#: A protobuf message of xds-protos (untyped: the package ships no stubs).
Proto = Any

__all__ = [
    "DEFAULT_MAX_REQUESTS",
    "MESHLIB_POLICY_PREFIX",
    "CertificateProviderRef",
    "ClusterUpdate",
    "FailurePercentageEjection",
    "OutlierSettings",
    "RingHashConfig",
    "SlowStartConfig",
    "StringMatcher",
    "SuccessRateEjection",
    "UpstreamTls",
    "validate_cluster",
]

#: gRFC A32: ``max_requests`` when the cluster sets none (Envoy's default too).
DEFAULT_MAX_REQUESTS = 1024
#: A ``TypedStruct``'s ``type_url`` for a meshlib balancer: this prefix then a name among meshlib's balancers.
MESHLIB_POLICY_PREFIX = "type.googleapis.com/meshlib."
#: The meshlib balancers a custom policy may name (``meshlib.config.LB_NAMES``).
_MESHLIB_BALANCERS = ("p2c_ewma", "least_request", "round_robin", "random", "ring_hash")

_AGGREGATE = "envoy.clusters.aggregate"
_AGGREGATE_URL = "type.googleapis.com/envoy.extensions.clusters.aggregate.v3.ClusterConfig"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_UPSTREAM_TLS_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_POLICY_URL = "type.googleapis.com/envoy.extensions.load_balancing_policies."
_ROUND_ROBIN_URL = _POLICY_URL + "round_robin.v3.RoundRobin"
_RING_HASH_URL = _POLICY_URL + "ring_hash.v3.RingHash"
_LEAST_REQUEST_URL = _POLICY_URL + "least_request.v3.LeastRequest"
_WRR_LOCALITY_URL = _POLICY_URL + "wrr_locality.v3.WrrLocality"
_CSWRR_URL = _POLICY_URL + "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin"
_TYPED_STRUCT_URLS = ("type.googleapis.com/xds.type.v3.TypedStruct", "type.googleapis.com/udpa.type.v1.TypedStruct")

_RING_DEFAULT_MIN = 1024  # A42 / grpc-go converter defaults
_RING_DEFAULT_MAX = 8 * 1024 * 1024
_RING_UPPER_BOUND = 8 * 1024 * 1024  # A42: larger sizes are NACKed
_CHOICE_DEFAULT, _CHOICE_MAX = 2, 10  # A48
_MAX_POLICY_DEPTH = 16  # A52
_UINT32_MAX = 2**32 - 1
_MAX_SNI = 255  # grpc-go maxSNILength
# google.protobuf.Duration's documented range (A50 requires durations to obey it).
_DURATION_MAX_SECONDS = 315_576_000_000


@dataclass(frozen=True, slots=True)
class RingHashConfig:
    """gRFC A42's ring sizes (defaults 1024 and 8M). Validated and kept; meshlib's ring sizes itself per
    endpoint weight (:mod:`meshlib.balance.ring_hash`), which already gives every endpoint >= 1024 points."""

    min_ring_size: int = _RING_DEFAULT_MIN
    max_ring_size: int = _RING_DEFAULT_MAX


#: Envoy's defaults for the rate detectors (immutable, shared).
_SR = SuccessRateEjection()
_FP = FailurePercentageEjection()


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    """A cluster's ``outlier_detection``, with Envoy's defaults for what it leaves unset.

    gRPC (A50) implements success-rate and failure-percentage ejection only and ignores ``consecutive_5xx``
    because gRPC status codes are not HTTP status codes. meshlib is an HTTP client and already ejects on
    consecutive failures (:mod:`meshlib.resilience.outlier`), so it honours ``consecutive_5xx`` (default 5)
    while ``enforcing_consecutive_5xx`` (default 100) is not 0: ``consecutive_failures`` is then that count,
    else ``None`` (consecutive ejection off). Any enforcement above 0 counts as 100 for consecutive ejection.
    ``success_rate`` / ``failure_percentage`` (:class:`~meshlib.resilience.outlier.SuccessRateEjection`,
    :class:`~meshlib.resilience.outlier.FailurePercentageEjection`) are ``None`` when their enforcement is 0
    (A50: failure percentage is off unless ``enforcing_failure_percentage`` is set above 0); they are applied,
    with ``interval``, by the service's outlier detector and the client's sweep, their enforcement as the
    probability of ejecting an outlier (A50).

    A ``base_ejection_time`` of 0 makes every ejection last 0 s, so consecutive ejection is off too.
    ``max_ejection_time`` below the base acts as the base (A50: ``min(base * n, max(base, max))``).
    """

    interval: float = 10.0
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejection_percent: int = 10
    consecutive_failures: int | None = 5
    success_rate: SuccessRateEjection | None = _SR
    failure_percentage: FailurePercentageEjection | None = None

    def apply(self, resilience: ResilienceSettings) -> ResilienceSettings:
        """``resilience`` with the outlier fields meshlib applies replaced by this cluster's.

        Consecutive ejection off (``consecutive_failures is None``) becomes a threshold of
        :data:`~meshlib._config.model.MAX_COUNT` failures, which is never reached; durations above meshlib's
        :data:`~meshlib._config.parse.MAX_DURATION` are clamped to it, and so is an ``interval`` of 0 to the
        smallest meshlib accepts (1 ms). A detector the cluster leaves off gets an enforcement of 0.
        """
        success_rate, failure_percentage = self.success_rate, self.failure_percentage
        failures = MAX_COUNT if self.consecutive_failures is None else min(self.consecutive_failures, MAX_COUNT)
        base = min(self.base_ejection, MAX_DURATION) if self.base_ejection > 0 else resilience.outlier_base_ejection
        most = max(base, min(self.max_ejection, MAX_DURATION))
        return dataclasses.replace(
            resilience,
            outlier_failures=failures,
            outlier_base_ejection=base,
            outlier_max_ejection=most,
            outlier_max_percent=float(self.max_ejection_percent),
            outlier_interval=min(max(self.interval, 0.001), MAX_DURATION),
            outlier_success_rate_enforcement_percent=success_rate.enforcement_percentage if success_rate else 0,
            outlier_success_rate_minimum_hosts=min((success_rate or _SR).minimum_hosts, MAX_COUNT),
            outlier_success_rate_request_volume=min((success_rate or _SR).request_volume, MAX_COUNT),
            outlier_success_rate_stdev_factor=min((success_rate or _SR).stdev_factor, MAX_COUNT),
            outlier_failure_percentage_enforcement_percent=(
                failure_percentage.enforcement_percentage if failure_percentage else 0
            ),
            outlier_failure_percentage_threshold=(failure_percentage or _FP).threshold,
            outlier_failure_percentage_minimum_hosts=min((failure_percentage or _FP).minimum_hosts, MAX_COUNT),
            outlier_failure_percentage_request_volume=min((failure_percentage or _FP).request_volume, MAX_COUNT),
        )


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """An ``envoy.type.matcher.v3.StringMatcher`` (grpc-go ``matcher.StringMatcherFromProto``): one of
    ``exact``, ``prefix``, ``suffix``, ``contains`` (the last three non-empty) or ``safe_regex`` (a full match;
    Python ``re`` syntax stands in for RE2), with ``ignore_case`` (not for regexes)."""

    kind: Literal["exact", "prefix", "suffix", "contains", "safe_regex"]
    value: str
    ignore_case: bool = False

    def matches(self, candidate: str) -> bool:
        """Whether ``candidate`` matches, as gRPC and Envoy match."""
        if self.kind == "safe_regex":
            return re.fullmatch(self.value, candidate) is not None
        value, text = (self.value.lower(), candidate.lower()) if self.ignore_case else (self.value, candidate)
        if self.kind == "exact":
            return text == value
        if self.kind == "prefix":
            return text.startswith(value)
        if self.kind == "suffix":
            return text.endswith(value)
        return value in text


@dataclass(frozen=True, slots=True)
class CertificateProviderRef:
    """A ``CertificateProviderPluginInstance``: a bootstrap ``certificate_providers`` instance by name, and
    the opaque certificate name passed to it (unused by the ``file_watcher`` plugin)."""

    instance_name: str
    certificate_name: str = ""


class _CertificateFiles(Protocol):
    """What :meth:`UpstreamTls.tls_settings` reads of a bootstrap provider (``bootstrap.CertificateFiles``)."""

    @property
    def certificate_file(self) -> str | None: ...
    @property
    def private_key_file(self) -> str | None: ...
    @property
    def ca_certificate_file(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """A cluster's TLS expectations (gRFC A29), from its ``UpstreamTlsContext``.

    ``root`` is the provider of the CAs that sign servers (``use_system_roots``: A82's ``system_root_certs``
    instead), ``identity`` the provider of the client certificate (``None``: TLS without a client
    certificate). ``san_matchers`` must accept one of the server certificate's SANs (none: any certificate
    the roots sign, as gRPC). ``server_id`` is the same expectation in meshlib's terms when it has one:
    a single exact SPIFFE ID (``spiffe://td/ns/x/sa/y``) or a single prefix ``spiffe://td/`` (any ID of the
    trust domain); ``server_name`` a single exact DNS name. ``sni`` is recorded (gRPC ignores it unless
    ``GRPC_EXPERIMENTAL_XDS_SNI`` is on).
    """

    root: CertificateProviderRef | None
    identity: CertificateProviderRef | None = None
    use_system_roots: bool = False
    san_matchers: tuple[StringMatcher, ...] = ()
    sni: str = ""
    server_id: str | None = None
    server_name: str | None = None

    def san_allowed(self, sans: Iterable[str]) -> bool:
        """Whether a server presenting ``sans`` passes the SAN check (always, with no matchers)."""
        names = tuple(sans)
        return not self.san_matchers or any(m.matches(n) for m in self.san_matchers for n in names)

    def tls_settings(self, providers: Mapping[str, _CertificateFiles]) -> TLSSettings:
        """The :class:`~meshlib.security.tls.TLSSettings` for this cluster, with the files of bootstrap
        certificate-provider instances ``providers`` (by instance name).

        Raises :class:`XdsResourceError` rather than weaken a check: a provider missing from ``providers``,
        a root provider without a CA file, or SAN matchers that ``server_id``/``server_name`` cannot express
        (the caller must then check :meth:`san_allowed` itself).
        """
        ca_file: str | None = None
        cert_file: str | None = None
        key_file: str | None = None
        if self.root is not None:
            roots = _provider(providers, self.root, "validation_context.ca_certificate_provider_instance")
            ca_file = roots.ca_certificate_file
            if ca_file is None:
                raise XdsResourceError(
                    "validation_context.ca_certificate_provider_instance",
                    f"certificate provider {self.root.instance_name!r} has no ca_certificate_file",
                )
        if self.identity is not None:
            files = _provider(providers, self.identity, "tls_certificate_provider_instance")
            cert_file, key_file = files.certificate_file, files.private_key_file
            if cert_file is None:
                raise XdsResourceError(
                    "tls_certificate_provider_instance",
                    f"certificate provider {self.identity.instance_name!r} has no certificate_file",
                )
        if self.san_matchers and self.server_id is None and self.server_name is None:
            raise XdsResourceError(
                "validation_context.match_subject_alt_names",
                f"{len(self.san_matchers)} matcher(s) that no single SPIFFE ID or DNS name expresses: "
                "check them with UpstreamTls.san_allowed",
            )
        return TLSSettings(
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            server_id=self.server_id,
            server_name=self.server_name,
        )


def _provider(providers: Mapping[str, _CertificateFiles], ref: CertificateProviderRef, path: str) -> _CertificateFiles:
    files = providers.get(ref.instance_name)
    if files is None:
        raise XdsResourceError(path, f"certificate provider instance {ref.instance_name!r} is not in the bootstrap")
    return files


@dataclass(frozen=True, slots=True)
class SlowStartConfig:
    """A cluster's ``slow_start_config`` (Envoy ``Cluster.SlowStartConfig``), applied as the service's
    ``slow_start_*`` resilience settings: ``window`` seconds, ``aggression`` (1.0), ``min_weight_percent`` (10)."""

    window: float
    aggression: float = 1.0
    min_weight_percent: float = 10.0


@dataclass(frozen=True, slots=True)
class ClusterUpdate:
    """A validated ``Cluster``, in meshlib's terms.

    * ``kind``: ``EDS`` (endpoints from the ``ClusterLoadAssignment`` named ``eds_service_name``, which is
      ``eds_cluster_config.service_name`` or else the cluster's name), ``LOGICAL_DNS`` (``dns_host`` /
      ``dns_port``: resolve that name, as meshlib's ``dns://`` discovery does), or ``AGGREGATE``
      (``aggregate_clusters``: child clusters in priority order, A37).
    * ``lb``: the meshlib balancer (``meshlib.balance``) name; ``lb_source`` the xDS policy it came from
      (``lb_policy`` enum name or the policy's type URL); ``ring_hash`` / ``choice_count`` its settings.
    * ``max_requests``: A32's limit of concurrent requests (``ResilienceSettings.max_inflight``).
    * ``outlier``: ``None`` when the cluster has no ``outlier_detection`` (then the service keeps its
      configured outlier settings; gRPC would do no outlier detection).
    * ``tls``: ``None`` for plaintext.
    * ``lrs_server``: the cluster asks for load reports to the management server (not sent by meshlib).
    * ``slow_start``: ``None`` when the cluster's policy sets no ``slow_start_config`` (the service keeps its
      configured slow start).
    """

    name: str
    kind: Literal["EDS", "LOGICAL_DNS", "AGGREGATE"]
    lb: str
    lb_source: str
    eds_service_name: str = ""
    dns_host: str = ""
    dns_port: int = 0
    aggregate_clusters: tuple[str, ...] = ()
    ring_hash: RingHashConfig | None = None
    choice_count: int | None = None
    max_requests: int = DEFAULT_MAX_REQUESTS
    outlier: OutlierSettings | None = None
    tls: UpstreamTls | None = None
    lrs_server: bool = False
    slow_start: SlowStartConfig | None = None
    max_connection_duration: float = 0.0

    def resilience(self, base: ResilienceSettings) -> ResilienceSettings:
        """``base`` with this cluster's ``max_requests`` (capped at meshlib's ``MAX_COUNT``), outlier settings, slow
        start and ``max_connection_duration`` (when the cluster sets one: then the service's jitter still applies)."""
        settings = dataclasses.replace(base, max_inflight=min(self.max_requests, MAX_COUNT))
        if self.slow_start is not None:
            settings = dataclasses.replace(
                settings,
                slow_start_window=self.slow_start.window,
                slow_start_aggression=self.slow_start.aggression,
                slow_start_min_weight_percent=self.slow_start.min_weight_percent,
            )
        if self.max_connection_duration:
            age = min(self.max_connection_duration, MAX_DURATION)
            settings = dataclasses.replace(settings, max_connection_age=age)
        return settings if self.outlier is None else self.outlier.apply(settings)


def validate_cluster(cluster: Proto, *, certificate_providers: Container[str] | None = None) -> ClusterUpdate:
    """Validate ``cluster`` as gRPC does and map it (module docstring); raise :class:`XdsResourceError`.

    ``certificate_providers``: the bootstrap's instance names; when given, a TLS context naming another
    instance is NACKed (gRPC C-core does so; A29).
    """
    if not cluster.name:
        raise XdsResourceError("name", "empty: a Cluster needs a name")
    lb, lb_source, ring, choice = _lb_policy(cluster)
    fields: dict[str, object] = {
        "name": cluster.name,
        "lb": lb,
        "lb_source": lb_source,
        "ring_hash": ring,
        "choice_count": choice,
        "max_requests": _max_requests(cluster),
        "outlier": _outlier(cluster) if cluster.HasField("outlier_detection") else None,
        "tls": _tls(cluster, certificate_providers),
        "slow_start": _slow_start(cluster, lb_source),
        "max_connection_duration": _max_connection_duration(cluster),
    }
    if cluster.HasField("lrs_server"):
        if not cluster.lrs_server.HasField("self"):
            which = cluster.lrs_server.WhichOneof("config_source_specifier")
            raise XdsResourceError("lrs_server", f"config source {which!r} unsupported: only 'self' (A27)")
        fields["lrs_server"] = True
    return ClusterUpdate(**_discovery(cluster), **fields)  # type: ignore[arg-type]


def _discovery(cluster: Proto) -> dict[str, object]:
    from envoy.config.cluster.v3.cluster_pb2 import Cluster as ClusterProto

    which = cluster.WhichOneof("cluster_discovery_type")
    if which == "cluster_type":
        custom = cluster.cluster_type
        if custom.name != _AGGREGATE:
            raise XdsResourceError("cluster_type.name", f"{custom.name!r} unsupported: only {_AGGREGATE!r} (A37)")
        from envoy.extensions.clusters.aggregate.v3.cluster_pb2 import ClusterConfig

        config = ClusterConfig()
        url = custom.typed_config.type_url
        if url != _AGGREGATE_URL or not custom.typed_config.Unpack(config):
            raise XdsResourceError("cluster_type.typed_config", f"type {url!r}: expected {_AGGREGATE_URL!r}")
        if not config.clusters:
            raise XdsResourceError("cluster_type.typed_config.clusters", "empty: an aggregate cluster needs clusters")
        for i, child in enumerate(config.clusters):
            if not child:
                raise XdsResourceError(f"cluster_type.typed_config.clusters[{i}]", "empty cluster name")
        return {"kind": "AGGREGATE", "aggregate_clusters": tuple(config.clusters)}
    kind = cluster.type
    if kind == ClusterProto.EDS:
        source = cluster.eds_cluster_config.eds_config
        if not (source.HasField("ads") or source.HasField("self")):
            which_source = source.WhichOneof("config_source_specifier")
            raise XdsResourceError(
                "eds_cluster_config.eds_config", f"config source {which_source!r} unsupported: 'ads' or 'self' (A27)"
            )
        service = cluster.eds_cluster_config.service_name
        if not service and cluster.name.startswith("xdstp:"):
            raise XdsResourceError("eds_cluster_config.service_name", "required with an xdstp: cluster name (A47)")
        return {"kind": "EDS", "eds_service_name": service or cluster.name}
    if kind == ClusterProto.LOGICAL_DNS:
        host, port = _logical_dns(cluster)
        return {"kind": "LOGICAL_DNS", "dns_host": host, "dns_port": port}
    name = ClusterProto.DiscoveryType.Name(kind)
    raise XdsResourceError("type", f"{name} unsupported: EDS, LOGICAL_DNS or an aggregate cluster_type (A27, A37)")


def _logical_dns(cluster: Proto) -> tuple[str, int]:
    """A37: exactly one locality with exactly one endpoint whose socket address has a host and a port."""
    if not cluster.HasField("load_assignment"):
        raise XdsResourceError("load_assignment", "required for a LOGICAL_DNS cluster (A37)")
    localities = cluster.load_assignment.endpoints
    if len(localities) != 1:
        raise XdsResourceError("load_assignment.endpoints", f"{len(localities)} localities: exactly 1 (A37)")
    lb_endpoints = localities[0].lb_endpoints
    path = "load_assignment.endpoints[0].lb_endpoints"
    if len(lb_endpoints) != 1:
        raise XdsResourceError(path, f"{len(lb_endpoints)} endpoints: exactly 1 (A37)")
    path += "[0].endpoint.address.socket_address"
    if not lb_endpoints[0].endpoint.address.HasField("socket_address"):
        raise XdsResourceError(path, "not set: a LOGICAL_DNS endpoint needs a socket address (A37)")
    socket = lb_endpoints[0].endpoint.address.socket_address
    if socket.resolver_name:
        raise XdsResourceError(f"{path}.resolver_name", f"{socket.resolver_name!r}: custom resolvers unsupported")
    if not socket.address:
        raise XdsResourceError(f"{path}.address", "empty: the host name to resolve (A37)")
    if socket.WhichOneof("port_specifier") != "port_value" or not socket.port_value:
        raise XdsResourceError(f"{path}.port_value", "not set: a port from 1 to 65535 (A37)")
    if socket.port_value > 65535:
        raise XdsResourceError(f"{path}.port_value", f"{socket.port_value}: a port from 1 to 65535")
    return socket.address, socket.port_value


def _lb_policy(cluster: Proto) -> tuple[str, str, RingHashConfig | None, int | None]:
    """(meshlib balancer, xDS source, ring sizes, choice count). A52: ``load_balancing_policy`` wins."""
    from envoy.config.cluster.v3.cluster_pb2 import Cluster as ClusterProto

    if cluster.HasField("load_balancing_policy"):
        return _policy_list(cluster.load_balancing_policy, "load_balancing_policy", 0)
    policy = cluster.lb_policy
    if policy == ClusterProto.ROUND_ROBIN:
        return "round_robin", "ROUND_ROBIN", None, None
    if policy == ClusterProto.RING_HASH:
        config = cluster.ring_hash_lb_config
        if config.hash_function != ClusterProto.RingHashLbConfig.XX_HASH:
            function = ClusterProto.RingHashLbConfig.HashFunction.Name(config.hash_function)
            raise XdsResourceError("ring_hash_lb_config.hash_function", f"{function} unsupported: XX_HASH only (A42)")
        ring = _ring_sizes(config, "ring_hash_lb_config")
        return "ring_hash", "RING_HASH", ring, None
    if policy == ClusterProto.LEAST_REQUEST:
        return (
            "least_request",
            "LEAST_REQUEST",
            None,
            _choice_count(cluster.least_request_lb_config, "least_request_lb_config"),
        )
    name = ClusterProto.LbPolicy.Name(policy)
    raise XdsResourceError("lb_policy", f"{name} unsupported: ROUND_ROBIN, RING_HASH or LEAST_REQUEST")


def _ring_sizes(config: object, path: str) -> RingHashConfig:
    low = config.minimum_ring_size.value if config.HasField("minimum_ring_size") else _RING_DEFAULT_MIN  # type: ignore[attr-defined]
    high = config.maximum_ring_size.value if config.HasField("maximum_ring_size") else _RING_DEFAULT_MAX  # type: ignore[attr-defined]
    if low > _RING_UPPER_BOUND:
        raise XdsResourceError(f"{path}.minimum_ring_size", f"{low}: at most {_RING_UPPER_BOUND} (A42)")
    if high > _RING_UPPER_BOUND:
        raise XdsResourceError(f"{path}.maximum_ring_size", f"{high}: at most {_RING_UPPER_BOUND} (A42)")
    low, high = low or _RING_DEFAULT_MIN, high or _RING_DEFAULT_MAX  # 0 means the default (grpc-go parseConfig)
    if low > high:
        raise XdsResourceError(f"{path}.minimum_ring_size", f"{low}: at most maximum_ring_size ({high}) (A42)")
    return RingHashConfig(low, high)


def _choice_count(config: object, path: str) -> int:
    count = config.choice_count.value if config.HasField("choice_count") else _CHOICE_DEFAULT  # type: ignore[attr-defined]
    if count < 2:
        raise XdsResourceError(f"{path}.choice_count", f"{count}: at least 2 (A48)")
    return min(count, _CHOICE_MAX)  # A48: above 10 is treated as 10


def _policy_list(policies: Proto, path: str, depth: int) -> tuple[str, str, RingHashConfig | None, int | None]:
    """A52: the first entry meshlib supports; an unknown type URL is skipped; none supported is a NACK."""
    if depth >= _MAX_POLICY_DEPTH:
        raise XdsResourceError(path, f"nested more than {_MAX_POLICY_DEPTH} levels deep (A52)")
    for i, entry in enumerate(policies.policies):
        typed = entry.typed_extension_config.typed_config
        where = f"{path}.policies[{i}].typed_extension_config.typed_config"
        chosen = _one_policy(typed.type_url, typed, where, depth)
        if chosen is not None:
            return chosen
    urls = [p.typed_extension_config.typed_config.type_url for p in policies.policies]
    raise XdsResourceError(f"{path}.policies", f"no supported policy among {urls} (A52)")


def _one_policy(
    url: str, typed: object, path: str, depth: int
) -> tuple[str, str, RingHashConfig | None, int | None] | None:
    from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
        client_side_weighted_round_robin_pb2 as cswrr,
    )
    from envoy.extensions.load_balancing_policies.least_request.v3.least_request_pb2 import LeastRequest
    from envoy.extensions.load_balancing_policies.ring_hash.v3.ring_hash_pb2 import RingHash
    from envoy.extensions.load_balancing_policies.wrr_locality.v3.wrr_locality_pb2 import WrrLocality

    def unpack(message: object) -> None:
        if not typed.Unpack(message):  # type: ignore[attr-defined]
            raise XdsResourceError(path, f"cannot be decoded as {url!r}")

    if url == _ROUND_ROBIN_URL:
        return "round_robin", url, None, None
    if url == _RING_HASH_URL:
        ring_hash = RingHash()
        unpack(ring_hash)
        if ring_hash.hash_function not in (RingHash.DEFAULT_HASH, RingHash.XX_HASH):
            function = RingHash.HashFunction.Name(ring_hash.hash_function)
            raise XdsResourceError(f"{path}.hash_function", f"{function} unsupported: XX_HASH only (A42)")
        return "ring_hash", url, _ring_sizes(ring_hash, path), None
    if url == _LEAST_REQUEST_URL:
        least = LeastRequest()
        unpack(least)
        return "least_request", url, None, _choice_count(least, path)
    if url == _WRR_LOCALITY_URL:
        wrr = WrrLocality()
        unpack(wrr)
        # Locality weights are applied by eds.py whatever the policy; the endpoint policy picks the balancer.
        return _policy_list(wrr.endpoint_picking_policy, f"{path}.endpoint_picking_policy", depth + 1)
    if url == _CSWRR_URL:
        unpack(cswrr.ClientSideWeightedRoundRobin())
        # Not yet mapped to meshlib's weighted_round_robin (which reads ORCA reports over HTTP): the policy's
        # settings (blackout, expiration, update period, penalty) would have to reach the service's balancer.
        # Until then A58 without reports: every endpoint has the mean weight, i.e. round robin over the weights.
        return "round_robin", url, None, None
    if url in _TYPED_STRUCT_URLS:
        from udpa.type.v1.typed_struct_pb2 import TypedStruct as TypedStructV1
        from xds.type.v3.typed_struct_pb2 import TypedStruct

        struct = TypedStruct() if url == _TYPED_STRUCT_URLS[0] else TypedStructV1()
        unpack(struct)
        name = struct.type_url.rsplit("/", 1)[-1]
        if name.startswith("meshlib.") and name.removeprefix("meshlib.") in _MESHLIB_BALANCERS:
            return name.removeprefix("meshlib."), struct.type_url, None, None
        return None  # gRPC: a custom policy it has not registered is skipped
    return None


def _max_requests(cluster: Proto) -> int:
    """A32: the first DEFAULT-priority threshold's ``max_requests``; 1024 when unset."""
    from envoy.config.core.v3.base_pb2 import RoutingPriority

    for i, threshold in enumerate(cluster.circuit_breakers.thresholds):
        if threshold.priority != RoutingPriority.DEFAULT:
            continue
        if not threshold.HasField("max_requests"):
            return DEFAULT_MAX_REQUESTS
        value = int(threshold.max_requests.value)
        if value == 0:
            # gRPC accepts 0 and then fails every request; meshlib NACKs it (keeping the last good cluster):
            # a limit of 0 is a control-plane mistake, and ResilienceSettings.max_inflight is >= 1.
            raise XdsResourceError(
                f"circuit_breakers.thresholds[{i}].max_requests", "0: at least 1 (0 would refuse every request)"
            )
        return value
    return DEFAULT_MAX_REQUESTS


_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def _max_connection_duration(cluster: Proto) -> float:
    """``common_http_protocol_options.max_connection_duration`` in seconds (0: unset), from the typed HTTP protocol
    options, else the deprecated ``Cluster.common_http_protocol_options``."""
    path = "common_http_protocol_options"
    options: Proto = None
    if _HTTP_OPTIONS in cluster.typed_extension_protocol_options:
        from envoy.extensions.upstreams.http.v3.http_protocol_options_pb2 import HttpProtocolOptions

        typed = cluster.typed_extension_protocol_options[_HTTP_OPTIONS]
        unpacked = HttpProtocolOptions()
        path = f"typed_extension_protocol_options[{_HTTP_OPTIONS!r}]"
        if not typed.Unpack(unpacked):
            raise XdsResourceError(path, f"type {typed.type_url!r}: expected type.googleapis.com/{_HTTP_OPTIONS}")
        path += ".common_http_protocol_options"
        if unpacked.HasField("common_http_protocol_options"):
            options = unpacked.common_http_protocol_options
    elif cluster.HasField("common_http_protocol_options"):
        options = cluster.common_http_protocol_options
    if options is None or not options.HasField("max_connection_duration"):
        return 0.0
    return _seconds(options.max_connection_duration, f"{path}.max_connection_duration")


def _seconds(duration: Proto, path: str) -> float:
    """A50: a valid ``google.protobuf.Duration`` (documented range, nanos' sign the seconds') and >= 0."""
    seconds, nanos = int(duration.seconds), int(duration.nanos)
    valid = abs(seconds) <= _DURATION_MAX_SECONDS and abs(nanos) < 1_000_000_000
    valid = valid and not (seconds > 0 > nanos or seconds < 0 < nanos)
    if not valid:
        raise XdsResourceError(path, f"{seconds}s {nanos}ns is not a valid google.protobuf.Duration (A50)")
    if seconds < 0 or nanos < 0:
        raise XdsResourceError(path, f"{seconds + nanos / 1e9}s: must be >= 0 (A50)")
    return seconds + nanos / 1e9


def _slow_start(cluster: Proto, lb_source: str) -> SlowStartConfig | None:
    """The ``slow_start_config`` of the policy chosen (module docstring), validated; ``None`` if it sets none."""
    if cluster.HasField("load_balancing_policy"):
        if lb_source not in (_ROUND_ROBIN_URL, _LEAST_REQUEST_URL):
            return None
        from envoy.extensions.load_balancing_policies.least_request.v3.least_request_pb2 import LeastRequest
        from envoy.extensions.load_balancing_policies.round_robin.v3.round_robin_pb2 import RoundRobin

        for i, entry in enumerate(cluster.load_balancing_policy.policies):
            typed = entry.typed_extension_config.typed_config
            if typed.type_url == lb_source:
                message = RoundRobin() if lb_source == _ROUND_ROBIN_URL else LeastRequest()
                typed.Unpack(message)  # decoded once already by _one_policy
                if not message.HasField("slow_start_config"):
                    return None
                path = f"load_balancing_policy.policies[{i}].typed_extension_config.typed_config.slow_start_config"
                return _slow_start_config(message.slow_start_config, path)
        return None  # chosen inside wrr_locality: not read
    if lb_source == "ROUND_ROBIN" and cluster.round_robin_lb_config.HasField("slow_start_config"):
        return _slow_start_config(
            cluster.round_robin_lb_config.slow_start_config, "round_robin_lb_config.slow_start_config"
        )
    if lb_source == "LEAST_REQUEST" and cluster.least_request_lb_config.HasField("slow_start_config"):
        config = cluster.least_request_lb_config.slow_start_config
        return _slow_start_config(config, "least_request_lb_config.slow_start_config")
    return None


def _slow_start_config(config: Proto, path: str) -> SlowStartConfig:
    """Envoy's ``SlowStartConfig``: window (unset: 0, off), ``aggression.default_value`` (unset: 1.0),
    ``min_weight_percent.value`` (unset: 10)."""
    from meshlib.balance.slow_start import slow_start_problem

    window = (
        _seconds(config.slow_start_window, f"{path}.slow_start_window") if config.HasField("slow_start_window") else 0.0
    )
    aggression = config.aggression.default_value if config.HasField("aggression") else 1.0
    percent = config.min_weight_percent.value if config.HasField("min_weight_percent") else 10.0
    problem = slow_start_problem(window, aggression, percent)
    if problem is not None:
        name, expected = problem
        field_path = {"window": "slow_start_window", "aggression": "aggression.default_value"}.get(
            name, "min_weight_percent.value"
        )
        value = {"window": window, "aggression": aggression}.get(name, percent)
        raise XdsResourceError(f"{path}.{field_path}", f"{value!r}: {expected}")
    return SlowStartConfig(window, aggression, percent)


def _outlier(cluster: Proto) -> OutlierSettings:
    """A50's validation and Envoy's defaults; see :class:`OutlierSettings` for the mapping."""
    od = cluster.outlier_detection

    def duration(name: str, default: float) -> float:
        return _seconds(getattr(od, name), f"outlier_detection.{name}") if od.HasField(name) else default

    def value(name: str, default: int, *, percent: bool = False) -> int:
        if not od.HasField(name):
            return default
        number = int(getattr(od, name).value)
        if percent and number > 100:
            raise XdsResourceError(f"outlier_detection.{name}", f"{number}: at most 100 (A50)")
        return number

    interval = duration("interval", 10.0)
    base = duration("base_ejection_time", 30.0)
    most = duration("max_ejection_time", 300.0)
    max_percent = value("max_ejection_percent", 10, percent=True)
    enforcing_sr = value("enforcing_success_rate", 100, percent=True)
    threshold = value("failure_percentage_threshold", 85, percent=True)
    enforcing_fp = value("enforcing_failure_percentage", 0, percent=True)
    # consecutive_5xx is ignored by gRPC; meshlib applies it (its consecutive-failure ejection).
    consecutive = value("consecutive_5xx", 5)
    enforcing_5xx = value("enforcing_consecutive_5xx", 100, percent=True)
    success_rate = None
    if enforcing_sr:
        success_rate = SuccessRateEjection(
            value("success_rate_stdev_factor", 1900),
            enforcing_sr,
            value("success_rate_minimum_hosts", 5),
            value("success_rate_request_volume", 100),
        )
    failure_percentage = None
    if enforcing_fp:
        failure_percentage = FailurePercentageEjection(
            threshold,
            enforcing_fp,
            value("failure_percentage_minimum_hosts", 5),
            value("failure_percentage_request_volume", 50),
        )
    on = enforcing_5xx > 0 and consecutive > 0 and base > 0
    return OutlierSettings(
        interval=interval,
        base_ejection=base,
        max_ejection=max(base, most),
        max_ejection_percent=max_percent,
        consecutive_failures=consecutive if on else None,
        success_rate=success_rate,
        failure_percentage=failure_percentage,
    )


def _tls(cluster: Proto, providers: Container[str] | None) -> UpstreamTls | None:
    """A29 (grpc-go ``securityConfigFromCluster``): the UpstreamTlsContext of ``transport_socket``."""
    if cluster.transport_socket_matches:
        raise XdsResourceError("transport_socket_matches", "unsupported (A29): use transport_socket")
    if not cluster.HasField("transport_socket"):
        return None
    socket = cluster.transport_socket
    if socket.name != _TLS_SOCKET:
        raise XdsResourceError("transport_socket.name", f"{socket.name!r}: expected {_TLS_SOCKET!r} (A29)")
    from envoy.extensions.transport_sockets.tls.v3.tls_pb2 import UpstreamTlsContext

    context = UpstreamTlsContext()
    url = socket.typed_config.type_url
    if url != _UPSTREAM_TLS_URL or not socket.typed_config.Unpack(context):
        raise XdsResourceError("transport_socket.typed_config", f"type {url!r}: expected {_UPSTREAM_TLS_URL!r} (A29)")
    path = "transport_socket.typed_config"
    if len(context.sni) > _MAX_SNI:
        raise XdsResourceError(f"{path}.sni", f"{len(context.sni)} characters: at most {_MAX_SNI}")
    if not context.HasField("common_tls_context"):
        raise XdsResourceError(f"{path}.common_tls_context", "not set: required (A29)")
    common = context.common_tls_context
    path += ".common_tls_context"
    for unsupported in ("tls_params", "custom_handshaker"):
        if common.HasField(unsupported):
            raise XdsResourceError(f"{path}.{unsupported}", "unsupported (A29)")
    identity = None
    if common.HasField("tls_certificate_provider_instance"):
        identity = _ref(
            common.tls_certificate_provider_instance, f"{path}.tls_certificate_provider_instance", providers
        )
    elif common.HasField("tls_certificate_certificate_provider_instance"):  # deprecated, still read by gRPC
        where = f"{path}.tls_certificate_certificate_provider_instance"
        identity = _ref(common.tls_certificate_certificate_provider_instance, where, providers)
    elif common.tls_certificates or common.tls_certificate_sds_secret_configs:
        which = "tls_certificates" if common.tls_certificates else "tls_certificate_sds_secret_configs"
        raise XdsResourceError(f"{path}.{which}", "unsupported: use tls_certificate_provider_instance (A29)")
    which = common.WhichOneof("validation_context_type")
    root: CertificateProviderRef | None = None
    system_roots = False
    matchers: tuple[StringMatcher, ...] = ()
    if which == "validation_context_certificate_provider_instance":  # deprecated form, still read by gRPC
        root = _ref(common.validation_context_certificate_provider_instance, f"{path}.{which}", providers)
    elif which in ("validation_context", "combined_validation_context"):
        if which == "validation_context":
            validation, where = common.validation_context, f"{path}.validation_context"
        else:
            combined = common.combined_validation_context
            validation = combined.default_validation_context
            where = f"{path}.combined_validation_context.default_validation_context"
            if combined.HasField("validation_context_certificate_provider_instance"):  # deprecated form
                deprecated = f"{path}.combined_validation_context.validation_context_certificate_provider_instance"
                root = _ref(combined.validation_context_certificate_provider_instance, deprecated, providers)
        checks = (
            ("verify_certificate_spki", bool(validation.verify_certificate_spki)),
            ("verify_certificate_hash", bool(validation.verify_certificate_hash)),
            ("require_signed_certificate_timestamp", validation.require_signed_certificate_timestamp.value),
            ("crl", validation.HasField("crl")),
            ("custom_validator_config", validation.HasField("custom_validator_config")),
            # Not in gRPC's list; refused rather than ignored, so a SAN check is never silently dropped.
            ("match_typed_subject_alt_names", bool(validation.match_typed_subject_alt_names)),
        )
        for name, present in checks:
            if present:
                raise XdsResourceError(f"{where}.{name}", "unsupported (A29)")
        if validation.HasField("ca_certificate_provider_instance"):
            where_ca = f"{where}.ca_certificate_provider_instance"
            root = _ref(validation.ca_certificate_provider_instance, where_ca, providers)
        elif validation.HasField("system_root_certs") and root is None:
            system_roots = True  # gRFC A82
        matchers = tuple(
            _string_matcher(m, f"{where}.match_subject_alt_names[{i}]")
            for i, m in enumerate(validation.match_subject_alt_names)
        )
    elif which is not None:
        raise XdsResourceError(f"{path}.{which}", "unsupported: use validation_context (A29)")
    if root is None and not system_roots:
        raise XdsResourceError(
            f"{path}.validation_context.ca_certificate_provider_instance",
            "not set: a client TLS context needs a root certificate provider (A29) or system_root_certs (A82)",
        )
    server_id, server_name = _identity_of(matchers)
    return UpstreamTls(root, identity, system_roots, matchers, context.sni, server_id, server_name)


def _ref(instance: object, path: str, providers: Container[str] | None) -> CertificateProviderRef:
    name: str = instance.instance_name  # type: ignore[attr-defined]
    if not name:
        raise XdsResourceError(f"{path}.instance_name", "empty: a bootstrap certificate_providers name (A29)")
    if providers is not None and name not in providers:
        raise XdsResourceError(f"{path}.instance_name", f"{name!r} is not in the bootstrap's certificate_providers")
    return CertificateProviderRef(name, instance.certificate_name)  # type: ignore[attr-defined]


def _string_matcher(matcher: Proto, path: str) -> StringMatcher:
    which = matcher.WhichOneof("match_pattern")
    if which is None:
        raise XdsResourceError(path, "no match_pattern: exact, prefix, suffix, contains or safe_regex")
    if which == "safe_regex":
        pattern = matcher.safe_regex.regex
        try:
            re.compile(pattern)
        except re.error as error:
            raise XdsResourceError(f"{path}.safe_regex.regex", f"{pattern!r} is not a valid regex: {error}") from None
        return StringMatcher("safe_regex", pattern)
    value: str = getattr(matcher, which)
    if which != "exact" and not value:
        raise XdsResourceError(f"{path}.{which}", "empty: not allowed in a StringMatcher")
    return StringMatcher(which, value, matcher.ignore_case)


def _identity_of(matchers: tuple[StringMatcher, ...]) -> tuple[str | None, str | None]:
    """(server_id, server_name) when one matcher says exactly what meshlib's TLSSettings can check."""
    if len(matchers) != 1 or matchers[0].ignore_case:
        return None, None
    matcher = matchers[0]
    from meshlib.security.identity import ExpectedIdentity

    if matcher.kind == "exact" and matcher.value.startswith("spiffe://"):
        try:
            expected = ExpectedIdentity.parse(matcher.value)
        except ValueError:
            return None, None
        return (None, None) if expected.trust_domain_only else (matcher.value, None)
    if matcher.kind == "prefix" and matcher.value.startswith("spiffe://") and matcher.value.count("/") == 3:
        domain = matcher.value.removesuffix("/")
        if matcher.value.endswith("/") and domain != "spiffe:/":
            try:
                ExpectedIdentity.parse(domain)
            except ValueError:
                return None, None
            return domain, None
        return None, None
    if matcher.kind == "exact" and matcher.value and "://" not in matcher.value and "/" not in matcher.value:
        return None, matcher.value
    return None, None
