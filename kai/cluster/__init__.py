"""The cluster: quorum coordination over the ring."""
