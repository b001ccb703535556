"""Kai: a Dynamo-style, peer-to-peer key-value store that speaks the memcached protocol."""

from kai._version import __version__ as __version__
