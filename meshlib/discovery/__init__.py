"""Discovery: turn a service's target URI into a :class:`Resolver`, keyed by URI scheme.

This is grpc-go's ``resolver.Builder`` registry in miniature. A target such as ``dns+srv://_http._tcp.users``
is split at ``://``; the scheme picks a factory, and the factory parses the rest and builds the resolver.
Parsing happens here, at client construction, so a bad target fails early with a
:class:`~meshlib.errors.ConfigError` that names the variable, the value and the expected form; nothing is
validated on the request path.

Built-in schemes (see :data:`SCHEMES`):

* ``static://host:port[;weight=N][;zone=Z][,host:port...]`` -- a fixed list (:mod:`meshlib.discovery.static`)
* ``dns://name:port`` -- A and AAAA records (:mod:`meshlib.discovery.dns`)
* ``dns+srv://name`` -- SRV records, including Consul's DNS interface (:mod:`meshlib.discovery.dns`)
* ``consul://service`` -- Consul's health endpoint, watched (:mod:`meshlib.discovery.consul`)
* ``xds:///listener`` and ``consul+chain://service`` -- reached through a control plane's routes
  (:mod:`meshlib.control.xds.source`, :mod:`meshlib.control.consul.source`): placeholders, see
  :data:`CONTROL_PLANE_SCHEMES`

Another module adds a scheme with :func:`register_scheme`, without this package knowing about it. A scheme
is registered with its factory or with the factory's dotted path; the built-ins are registered by path, so
their modules (dnspython, the Consul client, asyncio) are imported when a service first uses the scheme,
not by ``import meshlib``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from meshlib._config.parse import redact_uri
from meshlib._lazy import check_dotted_path, load
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution, Resolver
from meshlib.errors import ConfigError

__all__ = [
    "CONTROL_PLANE_SCHEMES",
    "SCHEMES",
    "DiscoverySettings",
    "Endpoint",
    "Resolution",
    "Resolver",
    "ResolverFactory",
    "Target",
    "build_resolver",
    "register_scheme",
    "scheme_of",
]


@dataclass(frozen=True, slots=True)
class Target:
    """A target URI split at ``://``, handed to a scheme's factory with what it needs to report errors.

    ``scheme`` is lower-cased; ``rest`` is everything after ``://``, untouched (factories parse it).
    ``form`` is the scheme's documented shape, used in error messages.
    """

    service: str
    uri: str
    scheme: str
    rest: str
    variable: str
    form: str

    def invalid(self, expected: str) -> ConfigError:
        """A :class:`ConfigError` for this target: ``<variable>='<uri>' is invalid: expected <expected>``.

        Factories ``raise target.invalid("...")`` so every message names the variable and the whole URI, with
        any user info and secret query parameter (``token=``...) redacted (:func:`~meshlib._config.parse.redact_uri`).
        """
        return ConfigError(self.variable, redact_uri(self.uri), redact_uri(self.uri, f"{expected} (form: {self.form})"))


#: Builds a resolver for one service from its parsed target; raises ``target.invalid(...)`` on a bad target.
ResolverFactory = Callable[[Target, DiscoverySettings], Resolver]

#: scheme -> its factory, or the factory's dotted path (imported by the first :func:`build_resolver` using it).
_FACTORIES: dict[str, ResolverFactory | str] = {}
_FORMS: dict[str, str] = {}

#: Registered schemes -> their documented form (a live, read-only view; for docs and error messages).
SCHEMES: Mapping[str, str] = MappingProxyType(_FORMS)


def register_scheme(scheme: str, factory: ResolverFactory | str, *, form: str, replace: bool = False) -> None:
    """Make ``<scheme>://`` targets buildable by ``factory``.

    ``factory`` is the factory itself or its dotted path (``"mypackage.discovery.from_target"``); a path is
    imported when a target first uses the scheme (registering does not import it), so a scheme costs nothing
    until a service uses it. ``form`` documents the URI shape (``"consul://[agent:port]/service[?tag=t]"``);
    it appears in :data:`SCHEMES` and in error messages. Registering a scheme twice is a programming error
    unless ``replace=True`` (tests swapping in a fake). A malformed path raises :class:`ValueError`.
    """
    key = scheme.lower()
    if not key or "://" in key or not all(c.isalnum() or c in "+-." for c in key):
        raise ValueError(f"invalid URI scheme {scheme!r}")
    if isinstance(factory, str):
        check_dotted_path(factory)
    if key in _FACTORIES and not replace:
        raise ValueError(f"discovery scheme {key!r} is already registered")
    _FACTORIES[key] = factory
    _FORMS[key] = form


def _factory(key: str, entry: ResolverFactory | str) -> ResolverFactory:
    """A registered factory, importing it if it was registered by path."""
    if not isinstance(entry, str):
        return entry
    try:
        factory: ResolverFactory = load(entry)
    except ImportError as error:
        raise ImportError(
            f"discovery scheme {key}:// is registered as {entry!r}, which cannot be imported: {error}"
        ) from error
    return factory


def scheme_of(target: str) -> str:
    """The lower-cased scheme of a target URI (``""`` when it has none): what :func:`build_resolver` dispatches on."""
    scheme, sep, _ = target.partition("://")
    return scheme.lower() if sep else ""


def build_resolver(service: str, target: str, settings: DiscoverySettings, *, variable: str) -> Resolver:
    """The resolver for ``service`` described by the target URI ``target``.

    ``variable`` is where ``target`` came from (``MESHLIB_SERVICE_PAYMENTS`` or a constructor argument);
    any :class:`ConfigError` names it. Raises :class:`ConfigError` for a missing or unknown scheme and for
    whatever the scheme's factory rejects (bad host, port, weight, empty list...). The first target of a
    scheme registered by path imports its module (:class:`ImportError` if that fails).
    """
    known = ", ".join(f"{scheme}://" for scheme in sorted(_FORMS))
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme:
        raise ConfigError(variable, redact_uri(target), f"a discovery target URI with a scheme, one of {known}")
    key = scheme.lower()
    entry = _FACTORIES.get(key)
    if entry is None:
        raise ConfigError(variable, redact_uri(target), f"a known discovery scheme, one of {known} (got {scheme!r})")
    return _factory(key, entry)(Target(service, target, key, rest, variable, _FORMS[key]), settings)


# The built-in schemes, by path: each module is imported by the first target that uses it. The forms are
# the modules' FORM constants (tests/discovery/test_registry.py checks they agree).
register_scheme(
    "static", "meshlib.discovery.static.from_target", form="static://host:port[;weight=N][;zone=Z][,host:port...]"
)
register_scheme("dns", "meshlib.discovery.dns.from_target", form="dns://name:port")
register_scheme(
    "dns+srv",
    "meshlib.discovery.dns.srv_from_target",
    form="dns+srv://name, e.g. dns+srv://_http._tcp.users.internal or dns+srv://web.payments.service.consul",
)
register_scheme("xds", "meshlib.control.xds.source.from_target", form="xds:///listener-name")
register_scheme(
    "consul+chain",
    "meshlib.control.consul.source.from_target",
    form="consul+chain://service[?dc=dc1&ns=namespace&partition=partition]",
)

#: The schemes of services reached through a control plane's routes (placeholders: no endpoints of their own).
CONTROL_PLANE_SCHEMES: Final = frozenset({"xds", "consul+chain"})
register_scheme(
    "consul",
    "meshlib.discovery.consul.from_target",
    form="consul://service[?tag=t&dc=dc1&passing=true&near=_agent&wait=5m&stale=true]",
)
