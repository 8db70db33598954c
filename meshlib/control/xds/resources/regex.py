"""xDS ``safe_regex`` (Google RE2 syntax) compiled with Python's :mod:`re`, or refused (NACKed).

The translation lives in :mod:`meshlib.routing.re2` (shared with the Consul discovery chain, which must not
need the ``xds`` extra); its module docstring lists what is translated and what is refused. This wrapper
raises :class:`XdsResourceError` so a refused pattern NACKs the resource that holds it.
"""

from __future__ import annotations

import re

from meshlib.control.xds.resources.errors import XdsResourceError
from meshlib.routing.re2 import MAX_REGEX, Re2Error
from meshlib.routing.re2 import compile_re2 as _compile_re2

__all__ = ["MAX_REGEX", "compile_re2"]


def compile_re2(pattern: str, where: str) -> re.Pattern[str]:
    """``pattern`` (RE2 syntax) as a :mod:`re` pattern with the same meaning under ``fullmatch``.

    Raises :class:`XdsResourceError` at ``where`` for a pattern RE2 or meshlib refuses (see
    :mod:`meshlib.routing.re2`).
    """
    try:
        return _compile_re2(pattern, where)
    except Re2Error as error:
        raise XdsResourceError(error.where, error.message) from None
