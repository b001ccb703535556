"""System tests: real kai processes, a real memcached, and real memcached client tools."""
