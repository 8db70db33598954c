"""RE2 patterns (xDS ``safe_regex``, Consul's router and bexpr regexes) compiled with Python's :mod:`re`, or refused.

Shared by the xDS resources (:mod:`meshlib.control.xds.resources.regex` wraps it, raising its NACK error) and
the Consul discovery chain (:mod:`meshlib.control.consul.chain`), which must not need the ``xds`` extra.

gRPC compiles ``RegexMatcher.regex`` with RE2 (grpc-go: Go's RE2-syntax ``regexp``, ``matcher.CompileSafeRegex``
wraps it as ``^(?:...)$``: a full match). meshlib has no RE2 at run time, so each pattern is translated to an
equivalent :mod:`re` pattern, matched with ``fullmatch``, and a pattern whose meaning would differ is refused
(the resource is NACKed, naming the construct) rather than matched differently. docs/xds.md lists it:

* translated: ``\\z`` -> ``\\Z``; ``$`` outside multi-line mode -> ``\\Z`` (Python's ``$`` also matches before a
  final newline, RE2's does not); ``\\Q...\\E`` -> the escaped literal; ``\\x{10FFFF}`` -> the character;
  ``(?<name>`` -> ``(?P<name>``; ``\\s`` / ``\\S`` -> RE2's ``[\\t\\n\\f\\r ]`` (Python's adds ``\\v``); POSIX
  classes ``[[:alpha:]]`` (Python would read them as a set of characters) -> their ASCII ranges;
* compiled with :data:`re.ASCII`, so ``\\d \\w \\b`` are ASCII as in RE2 (one difference remains: ``(?i)``
  folds ASCII letters only, RE2 folds Unicode);
* refused, as RE2 refuses them too (so gRPC NACKs as well): backreferences, look-around, atomic groups,
  conditionals, possessive quantifiers, repeat counts above 1000, whatever Python cannot compile;
* refused although RE2 accepts them (meshlib cannot match them the same way): Unicode classes ``\\p{..}`` /
  ``\\P{..}``, ``\\C``, the ungreedy flag ``(?U)``, negated POSIX classes ``[[:^alpha:]]``;
* patterns longer than :data:`MAX_REGEX` characters (Python's :mod:`re` backtracks, RE2 runs in linear time:
  the length bound and the fact that the matched text is the application's own request keep it tame).
"""

from __future__ import annotations

import re

__all__ = ["MAX_REGEX", "Re2Error", "compile_re2", "shown"]

#: Longest piece of a pattern quoted in an error.
_SHOW = 120


def shown(value: object) -> str:
    """``value`` as quoted in an error: ``repr`` (control characters escaped), cut to a bounded length."""
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


