"""migblockd.logs.quick: per-request info records, straight to the writer when
that is where logging would send them, and exactly as logging would make them."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from migblockd.logs import about, quick
from migblockd.logs.formats import JsonFormat, TextFormat
from migblockd.logs.writer import journal_entry
from migblockd.registry import Owner


class Conn:
    number = 7
    owner = Owner(pid=42, uid=1000, gid=100)


ABOUT = about(Conn(), blocker_id="vfio0")
log = logging.getLogger("migblockd")


class Sink(logging.Handler):
    """A root handler whose records ``info`` may hand over directly."""

    def __init__(self) -> None:
        super().__init__()
        self.put: list[logging.LogRecord] = []  # straight from quick.info
        self.handled: list[logging.LogRecord] = []  # through logging

    def emit(self, record: logging.LogRecord) -> None:
        self.handled.append(record)


@pytest.fixture
def sink() -> Iterator[Sink]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = Sink()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    quick.install(handler, handler.put.append)
    try:
        yield handler
    finally:
        quick.uninstall()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.fixture(autouse=True)
def daemons_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """What migblockd.logs.setup() tells logging not to look up."""
    monkeypatch.setattr(logging, "_srcfile", None)
    for switch in ("logThreads", "logProcesses", "logMultiprocessing", "logAsyncioTasks"):
        monkeypatch.setattr(logging, switch, False, raising=False)


def twins(monkeypatch: pytest.MonkeyPatch, ns: int = 1_750_000_000_123_456_789,
          args: tuple[object, ...] = ("client 7", "vfio0", "normal", "'VFIO device'"),
          msg: str = "%s: added blocker %s (%s): %s",
          ) -> tuple[logging.LogRecord, logging.LogRecord]:
    """The same record, made by quick and by logging, at the same (frozen) time."""
    monkeypatch.setattr(time, "time_ns", lambda: ns)
    monkeypatch.setattr(time, "time", lambda: ns / 1e9)
    fast = quick.QuickRecord("migblockd", msg, args, ABOUT["fields"])
    # What Logger.info makes once it has decided to log (Logger._log with
    # logging._srcfile None), whatever the levels other tests left behind.
    slow = log.makeRecord(log.name, logging.INFO, "(unknown file)", 0, msg, args, None,
                          "(unknown function)", ABOUT, None)
    return fast, slow


@pytest.mark.parametrize("ns", [1_750_000_000_123_456_789, 1_750_000_000_999_999_999,
                                1_750_000_001_000_000_000, 1_750_000_000_001_000_100])
def test_a_quick_record_has_every_attribute_as_logging_makes_it(
        monkeypatch: pytest.MonkeyPatch, ns: int) -> None:
    fast, slow = twins(monkeypatch, ns)
    assert vars(fast) == vars(slow)


def test_a_lone_mapping_is_the_named_arguments_as_for_logging(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = twins(monkeypatch, args=({"who": "client 7"},), msg="%(who)s connected")
    assert fast.getMessage() == slow.getMessage() == "client 7 connected"


@pytest.mark.parametrize("fmt", [TextFormat(journal=False, pid=9), TextFormat(journal=True, pid=9),
                                 JsonFormat(journal=False, pid=9), JsonFormat(journal=True, pid=9)],
                         ids=["text", "text-journal", "json", "json-journal"])
def test_a_quick_record_formats_as_loggings_own(
        monkeypatch: pytest.MonkeyPatch, fmt: TextFormat | JsonFormat) -> None:
    fast, slow = twins(monkeypatch)
    assert fmt.line(fast) == fmt.line(slow)
    assert "client 7: added blocker vfio0 (normal): 'VFIO device'" in fmt.line(fast)


def test_a_quick_record_is_the_same_journal_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    fast, slow = twins(monkeypatch)
    assert journal_entry(fast) == journal_entry(slow)
    assert b"MIGBLOCKD_BLOCKER_ID=vfio0" in journal_entry(fast)


def test_a_quick_record_is_a_log_record_for_any_formatter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    fast, _ = twins(monkeypatch)
    line = logging.Formatter("%(levelname)s %(name)s %(module)s:%(lineno)d %(process)s "
                             "%(relativeCreated)d %(message)s").format(fast)
    assert line.startswith("INFO migblockd (unknown file):0 None ")
    assert line.endswith(" client 7: added blocker vfio0 (normal): 'VFIO device'")


@pytest.mark.parametrize("converter", [time.localtime, time.gmtime])
def test_text_time_is_loggings_default_across_seconds(
        monkeypatch: pytest.MonkeyPatch, converter: object) -> None:
    monkeypatch.setattr(logging.Formatter, "converter", converter)
    text = TextFormat(journal=False, pid=1)
    plain = logging.Formatter()
    for created in (1_700_000_000.998, 1_700_000_000.999, 1_700_000_001.0, 1_700_000_001.5,
                    1_700_003_600.25, 1_699_999_999.001):
        r = logging.LogRecord("m", logging.INFO, "", 0, "x", None, None)
        r.created, r.msecs = created, int((created - int(created)) * 1000) + 0.0
        assert text.line(r).split(" migblockd[")[0] == plain.formatTime(r)


def only(handler: logging.Handler) -> None:
    """Make ``handler`` the root's only one (pytest adds its own for each test)."""
    logging.getLogger().handlers[:] = [handler]


