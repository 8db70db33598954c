"""Consul's filter expressions (go-bexpr) over health entries, as a resolver subset's ``Filter`` uses them.

A ``service-resolver`` subset selects instances with a ``Filter`` such as ``Service.Meta.version == v2``; Consul
evaluates it on the server over each entry ``/v1/health/service/:name`` returns (``Node``, ``Service``,
``Checks``). meshlib evaluates the same expression itself (an emulator, a cache, a test) with
:func:`compile_filter`, which follows go-bexpr's grammar (``grammar/grammar.peg``) and evaluation
(``evaluate.go``) for the part Consul's health entries use:

* ``or``, ``and``, ``not`` (``not`` binds tightest, then ``and``, then ``or``), parentheses, the whole input
  in parentheses; keywords are lower-case and need whitespace around them (``==`` and ``!=`` do not);
* ``Selector == value``, ``!=``, ``contains``, ``not contains``, ``matches``, ``not matches`` (an RE2 regex,
  unanchored as Go's ``MatchString``), ``is empty``, ``is not empty``, ``value in Selector``, ``not in``;
* values: a bare word (read as a selector is: ``v2``, ``a.b``), a number (``-1``, ``2.5``), a ``"double
  quoted"`` string (Go escapes; it cannot hold ``"``, as in go-bexpr) or a ``\\`raw\\``` string;
* selectors: ``Service.ID``, ``Service.Service``, ``Service.Tags``, ``Service.Meta.<key>`` (also
  ``Service.Meta["key"]``), ``Service.Address``, ``Service.Port``, ``Service.Kind``, ``Service.Weights.Passing``
  / ``.Warning``, ``Service.EnableTagOverride``, ``Service.Connect.Native``, ``Service.Namespace``,
  ``Service.Partition``, ``Service.PeerName``, ``Service.SocketPath``, ``Service.TaggedAddresses`` (its keys),
  ``Node.ID``, ``Node.Node``, ``Node.Address``, ``Node.Datacenter``, ``Node.Partition``, ``Node.PeerName``,
  ``Node.Meta.<key>``, ``Node.TaggedAddresses.<key>``, ``Checks`` (``is empty`` / ``is not empty`` only);
* each operator only on the types go-bexpr allows it for (``==`` on strings, numbers and booleans; ``contains``
  on strings (substring), lists (an element) and maps (a key); ``is empty`` on strings, lists and maps;
  ``matches`` on strings), the value coerced to the field's type when the filter is compiled;
* a map key that is absent: ``==``, ``contains``, ``in``, ``matches`` and ``is not empty`` are false, their
  negations true (go-bexpr's ``NotPresentDisposition``).

Everything else is refused with :class:`BexprError` when the filter is compiled (JSON-pointer selectors,
selectors into ``Checks`` or ``Service.Proxy``, non-decimal integers, an operator on a type it does not apply
to): a filter meshlib cannot evaluate exactly is never evaluated approximately.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from meshlib.routing.re2 import Re2Error, compile_re2, shown

__all__ = ["MAX_EXPRESSION", "BexprError", "Filter", "compile_filter"]

#: The longest expression accepted (Consul has no limit; a filter is a few dozen characters).
MAX_EXPRESSION = 4096
#: The deepest nesting of parentheses and ``not`` accepted.
MAX_DEPTH = 64

FieldType = Literal["str", "int", "bool", "strlist", "strmap", "keys", "checks"]
Schema = Mapping[str, "FieldType | Schema"]

_SERVICE: Schema = {
    "ID": "str",
    "Service": "str",
    "Kind": "str",
    "Tags": "strlist",
    "Address": "str",
    "Meta": "strmap",
    "Port": "int",
    "SocketPath": "str",
    "Weights": {"Passing": "int", "Warning": "int"},
    "EnableTagOverride": "bool",
    "Connect": {"Native": "bool"},
    "Namespace": "str",
    "Partition": "str",
    "PeerName": "str",
    "TaggedAddresses": "keys",
}
_NODE: Schema = {
    "ID": "str",
    "Node": "str",
    "Address": "str",
    "Datacenter": "str",
    "Partition": "str",
    "PeerName": "str",
    "Meta": "strmap",
    "TaggedAddresses": "strmap",
}
#: The fields of a ``/v1/health/service`` entry meshlib evaluates (see the module docstring).
HEALTH_ENTRY: Schema = {"Node": _NODE, "Service": _SERVICE, "Checks": "checks"}

Op = Literal["==", "!=", "in", "not in", "matches", "not matches", "is empty", "is not empty"]
_OPS_BY_TYPE: Mapping[str, frozenset[str]] = {
    "str": frozenset({"==", "!=", "in", "not in", "matches", "not matches", "is empty", "is not empty"}),
    "int": frozenset({"==", "!="}),
    "bool": frozenset({"==", "!="}),
    "strlist": frozenset({"in", "not in", "is empty", "is not empty"}),
    "strmap": frozenset({"in", "not in", "is empty", "is not empty"}),
    "keys": frozenset({"in", "not in", "is empty", "is not empty"}),
    "checks": frozenset({"is empty", "is not empty"}),
}
#: go-bexpr's ``NotPresentDisposition``: the result of each operator on an absent map key.
_ABSENT: Mapping[str, bool] = {
    "==": False,
    "!=": True,
    "in": False,
    "not in": True,
    "matches": False,
    "not matches": True,
    "is empty": True,
    "is not empty": False,
}
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})
_IDENT = re.compile(r"[a-zA-Z][a-zA-Z0-9_]*")
_WS = re.compile(r"[ \t\r\n]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_INDEX_DIGITS = re.compile(r"\.([0-9]+)")
_DECIMAL = re.compile(r"[+-]?[0-9]+")
_GO_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\", '"': '"'}


class BexprError(ValueError):
    """A filter expression meshlib refuses: a syntax error, or something it does not evaluate.

    ``expression`` is the filter (quoted, bounded, in the message), ``where`` the field that held it
    (``Targets["v2.web.default.dc1"].Subset.Filter``), ``position`` the character offset of the problem.
    """

    def __init__(self, expression: str, position: int, message: str, where: str = "Filter") -> None:
        self.expression = expression
        self.position = position
        self.where = where
        super().__init__(f"{where}: {shown(expression)} at character {position}: {message}")


@dataclass(frozen=True, slots=True)
class _Match:
    """One match expression, compiled: the selector's path and type, the operator, the coerced value."""

    path: tuple[str, ...]
    kind: str
    map_key: str | None
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class _Not:
    operand: Node


