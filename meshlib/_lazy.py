"""Objects named by a dotted path and imported when first used.

The discovery-scheme and balancer registries (:func:`meshlib.discovery.register_scheme`,
:func:`meshlib.balance.register_balancer`) accept either the object or its dotted path
(``"meshlib.discovery.dns.from_target"``). The built-ins are registered by path, so ``import meshlib`` does not
import dnspython or the Consul client: a scheme's module is imported when a service first uses it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["check_dotted_path", "load"]


def check_dotted_path(path: str) -> str:
    """``path`` if it has the form ``package.module.attribute``; :class:`ValueError` otherwise.

    Only the form is checked: the module is not imported (that is the point of registering a path).
    """
    parts = path.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise ValueError(f"{path!r} is not a dotted path such as 'package.module.attribute'")
    return path


def load(path: str) -> Any:
    """The object ``path`` names: imports its module (a no-op once imported), then reads the attribute.

    Raises :class:`ImportError` when the module cannot be imported or has no such attribute (as
    ``from module import attribute`` would).
    """
    module_name, _, attribute = path.rpartition(".")
    module = importlib.import_module(module_name)
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportError(f"cannot import name {attribute!r} from {module_name!r} ({path})", name=module_name) from None
