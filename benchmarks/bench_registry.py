"""Micro-benchmark of the blocker registry: cost per operation does not grow with size.

Run from the repository root::

    .venv/bin/python -m benchmarks.bench_registry          # under a minute
    .venv/bin/python -m benchmarks.bench_registry --quick  # smaller counts, for a smoke test

For 10, 1,000 and 100,000 blockers already registered (every mode, as
``migrate_add_blocker()`` makes them) it times, per operation:

* ``add + del (newest)``: add a blocker and delete it again (a temporary
  blocker, like dump-guest-memory's), draining the events as the server does;
* ``add + del (oldest)``: add a blocker and delete the oldest one, so that
  deletion happens at the far end of every list;
* ``migrate refused``: ``migrate`` finding the newest blocker of the current mode
  and raising (the "is migration blocked?" check);

then the memory per registered blocker (tracemalloc), with every mode and with
``normal`` only.  Each timing is the best of several rounds with the garbage
collector off, so the figures compare data-structure costs, not GC pauses.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import time
import tracemalloc
from collections.abc import Callable

from migblockd.clock import FakeClock
from migblockd.registry import MigrationBlocked, Registry

MODES = ("normal", "cpr-reboot", "cpr-transfer", "cpr-exec")
REASON = "Migration disabled: vhost lacks VHOST_F_LOG_ALL feature."
SIZES = (10, 1_000, 100_000)


def filled(n: int, modes: list[str] | None = None) -> Registry:
    registry = Registry(MODES, clock=FakeClock())
    for _ in range(n):
        registry.add(REASON, modes=modes)
    registry.take_events()
    return registry


def best_ns_per_op(run: Callable[[int], None], ops: int, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        gc.disable()
        try:
            start = time.perf_counter_ns()
            run(ops)
            elapsed = time.perf_counter_ns() - start
        finally:
            gc.enable()
        best = min(best, elapsed / ops)
    return best


def add_del_newest(registry: Registry) -> Callable[[int], None]:
    def run(ops: int) -> None:
        add, delete, drain = registry.add, registry.delete, registry.take_events
        for _ in range(ops):
            delete(add(REASON).id)
            drain()

    return run


def add_del_oldest(registry: Registry) -> Callable[[int], None]:
    # blockers()[0] would copy the whole list; the benchmark peeks at the
    # registry's list of all blockers to find the oldest in O(1).
    chain = registry._store.chain(None)

    def run(ops: int) -> None:
        add, delete, drain = registry.add, registry.delete, registry.take_events
        for _ in range(ops):
            add(REASON)
            oldest = chain.oldest
            assert oldest is not None
            delete(oldest.id)
            drain()

    return run


def migrate_refused(registry: Registry) -> Callable[[int], None]:
    def run(ops: int) -> None:
        migrate = registry.migrate
        for _ in range(ops):
            with contextlib.suppress(MigrationBlocked):
                migrate("tcp:localhost:4444")

    return run


def bytes_per_blocker(n: int, modes: list[str] | None) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        registry = filled(n, modes)
        used = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert len(registry) == n
    return used / n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer operations and rounds")
    args = parser.parse_args(argv)
    ops, rounds = (2_000, 2) if args.quick else (20_000, 7)

    print(f"registry micro-benchmark: ns per operation, best of {rounds} x {ops:,} ops")
    header = (
        f"{'blockers':>9} | {'add+del newest':>14} | {'add+del oldest':>14}"
        f" | {'migrate refused':>15}"
    )
    print(header)
    print("-" * len(header))
    for n in SIZES:
        registry = filled(n)
        row = []
        for bench in (add_del_newest, add_del_oldest, migrate_refused):
            row.append(best_ns_per_op(bench(registry), ops, rounds))
            assert len(registry) == n  # each workload keeps the size constant
        print(f"{n:>9,} | {row[0]:>14,.0f} | {row[1]:>14,.0f} | {row[2]:>15,.0f}")

    count = 10_000 if args.quick else 100_000
    print()
    print(f"memory per blocker (tracemalloc, {count:,} blockers, reason string shared):")
    for label, modes in (("every mode (4)", None), ("normal only", ["normal"])):
        print(f"  {label:<15} {bytes_per_blocker(count, modes):>6,.0f} bytes")


if __name__ == "__main__":
    main()
