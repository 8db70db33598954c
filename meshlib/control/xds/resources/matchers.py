"""The xDS match conditions meshlib's route model has no kind for, as subclasses of its own match types.

:class:`~meshlib.routing.model.HeaderMatch` knows ``Exact`` and ``RegularExpression``; xDS adds prefix, suffix,
contains, present, range, ``ignore_case`` and ``invert_match`` (grpc-go ``internal/xds/matcher/matcher_header.go``),
a runtime fraction (``RouteMatch.runtime_fraction``) and string-prefix / case-insensitive path matches
(``matcher_path.go``). Each is a subclass whose ``test_value`` / ``test`` does what gRPC does, so
:meth:`~meshlib.routing.model.HostRoutes.select` and ``meshlib explain`` use them unchanged. Their ``kind`` is
``RegularExpression`` (never ``Exact``: the table's exact-value dispatch must not key on them, and no path index
may rule them out) and ``value`` is a short description shown by ``explain``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meshlib.routing.model import HeaderMatch, PathMatch

__all__ = ["FRACTION_HEADER", "FractionMatch", "XdsPathMatch"]

#: The (impossible) header name a :class:`FractionMatch` is filed under: no request carries it.
FRACTION_HEADER = ":xds-runtime-fraction"


@dataclass(frozen=True, slots=True)
class FractionMatch(HeaderMatch):
    """``RouteMatch.runtime_fraction.default_value``: the route matches ``per_million`` / 1,000,000 of the
    requests that meet its other conditions, drawn per request (Envoy: ``random % 1e6 < numerator``)."""

    per_million: int = 1_000_000

    def test_value(self, found: str | None) -> bool:
        """A fresh draw: ``True`` for ``per_million`` in a million calls (``found`` is not read)."""
        return random.randrange(1_000_000) < self.per_million


@dataclass(frozen=True, slots=True)
class XdsPathMatch(PathMatch):
    """``RouteMatch.prefix`` (a plain string prefix: ``/foo`` matches ``/foobar``, unlike Gateway API's
    ``PathPrefix``) or a ``case_sensitive: false`` ``prefix`` / ``path`` (compared upper-cased, as grpc-go)."""

    prefix: bool = True
    expected: str = ""
    ignore_case: bool = False

    def test(self, path: str) -> bool:
        """Whether ``path`` (the request's raw path, no query string) meets this match."""
        if self.ignore_case:
            path = path.upper()
        return path.startswith(self.expected) if self.prefix else path == self.expected