def test_info_hands_the_record_straight_over_when_ours_is_the_only_handler(sink: Sink) -> None:
    only(sink)
    quick.info(log, "%s: deleted blocker %s", "client 7", "vfio0", extra=ABOUT)
    [record] = sink.put
    assert type(record) is quick.QuickRecord
    assert record.getMessage() == "client 7: deleted blocker vfio0"
    assert record.fields == ABOUT["fields"]
    assert sink.handled == []


def test_info_is_dropped_below_the_level(sink: Sink) -> None:
    only(sink)
    logging.getLogger().setLevel(logging.WARNING)
    quick.info(log, "%s connected", "client 7", extra=ABOUT)
    assert sink.put == sink.handled == []


def test_info_goes_through_logging_when_records_would_differ(
        sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    only(sink)

    class Tagged(logging.LogRecord):
        pass

    monkeypatch.setattr(logging, "_logRecordFactory", Tagged)
    quick.info(log, "%s connected", "client 7", extra=ABOUT)
    logging.setLogRecordFactory(logging.LogRecord)
    logging.addLevelName(logging.INFO, "NOTICE")
    try:
        quick.info(log, "%s connected", "client 7", extra=ABOUT)
    finally:
        logging.addLevelName(logging.INFO, "INFO")
    assert sink.put == []
    assert [(type(r), r.levelname) for r in sink.handled] == [(Tagged, "INFO"),
                                                              (logging.LogRecord, "NOTICE")]


@pytest.mark.parametrize("change", ["handler filter", "logger filter", "root filter",
                                    "second handler", "handler level", "own handler",
                                    "no propagation"])
def test_info_goes_through_logging_when_logging_would_do_more(sink: Sink, change: str) -> None:
    root = logging.getLogger()
    seen: list[logging.LogRecord] = []

    def keep(record: logging.LogRecord) -> bool:
        seen.append(record)
        return True

    other = Sink()
    only(sink)
    undo = {
        "handler filter": (lambda: sink.addFilter(keep), lambda: sink.removeFilter(keep)),
        "logger filter": (lambda: log.addFilter(keep), lambda: log.removeFilter(keep)),
        "root filter": (lambda: root.addFilter(keep), lambda: root.removeFilter(keep)),
        "second handler": (lambda: root.addHandler(other), lambda: root.removeHandler(other)),
        "handler level": (lambda: sink.setLevel(logging.ERROR),
                          lambda: sink.setLevel(logging.NOTSET)),
        "own handler": (lambda: log.addHandler(other), lambda: log.removeHandler(other)),
        "no propagation": (lambda: setattr(log, "propagate", False),
                           lambda: setattr(log, "propagate", True)),
    }[change]
    undo[0]()
    try:
        quick.info(log, "%s connected", "client 7", extra=ABOUT)
    finally:
        undo[1]()
    assert sink.put == []
    expected = {"handler filter": 1, "logger filter": 1, "root filter": 0,
                "second handler": 0, "handler level": 0, "own handler": 0,
                "no propagation": 0}[change]
    assert len(seen) == expected
    handled = sink.handled + other.handled
    assert [r.getMessage() for r in handled] == (
        [] if change in ("handler level", "no propagation") else
        ["client 7 connected"] * (2 if change in ("second handler", "own handler") else 1))
    assert all(type(r) is logging.LogRecord for r in handled)


def test_info_without_our_handler_is_plain_logging(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="migblockd"):
        quick.info(log, "%s: added blocker %s", "client 7", "vfio0", extra=ABOUT)
    [record] = caplog.records
    assert record.getMessage() == "client 7: added blocker vfio0"
    assert record.fields == ABOUT["fields"]  # type: ignore[attr-defined]
