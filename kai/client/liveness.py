"""Whether an idle pooled connection can carry a request: both flavours' one check.

A node that restarted or died closed its end of every idle connection; sending on one would
"succeed" (the bytes reach the kernel) and only the missing reply would tell, too late to
know the request was never carried out. So before reuse the client looks: an idle
connection on which anything can be read (the close, or bytes nobody asked for) is
discarded. The look is one non-blocking ``poll``; it never waits.
"""

from __future__ import annotations

import select


def idle_connection_is_usable(fileno: int) -> bool:
    """Whether the idle socket ``fileno`` has nothing to read and no error or hang-up."""
    if fileno < 0:
        return False
    poller = select.poll()
    poller.register(fileno, select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)
