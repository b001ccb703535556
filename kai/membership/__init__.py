"""Cluster membership: the gossiped view and the local failure detector."""
