"""``python -m migblockd`` and the ``migblockd`` command: the daemon.

SIGHUP, SIGTERM and SIGINT are caught first, before the daemon's modules load
(a third of a second, longer on a busy machine): what comes before the event
loop handles them is kept and acted on once the start gets to it
(``migblockd.early``).
"""

from migblockd.early import EarlySignals


def main() -> None:
    early = EarlySignals()
    early.install()
    from migblockd.cli import main as run  # noqa: PLC0415 - after the handlers, on purpose

    run(early=early)


if __name__ == "__main__":
    main()
