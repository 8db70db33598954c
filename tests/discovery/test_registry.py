"""The scheme registry's lazy entries: built-ins and third-party schemes registered by dotted path."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from meshlib import discovery
from meshlib._lazy import load
from meshlib.discovery import SCHEMES, Target, build_resolver, register_scheme
from meshlib.discovery import consul as consul_module
from meshlib.discovery import dns as dns_module
from meshlib.discovery import static as static_module
from meshlib.discovery.base import DiscoverySettings, Endpoint, Resolver
from meshlib.discovery.static import StaticResolver

pytestmark = pytest.mark.one_library


@pytest.fixture
def registry() -> Iterator[None]:
    """Restore the scheme registry (and drop the fake module) after a test."""
    factories, forms = dict(discovery._FACTORIES), dict(discovery._FORMS)
    yield
    discovery._FACTORIES.clear()
    discovery._FACTORIES.update(factories)
    discovery._FORMS.clear()
    discovery._FORMS.update(forms)
    sys.modules.pop("tests_fake_scheme", None)


def test_builtins_are_registered_by_path_with_their_modules_forms() -> None:
    paths = {
        "static": "meshlib.discovery.static.from_target",
        "dns": "meshlib.discovery.dns.from_target",
        "dns+srv": "meshlib.discovery.dns.srv_from_target",
        "consul": "meshlib.discovery.consul.from_target",
    }
    for scheme, path in paths.items():
        # Other tests put the function itself back after swapping in a fake (test_consul's fast_watch);
        # tests/test_lazy_imports.py checks in a fresh interpreter that none of these is imported up front.
        assert discovery._FACTORIES[scheme] in (path, load(path))
    forms = {
        "static": static_module.FORM,
        "dns": dns_module.FORM,
        "dns+srv": dns_module.SRV_FORM,
        "consul": consul_module.FORM,
    }
    assert {scheme: SCHEMES[scheme] for scheme in forms} == forms  # other test modules add schemes of their own


@pytest.mark.usefixtures("registry")
def test_a_scheme_registered_by_path_is_imported_by_its_first_target() -> None:
    seen: list[Target] = []

    def from_target(target: Target, settings: DiscoverySettings) -> Resolver:
        seen.append(target)
        return StaticResolver([Endpoint("10.9.9.9", 1)], source=target.uri)

    register_scheme("fake", "tests_fake_scheme.from_target", form="fake://name")
    assert SCHEMES["fake"] == "fake://name"
    assert "tests_fake_scheme" not in sys.modules  # registering imports nothing
    module = types.ModuleType("tests_fake_scheme")
    module.from_target = from_target  # type: ignore[attr-defined]
    sys.modules["tests_fake_scheme"] = module
    resolver = build_resolver("pay", "fake://payments", DiscoverySettings(), variable="V")
    assert resolver.resolve().endpoints == (Endpoint("10.9.9.9", 1),)
    assert seen == [Target("pay", "fake://payments", "fake", "payments", "V", "fake://name")]


@pytest.mark.usefixtures("registry")
def test_a_path_that_cannot_be_imported_fails_at_build_naming_the_scheme() -> None:
    register_scheme("gone", "tests_no_such_module.from_target", form="gone://x")
    with pytest.raises(ImportError, match=r"gone:// is registered as 'tests_no_such_module.from_target'"):
        build_resolver("pay", "gone://x", DiscoverySettings(), variable="V")
    register_scheme("noattr", "meshlib.discovery.static.no_such_factory", form="noattr://x")
    with pytest.raises(ImportError, match="no_such_factory"):
        build_resolver("pay", "noattr://x", DiscoverySettings(), variable="V")


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("path", ["", "from_target", "a..b", "a.b:c", "1a.b", "a.b "])
def test_a_malformed_path_is_refused_at_registration(path: str) -> None:
    with pytest.raises(ValueError, match="dotted path"):
        register_scheme("fake", path, form="fake://x")
    assert "fake" not in SCHEMES