class Re2Error(ValueError):
    """A pattern RE2 or meshlib refuses: ``where`` names the field holding it, ``message`` what is wrong."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        self.message = message
        super().__init__(f"{where}: {message}" if where else message)


#: The longest pattern accepted (the Gateway API routes source's limit too).
MAX_REGEX = 1024
#: RE2's largest repeat count (``{n,m}``).
_MAX_REPEAT = 1000

_POSIX = {
    "alnum": "0-9A-Za-z",
    "alpha": "A-Za-z",
    "ascii": "\\x00-\\x7f",
    "blank": "\\t ",
    "cntrl": "\\x00-\\x1f\\x7f",
    "digit": "0-9",
    "graph": "!-~",
    "lower": "a-z",
    "print": " -~",
    "punct": "!-/:-@\\[-`{-~",
    "space": "\\t\\n\\v\\f\\r ",
    "upper": "A-Z",
    "word": "0-9A-Za-z_",
    "xdigit": "0-9A-Fa-f",
}
_ESCAPES_KEPT = frozenset("adDwWbBAfnrtv0")
_FLAGS = re.compile(r"\(\?([a-zA-Z-]*)([:)])")
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
_MULTILINE = re.compile(r"\(\?[a-zA-Z-]*m[a-zA-Z-]*[:)]")


def compile_re2(pattern: str, where: str) -> re.Pattern[str]:
    """``pattern`` (RE2 syntax) as a :mod:`re` pattern with the same meaning under ``fullmatch``.

    Raises :class:`Re2Error` at ``where`` for a pattern RE2 or meshlib refuses (see the module doc).
    """
    if len(pattern) > MAX_REGEX:
        raise Re2Error(where, f"a regex of {len(pattern)} characters: meshlib accepts at most {MAX_REGEX}")
    translated = _translate(pattern, where)
    try:
        return re.compile(translated, re.ASCII)
    except re.error as error:
        raise Re2Error(where, f"invalid regex {shown(pattern)}: {error}") from None


def _refuse(where: str, pattern: str, what: str) -> Re2Error:
    return Re2Error(where, f"regex {shown(pattern)} uses {what}, which meshlib does not support")


def _translate(pattern: str, where: str) -> str:
    out: list[str] = []
    multiline = _MULTILINE.search(pattern) is not None
    in_class = False
    i = 0
    n = len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            if i + 1 >= n:
                raise Re2Error(where, f"invalid regex {shown(pattern)}: trailing backslash")
            e = pattern[i + 1]
            if e == "Q":
                end = pattern.find("\\E", i + 2)
                literal = pattern[i + 2 : n if end < 0 else end]
                out.append(re.escape(literal))
                i = n if end < 0 else end + 2
                continue
            if e == "x" and i + 2 < n and pattern[i + 2] == "{":
                end = pattern.find("}", i + 3)
                digits = pattern[i + 3 : end] if end > 0 else ""
                if not digits or not all(ch in "0123456789abcdefABCDEF" for ch in digits) or int(digits, 16) > 0x10FFFF:
                    raise Re2Error(where, f"invalid regex {shown(pattern)}: bad escape \\x{{{digits}}}")
                out.append(re.escape(chr(int(digits, 16))))
                i = end + 1
                continue
            if e == "z" and not in_class:
                out.append("\\Z")
            elif e == "s":
                out.append("\\t\\n\\f\\r " if in_class else "[\\t\\n\\f\\r ]")
            elif e == "S" and not in_class:
                out.append("[^\\t\\n\\f\\r ]")
            elif e in "pP":
                raise _refuse(where, pattern, f"the Unicode class \\{e}")
            elif e == "C":
                raise _refuse(where, pattern, "\\C (any byte)")
            elif e in "123456789":
                raise _refuse(where, pattern, "a backreference (RE2 has none)")
            elif e == "x" or e in _ESCAPES_KEPT or (e == "S" and in_class) or not e.isalnum():
                out.append(pattern[i : i + 2])
            else:
                raise _refuse(where, pattern, f"the escape \\{e}")
            i += 2
            continue
        if in_class:
            if c == "[" and pattern.startswith("[:", i):
                end = pattern.find(":]", i + 2)
                name = pattern[i + 2 : end] if end > 0 else ""
                if name.startswith("^"):
                    raise _refuse(where, pattern, f"the negated POSIX class [:{name}:]")
                if name not in _POSIX:
                    raise Re2Error(where, f"invalid regex {shown(pattern)}: unknown POSIX class [:{name}:]")
                out.append(_POSIX[name])
                i = end + 2
                continue
            if c == "]":
                in_class = False
            out.append(c)
            i += 1
            continue
        if c == "[":
            in_class = True
            out.append(c)
            i += 1
            if i < n and pattern[i] == "^":
                out.append("^")
                i += 1
            if i < n and pattern[i] == "]":  # a leading "]" is a literal, in RE2 as in Python
                out.append("\\]")
                i += 1
            continue
        if c == "(" and pattern.startswith("(?", i):
            rest = pattern[i + 2 : i + 4]
            if rest.startswith(("P<", ":")):
                out.append(c)
            elif rest.startswith("<") and rest[1:2].isalpha():
                out.append("(?P")
                i += 2
                continue
            else:
                flags = _FLAGS.match(pattern, i)
                if flags is None:
                    raise _refuse(where, pattern, "look-around, an atomic group or a conditional (RE2 refuses them)")
                if "U" in flags.group(1):
                    raise _refuse(where, pattern, "the ungreedy flag (?U)")
                out.append(c)
            i += 1
            continue
        if c == "$" and not multiline:
            out.append("\\Z")
            i += 1
            continue
        if c == "{":
            repeat = _REPEAT.match(pattern, i)
            if repeat is not None:
                counts = [int(part) for part in repeat.groups() if part]
                if any(count > _MAX_REPEAT for count in counts):
                    raise Re2Error(where, f"invalid regex {shown(pattern)}: repeat count above {_MAX_REPEAT}")
                out.append(repeat.group(0))
                i = repeat.end()
                if i < n and pattern[i] == "+":
                    raise _refuse(where, pattern, "a possessive quantifier (RE2 refuses it)")
                continue
        if c in "*+?" and i + 1 < n and pattern[i + 1] == "+":
            raise _refuse(where, pattern, "a possessive quantifier (RE2 refuses it)")
        out.append(c)
        i += 1
    return "".join(out)
