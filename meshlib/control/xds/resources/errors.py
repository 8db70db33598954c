"""The error a resource that fails validation raises: its text is the NACK's ``error_detail``."""

from __future__ import annotations

__all__ = ["XdsResourceError", "shown"]

#: Longest piece of a resource's own text quoted in an error (a hostile control plane may send anything).
_SHOW = 120


def shown(value: object) -> str:
    """``value`` as quoted in an error: ``repr`` (control characters escaped), cut to a bounded length."""
    text = repr(value)
    return text if len(text) <= _SHOW else text[: _SHOW - 3] + "..."


class XdsResourceError(ValueError):
    """A Listener or RouteConfiguration meshlib refuses (NACKs), as gRPC's client would.

    ``field_path`` names the field in the resource (``virtual_hosts[0].routes[2].match.safe_regex.regex``),
    ``message`` what is wrong with it; ``str(error)`` is ``"<field_path>: <message>"``, the text sent back as
    the NACK's ``error_detail`` (the ADS client prefixes the resource name).
    """

    def __init__(self, field_path: str, message: str) -> None:
        self.field_path = field_path
        self.message = message
        super().__init__(f"{field_path}: {message}" if field_path else message)
