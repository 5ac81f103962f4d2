"""What ``benchmarks.bench_daemon`` measured, summarised: medians over rounds, ratios, targets.

Every figure shown is a median over the rounds: a server's rate and latency
percentiles are the medians of its runs, and a ratio is the median of the
ratios of the two runs of each round (a few seconds apart, so both saw about
the same machine).  With an even number of rounds the lower median is taken.
"""

from __future__ import annotations

import json
import operator
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Every server of the benchmark, in the order they are shown (and run, in even rounds).
SERVERS = ("floor", "ceiling", "ceiling-uvloop", "daemon", "ephemeral")
#: The ratios a scenario may report: (numerator, denominator).
RATIOS = (("daemon", "floor"), ("daemon", "ceiling"), ("daemon", "ceiling-uvloop"),
          ("daemon", "ephemeral"))


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    loadgen: str   # the loadgen --scenario
    clients: int
    unit: str      # "req/s" or "conn/s"
    servers: tuple[str, ...]
    #: (numerator, denominator, least ratio) that --check requires
    ratio_targets: tuple[tuple[str, str, float], ...] = ()
    #: (server, largest p99 in microseconds) that --check requires
    p99_targets: tuple[tuple[str, float], ...] = ()

    def ratios(self) -> list[tuple[str, str]]:
        return [(a, b) for a, b in RATIOS if a in self.servers and b in self.servers]


@dataclass
class Outcome:
    scenario: Scenario
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def round_ratio(self, num: str, den: str, index: int) -> float:
        below = float(self.runs[den][index]["rate"])
        return float(self.runs[num][index]["rate"]) / below if below > 0 else 0.0

    def ratio(self, num: str, den: str) -> float:
        rounds = len(self.runs[den])
        return low_median([self.round_ratio(num, den, i) for i in range(rounds)])

    def cpu_ratio(self, num: str, den: str) -> float:
        """The median over rounds of den's server CPU time per request / num's: what
        the ratio would be if the server's CPU alone were the bottleneck."""
        values = []
        for a, b in zip(self.runs[num], self.runs[den], strict=True):
            mine = float(a.get("server_us", 0.0))
            values.append(float(b.get("server_us", 0.0)) / mine if mine > 0 else 0.0)
        return low_median(values)

    def median(self, server: str, key: str) -> float:
        return low_median([float(run[key]) for run in self.runs[server]])

    def summary(self, server: str) -> dict[str, float]:
        """The server's medians over rounds (``max_us``: the largest; counts: the sums)."""
        runs = self.runs[server]
        out = {key: self.median(server, key)
               for key in ("rate", "p50_us", "p99_us", "server_cpu", "server_us", "client_cpu")}
        out["max_us"] = max(float(r["max_us"]) for r in runs)
        for key in ("requests", "events", "errors"):
            out[key] = float(sum(int(r[key]) for r in runs))
        return out


@dataclass(frozen=True)
class Check:
    """One target: what, the value measured, the goal, and whether it is met."""

    what: str
    value: str
    goal: str
    met: bool

    def line(self, width: int) -> str:
        return (f"  {self.what:<{width}}  {self.value:>9}  {self.goal:<9}  "
                f"{'MET' if self.met else 'NOT MET'}")


def low_median(values: Sequence[float]) -> float:
    return statistics.median_low(values) if values else 0.0


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_us(us: float) -> str:
    return f"{us / 1000:.2f}ms" if us >= 10_000 else f"{us:.0f}us"


def fmt_ms(us: float) -> str:
    return f"{us / 1000:.1f}ms"


def columns(outcomes: Sequence[Outcome]) -> list[str]:
    present = {s for o in outcomes for s in o.scenario.servers}
    return [s for s in SERVERS if s in present]


