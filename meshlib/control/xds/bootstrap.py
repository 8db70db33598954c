"""gRPC's xDS bootstrap, parsed and validated with gRPC's rules (gRFC A27, A29, A47, A65; ``xds_bootstrap_grpc.cc``).

Where it comes from (gRPC's precedence, C-core's ``GetBootstrapContents``): ``GRPC_XDS_BOOTSTRAP`` names a file; if
that variable is not set, ``GRPC_XDS_BOOTSTRAP_CONFIG`` holds the JSON itself; neither set: no xDS
(:func:`from_env` returns ``None``). A variable that is set but blank is an error, as it is in C-core (a blank path
cannot be read, blank JSON cannot be parsed): a bootstrap picks the control plane and its credentials, so a mistake
there must not quietly fall back to the other variable.

What is checked is what gRPC checks (field types, required fields, the first supported ``channel_creds``, the
``file_watcher`` and ``tls`` configs, authority templates), plus a few refusals of values gRPC accepts and then
fails on later (a blank ``server_uri``, a blank path, an ``xdstp:`` default template naming no authority, a
certificate file that does not exist). Unknown fields are ignored at every level, as gRPC's JSON loader ignores them;
so are ``call_creds`` and ``allowed_grpc_services`` (gRPC reads them only behind experimental variables). Every
error is a :class:`BootstrapError` (a :class:`~meshlib.ConfigError`) naming the variable and file, the field path
(``xds_servers[0].channel_creds[1].config``), the value (shown truncated and escaped) and what was expected.

Input is bounded before it costs much: at most :data:`MAX_BOOTSTRAP_BYTES`, nesting at most ``MAX_DEPTH`` deep,
:data:`MAX_NODES` JSON values, and node metadata at most :data:`MAX_METADATA_BYTES` once serialized.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, NoReturn
from urllib.parse import quote, urlsplit

from meshlib.control.documents import MAX_DEPTH, show
from meshlib.errors import ConfigError, SourceError

if TYPE_CHECKING:
    import grpc

__all__ = [
    "BOOTSTRAP_CONFIG_VARIABLE",
    "BOOTSTRAP_FILE_VARIABLE",
    "CLIENT_FEATURES",
    "MAX_BOOTSTRAP_BYTES",
    "MAX_METADATA_BYTES",
    "MAX_NODES",
    "SERVER_FEATURES",
    "Authority",
    "Bootstrap",
    "BootstrapError",
    "CertificateFiles",
    "CertificateProvider",
    "ChannelCreds",
    "ListenerTarget",
    "Locality",
    "Node",
    "XdsServer",
    "channel_for",
    "from_env",
    "parse_bootstrap",
]

logger = logging.getLogger("meshlib.control.xds")

BOOTSTRAP_FILE_VARIABLE: Final = "GRPC_XDS_BOOTSTRAP"
BOOTSTRAP_CONFIG_VARIABLE: Final = "GRPC_XDS_BOOTSTRAP_CONFIG"

#: Limits on one bootstrap (gRPC has none; real bootstraps are a few KiB).
MAX_BOOTSTRAP_BYTES: Final = 1024 * 1024
MAX_NODES: Final = 100_000
MAX_METADATA_BYTES: Final = 64 * 1024
MAX_SERVERS: Final = 32
MAX_CREDS: Final = 32
MAX_AUTHORITIES: Final = 1024
MAX_PROVIDERS: Final = 256

#: The ``server_features`` gRPC C-core acts on (A30 ``xds_v3`` is kept for information); others are dropped.
SERVER_FEATURES: Final = frozenset(
    {
        "xds_v3",
        "ignore_resource_deletion",  # A53
        "fail_on_data_errors",  # A88
        "resource_timer_is_transient_error",  # A88
        "trusted_xds_server",  # A81
    }
)
#: What the node tells the control plane this client supports, as gRPC's clients do: no EDS overprovisioning
#: factor, and resources wrapped in ``envoy.service.discovery.v3.Resource`` in state-of-the-world responses.
CLIENT_FEATURES: Final = ("envoy.lb.does_not_support_overprovisioning", "xds.config.resource-in-sotw")

#: ``channel_creds`` types gRPC knows, and which of them meshlib implements.
_GRPC_CREDS: Final = frozenset({"insecure", "tls", "google_default"})
_MESHLIB_CREDS: Final = frozenset({"insecure", "tls"})
_DEFAULT_REFRESH: Final = 600.0  # seconds (A29, A65)
_MIN_REFRESH: Final = 1.0  # C-core's kMinimumFileWatcherRefreshIntervalSeconds
_MAX_DURATION_SECONDS: Final = 315_576_000_000  # google.protobuf.Duration's range
_DURATION: Final = re.compile(r"(-?[0-9]+)(?:\.([0-9]*))?s")
_XDSTP: Final = "xdstp:"
#: Characters kept as they are when a name is put into an ``xdstp:`` path (RFC 3986 section 3.3's pchar and "/").
_PATH_SAFE: Final = "/:@!$&'()*+,;="


class BootstrapError(SourceError):
    """The xDS bootstrap is invalid: names the variable and file (``GRPC_XDS_BOOTSTRAP=/etc/mesh/bootstrap.json``),
    the field path (``xds_servers[0].channel_creds``), the value found (truncated, escaped) and what was expected.

    Raised when the bootstrap is read (:func:`from_env`, :func:`parse_bootstrap`): a client is never built on one.
    """

    def __init__(self, source: str, path: str, value: object, expected: str) -> None:
        super().__init__(source, "", path, value, expected)


@dataclass(frozen=True, slots=True)
class Locality:
    """Where this client runs (``node.locality``): sent to the control plane, used for locality-aware routing."""

    region: str = ""
    zone: str = ""
    sub_zone: str = ""


@dataclass(frozen=True, slots=True)
class Node:
    """The ``node`` the ADS client sends (Envoy's ``config.core.v3.Node``).

    ``id``, ``cluster``, ``locality`` and ``metadata`` come from the bootstrap; ``user_agent_name``,
    ``user_agent_version`` and ``client_features`` are the client's own, as gRPC fills them (a bootstrap
    cannot set them). ``metadata`` is a read-only JSON object (nested objects read-only mappings, arrays tuples).
    """

    id: str = ""
    cluster: str = ""
    locality: Locality = field(default_factory=Locality)
    metadata: Mapping[str, Any] = field(default_factory=lambda: types.MappingProxyType({}))
    user_agent_name: str = "meshlib"
    user_agent_version: str = ""
    client_features: tuple[str, ...] = CLIENT_FEATURES


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """PEM files (gRFC A29's ``file_watcher`` config, and A65's ``tls`` channel creds config: the same schema).

    ``None``: not given. ``certificate_file`` and ``private_key_file`` are both given or both not; every file named
    existed when the bootstrap was read. ``refresh_interval``: seconds between re-reads (default 600, at least 1
    as in C-core).
    """

    certificate_file: str | None = None
    private_key_file: str | None = None
    ca_certificate_file: str | None = None
    refresh_interval: float = _DEFAULT_REFRESH


@dataclass(frozen=True, slots=True)
class ChannelCreds:
    """The credentials chosen for a management server: the first entry of ``channel_creds`` whose type gRPC knows.

    ``type`` is ``insecure`` (plaintext, explicitly asked for) or ``tls`` (``tls`` holds its files; no files: server
    authentication against the system roots). ``listed`` is the whole ``channel_creds`` list's types, in order.
    """

    type: Literal["insecure", "tls"]
    tls: CertificateFiles | None = None
    listed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class XdsServer:
    """One management server (``xds_servers[i]``): its target URI, credentials and the known features it has."""

    server_uri: str
    channel_creds: ChannelCreds
    server_features: frozenset[str] = frozenset()

    @property
    def ignore_resource_deletion(self) -> bool:
        """gRFC A53: a Listener or Cluster the server stops sending keeps serving (not treated as deleted)."""
        return "ignore_resource_deletion" in self.server_features

    @property
    def trusted_xds_server(self) -> bool:
        """gRFC A81: security-affecting fields from this server are accepted."""
        return "trusted_xds_server" in self.server_features


@dataclass(frozen=True, slots=True)
class CertificateProvider:
    """A ``certificate_providers`` instance (gRFC A29); the one plugin gRPC has is ``file_watcher``."""

    name: str
    plugin_name: Literal["file_watcher"]
    files: CertificateFiles


@dataclass(frozen=True, slots=True)
class Authority:
    """An ``authorities`` entry (gRFC A47 federation).

    ``client_listener_resource_name_template`` starts with ``xdstp://<name>/`` (default
    ``xdstp://<name>/envoy.config.listener.v3.Listener/%s``); ``servers`` empty means the top-level servers.
    """

    name: str
    client_listener_resource_name_template: str
    servers: tuple[XdsServer, ...] = ()
    fallback_on_reachability_only: bool = False


@dataclass(frozen=True, slots=True)
class ListenerTarget:
    """What an ``xds:`` target subscribes to: the Listener resource name and the servers (in fallback order)
    that serve it; ``authority`` is the authority that chose them (``None``: the top-level servers)."""

    resource_name: str
    servers: tuple[XdsServer, ...]
    authority: str | None = None


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """A validated bootstrap (frozen; mappings read-only).

    ``servers`` are in fallback order (gRFC A71). ``source`` says where it came from
    (``GRPC_XDS_BOOTSTRAP=/etc/mesh/bootstrap.json`` or ``GRPC_XDS_BOOTSTRAP_CONFIG``).
    """

    servers: tuple[XdsServer, ...]
    node: Node
    certificate_providers: Mapping[str, CertificateProvider]
    server_listener_resource_name_template: str | None
    client_default_listener_resource_name_template: str
    authorities: Mapping[str, Authority]
    source: str

    def listener_for(self, target: str) -> ListenerTarget:
        """The Listener resource and servers for an ``xds:`` target, as gRPC's xds resolver derives them (A47).

        ``xds:///payments`` uses ``client_default_listener_resource_name_template``; ``xds://auth/payments``
        the template of authority ``auth``. ``%s`` is replaced by the target's path (percent-encoded when the
        template is an ``xdstp:`` name), and an ``xdstp:`` name's authority picks the servers.
        :class:`~meshlib.ConfigError` for a target that is not ``xds:`` or names an authority not in the bootstrap.
        """
        parts = urlsplit(target)
        if parts.scheme != "xds":
            raise ConfigError("xDS target", show(target), "an xds: URI such as xds:///payments")
        name = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc:
            authority = self.authorities.get(parts.netloc)
            if authority is None:
                known = ", ".join(sorted(self.authorities)) or "none"
                raise ConfigError(
                    "xDS target", show(target), f"an authority listed in {self.source}'s authorities ({known})"
                )
            template = authority.client_listener_resource_name_template
        else:
            template = self.client_default_listener_resource_name_template
        if not template.startswith(_XDSTP):
            return ListenerTarget(template.replace("%s", name), self.servers)
        resource = template.replace("%s", quote(name, safe=_PATH_SAFE))
        authority_name = urlsplit(resource).netloc
        chosen = self.authorities.get(authority_name)
        if chosen is None:  # checked at load for the default template; authority templates name themselves
            raise ConfigError("xDS target", show(target), f"an authority listed in {self.source}'s authorities")
        return ListenerTarget(resource, chosen.servers or self.servers, authority_name)


def from_env(environ: Mapping[str, str] | None = None) -> Bootstrap | None:
    """The bootstrap the environment names (``os.environ`` by default), or ``None`` when neither variable is set.

    ``GRPC_XDS_BOOTSTRAP`` (a file path) wins over ``GRPC_XDS_BOOTSTRAP_CONFIG`` (inline JSON) when both are set,
    as in gRPC. :class:`BootstrapError` when the one used is blank, unreadable or invalid.
    """
    env = os.environ if environ is None else environ
    path = env.get(BOOTSTRAP_FILE_VARIABLE)
    if path is not None:
        if BOOTSTRAP_CONFIG_VARIABLE in env:
            logger.info(
                "xDS bootstrap: %s is set, so %s is ignored", BOOTSTRAP_FILE_VARIABLE, BOOTSTRAP_CONFIG_VARIABLE
            )
        if not path.strip():
            raise BootstrapError(BOOTSTRAP_FILE_VARIABLE, "", show(path), "the path of the xDS bootstrap file")
        source = f"{BOOTSTRAP_FILE_VARIABLE}={path}"
        return parse_bootstrap(_read_file(path, source), source=source)
    inline = env.get(BOOTSTRAP_CONFIG_VARIABLE)
    if inline is not None:
        return parse_bootstrap(inline, source=BOOTSTRAP_CONFIG_VARIABLE)
    return None


def _read_file(path: str, source: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_BOOTSTRAP_BYTES + 1)
    except OSError as exc:
        raise BootstrapError(source, "", show(exc.strerror or str(exc)), "a readable xDS bootstrap file") from None
    return data


def parse_bootstrap(text: str | bytes, *, source: str) -> Bootstrap:
    """Parse and validate one bootstrap document; ``source`` names it in errors and in :attr:`Bootstrap.source`."""
    size = len(text)
    if size > MAX_BOOTSTRAP_BYTES:
        raise BootstrapError(source, "", show(f"over {MAX_BOOTSTRAP_BYTES} bytes"), "at most 1 MiB of bootstrap JSON")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BootstrapError(source, "", show(text[max(0, exc.start - 10) : exc.start + 10]), "UTF-8") from None
    try:
        document = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise BootstrapError(source, "", show(text[:40]), f"JSON nesting at most {MAX_DEPTH} deep") from None
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise BootstrapError(source, where, show(exc.msg), "a JSON object (the xDS bootstrap)") from None
    except _JSONRefused as exc:
        raise BootstrapError(source, "", show(exc.args[0]), exc.args[1]) from None
    return _Parser(source).bootstrap(document)


class _JSONRefused(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse a repeated key, as C-core's JSON reader does (Python keeps the last; the reader of another client
    might keep the first)."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _JSONRefused(key, "JSON objects without duplicate keys")
        result[key] = value
    return result


def _no_constant(name: str) -> NoReturn:
    raise _JSONRefused(name, "standard JSON (no NaN or Infinity)")


def _key(name: str) -> str:
    """A map key in a field path, as gRPC writes it: ``authorities["a"]``."""
    return json.dumps(name)


class _Parser:
    """One bootstrap's validation; ``fail`` raises the error naming ``source``."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.nodes = MAX_NODES

    def fail(self, path: str, value: object, expected: str) -> NoReturn:
        raise BootstrapError(self.source, path, show(value), expected)

    # -- shapes --------------------------------------------------------------------------------------------------

    def walk(self, value: Any, depth: int) -> None:
        self.nodes -= 1
        if self.nodes < 0:
            self.fail("", f"over {MAX_NODES} JSON values", f"at most {MAX_NODES} JSON values")
        if depth > MAX_DEPTH:
            self.fail("", f"over {MAX_DEPTH} levels", f"JSON nesting at most {MAX_DEPTH} deep")
        if isinstance(value, dict):
            for item in value.values():
                self.walk(item, depth + 1)
        elif isinstance(value, list):
            for item in value:
                self.walk(item, depth + 1)

    def obj(self, path: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            self.fail(path, value, "a JSON object")
        return value

    def array(self, path: str, value: object, limit: int) -> list[Any]:
        if not isinstance(value, list):
            self.fail(path, value, "a JSON array")
        if len(value) > limit:
            self.fail(path, f"{len(value)} items", f"at most {limit} items")
        return value

    def string(self, doc: Mapping[str, Any], key: str, path: str, *, required: bool = False) -> str | None:
        if key not in doc:
            if required:
                self.fail(f"{path}{key}", "(missing)", "a string (required)")
            return None
        value = doc[key]
        if not isinstance(value, str):
            self.fail(f"{path}{key}", value, "a JSON string")
        return value

    def path_field(self, doc: Mapping[str, Any], key: str, path: str) -> str | None:
        value = self.string(doc, key, path)
        if value is not None and not value.strip():
            self.fail(f"{path}{key}", value, "a file path (not blank)")
        return value

    def duration(self, doc: Mapping[str, Any], key: str, path: str) -> float | None:
        """A ``google.protobuf.Duration`` in its JSON form (``"600s"``, ``"1.5s"``), as C-core's loader reads it."""
        text = self.string(doc, key, path)
        if text is None:
            return None
        match = _DURATION.fullmatch(text)
        if match is None:
            self.fail(f"{path}{key}", text, 'a duration such as "600s" or "1.5s" (google.protobuf.Duration JSON)')
        seconds, fraction = int(match.group(1)), match.group(2) or ""
        if len(fraction) > 9:
            self.fail(f"{path}{key}", text, "a duration with at most 9 digits after the decimal point")
        if not 0 <= seconds <= _MAX_DURATION_SECONDS:
            self.fail(f"{path}{key}", text, f"a duration of 0 to {_MAX_DURATION_SECONDS} seconds")
        return seconds + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)

    # -- the document --------------------------------------------------------------------------------------------

    def bootstrap(self, document: object) -> Bootstrap:
        self.walk(document, 0)
        doc = self.obj("", document)
        if "xds_servers" not in doc:
            self.fail("xds_servers", "(missing)", "a non-empty array of xDS servers (required)")
        servers = self.servers(doc["xds_servers"], "xds_servers")
        if not servers:
            self.fail("xds_servers", [], "a non-empty array of xDS servers")
        node = self.node(doc["node"]) if "node" in doc else self.node({})
        providers = self.providers(doc.get("certificate_providers", {}))
        server_template = self.string(doc, "server_listener_resource_name_template", "")
        client_template = self.string(doc, "client_default_listener_resource_name_template", "") or "%s"
        authorities = self.authorities(doc.get("authorities", {}))
        if client_template.startswith(_XDSTP):
            name = urlsplit(client_template).netloc
            if name not in authorities:
                self.fail(
                    "client_default_listener_resource_name_template",
                    client_template,
                    f"an xdstp: name whose authority ({name!r}) is listed in authorities",
                )
        for ignored in ("call_creds", "allowed_grpc_services"):
            if ignored in doc:
                logger.warning("xDS bootstrap %s: %s is ignored (as gRPC does by default)", self.source, ignored)
        return Bootstrap(
            servers=servers,
            node=node,
            certificate_providers=types.MappingProxyType(providers),
            server_listener_resource_name_template=server_template,
            client_default_listener_resource_name_template=client_template,
            authorities=types.MappingProxyType(authorities),
            source=self.source,
        )

    def servers(self, value: object, path: str) -> tuple[XdsServer, ...]:
        return tuple(
            self.server(item, f"{path}[{index}]") for index, item in enumerate(self.array(path, value, MAX_SERVERS))
        )

    def server(self, value: object, path: str) -> XdsServer:
        doc = self.obj(path, value)
        uri = self.string(doc, "server_uri", f"{path}.", required=True)
        if not uri or not uri.strip():
            self.fail(f"{path}.server_uri", uri, "the management server's target URI (not blank)")
        creds = self.channel_creds(doc, f"{path}.channel_creds")
        features: set[str] = set()
        if "server_features" in doc:
            for feature in self.array(f"{path}.server_features", doc["server_features"], 64):
                if isinstance(feature, str) and feature in SERVER_FEATURES:  # others ignored, as gRPC does
                    features.add(feature)
        if "call_creds" in doc:
            logger.warning("xDS bootstrap %s: %s.call_creds is ignored (as gRPC does by default)", self.source, path)
        return XdsServer(server_uri=uri, channel_creds=creds, server_features=frozenset(features))

    def channel_creds(self, doc: Mapping[str, Any], path: str) -> ChannelCreds:
        """The first entry whose type gRPC knows, every known entry's config validated (as C-core does). A first
        known type meshlib does not implement (``google_default``) is refused, never skipped for a later entry:
        gRPC would use it, so skipping could downgrade the connection."""
        if "channel_creds" not in doc:
            self.fail(path, "(missing)", "an array of channel credentials (required)")
        entries = self.array(path, doc["channel_creds"], MAX_CREDS)
        chosen: ChannelCreds | None = None
        listed: list[str] = []
        for index, item in enumerate(entries):
            where = f"{path}[{index}]"
            entry = self.obj(where, item)
            kind = self.string(entry, "type", f"{where}.", required=True)
            assert kind is not None
            listed.append(kind)
            config = self.obj(f"{where}.config", entry["config"]) if "config" in entry else {}
            if kind not in _GRPC_CREDS:
                continue  # a type gRPC does not know: skipped, as gRPC does
            files = self.files(config, f"{where}.config.", provider=False) if kind == "tls" else None
            if chosen is not None:
                continue
            if kind not in _MESHLIB_CREDS:
                self.fail(
                    f"{where}.type",
                    kind,
                    "a channel_creds type meshlib supports ('insecure' or 'tls') as the first type gRPC knows: "
                    "gRPC would use this one, so meshlib will not fall through to a later entry",
                )
            if files is not None:
                self.check_exist(files, f"{where}.config.")
            chosen = ChannelCreds(type="tls" if kind == "tls" else "insecure", tls=files)
        if chosen is None:
            self.fail(path, listed, "at least one channel_creds type gRPC knows: 'insecure' or 'tls'")
        return ChannelCreds(type=chosen.type, tls=chosen.tls, listed=tuple(listed))

    def files(self, config: Mapping[str, Any], path: str, *, provider: bool) -> CertificateFiles:
        """A29's ``file_watcher`` config (``provider``) or A65's ``tls`` config: certificate and key both or
        neither; a provider needs a certificate or a CA certificate."""
        certificate = self.path_field(config, "certificate_file", path)
        key = self.path_field(config, "private_key_file", path)
        ca = self.path_field(config, "ca_certificate_file", path)
        refresh = self.duration(config, "refresh_interval", path)
        if (certificate is None) != (key is None):
            self.fail(
                path.rstrip("."),
                {k: config[k] for k in ("certificate_file", "private_key_file") if k in config},
                '"certificate_file" and "private_key_file" both set or both unset',
            )
        if provider and certificate is None and ca is None:
            self.fail(path.rstrip("."), dict(config), 'at least one of "certificate_file" and "ca_certificate_file"')
        interval = _DEFAULT_REFRESH if refresh is None else max(refresh, _MIN_REFRESH)
        return CertificateFiles(certificate, key, ca, interval)

    def check_exist(self, files: CertificateFiles, path: str) -> None:
        """Every file named exists now (meshlib's check: gRPC finds out at the first handshake)."""
        for key in ("certificate_file", "private_key_file", "ca_certificate_file"):
            name = getattr(files, key)
            if name is not None and not os.path.isfile(name):
                self.fail(f"{path}{key}", name, "an existing file")

    def node(self, value: object) -> Node:
        doc = self.obj("node", value)
        locality = Locality()
        if "locality" in doc:
            loc = self.obj("node.locality", doc["locality"])
            locality = Locality(
                region=self.string(loc, "region", "node.locality.") or "",
                zone=self.string(loc, "zone", "node.locality.") or "",
                sub_zone=self.string(loc, "sub_zone", "node.locality.") or "",
            )
        metadata: Mapping[str, Any] = types.MappingProxyType({})
        if "metadata" in doc:
            raw = self.obj("node.metadata", doc["metadata"])
            size = len(json.dumps(raw, separators=(",", ":")))
            if size > MAX_METADATA_BYTES:
                self.fail("node.metadata", f"{size} bytes of JSON", f"at most {MAX_METADATA_BYTES} bytes")
            frozen = _freeze(raw)
            assert isinstance(frozen, Mapping)
            metadata = frozen
        from meshlib import __version__  # not at import: meshlib/__init__ may be importing

        return Node(
            id=self.string(doc, "id", "node.") or "",
            cluster=self.string(doc, "cluster", "node.") or "",
            locality=locality,
            metadata=metadata,
            user_agent_name="meshlib",
            user_agent_version=f"{__version__} (Python {sys.version_info.major}.{sys.version_info.minor})",
        )

    def providers(self, value: object) -> dict[str, CertificateProvider]:
        doc = self.obj("certificate_providers", value)
        if len(doc) > MAX_PROVIDERS:
            self.fail("certificate_providers", f"{len(doc)} entries", f"at most {MAX_PROVIDERS}")
        providers: dict[str, CertificateProvider] = {}
        for name, item in doc.items():
            path = f"certificate_providers[{_key(name)}]"
            entry = self.obj(path, item)
            plugin = self.string(entry, "plugin_name", f"{path}.", required=True)
            if plugin != "file_watcher":
                self.fail(f"{path}.plugin_name", plugin, "'file_watcher' (the certificate provider gRPC has)")
            config = self.obj(f"{path}.config", entry["config"]) if "config" in entry else {}
            files = self.files(config, f"{path}.config.", provider=True)
            self.check_exist(files, f"{path}.config.")
            providers[name] = CertificateProvider(name=name, plugin_name="file_watcher", files=files)
        return providers

    def authorities(self, value: object) -> dict[str, Authority]:
        doc = self.obj("authorities", value)
        if len(doc) > MAX_AUTHORITIES:
            self.fail("authorities", f"{len(doc)} entries", f"at most {MAX_AUTHORITIES}")
        authorities: dict[str, Authority] = {}
        for name, item in doc.items():
            path = f"authorities[{_key(name)}]"
            entry = self.obj(path, item)
            prefix = f"xdstp://{name}/"
            template = self.string(entry, "client_listener_resource_name_template", f"{path}.")
            if not template:  # unset or empty: the default (C-core treats empty as unset)
                template = f"{prefix}envoy.config.listener.v3.Listener/%s"
            elif not template.startswith(prefix):
                self.fail(f"{path}.client_listener_resource_name_template", template, f'a name starting "{prefix}"')
            servers = self.servers(entry["xds_servers"], f"{path}.xds_servers") if "xds_servers" in entry else ()
            fallback = entry.get("fallback_on_reachability_only", False)
            if not isinstance(fallback, bool):
                self.fail(f"{path}.fallback_on_reachability_only", fallback, "true or false")
            authorities[name] = Authority(name, template, servers, fallback)
        return authorities


