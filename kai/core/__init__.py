"""The pure core: ring, clocks and versions, conditional writes, quorum bookkeeping,
membership merge, config, statistics, the storage interface and the sans-IO protocols.

Nothing under this package imports trio, plyvel or socket, or does any I/O: the shells around
it (the memcache front end, RPC, the cluster coordinator, storage engines) do. A test checks
every module here in a clean interpreter.
"""
