"""Package kai.memcache."""
