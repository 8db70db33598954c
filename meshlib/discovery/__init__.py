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

Another module adds a scheme with :func:`register_scheme` (``consul://`` does), without this package
knowing about it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from meshlib.discovery import dns as _dns
from meshlib.discovery import static as _static
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolution, Resolver
from meshlib.errors import ConfigError

__all__ = [
    "SCHEMES",
    "DiscoverySettings",
    "Endpoint",
    "Resolution",
    "Resolver",
    "ResolverFactory",
    "Target",
    "build_resolver",
    "register_scheme",
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

        Factories ``raise target.invalid("...")`` so every message names the variable and the whole URI.
        """
        return ConfigError(self.variable, self.uri, f"{expected} (form: {self.form})")


#: Builds a resolver for one service from its parsed target; raises ``target.invalid(...)`` on a bad target.
ResolverFactory = Callable[[Target, DiscoverySettings], Resolver]

_FACTORIES: dict[str, ResolverFactory] = {}
_FORMS: dict[str, str] = {}

#: Registered schemes -> their documented form (a live, read-only view; for docs and error messages).
SCHEMES: Mapping[str, str] = MappingProxyType(_FORMS)


def register_scheme(scheme: str, factory: ResolverFactory, *, form: str, replace: bool = False) -> None:
    """Make ``<scheme>://`` targets buildable by ``factory``.

    ``form`` documents the URI shape (``"consul://[agent:port]/service[?tag=t]"``); it appears in
    :data:`SCHEMES` and in error messages. Registering a scheme twice is a programming error unless
    ``replace=True`` (tests swapping in a fake).
    """
    key = scheme.lower()
    if not key or "://" in key or not all(c.isalnum() or c in "+-." for c in key):
        raise ValueError(f"invalid URI scheme {scheme!r}")
    if key in _FACTORIES and not replace:
        raise ValueError(f"discovery scheme {key!r} is already registered")
    _FACTORIES[key] = factory
    _FORMS[key] = form


def build_resolver(service: str, target: str, settings: DiscoverySettings, *, variable: str) -> Resolver:
    """The resolver for ``service`` described by the target URI ``target``.

    ``variable`` is where ``target`` came from (``MESHLIB_SERVICE_PAYMENTS`` or a constructor argument);
    any :class:`ConfigError` names it. Raises :class:`ConfigError` for a missing or unknown scheme and for
    whatever the scheme's factory rejects (bad host, port, weight, empty list...).
    """
    known = ", ".join(f"{scheme}://" for scheme in sorted(_FORMS))
    scheme, sep, rest = target.partition("://")
    if not sep or not scheme:
        raise ConfigError(variable, target, f"a discovery target URI with a scheme, one of {known}")
    key = scheme.lower()
    factory = _FACTORIES.get(key)
    if factory is None:
        raise ConfigError(variable, target, f"a known discovery scheme, one of {known} (got {scheme!r})")
    return factory(Target(service, target, key, rest, variable, _FORMS[key]), settings)


register_scheme("static", _static.from_target, form=_static.FORM)
register_scheme("dns", _dns.from_target, form=_dns.FORM)
register_scheme("dns+srv", _dns.srv_from_target, form=_dns.SRV_FORM)

# consul:// registers like any other source; imported last because it builds on this module's Target.
from meshlib.discovery import consul as _consul  # noqa: E402

register_scheme("consul", _consul.from_target, form=_consul.FORM)
