"""The logging package's parts on their own: encoders, formats, fields, the writer thread."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import struct
import sys
import threading
from pathlib import Path

import pytest
from journal_entries import Entry, parse_entry

from migblockd.logs import about, shown
from migblockd.logs.fields import FIELD_LIMIT, VALUES_LIMIT
from migblockd.logs.formats import JsonFormat, TextFormat, priority
from migblockd.logs.journal import (
    MAX_ENTRY,
    encode_entry,
    encode_field,
    socket_path,
    stderr_is_journal,
)
from migblockd.logs.writer import WAKE_INTERVAL, Writer, journal_entry
from migblockd.registry import Owner


def record(msg: str, *args: object, level: int = logging.INFO,
           fields: dict[str, object] | None = None) -> logging.LogRecord:
    r = logging.LogRecord("migblockd", level, __file__, 1, msg, args, None)
    if fields is not None:
        r.fields = fields
    return r


class Conn:
    def __init__(self, number: int, owner: Owner | None) -> None:
        self.number = number
        self.owner = owner


# --------------------------------------------------------------------------- journal encoding


def test_a_field_without_newline_is_key_equals_value() -> None:
    assert encode_field("MESSAGE", "hello = world") == b"MESSAGE=hello = world\n"


def test_a_field_with_a_newline_is_length_prefixed() -> None:
    value = "two\nlines"
    assert encode_field("MESSAGE", value) == (
        b"MESSAGE\n" + struct.pack("<Q", len(value)) + value.encode() + b"\n")


@pytest.mark.parametrize("key", ["", "lower", "_TRUSTED", "1DIGIT", "WITH-DASH", "A" * 65])
def test_invalid_field_names_are_refused(key: str) -> None:
    with pytest.raises(ValueError, match="invalid journal field name"):
        encode_field(key, "x")


def test_an_entry_reads_back_field_by_field() -> None:
    data = encode_entry("first\nsecond", 3, [("MIGBLOCKD_BLOCKER_ID", "a"),
                                             ("MIGBLOCKD_BLOCKER_ID", "b")])
    assert parse_entry(data) == [
        ("PRIORITY", b"3"), ("SYSLOG_IDENTIFIER", b"migblockd"),
        ("MIGBLOCKD_BLOCKER_ID", b"a"), ("MIGBLOCKD_BLOCKER_ID", b"b"),
        ("MESSAGE", b"first\nsecond"),
    ]


def test_lone_surrogates_and_non_ascii_are_encoded_not_fatal() -> None:
    entry = Entry(parse_entry(encode_entry("caf\u00e9 \ud800", 6)))
    assert entry["MESSAGE"] == "caf\u00e9 \\ud800"


def test_an_oversized_message_is_truncated_to_fit() -> None:
    data = encode_entry("\u00e9" * MAX_ENTRY + "\nend", 6, [("MIGBLOCKD_CLIENT", "1")])
    assert len(data) <= MAX_ENTRY
    entry = Entry(parse_entry(data))
    assert entry["MESSAGE"].endswith("\u00e9... [truncated]")  # cut between characters
    assert entry["MIGBLOCKD_CLIENT"] == "1"


def test_a_record_becomes_an_entry_with_its_fields() -> None:
    r = record("%s: added blocker %s", "client 1", "b1", level=logging.WARNING,
               fields={"client": 1, "peer_uid": 0, "blocker_id": ["b1", "b2"]})
    entry = Entry(parse_entry(journal_entry(r)))
    assert entry["MESSAGE"] == "client 1: added blocker b1"
    assert entry["PRIORITY"] == "4"
    assert entry["MIGBLOCKD_CLIENT"] == "1"
    assert entry["MIGBLOCKD_PEER_UID"] == "0"
    assert entry.all("MIGBLOCKD_BLOCKER_ID") == ["b1", "b2"]


def test_a_traceback_goes_in_the_message_binary_safe() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        r = logging.LogRecord("migblockd", logging.ERROR, __file__, 1, "internal error",
                              (), sys.exc_info())
    entry = Entry(parse_entry(journal_entry(r)))
    assert entry["MESSAGE"].startswith("internal error\nTraceback (most recent call last):")
    assert entry["MESSAGE"].endswith("RuntimeError: boom")


# --------------------------------------------------------------------------- is stderr the journal


def test_stderr_is_the_journal_only_when_device_and_inode_match(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    other = tmp_path / "other"
    other.write_text("")
    with path.open("w") as f:
        st = os.fstat(f.fileno())
        fd = f.fileno()
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fd)
        ost = os.stat(other)
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{ost.st_dev}:{ost.st_ino}"}, fd)
        for bad in ("", "x:y", f"{st.st_dev}", f"{st.st_dev}:{st.st_ino}:1", ":"):
            assert not stderr_is_journal({"JOURNAL_STREAM": bad}, fd)
        assert not stderr_is_journal({}, fd)


def test_the_journal_socket_must_exist_and_be_a_socket(tmp_path: Path) -> None:
    assert socket_path({"MIGBLOCKD_JOURNAL_SOCKET": str(tmp_path / "none")}) is None
    (tmp_path / "file").write_text("")
    assert socket_path({"MIGBLOCKD_JOURNAL_SOCKET": str(tmp_path / "file")}) is None


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(("level", "prio"), [
    (logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4), (logging.ERROR, 3),
    (logging.CRITICAL, 2), (logging.INFO + 1, 6), (5, 7)])
def test_priorities_are_sd_daemons(level: int, prio: int) -> None:
    assert priority(level) == prio


def test_text_for_a_terminal_has_time_pid_and_level() -> None:
    line = TextFormat(journal=False, pid=42).line(record("hello %s", "you"))
    assert line.endswith(" migblockd[42] INFO: hello you")
    assert line[:4].isdigit()


def test_text_for_the_journal_prefixes_every_line() -> None:
    line = TextFormat(journal=True, pid=42).line(
        record("one\ntwo", level=logging.WARNING))
    assert line == "<4>WARNING: one\n<4>two"


def test_json_has_the_fields_as_keys_and_cannot_be_forged() -> None:
    fmt = JsonFormat(journal=False, pid=42)
    r = record("%s: added blocker %s", "client 1", "b1",
               fields={"client": 1, "blocker_id": "b1", "message": "forged"})
    obj = json.loads(fmt.line(r))
    assert obj["message"] == "client 1: added blocker b1"
    assert (obj["level"], obj["priority"], obj["pid"]) == ("info", 6, 42)
    assert (obj["client"], obj["blocker_id"]) == (1, "b1")
    assert obj["time"].endswith("+00:00")
    assert JsonFormat(journal=True, pid=42).line(r).startswith("<6>{")
    assert "\n" not in fmt.line(record("a\nb \ud800"))


# --------------------------------------------------------------------------- fields


def test_shown_escapes_and_truncates() -> None:
    assert shown("a\nb") == "'a\\nb'"
    assert shown("x" * 300) == "'" + "x" * 200 + "...'"
    assert shown("#blocker0", quoted=False) == "#blocker0"
    assert shown(b'{"execute": "x"}') == "b'{\"execute\": \"x\"}'"
    assert shown(b"\n" * 5000, 10) == repr(b"\n" * 10) + "... (5000 bytes)"


def test_shown_gives_a_commands_arguments_as_the_compact_json_sent() -> None:
    # A refused migrate's channels were a Python repr ([{'channel-type': 'main', ...}]),
    # not the JSON the client sent: JSON's escapes are enough for one line, and another
    # layer (ascii()) would double its backslashes.
    assert shown([{"channel-type": "main", "addr": {"port": "1", "up": True, "n": None}}]) == (
        '[{"channel-type":"main","addr":{"port":"1","up":true,"n":null}}]')
    assert shown({"host": "h\n2026-01-01 CRITICAL forged\u2028\x7f\u00e9\"'\\"}) == (
        '{"host":"h\\n2026-01-01 CRITICAL forged\\u2028\\u007f\\u00e9\\"\'\\\\"}')
    assert shown(["x" * 300]) == '["' + "x" * 198 + "..."


def test_about_a_connection_and_a_blocker() -> None:
    conn = Conn(7, Owner(pid=1, uid=2, gid=3))
    assert about(conn, blocker_id="b", other=None) == {"fields": {
        "client": 7, "peer_pid": 1, "peer_uid": 2, "peer_gid": 3, "blocker_id": "b"}}
    assert about(Conn(8, None)) == {"fields": {"client": 8}}
    many = about(None, blocker_id=["y" * 1000] * 1000)["fields"]["blocker_id"]
    assert len(many) == VALUES_LIMIT and {len(v) for v in many} == {FIELD_LIMIT}


# --------------------------------------------------------------------------- the writer


def test_a_stuck_sink_drops_counts_and_reports_once_it_drains() -> None:
    read_fd, write_fd = os.pipe()
    # Fill the pipe, so that the writer's first write blocks.
    os.set_blocking(write_fd, False)
    try:
        while True:
            os.write(write_fd, b"." * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(write_fd, True)
    writer = Writer(TextFormat(journal=False, pid=1), fd=write_fd, capacity=10)
    writer.start()
    total = 100
    for i in range(total):
        writer.put(record("record %d", i))
    received = bytearray()

    def drain() -> None:
        while chunk := os.read(read_fd, 1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    writer.close(timeout=10)
    os.close(write_fd)
    reader.join(10)
    os.close(read_fd)
    lines = received.decode().split("\n")
    written = [line for line in lines if " INFO: record " in line]
    losses = [line for line in lines if " WARNING: dropped " in line]
    assert len(losses) == 1, losses
    lost = int(losses[0].split(" WARNING: dropped ")[1].split()[0])
    assert lost > 0
    assert len(written) + lost == total
    # The records that were written come in order.
    numbers = [int(line.rsplit(" ", 1)[1]) for line in written]
    assert numbers == sorted(numbers)


async def test_the_writer_is_woken_at_once_then_at_most_once_per_interval() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    writer = Writer(TextFormat(journal=False, pid=1), fd=theirs.fileno())
    writer.batching = True  # as the daemon serves
    writer.start()
    writes = []  # one datagram per write(2)
    writer.put(record("record %d", 0))
    # The first record after a quiet spell is not held back.
    loop = asyncio.get_running_loop()
    writes.append((await asyncio.wait_for(loop.sock_recv(ours, 1 << 16), 10)).decode())
    turns = 5
    for i in range(1, turns):
        # Later turns of the loop, and time enough for a writer woken at once to write.
        await asyncio.sleep(WAKE_INTERVAL / 10)
        writer.put(record("record %d", i))
    await asyncio.sleep(WAKE_INTERVAL * 5)
    writer.close(timeout=10)
    with contextlib.suppress(BlockingIOError):
        while True:
            writes.append(ours.recv(1 << 16).decode())
    ours.close()
    theirs.close()
    lines = "".join(writes).splitlines()
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == list(range(turns))
    # The four later ones came within one interval: one batch (a stall may split it).
    assert 2 <= len(writes) <= 3, writes


async def test_a_record_of_the_start_is_written_while_the_start_blocks_the_loop() -> None:
    # Found with the start's socket-group look-up: its "the group database has not
    # answered" warning, logged from the event loop's thread while the start's step
    # blocked it, waited for the loop's next turn to wake the writer: it came out
    # only when the step was over, 20 s later, or with the start's refusal.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer = Writer(TextFormat(journal=False, pid=1), fd=theirs.fileno())
    writer.start()
    try:
        writer.put(record("record %d", 0))
        # The loop's thread blocked, as by a start's step: the record is written meanwhile.
        ready, _, _ = select.select([ours], [], [], 10)
        assert ready, "the record waited for the event loop"
        assert ours.recv(1 << 16).decode().endswith("record 0\n")
    finally:
        writer.close(timeout=10)
        ours.close()
        theirs.close()
