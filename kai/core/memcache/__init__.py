"""The sans-IO memcached text protocol: requests, the parser, reply encoders, the stats report."""
