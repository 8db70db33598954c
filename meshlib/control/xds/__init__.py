"""xDS: meshlib steered by any xDS control plane, as gRPC's proxyless clients are (gRFC A27 and following)."""
