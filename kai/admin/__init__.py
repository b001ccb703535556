"""Package kai.admin."""
