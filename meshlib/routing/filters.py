"""Placeholder until the Gateway API filters land (the gwapi branch replaces this file)."""

from __future__ import annotations

from typing import Any

from meshlib.routing.model import HeaderModifier, PathModifier, RouteMatch


def modify(headers: Any, modifier: HeaderModifier) -> None:
    """Apply ``modifier`` to ``headers`` in place: set, add (appended as ``existing,new``), remove."""
    for name, value in modifier.set:
        headers[name] = value
    for name, value in modifier.add:
        existing = headers.get(name)
        headers[name] = value if existing is None else f"{existing},{value}"
    for name in modifier.remove:
        headers.pop(name, None)


def rewritten_path(path: str, match: RouteMatch, rewrite: PathModifier) -> str:
    """``path`` as a ``URLRewrite`` path modifier makes it."""
    if rewrite.kind == "ReplaceFullPath":
        return rewrite.value
    prefix = match.path.value.rstrip("/")
    rest = path[len(prefix) :]
    value = rewrite.value.rstrip("/")
    if not rest:
        return value or "/"
    return (value + rest) if rest.startswith("/") else (value + "/" + rest)


def redirect_location(
    *, scheme: str, host: str, port: int | None, path: str, query: str, match: RouteMatch, redirect: Any
) -> str:
    """The ``Location`` of a ``RequestRedirect`` (placeholder: scheme, host, port and full-path only)."""
    new_scheme = redirect.scheme or scheme
    new_host = redirect.hostname or host
    new_port = redirect.port
    new_path = path if redirect.path is None else rewritten_path(path, match, redirect.path)
    netloc = new_host if new_port is None else f"{new_host}:{new_port}"
    return f"{new_scheme}://{netloc}{new_path}" + (f"?{query}" if query else "")
