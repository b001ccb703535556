"""Benchmarks of kai: a memcached load generator and one-command scenarios.

Run every tool as a module of this package from the repository root, with the project's
virtualenv, e.g. ``.venv/bin/python -m bench.single_node --help``. bench/README.md is the
manual and holds the latest results; docs/performance.md tells how the figures came about.

The package is not installed with kai (setuptools lists only ``kai``). Everything here talks
to loopback addresses only, and every run, wait and child process is bounded in time.
"""
