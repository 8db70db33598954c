"""Secured hops: client TLS contexts with mTLS and certificate rotation, and SPIFFE identity checks.

:mod:`meshlib.security.tls` builds the SSL contexts mesh endpoints connect with (from :class:`TLSSettings`,
set by ``MESHLIB_TLS_*`` variables or in code) and reloads their files when they change;
:mod:`meshlib.security.identity` checks, inside the TLS handshake, that a server presents the expected
SPIFFE ID. See ``docs/security.md``.
"""

from __future__ import annotations

from meshlib.security.identity import ExpectedIdentity, IdentityError, SpiffeId, find_identity_error
from meshlib.security.tls import DEFAULT_RELOAD_INTERVAL, ReloadingContext, TLSContexts, TLSSettings

__all__ = [
    "DEFAULT_RELOAD_INTERVAL",
    "ExpectedIdentity",
    "IdentityError",
    "ReloadingContext",
    "SpiffeId",
    "TLSContexts",
    "TLSSettings",
    "find_identity_error",
]
