"""What HTTPRoute filters compute, as pure functions the request path calls (no I/O, no state).

* :func:`modify` -- ``RequestHeaderModifier`` / ``ResponseHeaderModifier`` on an httpx/httpx2 ``Headers``;
* :func:`rewritten_path` -- ``URLRewrite.path`` (and ``RequestRedirect.path``): the path the backend receives;
* :func:`redirect_location` -- ``RequestRedirect``: the ``Location`` of the redirect answer.

Semantics are the Gateway API spec's (``apis/v1/httproute_types.go``) as its conformance tests check them
(``conformance/tests/httproute-request-header-modifier``, ``-rewrite-path``, ``-redirect-*``).
"""

from __future__ import annotations

from typing import Any

from meshlib.routing.model import HeaderModifier, PathModifier, Redirect, RouteMatch

__all__ = ["modify", "redirect_location", "rewritten_path"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def modify(headers: Any, modifier: HeaderModifier) -> None:
    """Apply ``modifier`` to ``headers`` (an httpx/httpx2 ``Headers``) in place: ``set`` replaces every value of
    the header, ``add`` appends to what is there as one ``existing,new`` value (the conformance suite expects
    ``X-Header-Add: some-other-value,add-appends-values``), ``remove`` deletes; in that order. Names compare
    case-insensitively (``Headers`` does)."""
    for name, value in modifier.set:
        headers[name] = value
    for name, value in modifier.add:
        existing = headers.get_list(name)
        headers[name] = ",".join([*existing, value]) if existing else value
    for name in modifier.remove:
        if name in headers:
            del headers[name]


def _prefix_rest(path: str, match: RouteMatch) -> str | None:
    """The part of ``path`` after the rule's ``PathPrefix`` value (``None``: the match is not a prefix)."""
    if match.path.kind != "PathPrefix":
        return None
    prefix = match.path.value.rstrip("/")  # compiled without a trailing "/" already; "/" becomes ""
    return path[len(prefix) :] if path.startswith(prefix) else None


def rewritten_path(path: str, match: RouteMatch, rewrite: PathModifier) -> str:
    """The path after ``rewrite``: ``ReplaceFullPath`` gives its value; ``ReplacePrefixMatch`` replaces the
    whole segments the rule's ``PathPrefix`` matched, keeping one ``/`` between the replacement and the rest
    (the spec's table: ``/foo/bar`` with prefix ``/foo`` and replacement ``/xyz/`` or ``/xyz`` -> ``/xyz/bar``;
    replacement ``""`` or ``/`` -> ``/bar``; ``/foo`` -> ``/xyz``; ``/foo/`` -> ``/xyz/``). ``path`` is the
    path only (no query string: the caller keeps the query).

    A path match with a ``literal_prefix`` (a Consul router's ``PathPrefix``, Envoy's plain string ``prefix``)
    gets Envoy's ``prefix_rewrite`` instead: exactly those characters are replaced by the value, no ``/`` added
    or removed (``/admin`` -> ``/`` makes ``/admin/x`` ``//x``, as Envoy does)."""
    if rewrite.kind == "ReplaceFullPath":
        return rewrite.value
    literal = getattr(match.path, "literal_prefix", None)
    if literal is not None:  # Envoy's prefix_rewrite (Consul's router): the matched characters swapped, as they are
        return rewrite.value + path[len(literal) :] if path.startswith(literal) else path
    rest = _prefix_rest(path, match)
    if rest is None:  # the parser only allows ReplacePrefixMatch with one PathPrefix match; be safe anyway
        return path
    replacement = rewrite.value.rstrip("/")
    if not rest:
        return replacement or "/"
    # rest starts with "/" (prefix matches end on a segment boundary)
    return replacement + rest if replacement else rest


def redirect_location(  # noqa: PLR0917 (the signature the request path calls, positional as the URL reads)
    scheme: str,
    host: str,
    port: int | None,
    path: str,
    query: str,
    match: RouteMatch,
    redirect: Redirect,
) -> str:
    """The ``Location`` of a ``RequestRedirect`` answer to a request for ``scheme://host[:port]path?query``.

    Scheme, hostname and path come from ``redirect`` when it sets them, else from the request. The port, when
    ``redirect.port`` is not set: the redirect scheme's well-known port (80/443) when ``redirect.scheme`` is
    set, else the request's own (``port``; ``None`` means the request scheme's default). It is left out of the
    URL when it is the scheme's default (http and 80, https and 443), as the spec says. The query is kept.
    """
    new_scheme = redirect.scheme or scheme
    if redirect.port is not None:
        new_port: int | None = redirect.port
    elif redirect.scheme is not None:
        new_port = _DEFAULT_PORTS.get(redirect.scheme)
    else:
        new_port = port if port is not None else _DEFAULT_PORTS.get(scheme)
    new_host = redirect.hostname or host
    if ":" in new_host and not new_host.startswith("["):
        new_host = f"[{new_host}]"  # an IPv6 literal
    authority = new_host
    if new_port is not None and _DEFAULT_PORTS.get(new_scheme) != new_port:
        authority = f"{new_host}:{new_port}"
    new_path = path if redirect.path is None else rewritten_path(path, match, redirect.path)
    location = f"{new_scheme}://{authority}{new_path}"
    return f"{location}?{query}" if query else location
