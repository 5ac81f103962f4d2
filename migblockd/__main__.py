"""``python -m migblockd`` and the ``migblockd`` command: the daemon.

SIGHUP is caught first, before the daemon's modules load (a third of a second,
longer on a busy machine): its default action would end a daemon asked to
reload while it starts.  The request is kept, and carried out once the daemon
is ready (``migblockd.daemon``).
"""

import signal


def main() -> None:
    hangups: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, _frame: hangups.append(signum))
    from migblockd.cli import main as run  # noqa: PLC0415 - after the handler, on purpose

    run(hangups=hangups)


if __name__ == "__main__":
    main()
