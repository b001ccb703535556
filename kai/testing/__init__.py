"""Package kai.testing."""
