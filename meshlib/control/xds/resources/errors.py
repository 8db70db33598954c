"""The error a NACKed xDS resource raises: the field path and what is wrong with it."""

from __future__ import annotations

from meshlib.errors import MeshError

__all__ = ["XdsResourceError", "shown"]

#: Longest piece of a resource's own text quoted in an error (a hostile control plane may send anything).
_SHOW = 120


def shown(value: object) -> str:
    """``value`` as quoted in an error: ``repr`` (control characters escaped), cut to a bounded length."""
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


class XdsResourceError(MeshError, ValueError):
    """An xDS resource failed validation (the ADS client NACKs it with ``str(error)`` as ``error_detail``).

    ``path`` is the field path inside the resource (``outlier_detection.max_ejection_percent``,
    ``endpoints[0].lb_endpoints[1].endpoint.address``), ``message`` the value found and what was expected;
    ``name`` the resource's name when it could be read (the ADS client then marks that resource NACKED).
    """

    def __init__(self, path: str, message: str, *, name: str | None = None) -> None:
        self.path = path
        self.message = message
        self.name = name
        super().__init__(f"{path}: {message}" if path else message)

    @property
    def field_path(self) -> str:
        """:attr:`path` (the RDS/LDS validators' name for it)."""
        return self.path

    def __reduce__(self) -> tuple[type[XdsResourceError], tuple[str, str]]:
        return (type(self), (self.path, self.message))
