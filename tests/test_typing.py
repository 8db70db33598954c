"""The public API is typed from a user's side: mypy --strict flags what it flags for httpx's own client."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.one_library

api = pytest.importorskip("mypy.api")

USER_CODE = Path(__file__).parent / "typing" / "user_code.py"


def test_mypy_flags_exactly_the_lines_marked_error() -> None:
    out, err, _ = api.run(["--strict", "--no-incremental", "--cache-dir=/dev/null", str(USER_CODE)])
    flagged = {int(n) for n in re.findall(rf"{re.escape(USER_CODE.name)}:(\d+): error", out)}
    expected = {
        n
        for n, line in enumerate(USER_CODE.read_text().splitlines(), 1)
        if line.endswith(tuple(["# error"])) or "# error:" in line
    }
    assert flagged == expected, out + err
