"""What a group commit of the state store costs, next to one bare ``fdatasync``.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_state            # 1,000 groups of 16 changes
    .venv/bin/python -m benchmarks.bench_state --dir DIR  # on another file system
    .venv/bin/python -m benchmarks.bench_state --pause 0.002  # idle between commits

A group is what one turn of the daemon's event loop might write: half of it
adds blockers, half deletes the ones the previous group added, over a store
that already holds ``--standing`` blockers.  Each commit is timed from the
call to the return (encoding, SQLite, the WAL's sync, and now and then a
checkpoint); after it, so is a bare ``fdatasync`` of a 4 KiB overwrite in the
same directory, the floor, since WAL with ``synchronous=FULL`` syncs once per
commit.  The commit costs more than the floor by its CPU time (about 60 us)
and because it appends to the WAL, whose growing size the file system must
sync as well, until the WAL's first checkpoint lets it be overwritten.

In the daemon, commits do not come one right after another: between two, the
event loop runs the next group's requests while the disk is idle.  ``--pause``
sleeps that long after each commit (and its floor) to see what that does to the
next one: the CPU the committing thread spends (user and system, from
``getrusage``) is reported next to the times.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from migblockd.state import BlockerRow, Change, Delete, Put, Store

REASON = "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(q * len(ordered)) - 1))]


def blocker(seq: int) -> BlockerRow:
    return BlockerRow(id=f"#blocker{seq}", reason=REASON, modes=("normal", "cpr-reboot"),
                      internal=False, owner=(4242, 1000, 1000), added=time.time(), seq=seq)


class SyncProbe:
    """A 4 KiB overwrite and ``fdatasync`` in the state's file system: the floor."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "fsync-probe"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def time(self) -> float:
        os.pwrite(self.fd, os.urandom(4096), 0)
        start = time.perf_counter()
        os.fdatasync(self.fd)
        return time.perf_counter() - start

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink()


def thread_cpu() -> tuple[float, float]:
    """This thread's user and system CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime, usage.ru_stime


def bench(directory: Path, groups: int, size: int, standing: int, pause: float = 0.0
          ) -> tuple[list[float], list[float], tuple[float, float]]:
    """Seconds per commit of ``groups`` groups of ``size`` changes, and of a bare
    sync after each (interleaved, so that both see the same disk: on a shared
    machine other processes' I/O changes the sync's cost from second to second),
    then sleeping ``pause`` seconds; and the user and system CPU seconds of all
    the commits together."""
    probe = SyncProbe(directory)
    commits: list[float] = []
    syncs: list[float] = []
    user = system = 0.0
    try:
        with Store.open(directory / "state") as store:
            store.commit([Put(blocker(seq)) for seq in range(standing)])
            seq = standing
            previous: list[str] = []
            for _ in range(groups):
                adds = [blocker(seq + k) for k in range(size - size // 2)]
                seq += len(adds)
                group: list[Change] = [Put(row) for row in adds]
                group += [Delete(id) for id in previous[: size // 2]]
                cpu = thread_cpu()
                start = time.perf_counter()
                store.commit(group)
                commits.append(time.perf_counter() - start)
                after = thread_cpu()
                user += after[0] - cpu[0]
                system += after[1] - cpu[1]
                syncs.append(probe.time())
                previous = [row.id for row in adds]
                if pause:
                    time.sleep(pause)
    finally:
        probe.close()
    return commits, syncs, (user, system)


def report(name: str, times: list[float]) -> None:
    ms = [t * 1e3 for t in times]
    print(f"{name:<28} mean {statistics.fmean(ms):6.3f} ms  p50 {percentile(ms, 0.5):6.3f} ms"
          f"  p99 {percentile(ms, 0.99):6.3f} ms  max {max(ms):6.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--size", type=int, default=16, help="changes per group")
    parser.add_argument("--standing", type=int, default=1000,
                        help="blockers already stored")
    parser.add_argument("--dir", type=Path, help="an existing directory, on the disk to "
                        "measure, to make the state's temporary directory in (default: the "
                        "system's temporary directory)")
    parser.add_argument("--pause", type=float, default=0.0, metavar="SECONDS",
                        help="sleep after each commit, as the daemon's disk idles between "
                        "two (default: none)")
    args = parser.parse_args()
    if args.dir is not None and not args.dir.is_dir():
        parser.error(f"--dir {args.dir}: not an existing directory")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        directory = Path(tmp)
        commits, syncs, (user, system) = bench(directory, args.groups, args.size,
                                               args.standing, args.pause)
    pause = f", {args.pause * 1e3:g} ms apart" if args.pause else ""
    print(f"{args.groups} commits of {args.size} changes over {args.standing} stored blockers, "
          f"in {directory}{pause}")
    report("commit (group)", commits)
    report("fdatasync (4 KiB)", syncs)
    print(f"{'commit CPU':<28} user {user / args.groups * 1e6:.0f} us, system "
          f"{system / args.groups * 1e6:.0f} us per commit")


if __name__ == "__main__":
    main()
