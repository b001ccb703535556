"""Package kai.storage."""
