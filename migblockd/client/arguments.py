"""What :class:`~migblockd.client.MigblockClient` accepts for its path and timeout.

Refused at construction with ``ValueError``, as Python refuses a bad argument,
rather than at :meth:`~migblockd.client.MigblockClient.connect` as a connection
failure that names no argument.
"""

from __future__ import annotations

import math

__all__ = ["socket_path", "wait_bound"]


def socket_path(path: str) -> str:
    """``path``, if it can name a socket.  An empty one fails only at ``connect()``,
    as "Invalid argument", and one with a NUL byte names the path before it (the
    kernel reads up to the NUL): "No such file or directory" for a path never given."""
    if not path or "\0" in path:
        raise ValueError(f"path must be a socket's path, not {path!r}")
    return path


def wait_bound(timeout: float | None) -> float | None:
    """``timeout`` in seconds, None for no bound.

    0 is no bound, as for the daemon's own timeouts (``--negotiation-timeout``,
    ``--idle-timeout``, ``--qemu-timeout``: "0: forever"): a bound of nothing would
    fail every connection at once, before the daemon could greet it.  Infinity is
    no bound too, and None says so.
    """
    if timeout is None:
        return None
    if math.isnan(timeout) or timeout < 0:
        raise ValueError(f"timeout must be a non-negative number of seconds (0 or None: "
                         f"no bound), not {timeout!r}")
    return None if timeout == 0 or math.isinf(timeout) else float(timeout)
