"""The package version, single-sourced for pyproject and the memcached `version` reply."""

__version__ = "0.1.0"
