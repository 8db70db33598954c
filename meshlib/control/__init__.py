"""Control-plane sources: where a client's dynamic configuration (routes, authorization rules) comes from.

Each source delivers whole, validated versions of one kind of configuration to its owner, off the request
path; the owner swaps each one in with one attribute assignment, so a request uses one version from start
to end. :class:`~meshlib.control.file.FileSource` watches a local file (``MESHLIB_ROUTES_FILE``,
``MESHLIB_AUTHZ_FILE``); xDS and Consul sources are to follow the same shape.
"""

from meshlib.control.file import (
    MAX_FILE_SIZE,
    FileSource,
    FileSourceStatus,
    FileVersion,
    RejectedVersion,
)

__all__ = ["MAX_FILE_SIZE", "FileSource", "FileSourceStatus", "FileVersion", "RejectedVersion"]
