"""Reading a file that must be a regular one, without waiting on a FIFO.

``open()`` of a FIFO for reading waits until a writer opens it: a
configuration file or a schema (or a file the schema includes) that is a
FIFO would hold the start, ``--check-config`` or a reload until someone
wrote to it.  Opened ``O_NONBLOCK`` it returns at once, and ``fstat()`` on
the descriptor says what it is, so the file judged is the file read (sshd
opens authorized_keys so).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

__all__ = ["NotRegularFile", "TooLarge", "read_regular"]


class NotRegularFile(OSError):
    """``filename`` is a FIFO, a device, a directory or a socket.

    An OSError, so that whoever says "cannot read FILE: why" of other reasons
    says this one too; ``strerror`` is the why.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(None, "not a regular file", os.fspath(path))

    def __str__(self) -> str:
        return f"{self.filename} is not a regular file"


class TooLarge(OSError):
    """``filename`` has more than ``limit`` bytes."""

    def __init__(self, path: str | os.PathLike[str], limit: int) -> None:
        super().__init__(None, f"larger than {limit} bytes", os.fspath(path))
        self.limit = limit


def read_regular(path: str | os.PathLike[str],
                 vet: Callable[[int, os.stat_result], None] | None = None,
                 limit: int | None = None) -> bytes:
    """The bytes of ``path``; NotRegularFile, at once, when it is not a regular file,
    and TooLarge when it has more than ``limit`` bytes (only so many are read).

    ``vet`` is then called with the opened regular file's descriptor and status
    (whose file it is, its mode; its ACL is read from the descriptor), and may
    refuse it by raising: after the file's type, so
    that what is not a file at all (``/dev/null``, ``/tmp``) is called so, and
    not given advice on its mode.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path)
        if vet is not None:
            vet(fd, st)
        # A regular file: no writer to wait for.  Blocking again, as a network
        # file system may honour O_NONBLOCK on reads (EAGAIN mid-file).
        os.set_blocking(fd, True)
        with open(fd, "rb", closefd=False) as f:
            if limit is None:
                return f.read()
            # Read, not fstat'ed: a file may grow meanwhile.
            data = f.read(limit + 1)
            if len(data) > limit:
                raise TooLarge(path, limit)
            return data
    finally:
        os.close(fd)
