"""Routes: the Gateway API parser, the compiled table and the filters (pure functions: no servers needed)."""