@dataclass(frozen=True, slots=True)
class _Binary:
    op: Literal["and", "or"]
    left: Node
    right: Node


Node = _Match | _Not | _Binary


@dataclass(frozen=True, slots=True)
class Filter:
    """A compiled filter: :meth:`matches` says whether a health entry (the decoded JSON of one element of
    ``/v1/health/service/:name``) is selected. Immutable and thread-safe."""

    expression: str
    root: Node

    def matches(self, entry: Mapping[str, Any]) -> bool:
        """Whether ``entry`` meets the filter (fields the entry lacks read as Go's zero values)."""
        return _evaluate(self.root, entry)


def compile_filter(expression: str, *, where: str = "Filter") -> Filter:
    """``expression`` compiled, or :class:`BexprError` naming ``where``, the position and the problem."""
    if not isinstance(expression, str):
        raise BexprError(repr(expression), 0, "expected a string", where)
    if len(expression) > MAX_EXPRESSION:
        raise BexprError(expression, MAX_EXPRESSION, f"longer than {MAX_EXPRESSION} characters", where)
    return Filter(expression, _Parser(expression, where).parse())


class _Fail(Exception):
    """This alternative does not apply here (the PEG parser backtracks)."""


class _Parser:
    """A recursive-descent reading of go-bexpr's PEG grammar (same alternatives, same order)."""

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where
        self.pos = 0
        self.depth = 0

    def error(self, message: str, position: int | None = None) -> BexprError:
        return BexprError(self.text, self.pos if position is None else position, message, self.where)

    def parse(self) -> Node:
        self.ws()
        if self.pos >= len(self.text):
            raise self.error("empty expression")
        try:
            node = self.or_expr()
        except _Fail:
            raise self.error("expected a match expression (selector, operator, value)") from None
        self.ws()
        if self.pos != len(self.text):
            raise self.error(f"unexpected {shown(self.text[self.pos : self.pos + 20])}")
        return node

    # -- lexical helpers --
    def ws(self) -> bool:
        found = _WS.match(self.text, self.pos)
        if found is None:
            return False
        self.pos = found.end()
        return True

    def keyword(self, *words: str) -> bool:
        """``_ w1 _ w2 ...`` (whitespace before each word); the position is kept only if all are there."""
        start = self.pos
        for word in words:
            if not self.ws() or not self.text.startswith(word, self.pos):
                self.pos = start
                return False
            self.pos += len(word)
        return True

    # -- grammar --
    def or_expr(self) -> Node:
        left = self.and_expr()
        start = self.pos
        if self.keyword("or") and self.ws():
            return _Binary("or", left, self.or_expr())
        self.pos = start
        return left

    def and_expr(self) -> Node:
        left = self.not_expr()
        start = self.pos
        if self.keyword("and") and self.ws():
            return _Binary("and", left, self.and_expr())
        self.pos = start
        return left

    def nested(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested deeper than {MAX_DEPTH} levels")

    def not_expr(self) -> Node:
        start = self.pos
        if self.text.startswith("not", self.pos):
            self.pos += 3
            if self.ws():
                self.nested()
                try:
                    operand = self.not_expr()
                except _Fail:
                    pass
                else:
                    self.depth -= 1
                    return operand.operand if isinstance(operand, _Not) else _Not(operand)
                self.depth -= 1
            self.pos = start
        return self.paren_expr()

    def paren_expr(self) -> Node:
        if self.text.startswith("(", self.pos):
            open_at = self.pos
            self.pos += 1
            self.nested()
            self.ws()
            node = self.or_expr()
            self.ws()
            if not self.text.startswith(")", self.pos):
                raise self.error("unmatched parentheses", open_at)
            self.pos += 1
            self.depth -= 1
            return node
        return self.match_expr()

    def match_expr(self) -> Node:
        start = self.pos
        selector = self.selector()
        if selector is not None:
            path, at = selector
            op = self.operator_after_selector()
            if op in ("is empty", "is not empty"):
                return self.compile_match(path, at, op, None)
            if op is not None:
                value = self.value()
                if value is None:
                    raise self.error(f"expected a value after {op!r}")
                return self.compile_match(path, at, op, value)
        self.pos = start
        value = self.value()
        if value is not None:
            if self.keyword("in") and self.ws():
                op = "in"
            elif self.keyword("not", "in") and self.ws():
                op = "not in"
            else:
                self.pos = start
                raise _Fail
            selector = self.selector()
            if selector is None:
                raise self.error("invalid selector")
            return self.compile_match(selector[0], selector[1], op, value)
        self.pos = start
        raise _Fail

    def operator_after_selector(self) -> str | None:
        start = self.pos
        self.ws()
        for symbol in ("==", "!="):
            if self.text.startswith(symbol, self.pos):
                self.pos += len(symbol)
                self.ws()
                return symbol
        self.pos = start
        for words, op in (
            (("contains",), "in"),
            (("not", "contains"), "not in"),
            (("matches",), "matches"),
            (("not", "matches"), "not matches"),
        ):
            if self.keyword(*words):
                if self.ws():
                    return op
                self.pos = start
        if self.keyword("is", "empty"):
            return "is empty"
        if self.keyword("is", "not", "empty"):
            return "is not empty"
        return None

    def selector(self) -> tuple[tuple[str, ...], int] | None:
        """A bexpr selector (``Service.Meta.version``, ``Service.Meta["a-b"]``, ``Checks.0``), or ``None``."""
        at = self.pos
        if self.text.startswith('"/', self.pos):
            raise self.error("JSON-pointer selectors are not supported")
        first = _IDENT.match(self.text, self.pos)
        if first is None:
            return None
        parts = [first.group()]
        self.pos = first.end()
        while True:
            if self.text.startswith(".", self.pos):
                ident = _IDENT.match(self.text, self.pos + 1)
                if ident is not None:
                    parts.append(ident.group())
                    self.pos = ident.end()
                    continue
                digits = _INDEX_DIGITS.match(self.text, self.pos)
                if digits is not None:
                    parts.append(digits.group(1))
                    self.pos = digits.end()
                    continue
                break
            if self.text.startswith("[", self.pos):
                self.pos += 1
                self.ws()
                literal = self.string()
                if literal is None:
                    raise self.error("invalid index")
                self.ws()
                if not self.text.startswith("]", self.pos):
                    raise self.error("unclosed index expression")
                self.pos += 1
                parts.append(literal)
                continue
            break
        return tuple(parts), at

    def value(self) -> str | None:
        """A value's raw text: a selector (joined with ``.``), a number, or a string literal."""
        selector = self.selector()
        if selector is not None:
            return ".".join(selector[0])
        number = _NUMBER.match(self.text, self.pos)
        if number is not None:
            end = number.end()
            if end < len(self.text) and self.text[end] not in " \t\r\n)":
                raise self.error("invalid number literal")
            self.pos = end
            return number.group()
        return self.string()

    def string(self) -> str | None:
        """A ```raw``` or ``"double-quoted"`` literal (Go's ``strconv.Unquote``), or ``None``."""
        text = self.text
        if self.pos >= len(text) or text[self.pos] not in '`"':
            return None
        quote = text[self.pos]
        end = text.find(quote, self.pos + 1)
        if end < 0:
            raise self.error("unterminated string literal")
        body = text[self.pos + 1 : end]
        start = self.pos
        self.pos = end + 1
        if quote == "`":
            return body.replace("\r", "")  # Go drops carriage returns from raw strings
        return self.unquote(body, start + 1)

    def unquote(self, body: str, offset: int) -> str:
        if "\\" not in body:
            if "\n" in body:
                raise self.error("newline in string literal", offset)
            return body
        out: list[str] = []
        i = 0
        while i < len(body):
            char = body[i]
            if char == "\n":
                raise self.error("newline in string literal", offset + i)
            if char != "\\":
                out.append(char)
                i += 1
                continue
            if i + 1 >= len(body):
                raise self.error("invalid escape in string literal", offset + i)
            code = body[i + 1]
            if code in _GO_ESCAPES:
                out.append(_GO_ESCAPES[code])
                i += 2
                continue
            widths = {"x": 2, "u": 4, "U": 8}
            if code in widths:
                digits = body[i + 2 : i + 2 + widths[code]]
                if len(digits) != widths[code] or not all(c in "0123456789abcdefABCDEF" for c in digits):
                    raise self.error("invalid escape in string literal", offset + i)
                number = int(digits, 16)
                if code != "x" and (number > 0x10FFFF or 0xD800 <= number <= 0xDFFF):
                    raise self.error("invalid Unicode escape in string literal", offset + i)
                if code == "x" and number > 0x7F:
                    raise self.error("\\x escapes of bytes above 0x7f are not supported", offset + i)
                out.append(chr(number))
                i += 2 + widths[code]
                continue
            if code in "01234567":
                digits = body[i + 1 : i + 4]
                if len(digits) != 3 or not all(c in "01234567" for c in digits) or int(digits, 8) > 0x7F:
                    raise self.error("octal escapes other than \\000..\\177 are not supported", offset + i)
                out.append(chr(int(digits, 8)))
                i += 4
                continue
            raise self.error(f"invalid escape \\{code} in string literal", offset + i)
        return "".join(out)

    # -- typing --
    def compile_match(self, path: tuple[str, ...], at: int, op: str, raw: str | None) -> _Match:
        """Resolve the selector against :data:`HEALTH_ENTRY`, check the operator, coerce the value."""
        schema: Any = HEALTH_ENTRY
        walked: list[str] = []
        kind: str | None = None
        for part in path:
            if not isinstance(schema, Mapping) or part not in schema:
                break
            walked.append(part)
            found = schema[part]
            if isinstance(found, str):
                kind = found
                break
            schema = found
        rest = path[len(walked) :]
        map_key = None
        if kind == "strmap" and len(rest) == 1:
            map_key, kind = rest[0], "str"
        elif kind is None or rest:
            raise self.error(f"selector {shown('.'.join(path))} is not a field meshlib evaluates", at)
        if op not in _OPS_BY_TYPE[kind]:
            shown_op = {"in": "in/contains", "not in": "not in/not contains"}.get(op, op)
            raise self.error(f"{shown_op!r} does not apply to {shown('.'.join(path))} ({kind})", at)
        value: Any = raw
        if raw is not None and kind == "int":
            if _DECIMAL.fullmatch(raw) is None:
                raise self.error(f"{shown(raw)} is not a decimal integer (for {'.'.join(path)})", at)
            value = int(raw)
        elif raw is not None and kind == "bool":
            if raw not in _TRUE and raw not in _FALSE:
                raise self.error(f"{shown(raw)} is not a boolean (for {'.'.join(path)})", at)
            value = raw in _TRUE
        elif raw is not None and op in ("matches", "not matches"):
            try:
                value = compile_re2(raw, f"{self.where} (regex)")
            except Re2Error as error:
                raise self.error(error.message, at) from None
        return _Match(tuple(walked), kind, map_key, op, value)


# -- evaluation -----------------------------------------------------------------------------------------------------


def _zero(kind: str) -> Any:
    return {"str": "", "int": 0, "bool": False, "strlist": [], "checks": []}.get(kind, {})


def _lookup(entry: Mapping[str, Any], match: _Match) -> tuple[bool, Any]:
    """(present, value) of the selector in ``entry``; absent only for a map key that is not there. A field the
    entry lacks (or holds ``null``) reads as Go's zero value, as the decoded struct would."""
    current: Any = entry
    for part in match.path:
        current = current.get(part) if isinstance(current, Mapping) else None
        if current is None:
            break
    if match.map_key is None:
        return True, _zero(match.kind) if current is None else current
    if not isinstance(current, Mapping) or match.map_key not in current:
        return False, None
    value = current[match.map_key]
    return True, "" if value is None else value


def _test(match: _Match, found: Any) -> bool:
    op = match.op
    kind = match.kind
    if op in ("is empty", "is not empty"):
        empty = len(found) == 0 if hasattr(found, "__len__") else not found
        return empty if op == "is empty" else not empty
    if op in ("==", "!="):
        if kind == "str":
            equal = isinstance(found, str) and found == match.value
        elif kind == "bool":
            equal = isinstance(found, bool) and found is match.value
        else:
            equal = isinstance(found, int) and not isinstance(found, bool) and found == match.value
        return equal if op == "==" else not equal
    if op in ("in", "not in"):
        if kind == "str":
            inside = isinstance(found, str) and match.value in found
        elif kind == "strlist":
            inside = isinstance(found, list) and match.value in found
        else:
            inside = isinstance(found, Mapping) and match.value in found
        return inside if op == "in" else not inside
    regex: re.Pattern[str] = match.value
    hit = isinstance(found, str) and regex.search(found) is not None
    return hit if op == "matches" else not hit


def _evaluate(node: Node, entry: Mapping[str, Any]) -> bool:
    if isinstance(node, _Match):
        present, found = _lookup(entry, node)
        return _ABSENT[node.op] if not present else _test(node, found)
    if isinstance(node, _Not):
        return not _evaluate(node.operand, entry)
    if node.op == "and":
        return _evaluate(node.left, entry) and _evaluate(node.right, entry)
    return _evaluate(node.left, entry) or _evaluate(node.right, entry)


#: For callers that filter lists: ``[e for e in entries if predicate(e)]``.
Predicate = Callable[[Mapping[str, Any]], bool]
