"""xDS resources validated as gRPC's proxyless client does and mapped onto meshlib's settings."""
