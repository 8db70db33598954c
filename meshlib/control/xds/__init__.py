"""xDS: meshlib steered by any xDS control plane, as gRPC's proxyless clients are.

This package reads the same bootstrap gRPC's proxyless clients read (``GRPC_XDS_BOOTSTRAP`` /
``GRPC_XDS_BOOTSTRAP_CONFIG``, gRFC A27, A29, A47, A65): :mod:`meshlib.control.xds.bootstrap` parses and validates
it into frozen, typed values (:class:`Bootstrap`) and builds the gRPC channel to a management server
(:func:`channel_for`, the ``xds`` extra). The ADS client and the resource translation (LDS/RDS/CDS/EDS onto
meshlib's route table, services and balancers) build on it. Nothing here imports ``grpc`` until a channel is made.
"""

from meshlib.control.xds.bootstrap import (
    BOOTSTRAP_CONFIG_VARIABLE,
    BOOTSTRAP_FILE_VARIABLE,
    Authority,
    Bootstrap,
    BootstrapError,
    CertificateFiles,
    CertificateProvider,
    ChannelCreds,
    ListenerTarget,
    Locality,
    Node,
    XdsServer,
    channel_for,
    from_env,
    parse_bootstrap,
)

__all__ = [
    "BOOTSTRAP_CONFIG_VARIABLE",
    "BOOTSTRAP_FILE_VARIABLE",
    "Authority",
    "Bootstrap",
    "BootstrapError",
    "CertificateFiles",
    "CertificateProvider",
    "ChannelCreds",
    "ListenerTarget",
    "Locality",
    "Node",
    "XdsServer",
    "channel_for",
    "from_env",
    "parse_bootstrap",
]
