"""Package kai.rpc."""
