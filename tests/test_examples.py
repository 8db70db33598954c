"""The runnable examples in examples/ keep working."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_services_reach_both_users_instances_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    example = load_example("two_services")
    assert example.main([]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("GET http://frontend/profile/")]
    assert len(lines) == 6
    assert sum("served by users-1" in line for line in lines) == 3  # round_robin alternates
    assert sum("served by users-2" in line for line in lines) == 3
    assert "users instances that answered: users-1, users-2" in out


def test_getting_started_mock_transport_snippet_passes() -> None:
    """The MockTransport example in docs/getting-started.md is run as written, so it cannot rot."""
    text = (EXAMPLES.parent / "docs" / "getting-started.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    (snippet,) = [block for block in blocks if "def test_charge_goes_to_payments" in block]
    namespace: dict[str, object] = {}
    exec(compile(snippet, "docs/getting-started.md", "exec"), namespace)
    test = namespace["test_charge_goes_to_payments"]
    assert callable(test)
    test()
