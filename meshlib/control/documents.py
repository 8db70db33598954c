"""Bounded loading of the Kubernetes-style documents operators write (YAML or JSON): one loader for every file
meshlib reads (Gateway API routes, Istio ``AuthorizationPolicy``, Linkerd ``HTTPLocalRateLimitPolicy``).

Hostile or runaway input is refused before it costs much: at most :data:`MAX_TEXT` bytes, :data:`MAX_DOCUMENTS`
documents (a ``...List`` object's items count), :data:`MAX_DEPTH` levels of nesting and :data:`MAX_NODES` nodes
walked in all (a YAML alias counts every time it is reached, so an alias bomb is refused); mapping keys must be
strings. YAML is read with PyYAML's safe loader (its C version when built). Every error names the source, the
document (``document 2``, ``document 1 item 3``), the field path, the value (:func:`show`: repr, truncated, control
characters escaped) and what was expected, raised as the caller's own :class:`~meshlib.ConfigError` subclass.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, NoReturn, Protocol

from meshlib.errors import ConfigError

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENTS",
    "MAX_NODES",
    "MAX_TEXT",
    "SHOW_LIMIT",
    "Shown",
    "list_field",
    "load_documents",
    "show",
]

#: Limits on one source: refused above them.
MAX_TEXT = 4 * 1024 * 1024
MAX_DOCUMENTS = 1000
MAX_DEPTH = 64
MAX_NODES = 200_000

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: How many characters of a value an error shows.
SHOW_LIMIT = 100


class ErrorFactory(Protocol):
    """The error a parser raises: built from ``(source, document, path, value, expected)``."""

    def __call__(self, source: str, document: str, path: str, value: object, expected: str) -> ConfigError: ...


class Shown(str):
    """A value as shown in an error: truncated, control characters escaped (its repr is itself)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


def show(value: object) -> Shown:
    """``repr(value)`` fit for an error message: at most 100 characters, control characters escaped."""
    try:
        text = repr(value)
    except Exception:  # a repr that fails must not hide the real error
        text = f"<{type(value).__name__}>"
    if len(text) > SHOW_LIMIT:
        text = text[:SHOW_LIMIT] + "..."
    return Shown(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text))


class _Failing(Protocol):
    def fail(self, path: str, value: object, expected: str) -> NoReturn: ...


def list_field(doc: _Failing, path: str, value: object, max_items: int) -> list[Any]:
    """A list field of a document (``None`` reads as empty), at most ``max_items`` long; else ``doc.fail``."""
    if value is None:
        return []
    if not isinstance(value, list):
        doc.fail(path, value, "a list")
    if len(value) > max_items:
        doc.fail(path, f"{len(value)} items", f"at most {max_items} items")
    return value


def load_documents(text: str | bytes, source: str, *, error: ErrorFactory, what: str) -> list[tuple[str, Any]]:
    """The documents of ``text`` as ``(label, object)``: each JSON array item or YAML document one entry, and each
    item of a ``...List`` object (``kubectl get -o yaml``) one entry. Empty YAML documents are skipped. ``what``
    names the content in the size error (``routes``, ``policies``)."""
    size = len(text)
    if size > MAX_TEXT:
        raise error(source, "", "", show(f"{size} bytes"), f"at most {MAX_TEXT} bytes (4 MiB) of {what}")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(source, "", "", show(text[max(0, exc.start - 10) : exc.start + 10]), "UTF-8 text") from None
    stripped = text.lstrip("\ufeff \t\r\n")
    loaded: list[Any]
    try:
        if stripped.startswith(("{", "[")):
            value = json.loads(stripped)
            loaded = value if isinstance(value, list) else [value]
        else:
            loaded = _load_yaml(stripped, source, error)
    except RecursionError:
        raise error(source, "", "", show(text[:40]), f"nesting at most {MAX_DEPTH} deep") from None
    except json.JSONDecodeError as exc:
        raise error(source, "", f"line {exc.lineno} column {exc.colno}", show(exc.msg), "valid JSON") from None
    if len(loaded) > MAX_DOCUMENTS:
        raise error(source, "", "", show(f"{len(loaded)} documents"), f"at most {MAX_DOCUMENTS} documents")
    documents: list[tuple[str, Any]] = []
    budget = [MAX_NODES]
    for number, value in enumerate(loaded, 1):
        label = f"document {number}"
        _walk(value, 0, budget, (source, label, error))
        kind = value.get("kind") if isinstance(value, Mapping) else None
        if isinstance(kind, str) and kind.endswith("List") and isinstance(value.get("items"), list):
            for index, item in enumerate(value["items"], 1):
                documents.append((f"{label} item {index}", item))
                if len(documents) > MAX_DOCUMENTS:
                    raise error(source, label, "items", show(len(value["items"])), f"at most {MAX_DOCUMENTS} items")
        elif value is not None:  # an empty YAML document ("---" twice) is no document
            documents.append((label, value))
    return documents


def _load_yaml(text: str, source: str, error: ErrorFactory) -> list[Any]:
    import yaml  # only when a YAML source is read (import cost)

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    documents: list[Any] = []
    try:
        for document in yaml.load_all(text, Loader=loader):  # a safe loader
            documents.append(document)
            if len(documents) > MAX_DOCUMENTS:
                raise error(source, "", "", show(f"over {MAX_DOCUMENTS} documents"), f"at most {MAX_DOCUMENTS}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise error(source, f"document {len(documents) + 1}", where, show(problem), "valid YAML") from None
    return documents


def _walk(value: Any, depth: int, budget: list[int], where: tuple[str, str, ErrorFactory]) -> None:
    """Count every node walked (an alias counts each time it is reached) and bound the nesting depth;
    ``where``: the source, the document's label and the error to raise."""

    def fail(value: object, expected: str) -> NoReturn:
        source, label, error = where
        raise error(source, label, "", show(value), expected)

    budget[0] -= 1
    if budget[0] < 0:
        fail(f"over {MAX_NODES} nodes", f"at most {MAX_NODES} nodes in all (aliases counted each use)")
    if depth > MAX_DEPTH:
        fail(f"over {MAX_DEPTH} levels", f"nesting at most {MAX_DEPTH} deep")
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                fail(key, "string keys")
            _walk(item, depth + 1, budget, where)
    elif isinstance(value, list):
        for item in value:
            _walk(item, depth + 1, budget, where)
