"""``meshlib.tools`` (the ``meshlib`` command and its demo) are applications of the public API: check their source.

They may import ``meshlib`` and its public modules, and read ``client.mesh_status()``; they may not import a
private module (``meshlib._*``), the resilience internals or the compatibility ``meshlib.config`` (which
re-exports private helpers such as ``service_key``), reach into ``client.mesh``, or read a private attribute of
anything but their own objects.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import meshlib
import meshlib.tools

pytestmark = pytest.mark.one_library

TOOLS = Path(meshlib.tools.__file__).parent
#: The modules the tools may import from meshlib (besides their own package).
ALLOWED = {
    "meshlib",
    "meshlib.discovery",
    "meshlib.errors",
    "meshlib.routing.explain",  # explain's public helpers (wait_for_discovery takes the client, not its mesh)
    "meshlib.security.authz",  # the documented policy engine (parse_policies, PolicySet), for `meshlib authz`
    "meshlib.status",
    "meshlib.testing",
}
SOURCES = sorted(TOOLS.glob("*.py"))


def _meshlib_imports(tree: ast.AST) -> list[str]:
    """Every meshlib module a source imports (``from meshlib import Client`` counts as the name ``Client``)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "meshlib":
                found.extend(alias.name for alias in node.names)
            else:
                found.append(node.module)
    return [name for name in found if name.startswith("meshlib.") or name in meshlib.__all__ or name == "meshlib"]


def test_the_tools_package_has_modules() -> None:
    assert {path.name for path in SOURCES} >= {"__init__.py", "cli.py", "demo.py"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.name)
def test_tools_import_only_public_meshlib_modules(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for name in _meshlib_imports(tree):
        public = name == "meshlib" or name in meshlib.__all__ or name in ALLOWED or name.startswith("meshlib.tools.")
        assert public, f"{path.name} imports {name}: not part of the public API the tools are limited to"


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.name)
def test_tools_use_no_private_attribute_nor_the_mesh_transport(path: Path) -> None:
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            assert name != "mesh", f"{path.name}:{node.lineno}: .mesh is the client's internals: use mesh_status()"
            private = name.startswith("_") and not name.startswith("__")
            own = isinstance(node.value, ast.Name) and node.value.id == "self"
            assert not private or own, f"{path.name}:{node.lineno}: private attribute .{name}"
        if isinstance(node, ast.Name):
            assert node.id != "service_key", f"{path.name}:{node.lineno}: service_key is private"