def grid(head: Sequence[str], rows: Sequence[Sequence[str]], right_from: int) -> list[str]:
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    lines = []
    for number, row in enumerate((head, *rows)):
        cells = [c.rjust(w) if i >= right_from else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append(" | ".join(cells).rstrip())
        if number == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return lines


def ratio_heading(num: str, den: str) -> str:
    """``daemon / ceiling-uvloop`` as a column heading: ``d/ceiling-uvloop``."""
    return f"{num[0]}/{den}"


def rate_table(outcomes: Sequence[Outcome]) -> list[str]:
    """Rates of each server, and the ratios (``d/X``: daemon / X)."""
    servers = columns(outcomes)
    ratios = [r for r in RATIOS if any(r in o.scenario.ratios() for o in outcomes)]
    head = ["scenario", "unit", *servers, *(ratio_heading(a, b) for a, b in ratios)]
    rows = []
    for o in outcomes:
        row = [o.scenario.label, o.scenario.unit]
        row += [fmt_rate(o.median(s, "rate")) if s in o.scenario.servers else "-"
                for s in servers]
        row += [f"{o.ratio(a, b):.2f}" if (a, b) in o.scenario.ratios() else "-"
                for a, b in ratios]
        rows.append(row)
    return grid(head, rows, 2)


def latency_table(outcomes: Sequence[Outcome]) -> list[str]:
    servers = columns(outcomes)
    head = ["latency p50 / p99", *servers]
    rows = []
    for o in outcomes:
        row = [o.scenario.label]
        row += [f"{fmt_us(o.median(s, 'p50_us'))} / {fmt_us(o.median(s, 'p99_us'))}"
                if s in o.scenario.servers else "-" for s in servers]
        rows.append(row)
    return grid(head, rows, 1)


def cpu_table(outcomes: Sequence[Outcome]) -> list[str]:
    """Who was busy: each server's and the load generator's share of a core, the
    server's CPU time per request (utilisation / rate), and the CPU ratios."""
    servers = columns(outcomes)
    ratios = [r for r in RATIOS if any(r in o.scenario.ratios() for o in outcomes)]
    head = ["cpu: server% client% us/req", *servers,
            *(f"cpu {ratio_heading(a, b)}" for a, b in ratios)]
    rows = []
    for o in outcomes:
        row = [o.scenario.label]
        row += [f"{o.median(s, 'server_cpu'):4.0%} {o.median(s, 'client_cpu'):4.0%} "
                f"{o.median(s, 'server_us'):4.0f}us" if s in o.scenario.servers else "-"
                for s in servers]
        row += [f"{o.cpu_ratio(a, b):.2f}" if (a, b) in o.scenario.ratios() else "-"
                for a, b in ratios]
        rows.append(row)
    return grid(head, rows, 1)


def starved(outcomes: Sequence[Outcome], least: float = 0.6) -> list[str]:
    """The many-client scenarios in which neither the floor nor its load generator kept
    a core ``least`` busy: with closed-loop clients one of them is the bottleneck and
    should use most of its core, unless other processes had the cores."""
    out = []
    for o in outcomes:
        if o.scenario.clients > 1 and "floor" in o.scenario.servers:
            busiest = max(o.median("floor", "server_cpu"), o.median("floor", "client_cpu"))
            if busiest < least:
                out.append(f"{o.scenario.label} (floor {busiest:.0%})")
    return out


def telling(value: float, goal: float, holds: Callable[[float, float], bool],
            digits: int) -> tuple[str, str]:
    """``value`` and ``goal`` with ``digits`` decimals, or more where those would show
    them equal (or on the wrong side of each other): "2.0ms < 2.0ms" would puzzle
    anyone, met or not."""
    met = holds(value, goal)
    for places in range(digits, digits + 4):
        shown, wanted = f"{value:.{places}f}", f"{goal:.{places}f}"
        if holds(float(shown), float(wanted)) == met and (shown != wanted or value == goal):
            break
    return shown, wanted


def ratio_check(what: str, value: float, least: float) -> Check:
    """``value >= least``, a ratio."""
    shown, goal = telling(value, least, operator.ge, 2)
    return Check(what, shown, f">= {goal}", value >= least)


def ms_check(what: str, us: float, most_us: float) -> Check:
    """``us < most_us``, microseconds shown as milliseconds."""
    shown, goal = telling(us / 1000, most_us / 1000, operator.lt, 1)
    return Check(what, f"{shown}ms", f"< {goal}ms", us < most_us)


def checks(outcomes: Sequence[Outcome]) -> list[Check]:
    out = []
    for o in outcomes:
        for num, den, least in o.scenario.ratio_targets:
            out.append(ratio_check(f"{o.scenario.label}: {num} / {den}", o.ratio(num, den),
                                   least))
        for server, most in o.scenario.p99_targets:
            out.append(ms_check(f"{o.scenario.label}: {server} p99",
                                o.median(server, "p99_us"), most))
    return out


def scenario_json(o: Outcome) -> dict[str, Any]:
    return {
        "key": o.scenario.key,
        "label": o.scenario.label,
        "unit": o.scenario.unit,
        "clients": o.scenario.clients,
        "servers": {s: o.summary(s) for s in o.scenario.servers},
        "ratios": {f"{a}/{b}": o.ratio(a, b) for a, b in o.scenario.ratios()},
        "cpu_ratios": {f"{a}/{b}": o.cpu_ratio(a, b) for a, b in o.scenario.ratios()},
        "rounds": o.runs,
    }


#: How far below an earlier run's value a ratio may fall before ``--check`` fails:
#: on the development machine the ratios move 15-30 % between runs of the same code
#: (docs/performance.md), so a smaller fall is not told apart from noise, and one
#: beyond 30 % is taken for a regression.  ``benchmarks.ab`` measures smaller changes.
BASELINE_FALL = 0.30


#: An earlier run's ratios: (scenario key, "daemon/floor") -> value.
Baseline = dict[tuple[str, str], float]


def read_baseline(text: str, settings: dict[str, Any] | None = None) -> Baseline:
    """The ratios of an earlier run's ``--json`` file; ValueError (one line) if
    ``text`` is not such a file, or if it records one of ``settings`` (this run's,
    as its ``--json`` file names them) with another value: the 30 % margin is the
    noise between runs measured alike, and says nothing of runs measured otherwise."""
    shape = ('not a --json file of this benchmark (an object whose "scenarios" each have '
             'a "key" and "ratios" of numbers)')
    data = json.loads(text)
    scenarios = data.get("scenarios") if isinstance(data, dict) else None
    if not isinstance(scenarios, list):
        raise ValueError(shape)
    for name, now in (settings or {}).items():
        if name in data and data[name] != now:
            raise ValueError(f"measured with {name} {json.dumps(data[name])}, this run with "
                             f"{json.dumps(now)}: its ratios are not comparable")
    out: Baseline = {}
    for scenario in scenarios:
        if not isinstance(scenario, dict):
            raise ValueError(shape)
        key, ratios = scenario.get("key"), scenario.get("ratios")
        if not isinstance(key, str) or not isinstance(ratios, dict):
            raise ValueError(shape)
        for name, value in ratios.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(shape)
            out[key, name] = float(value)
    return out


def baseline_checks(outcomes: Sequence[Outcome], before: Baseline) -> list[Check]:
    """Each ratio this run shares with an earlier run's ``--json`` file: met unless it
    fell by more than :data:`BASELINE_FALL` of the earlier value.  A file that shares
    none (other ``--clients``, other ``--only``) compared nothing: that is a target not
    met, or ``--check`` would pass a run that was held to no baseline at all."""
    out = []
    for o in outcomes:
        for a, b in o.scenario.ratios():
            old = before.get((o.scenario.key, f"{a}/{b}"))
            if old is None:
                continue
            now = o.ratio(a, b)
            change = f", {now / old - 1:+.0%}" if old > 0 else ""
            out.append(ratio_check(f"{o.scenario.label}: {a} / {b} (was {old:.2f}{change})",
                                   now, old * (1 - BASELINE_FALL)))
    if not out:
        out.append(Check("ratios in common with the baseline", "0", ">= 1", False))
    return out
