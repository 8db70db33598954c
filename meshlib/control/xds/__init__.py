"""xDS: meshlib steered by an xDS control plane (the ADS client, bootstrap, resources)."""