def _freeze(value: Any) -> Any:
    """A JSON value made read-only: objects become mapping proxies, arrays tuples."""
    if isinstance(value, dict):
        return types.MappingProxyType({key: _freeze(item) for key, item in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(item) for item in value)
    return value


def channel_for(server: XdsServer, *, options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
    """A gRPC channel to ``server`` with the credentials the bootstrap chose (the ``xds`` extra: grpcio).

    ``insecure``: :func:`grpc.insecure_channel`. ``tls``: :func:`grpc.secure_channel` with
    :func:`grpc.ssl_channel_credentials` built from the files read now (no CA file: gRPC's default roots; a
    certificate and key: mutual TLS). A file that cannot be read raises :class:`BootstrapError`; files are re-read
    when a new channel is made (the ADS client makes one per reconnect), which is how ``refresh_interval`` applies.
    """
    try:
        import grpc
    except ImportError as exc:  # pragma: no cover - the xds extra is installed in the test environment
        raise ImportError(f"xDS needs grpcio: pip install 'meshlib[xds]' ({exc})", name="grpc") from exc
    creds = server.channel_creds
    if creds.type == "insecure":
        return grpc.insecure_channel(server.server_uri, options=options)
    files = creds.tls or CertificateFiles()

    def read(key: str) -> bytes | None:
        name: str | None = getattr(files, key)
        if name is None:
            return None
        try:
            with open(name, "rb") as handle:
                return handle.read(MAX_BOOTSTRAP_BYTES)
        except OSError as exc:
            raise BootstrapError(
                server.server_uri, f"channel_creds.config.{key}", show(name), f"a readable file ({exc.strerror})"
            ) from None

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca_certificate_file"),
        private_key=read("private_key_file"),
        certificate_chain=read("certificate_file"),
    )
    return grpc.secure_channel(server.server_uri, credentials, options=options)
