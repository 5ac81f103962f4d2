"""migblock-shell's scripting mode against a real daemon: output, exit codes, errors."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess, quick_shell
from fakeqmp import GREETING, INTROSPECTION, SILENT, Line, Raw, serving

from migblockd.client import MigblockClient
from migblockd.shell import client as shell_client
from migblockd.shell import opening
from migblockd.shell.syntax import MAX_LINE

SHELL = [sys.executable, "-m", "migblockd.shell"]


def shell(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHELL, *args],
        check=False,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def replies(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_dash_c_prints_one_json_reply_per_line(daemon: DaemonProcess) -> None:
    result = shell(
        str(daemon.socket),
        "-c", "add-blocker reason='SEV: no migration' modes=normal,cpr-reboot id=b1",
        "-c", "query-blockers",
        "-c", "query-version",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    added, blockers, version = replies(result.stdout)
    assert added["return"]["id"] == "b1"
    assert added["return"]["modes"] == ["normal", "cpr-reboot"]
    assert [b["reason"] for b in blockers["return"]] == ["SEV: no migration"]
    assert "package" in version["return"]
    # The shell's own request ids are not shown; no events in scripting mode.
    assert all("id" not in r and "event" not in r for r in (added, blockers, version))
    assert result.stderr == ""


def test_stdin_script_skips_blank_lines_and_comments(daemon: DaemonProcess) -> None:
    script = "# set up\n\nadd-blocker reason=x\n   \nquery-migrate\n"
    result = shell(str(daemon.socket), stdin=script)
    assert result.returncode == 0, result.stderr
    added, migrate = replies(result.stdout)
    assert added["return"]["reason"] == "x"
    assert migrate == {"return": {"blocked-reasons": ["x"]}}


@pytest.mark.parametrize("first", ["query-version", '{"execute": "query-version"}'])
def test_a_script_saved_on_windows_runs_as_written(daemon: DaemonProcess, first: str) -> None:
    # Found by review: a byte order mark before the first line made it an unknown
    # command ('\ufeffquery-version'), a raw request one too.  Line ends of CR LF
    # were already read as line feeds.
    result = shell(str(daemon.socket), stdin=f"\ufeff{first}\r\nquery-migrate\r\n")
    assert (result.returncode, result.stderr) == (0, "")
    version, migrate = replies(result.stdout)
    assert version["return"]["package"].startswith("migblockd ")
    assert migrate == {"return": {}}


def test_values_typed_as_for_qmp_shell_are_sent_as_it_sends_them(daemon: DaemonProcess) -> None:
    # qmp-shell takes True and FALSE for booleans, and a Python literal where JSON
    # fails; the shell sent "True" as a string, and refused the literal.  A string
    # argument keeps such a value a string (qmp-shell's boolean would be refused).
    result = shell(
        str(daemon.socket),
        "-c", "add-blocker reason=True id=True internal=TRUE modes=['cpr-reboot']",
        "-c", "migrate-set-capabilities capabilities=[{'capability': 'events', 'state': True}]",
        "-c", "query-migrate-capabilities",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    added, _, capabilities = replies(result.stdout)
    assert {k: added["return"][k] for k in ("id", "reason", "internal", "modes")} == {
        "id": "True", "reason": "True", "internal": True, "modes": ["cpr-reboot"]}
    assert {"capability": "events", "state": True} in capabilities["return"]


def test_raw_json_request_keeps_its_own_id(daemon: DaemonProcess) -> None:
    result = shell(str(daemon.socket), "-c", '{"execute": "query-blockers", "id": {"mine": [1]}}')
    assert result.returncode == 0, result.stderr
    assert replies(result.stdout) == [{"return": [], "id": {"mine": [1]}}]


#: Raw requests whose bytes matter: JSON that Python reads and the daemon, like QEMU,
#: does not (0e5); a number Python would write another way (1E2, 1.50, -0); blanks
#: and an order of members Python would not keep; over several lines.
AS_TYPED = [
    '{"execute":"query-version","arguments":{"a":0e5}}',
    '{ "id" : 1E2 ,\t"execute" :"query-version"}',
    '{"arguments": {}, "id": [1.50, -0, "\\u00e9"], "execute": "query-blockers"}',
    '{\n  "execute": "query-version",\n  "id": 7\n}',
]


def test_a_raw_request_is_sent_as_typed_and_answered_as_its_bytes_are(
    daemon: DaemonProcess,
) -> None:
    # Found by review: the shell parsed a raw request and wrote it again, so
    # {"a": 0e5}, which the daemon refuses ("JSON parse error"), went as {"a": 0.0},
    # and "id": 1E2 as 100.0: not what a client that typed those bytes gets.
    result = shell(str(daemon.socket), "-v", stdin="".join(f"{t}\n" for t in AS_TYPED))

    async def direct() -> list[dict[str, Any]]:
        async with daemon.client() as client:
            for text in AS_TYPED:
                client.send_raw(text.encode() + b"\n")
            return await client.read_replies(len(AS_TYPED))

    expected = asyncio.run(direct())
    assert expected[0] == {"error": {"class": "GenericError",
                                     "desc": "JSON parse error, expected separator in dict"}}
    assert expected[1]["id"] == 100.0  # the daemon's echo of what it read
    assert result.returncode == 1  # the first is an error reply
    assert replies(result.stdout) == expected
    assert result.stderr == "".join(f"{t}\n" for t in AS_TYPED)  # -v shows what is sent
    log = daemon.log()
    for text in AS_TYPED:
        assert f" <- {(text + chr(10)).encode()!r}" in log


def test_raw_json_the_shell_cannot_send_as_typed_is_still_refused(daemon: DaemonProcess) -> None:
    refused = ['{"execute": "query-version", "id": 1, "id": 2}',
               '{"execute": "query-version", "id": NaN}',
               '{"execute": "query-version", "id": 1e400}',
               '{"execute": "query-version", "id": ' + "9" * 5000 + "}",
               '{"execute": "query-version"} {"execute": "query-blockers"}']
    result = shell(str(daemon.socket), *[a for text in refused for a in ("-c", text)])
    assert (result.returncode, result.stdout) == (1, "")
    assert [line.split(": ", 3)[2:] for line in result.stderr.splitlines()] == [
        ["error", "invalid JSON: duplicate key 'id'"],
        ["error", "invalid JSON: NaN is not JSON"],
        ["error", "invalid JSON: number 1e400 is out of range"],
        ["error", "invalid JSON: an integer of 5,000 digits, more than the daemon reads (4,300)"],
        ["error", "invalid JSON: Extra data: line 1 column 30 (char 29)"]]
    assert daemon.received() == ["qmp_capabilities", "query-qmp-schema", "query-commands"]


def test_a_request_pretty_printed_in_a_file_runs_whole(daemon: DaemonProcess) -> None:
    # Found in use: `migblock-shell < request.json` with the request as
    # json.dumps(indent=4) writes it sent each of its lines as a command.
    request = {"execute": "add-blocker", "arguments": {"id": "kept", "reason": "a } in [it"}}
    script = "\n".join([
        "query-version",
        json.dumps(request, indent=4),   # lines 2-8
        '{"execute":',                   # line 9: its brace never closes
        "query-blockers",                # line 10: runs all the same
        '{ "execute": "query-blockers",,',  # lines 11-12: closed, not JSON
        "}",
        "{",                             # line 13: open at the end of the input
    ]) + "\n"
    result = shell(str(daemon.socket), stdin=script)
    assert result.returncode == 1
    version, added, listed = replies(result.stdout)
    assert "qemu" in version["return"]
    assert added["return"]["id"] == "kept"
    assert [b["reason"] for b in listed["return"]] == ["a } in [it"]
    lines = [line.split(": error: ")[0] for line in result.stderr.splitlines()]
    assert lines == ["migblock-shell: line 9", "migblock-shell: line 11",
                     "migblock-shell: line 13"], result.stderr


def test_a_line_of_words_longer_than_the_daemon_takes_is_refused_unread(
    daemon: DaemonProcess,
) -> None:
    """Found by the shell review: a 50 MB line of key=value words, pasted or in a
    script, was read one character at a time (90 s), deaf to Ctrl-C, to build a
    request the daemon refuses past its default --max-message-size (1 MiB).  Such a
    line is refused before it is read; raw JSON is sent as typed, for the daemon to
    judge, and a line of words within the bound runs."""
    words = "add-blocker" + " reason=x" * 600_000
    value = "add-blocker reason=" + "y" * MAX_LINE
    raw = json.dumps({"execute": "add-blocker", "arguments": {"reason": "z" * MAX_LINE}})
    within = "add-blocker id=b1" + " " * (MAX_LINE - 40) + "reason=w"  # read, sent small
    result = shell(str(daemon.socket),
                   stdin=f"{words}\n{value}\n{raw}\n{within}\nquery-blockers\n")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"migblock-shell: line {n}: error: a line of {len(line):,} characters is more than "
        "the 1,048,576 this shell reads as key=value words (the daemon's default "
        "max-message-size, in bytes, past which it refuses a request): write it as a raw "
        'JSON request ({"execute": ...}), which is sent as typed'
        for n, line in [(1, words), (2, value)]]
    refused, added, listed = replies(result.stdout)
    assert refused == {"error": {"class": "GenericError",
                                 "desc": "JSON token size limit exceeded"}}
    assert added["return"]["id"] == "b1"
    assert [b["id"] for b in listed["return"]] == ["b1"]


def test_failed_command_makes_exit_status_1_but_the_rest_still_runs(daemon: DaemonProcess) -> None:
    result = shell(str(daemon.socket), stdin="del-blocker id=nope\nadd-blocker reason=after\n")
    assert result.returncode == 1
    error, added = replies(result.stdout)
    assert error["error"]["class"] == "GenericError"
    assert added["return"]["reason"] == "after"
    assert "\x1b" not in result.stdout  # no colour when stdout is not a terminal


def test_daemon_side_validation_errors_are_failures(daemon: DaemonProcess) -> None:
    result = shell(str(daemon.socket), "-c", "add-blocker modes=bogus reason=x")
    assert result.returncode == 1
    (error,) = replies(result.stdout)
    assert error["error"]["desc"] == "Parameter 'modes[0]' does not accept value 'bogus'"


def test_unknown_names_fail_the_run_and_are_never_sent(daemon: DaemonProcess) -> None:
    typo = shell(str(daemon.socket), "-c", "add-blocker reson=x")
    assert typo.returncode == 1
    assert typo.stdout == ""  # no reply: there was no request
    assert typo.stderr == (
        "migblock-shell: -c 1: error: unknown argument 'reson' for add-blocker;"
        " did you mean 'reason'?\n"
    )
    # From a pipe: the line is refused, the others still run.
    piped = shell(
        str(daemon.socket),
        stdin="add-bloker reason=x\n"
        'migrate-set-capabilities capabilities=[{"capabilty": "events", "state": true}]\n'
        "query-version x=1\n"
        "del-blocker name=b1\n"
        "frobnicate\n"
        "query-blockers\n",
    )
    assert piped.returncode == 1
    assert piped.stderr.splitlines() == [
        "migblock-shell: line 1: error: unknown command 'add-bloker';"
        " did you mean 'add-blocker'?",
        "migblock-shell: line 2: error: unknown argument 'capabilities[0].capabilty'"
        " for migrate-set-capabilities; did you mean 'capabilities[0].capability'?",
        "migblock-shell: line 3: error: unknown argument 'x' for query-version:"
        " it takes no arguments",
        "migblock-shell: line 4: error: unknown argument 'name' for del-blocker"
        " (its arguments: id)",
        "migblock-shell: line 5: error: unknown command 'frobnicate';"
        " 'help' lists the commands",
    ]
    assert replies(piped.stdout) == [{"return": []}]  # the blocker was not added
    # The daemon's debug log shows every request it received: each shell's
    # negotiation and schema, and query-blockers; none of the refused lines.
    daemon.wait_for_log(re.compile(r' <- b.*"execute": ?"query-blockers"'))
    negotiation = ["qmp_capabilities", "query-qmp-schema", "query-commands"]
    assert daemon.received() == negotiation * 2 + ["query-blockers"]


def test_a_name_typed_in_the_wrong_case_is_suggested_as_it_is(daemon: DaemonProcess) -> None:
    # Found by review: with Caps Lock on, QUERY-MIGRATE got "'help' lists the
    # commands" and no suggestion, though it differs from query-migrate by case alone.
    piped = shell(
        str(daemon.socket),
        stdin="QUERY-MIGRATE\n"
        "add-blocker REASON=x\n"
        "help blocker_added\n"
        "Query-Blockers\n"
        "query-blockers\n",
    )
    assert piped.returncode == 1
    assert piped.stderr.splitlines() == [
        # The name itself alone, not query-migrate-capabilities and the like too.
        "migblock-shell: line 1: error: unknown command 'QUERY-MIGRATE';"
        " did you mean 'query-migrate'?",
        "migblock-shell: line 2: error: unknown argument 'REASON' for add-blocker;"
        " did you mean 'reason'?",
        "migblock-shell: line 3: error: help: the daemon has no command, event or type"
        " 'blocker_added'; did you mean 'BLOCKER_ADDED'?",
        "migblock-shell: line 4: error: unknown command 'Query-Blockers';"
        " did you mean 'query-blockers'?",
    ]
    assert replies(piped.stdout) == [{"return": []}]  # nothing was added


def test_a_pasted_megabyte_is_quoted_cut(daemon: DaemonProcess) -> None:
    # Found by review: the whole name came back in the error, after seconds of
    # looking for a command like it.
    name = "x" * 1_000_000
    piped = shell(str(daemon.socket), stdin=f"{name}\nhelp {name}\n"
                                            f"add-blocker reason=r {name}=1\nquery-blockers\n")
    cut = f"'{'x' * 64}... (1,000,000 characters)'"
    assert piped.returncode == 1
    assert piped.stderr.splitlines() == [
        f"migblock-shell: line 1: error: unknown command {cut}; 'help' lists the commands",
        f"migblock-shell: line 2: error: help: the daemon has no command, event or type {cut}",
        f"migblock-shell: line 3: error: unknown argument {cut} for add-blocker (its "
        "arguments: reason, modes, internal, id, scope)",
    ]
    assert replies(piped.stdout) == [{"return": []}]


def test_an_integer_longer_than_the_daemon_reads_is_refused_not_sent_as_a_string(
        daemon: DaemonProcess) -> None:
    # Found by review: 4,301 digits or more were sent as a string when typed bare, and
    # refused with Python's advice (sys.set_int_max_str_digits) in brackets; lifting
    # Python's bound instead made a pasted megabyte of digits a 16 s freeze.
    digits = "1" * 5000
    result = shell(str(daemon.socket), "-c", f"migrate-set-parameters downtime-limit={digits}",
                   "-c", f"add-blocker reason=x internal=[{digits}]",
                   "-c", f'{{"execute": "query-version", "id": {digits}}}')
    assert result.returncode == 1
    too_long = "an integer of 5,000 digits, more than the daemon reads (4,300)"
    assert result.stderr.splitlines() == [
        f"migblock-shell: -c 1: error: {too_long}",
        f"migblock-shell: -c 2: error: 'internal': invalid JSON value [{'1' * 76}...: "
        f"{too_long}",
        f"migblock-shell: -c 3: error: invalid JSON: {too_long}",
    ]
    assert result.stdout == ""


def test_a_pasted_word_is_quoted_cut_in_syntax_errors(daemon: DaemonProcess) -> None:
    # Found by review: these errors quoted a 100 KB word whole.
    word = "w" * 100_000
    cut = "w" * 77 + "..."
    piped = shell(str(daemon.socket), stdin=f"add-blocker {word}\nadd-blocker ={word}\n"
                                            f"add-blocker reason=x {word}.=1\n{word}=1\n")
    assert piped.returncode == 1
    assert piped.stderr.splitlines() == [
        f"migblock-shell: line 1: error: expected key=value, got '{cut}'",
        f"migblock-shell: line 2: error: missing key before '=' in '={cut}'",
        f"migblock-shell: line 3: error: bad key '{cut}': empty name between dots",
        f"migblock-shell: line 4: error: expected a command name first, got '{cut}'",
    ]


def test_a_line_that_starts_with_no_command_shows_its_first_word_whole(
    daemon: DaemonProcess,
) -> None:
    # Found by review: pasted from a web page, add-blocker<U+00A0>reason=x was
    # refused as "expected a command name first, got 'add-blocker'": the message cut
    # the word where Python sees a space and the shell, as a POSIX shell, does not,
    # so it named a command as what was not one.  It cut a quoted key too.
    result = shell(str(daemon.socket), "-c", "add-blocker\u00a0reason=x",
                   "-c", "add-blocker\u2003reason=x internal=true",
                   "-c", "'add blocker'=x reason=y", "-c", "query-blockers")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "migblock-shell: -c 1: error: expected a command name first, got "
        "'add-blocker\\xa0reason=x' (U+00A0 NO-BREAK SPACE does not separate words: "
        "type a space)",
        "migblock-shell: -c 2: error: expected a command name first, got "
        "'add-blocker\\u2003reason=x' (U+2003 EM SPACE does not separate words: "
        "type a space)",
        "migblock-shell: -c 3: error: expected a command name first, got "
        "''add blocker'=x'",
    ]
    assert replies(result.stdout) == [{"return": []}]  # nothing was sent


def test_a_qmp_shell_transaction_block_is_refused_whole(daemon: DaemonProcess) -> None:
    # Found by review: qmp-shell's transaction( ... ) block, pasted or in a script,
    # had each of its actions run alone, at once, and not as one transaction: only
    # its first and last lines were refused (unknown command 'transaction(' and ')').
    # The whole block is refused now, and nothing of it sent.
    script = ("transaction(\n"
              "add-blocker reason=a id=ta\n"
              "  add-blocker reason=b id=tb )\n"
              "query-blockers\n"
              "transaction( add-blocker reason=c id=tc )\n"
              "transaction(\n"
              "add-blocker reason=d id=td\n")  # never closed: to the end of the input
    result = shell(str(daemon.socket), stdin=script)
    refused = ("error: qmp-shell's transaction( ... ) block is not read by this shell: none "
               "of its lines was sent (write transaction actions=[...], or a raw JSON "
               "request)")
    assert result.stderr.splitlines() == [
        f"migblock-shell: line {number}: {refused}" for number in (1, 5, 6)]
    assert replies(result.stdout) == [{"return": []}]
    assert result.returncode == 1
    typed = shell(str(daemon.socket), "-c", "transaction(", "-c", "query-blockers")
    assert typed.stderr == f"migblock-shell: -c 1: {refused}\n"
    assert replies(typed.stdout) == [{"return": []}]


def test_a_member_of_what_is_not_an_object_is_refused_before_sending(
    daemon: DaemonProcess,
) -> None:
    # A dotted key (or a JSON object) under a string, a list or an enum names a
    # member the schema cannot have; the daemon would only say the type is wrong.
    result = shell(
        str(daemon.socket),
        stdin="add-blocker reason.x=1\n"
        'add-blocker reason={"x": 1}\n'
        "add-blocker reason=r modes.a=1\n"
        'add-blocker reason=r modes=[{"a": 1}]\n'
        "add-blocker reason=r internal.y.z=1\n"
        "query-blockers\n",
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "migblock-shell: line 1: error: unknown argument 'reason.x' for add-blocker:"
        " 'reason' is a string, not an object",
        "migblock-shell: line 2: error: unknown argument 'reason.x' for add-blocker:"
        " 'reason' is a string, not an object",
        "migblock-shell: line 3: error: unknown argument 'modes.a' for add-blocker:"
        " 'modes' is a list, not an object",
        "migblock-shell: line 4: error: unknown argument 'modes[0].a' for add-blocker:"
        " 'modes[0]' is an enum value, not an object",
        "migblock-shell: line 5: error: unknown argument 'internal.y' for add-blocker:"
        " 'internal' is a boolean, not an object",
    ]
    assert replies(result.stdout) == [{"return": []}]
    daemon.wait_for_log(re.compile(r' <- b.*"execute": ?"query-blockers"'))
    assert daemon.received() == ["qmp_capabilities", "query-qmp-schema", "query-commands",
                                 "query-blockers"]


def test_raw_json_and_type_errors_are_left_to_the_daemon(daemon: DaemonProcess) -> None:
    result = shell(
        str(daemon.socket),
        "-c", '{"execute": "add-blocker", "arguments": {"reson": "x"}}',
        "-c", "add-blocker internal=true",
        "-c", "add-blocker reason=x internal=maybe",
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == ""
    assert [r["error"]["desc"] for r in replies(result.stdout)] == [
        "Parameter 'reason' is missing",
        "Parameter 'reason' is missing",
        "Invalid parameter type for 'internal', expected: boolean",
    ]
    daemon.wait_for_log(repr(b'{"execute": "add-blocker", "arguments": {"reson": "x"}}\n'))


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[Path]:
    """A real QEMU with no guest, paused; yields its QMP socket."""
    binary = shutil.which("qemu-system-x86_64")
    assert binary is not None, "qemu-system-x86_64 is needed: apt-get install qemu-system-x86"
    sock, pidfile = tmp_path / "qemu.sock", tmp_path / "qemu.pid"
    subprocess.run(
        [binary, "-machine", "none", "-nodefaults", "-display", "none", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off", "-daemonize", "-pidfile", str(pidfile)],
        check=True, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    # -daemonize returns once the monitor listens.
    pid = int(pidfile.read_text())
    yield sock
    os.kill(pid, signal.SIGTERM)


def test_nested_names_are_checked_where_the_schema_knows_them(qemu: Path) -> None:
    # QEMU's own schema has what migblockd's lacks: a struct-typed argument
    # (query-cpu-model-expansion's model, a CpuModelInfo), for dotted keys.
    typo = shell(str(qemu), "-c", "query-cpu-model-expansion type=static model.nmae=qemu64")
    assert typo.returncode == 1
    assert typo.stdout == ""
    assert typo.stderr == (
        "migblock-shell: -c 1: error: unknown argument 'model.nmae' for"
        " query-cpu-model-expansion; did you mean 'model.name'?\n"
    )
    # Correct nested keys go through; so do the members of a union (blockdev-add's
    # arguments depend on 'driver'), which the shell cannot know...
    right = shell(
        str(qemu),
        "-c", "query-cpu-model-expansion type=static model.name=qemu64",
        "-c", "blockdev-add driver=null-co node-name=n0 size=1024",
        "-c", "query-named-block-nodes",
    )  # fmt: skip
    assert right.returncode == 0, right.stderr
    expansion, added, nodes = replies(right.stdout)
    assert expansion["return"]["model"]["name"] == "base"
    assert added == {"return": {}}
    assert [(n["node-name"], n["image"]["virtual-size"]) for n in nodes["return"]] == [("n0", 1024)]
    # ...so a typo there is QEMU's to report.
    union = shell(str(qemu), "-c", "blockdev-add driver=null-co node-name=n1 sise=1024")
    assert union.returncode == 1
    assert union.stderr == ""
    assert replies(union.stdout)[0]["error"]["desc"] == "Parameter 'sise' is unexpected"


def test_a_unions_members_are_typed_by_the_variant_its_tag_names(qemu: Path) -> None:
    # Found by review: a union's members depend on its tag, so the shell had no
    # type for them and sent data=1234 as an integer, which QEMU refuses
    # ("Invalid parameter type for 'data', expected: string").  With the tag on the
    # line, in any order, its variant's members are typed: nested unions (qcow2's
    # encrypt, on 'format') and a union under an alternate (raw's file) too.
    result = shell(
        str(qemu), "-v",
        "-c", "object-add qom-type=secret id=s1 data=1234",
        "-c", "object-add data=5678 id=s2 qom-type=secret",
        "-c", "blockdev-add driver=file node-name=f1 filename=1234",
        "-c", "blockdev-add driver=raw node-name=r1 file.driver=file file.filename=1234",
        "-c", "blockdev-add driver=qcow2 node-name=q1 file=f0 encrypt.format=luks"
              " encrypt.key-secret=1234",
        # Without its tag, a variant's member is read as before.
        "-c", "object-add id=s3 data=1234",
    )  # fmt: skip
    sent = [json.loads(line)["arguments"] for line in result.stderr.splitlines()]
    assert sent == [
        {"qom-type": "secret", "id": "s1", "data": "1234"},
        {"data": "5678", "id": "s2", "qom-type": "secret"},
        {"driver": "file", "node-name": "f1", "filename": "1234"},
        {"driver": "raw", "node-name": "r1", "file": {"driver": "file", "filename": "1234"}},
        {"driver": "qcow2", "node-name": "q1", "file": "f0",
         "encrypt": {"format": "luks", "key-secret": "1234"}},
        {"id": "s3", "data": 1234},
    ]
    # QEMU took each as typed, and judged what the values mean.
    assert [r.get("error", {}).get("desc") for r in replies(result.stdout)] == [
        None,
        None,
        "Could not open '1234': No such file or directory",
        "Could not open '1234': No such file or directory",
        "Cannot find device='f0' nor node-name='f0'",
        "Parameter 'qom-type' is missing",
    ]


def test_an_alternate_whose_only_scalar_is_a_string_takes_a_bare_value_as_one(
    qemu: Path,
) -> None:
    # Found by review: blockdev-add's file is a BlockdevRef, an object or a node's
    # name, and file=1234 went as an integer, which QEMU refuses ("Invalid parameter
    # type for 'file', expected: BlockdevRef").  backing may also be null: it is
    # still read by the plain rules.
    result = shell(
        str(qemu), "-v",
        "-c", "blockdev-add driver=raw node-name=r2 file=1234",
        "-c", "blockdev-add driver=qcow2 node-name=q2 file=f0 backing=null",
    )  # fmt: skip
    sent = [json.loads(line)["arguments"] for line in result.stderr.splitlines()]
    assert sent == [
        {"driver": "raw", "node-name": "r2", "file": "1234"},
        {"driver": "qcow2", "node-name": "q2", "file": "f0", "backing": None},
    ]
    assert [r["error"]["desc"] for r in replies(result.stdout)] == [
        "Cannot find device='1234' nor node-name='1234'",
        "Cannot find device='f0' nor node-name='f0'",
    ]


def test_help_wraps_what_introspection_describes_at_the_terminals_width(qemu: Path) -> None:
    # Found by review: a type QEMU's introspection describes was one line, however
    # long: query-block's Returns: was 885 characters, object-add's qom-type 600.
    env = {**os.environ, "COLUMNS": "80"}
    for command in ("query-block", "object-add"):
        result = shell(str(qemu), "-c", f"help {command}", env=env)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert max(len(line) for line in lines) < 80
        # Continued under itself, more deeply indented, nothing lost.
        wide = shell(str(qemu), "-c", f"help {command}",
                     env={**os.environ, "COLUMNS": "100000"}).stdout
        assert result.stdout.split() == wide.split()
        if command == "query-block":
            returns = lines[lines.index(next(li for li in lines if li.startswith("Returns:"))):]
            assert returns[0].startswith("Returns: list of (object {device: string")
            assert returns[1].startswith("    ") and returns[1][4] != " "


def test_device_add_takes_its_devices_properties_as_qemu_does(tmp_path: Path) -> None:
    # Found by review: device_add's introspection lists driver, bus and id only,
    # and the shell refused every property of the device (`unknown argument
    # 'chassis_nr' for device_add`), which QEMU takes ('gen': false in its
    # qapi/qdev.json) and qmp-shell sends.  A PC machine, for a PCI bus.
    binary = shutil.which("qemu-system-x86_64")
    assert binary is not None, "qemu-system-x86_64 is needed: apt-get install qemu-system-x86"
    sock, pidfile = tmp_path / "pc.sock", tmp_path / "pc.pid"
    subprocess.run(
        [binary, "-machine", "pc", "-nodefaults", "-display", "none", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off", "-daemonize", "-pidfile", str(pidfile)],
        check=True, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    try:
        result = shell(
            str(sock),
            "-c", "device_add driver=pci-bridge id=b0 chassis_nr=7",
            "-c", "qom-get path=/machine/peripheral/b0 property=chassis_nr",
            "-c", "device_add driver=pci-bridge id=b1 chasis_nr=8",
        )  # fmt: skip
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert result.stderr == ""  # nothing refused by the shell: a typo is QEMU's to name
    assert replies(result.stdout) == [
        {"return": {}},
        {"return": 7},
        {"error": {"class": "GenericError",
                   "desc": "Property 'pci-bridge.chasis_nr' not found"}},
    ]


@pytest.mark.parametrize(("monitor", "why"), [
    (["-monitor", "unix:{sock},server=on,wait=off"],
     "this is QEMU's human monitor (HMP: -monitor, or -mon mode=readline), not QMP: "
     "give the shell a -qmp monitor"),
    (["-chardev", "socket,id=m,path={sock},server=on,wait=off",
      "-mon", "chardev=m,mode=control,pretty=on"],
     "QEMU's monitor pretty-prints its JSON (-qmp-pretty, or -mon pretty=on), which the "
     "shell cannot read: give it a monitor without it"),
], ids=["hmp", "pretty"])
def test_a_qemu_monitor_the_shell_cannot_use_is_named(
    tmp_path: Path, monitor: list[str], why: str
) -> None:
    # Found by review: both were "the server did not send a QMP greeting", where
    # migblockd's --qemu names them.
    binary = shutil.which("qemu-system-x86_64")
    assert binary is not None, "qemu-system-x86_64 is needed: apt-get install qemu-system-x86"
    sock, pidfile = tmp_path / "monitor.sock", tmp_path / "qemu.pid"
    subprocess.run(
        [binary, "-machine", "none", "-nodefaults", "-display", "none", "-S",
         *[arg.format(sock=sock) for arg in monitor],
         "-daemonize", "-pidfile", str(pidfile)],
        check=True, stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    try:
        result = shell(str(sock), "-c", "query-version")
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"migblock-shell: {sock}: {why}\n"


def test_syntax_error_goes_to_stderr_with_the_line_number(daemon: DaemonProcess) -> None:
    result = shell(str(daemon.socket), stdin="query-version\nadd-blocker reason='open\n")
    assert result.returncode == 1
    assert len(replies(result.stdout)) == 1
    assert result.stderr.startswith("migblock-shell: line 2: error: unterminated ' quote")
    assert "Traceback" not in result.stderr


def test_verbose_echoes_requests_on_stderr_and_pretty_indents(daemon: DaemonProcess) -> None:
    result = shell(str(daemon.socket), "-v", "-p", "-c", "add-blocker reason=x internal=true")
    assert result.returncode == 0
    sent = json.loads(result.stderr)
    assert sent["execute"] == "add-blocker"
    assert sent["arguments"] == {"reason": "x", "internal": True}
    # As qmp-shell's -p: four spaces, keys sorted.
    assert result.stdout.startswith('{\n    "return": {\n        "added": {\n')
    reply = json.loads(result.stdout)["return"]
    assert reply["internal"] is True
    assert result.stdout.index('"id"') < result.stdout.index('"internal"') < result.stdout.index(
        '"modes"') < result.stdout.index('"reason"')


def test_help_in_scripting_mode(daemon: DaemonProcess) -> None:
    result = shell(str(daemon.socket), "-c", "help", "-c", "help del-blocker")
    assert result.returncode == 0
    assert "add-blocker" in result.stdout
    assert "id: string (required)" in result.stdout
    bad = shell(str(daemon.socket), "-c", "help no-such-thing")
    assert bad.returncode == 1
    assert "no command, event or type 'no-such-thing'" in bad.stderr
    close = shell(str(daemon.socket), "-c", "help blocker")
    assert close.returncode == 1
    # The events too, whose names differ in case alone (BLOCKER_ADDED).
    assert close.stderr == (
        "migblock-shell: -c 1: error: help: the daemon has no command, event or type 'blocker';"
        " did you mean 'add-blocker', 'del-blocker', 'BLOCKER_ADDED', 'query-blockers' or"
        " 'BLOCKER_DELETED'?\n"
    )
    # Found by review: the usage named commands only, where help takes events and types.
    two = shell(str(daemon.socket), "-c", "help MigMode BLOCKER_ADDED")
    assert two.stderr == "migblock-shell: -c 1: error: usage: help [COMMAND | EVENT | TYPE]\n"
    assert "MigMode" in shell(str(daemon.socket), "-c", "help MigMode").stdout


def test_a_directory_as_stdin_is_refused_by_python_before_the_shell_runs(
        daemon: DaemonProcess, tmp_path: Path) -> None:
    # As docs/shell.md says: the interpreter refuses it while it starts, so the shell
    # cannot give its usage status.  Should a Python let the shell run, this fails, and
    # the shell is then to refuse it in a line of its own, with exit status 64.
    command = Path(sys.executable).parent / "migblock-shell"
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = subprocess.run([str(command), str(daemon.socket), "-c", "query-version"],
                                stdin=directory, capture_output=True, text=True,
                                timeout=60, check=False)
    finally:
        os.close(directory)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr.startswith("Fatal Python error: init_sys_streams: <stdin> is a "
                                    "directory, cannot continue\n"), result.stderr
    assert "migblock-shell" not in result.stderr


def test_connection_refused_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    result = shell(str(tmp_path / "missing.sock"), "-c", "query-version")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("migblock-shell: cannot connect to ")
    assert "No such file or directory" in result.stderr


def test_a_missing_socket_beside_others_names_them(short_tmp: Path) -> None:
    # One daemon per VM (/run/migblockd/vm1.sock...) and none at the default path:
    # "No such file or directory" alone left the operator to find the sockets.
    listeners = []
    for name in ("vm2.sock", "vm1.sock"):
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(short_tmp / name))
        listeners.append(sock)
    (short_tmp / "vm1.sock.lock").touch()  # not a socket: not named
    try:
        result = shell(str(short_tmp / "migblockd.sock"), "-c", "query-version")
    finally:
        for sock in listeners:
            sock.close()
    assert (result.returncode, result.stderr) == (2, (
        f"migblock-shell: cannot connect to {short_tmp}/migblockd.sock: No such file or "
        f"directory (sockets in {short_tmp}: vm1.sock, vm2.sock; give one's path)\n"))


def test_a_staging_socket_is_not_named_as_a_daemons(short_tmp: Path) -> None:
    # Found by review: a daemon killed between binding its socket by its staging name
    # and linking it to its own left .NAME.binding, which the shell offered as a
    # socket to give (nobody answers there; during a start it is NAME in a moment).
    left = socket.socket(socket.AF_UNIX)
    left.bind(str(short_tmp / ".migblockd.sock.binding"))
    left.close()
    result = shell(str(short_tmp / "migblockd.sock"), "-c", "query-version")
    assert (result.returncode, result.stderr) == (2, (
        f"migblock-shell: cannot connect to {short_tmp}/migblockd.sock: No such file or "
        "directory\n"))


def test_default_socket_comes_from_the_environment(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(tmp_path)}
    argv = [*SHELL, "-c", "query-version"]
    if os.geteuid() == 0:
        # root's default lives in /run: give the shell an empty private /run, so
        # that a daemon really running on this machine cannot answer.
        expected = Path("/run/migblockd/migblockd.sock")
        empty_run = tmp_path / "run"
        empty_run.mkdir()
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /run && exec "$@"', str(empty_run), *argv]
        # Reported: "No such file or directory" alone, where no daemon was started.
        hint = (" (no daemon listens there: start the systemd units' one with 'systemctl "
                "start migblockd.socket', or run migblockd)")
    else:
        expected = tmp_path / "migblockd" / "migblockd.sock"
        hint = (" (this user's default socket; the daemon of the systemd units listens on "
                "/run/migblockd/migblockd.sock: give that path)"
                if os.path.isdir("/run/migblockd") else
                " (no daemon listens there: start one with migblockd)")
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env,
                            check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        f"migblock-shell: cannot connect to {expected}: No such file or directory{hint}\n"
    )


def _serve_once(server: socket.socket, payload: bytes) -> None:
    conn, _ = server.accept()
    with conn:
        conn.sendall(payload)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"", "the connection was closed before a greeting"),
     (b"hello\r\n", "did not send a QMP greeting")],
)
def test_a_socket_that_does_not_speak_qmp_is_exit_status_2(
    payload: bytes, message: str, tmp_path: Path
) -> None:
    path = tmp_path / "not-qmp.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        thread = threading.Thread(target=_serve_once, args=(server, payload))
        thread.start()
        result = shell(str(path), "-c", "query-version")
        thread.join()
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stderr.count("\n") == 1


DEEP = Raw("[" * 100_000 + "]" * 100_000)
#: The end of the line of a command sent to a server that then broke the connection.
LOST = "; the command may or may not have taken effect"
#: Why: a message the shell holds to what it would send itself.
UNREAD = "a message from the daemon cannot be read ({}), so the shell closed the connection"


@pytest.mark.parametrize(("greeting", "returns", "why"), [
    ({"QMP": {"version": 1, "capabilities": []}}, {},
     "{path}: the server did not send a QMP greeting"),
    ({"QMP": {"version": {}}}, {}, "{path}: the server did not send a QMP greeting"),
    (GREETING, {"query-qmp-schema": [
        {"name": "x", "meta-type": "command", "arg-type": "0", "ret-type": "0"}, 7]},
     "{path}: the server's answer to query-qmp-schema is malformed: entry 1 is not an "
     "object"),
    (GREETING, {"query-qmp-schema": [
        {"name": "x", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
        {"name": "0", "meta-type": "object", "members": [{"name": "a"}]}]},
     "{path}: the server's answer to query-qmp-schema is malformed: entry 1 (object '0'): "
     "'members' is not a list of objects with a string 'name' and a string 'type'"),
    # A union's variants, which the shell reads to type the members of one.
    (GREETING, {"query-qmp-schema": [
        {"name": "x", "meta-type": "command", "arg-type": "0", "ret-type": "0"},
        {"name": "0", "meta-type": "object", "members": [], "tag": "t",
         "variants": [{"case": "a", "type": 1}]}]},
     "{path}: the server's answer to query-qmp-schema is malformed: entry 1 (object '0'): "
     "'variants' is not a list of objects with a string 'case' and a string 'type'"),
    (GREETING, {"query-qmp-schema": {}},
     "{path}: the server's answer to query-qmp-schema is malformed: not a list"),
    (GREETING, {"query-commands": [{"name": "x"}, None]},
     "{path}: the server's answer to query-commands is malformed: not a list of objects "
     "with a string 'name'"),
    # Nested deeper than Python's decoder recurses: a RecursionError's traceback, and
    # exit status 1, before.
    (DEEP, {}, "{path}: the server did not send a QMP greeting"),
    (GREETING, {"query-version": DEEP},
     "-c 1: {path}: " + UNREAD.format("nested too deeply") + LOST),
    (GREETING, {"query-version": Raw('{"a": NaN}')},
     "-c 1: {path}: " + UNREAD.format("NaN is not JSON") + LOST),
    (GREETING, {"query-version": Raw('{"a": ' + "1" * 5000 + "}")},
     "-c 1: {path}: " + UNREAD.format(
         "an integer of 5,000 digits, more than the daemon reads (4,300)") + LOST),
    (GREETING, {"query-version": Raw('{"a": -1e400}')},
     "-c 1: {path}: " + UNREAD.format("number -1e400 is out of range") + LOST),
], ids=["version-not-an-object", "no-capabilities", "entry-not-an-object",
        "member-not-an-object", "variant-not-an-object", "schema-not-a-list",
        "command-not-an-object",
        "deep-greeting", "deep-reply", "nan", "digits", "beyond-a-double"])
def test_a_server_whose_answers_are_not_qmps_shape_is_one_line_and_exit_status_2(
    tmp_path: Path, greeting: object, returns: dict[str, object], why: str
) -> None:
    # Answers migblockd never gives; a QEMU-like server that gave them made the
    # shell fail with a traceback (at once, or at the first command it checked).
    path = tmp_path / "broken.sock"
    with serving(path, greeting, returns):
        result = shell(str(path), "-c", "query-version")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"migblock-shell: {why.format(path=path)}\n"


def test_a_reply_that_is_not_json_ends_the_run_rather_than_wait_for_ever(
    tmp_path: Path
) -> None:
    # Found by review: a line that was not JSON (or not UTF-8) was skipped, and the
    # command waited for ever for the reply that line was.  (--timeout only bounds
    # that wait here: the run ends at once.)
    path = tmp_path / "broken.sock"
    with serving(path, GREETING, {"query-version": Raw("not json")}):
        result = shell(str(path), "--timeout", "30", "-c", "query-version")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"migblock-shell: -c 1: {path}: "
                             + UNREAD.format("not JSON: Expecting value at column 12")
                             + LOST + "\n")


@pytest.mark.parametrize("line", ["[1]", "42", '"return"', "null"])
def test_a_reply_that_is_json_but_not_an_object_ends_the_run_rather_than_wait_for_ever(
    tmp_path: Path, line: str
) -> None:
    # Found by review: JSON that is not an object was skipped as silently as text
    # that is not JSON had been, and the command waited for ever for the reply that
    # line was.  Every QMP message is an object; qemu.qmp ends the connection on one
    # that is not (UnexpectedTypeError).
    path = tmp_path / "array.sock"
    with serving(path, GREETING, {"query-version": Line(line)}):
        result = shell(str(path), "--timeout", "30", "-c", "query-version")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"migblock-shell: -c 1: {path}: "
                             + UNREAD.format("not a JSON object") + LOST + "\n")


def test_bytes_that_are_not_utf8_in_a_reply_are_shown_as_qemu_writes_them(
    tmp_path: Path
) -> None:
    # QEMU writes U+FFFD for them (quoted_str() in qobject/json-writer.c); the
    # shell used to skip the whole reply, and its command waited for ever.
    path = tmp_path / "latin1.sock"
    with serving(path, GREETING, {"query-version": Raw('"caf\udce9"')}):
        result = shell(str(path), "--timeout", "30", "-c", "query-version")
    assert (result.returncode, result.stderr) == (0, "")
    assert replies(result.stdout) == [{"return": "caf\ufffd"}]


def test_help_escapes_the_servers_names(tmp_path: Path) -> None:
    # Found by review: a command or member name with a terminal's escape sequences
    # in it (a server that is not migblockd) reached the terminal raw.
    evil, member = "evil\x1b[2J\x1b[31mcmd", "x\x1b]0;pwned\x07"
    schema = [{"name": evil, "meta-type": "command", "arg-type": "a", "ret-type": "r"},
              {"name": "a", "meta-type": "object",
               "members": [{"name": member, "type": "str"}]},
              {"name": "r", "meta-type": "object", "members": []},
              {"name": "str", "meta-type": "builtin", "json-type": "string"}]
    path = tmp_path / "evil.sock"
    with serving(path, GREETING, {"query-qmp-schema": schema,
                                  "query-commands": [{"name": evil}]}):
        overview = shell(str(path), "-c", "help")
        topic = shell(str(path), "-c", f"help {evil}")
    assert (overview.returncode, topic.returncode) == (0, 0), (overview.stderr, topic.stderr)
    assert "evil\\x1b[2J\\x1b[31mcmd" in overview.stdout
    assert "x\\x1b]0;pwned\\x07" in topic.stdout
    assert "\x1b" not in overview.stdout + topic.stdout


def test_a_server_that_greets_and_never_negotiates_is_exit_status_2(tmp_path: Path) -> None:
    # A daemon that hangs (or is stopped) after its greeting: the script used to wait
    # for the answer to qmp_capabilities forever, where migblockd.client gives up.
    path = tmp_path / "mute.sock"
    greeting = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 0}, '
                b'"package": ""}, "capabilities": []}}\r\n')
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        proc = subprocess.Popen([*quick_shell(0.5), str(path), "-c", "query-version"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            conn, _ = server.accept()
            with conn:
                conn.sendall(greeting)  # and reads nothing, answers nothing
                out, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2
    assert out == ""
    assert err == f"migblock-shell: {path}: no answer to qmp_capabilities within 0.5s\n"


@pytest.mark.parametrize("timeout", [[], ["--timeout", "30"]], ids=["bound", "longer-timeout"])
@pytest.mark.parametrize("command", ["query-qmp-schema", "query-commands"])
def test_a_server_that_never_answers_what_the_shell_asks_on_connecting_is_exit_status_2(
    tmp_path: Path, command: str, timeout: list[str]
) -> None:
    # Found by review: a daemon that greeted and negotiated, then answered neither of
    # the queries the shell makes before the first command, held a script for ever,
    # --timeout or not.  It is as broken as one that does not greet; a longer
    # --timeout does not make the shell wait longer on it.
    path = tmp_path / "mute.sock"
    with serving(path, GREETING, {command: SILENT}):
        result = subprocess.run([*quick_shell(0.5), *timeout, str(path), "-c", "query-version"],
                                capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"migblock-shell: {path}: no answer to {command} within 0.5s\n"


@pytest.mark.parametrize("silent", ["greeting", "qmp_capabilities", "query-qmp-schema",
                                    "query-commands"])
def test_timeout_bounds_each_wait_of_connecting_too(tmp_path: Path, silent: str) -> None:
    # Found by review: `--timeout 5` against a daemon that never answered
    # query-commands printed nothing and was killed at 20 s; the greeting and
    # qmp_capabilities waited their 10 s whatever --timeout said.
    path = tmp_path / "mute.sock"
    greeting = SILENT if silent == "greeting" else GREETING
    started = time.monotonic()
    with serving(path, greeting, {silent: SILENT}):
        result = subprocess.run([*SHELL, "--timeout", "1", str(path), "-c", "query-version"],
                                capture_output=True, text=True, timeout=30, check=False)
    assert time.monotonic() - started < opening.GREETING_TIMEOUT
    what = "no QMP greeting" if silent == "greeting" else f"no answer to {silent}"
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"migblock-shell: {path}: {what} within 1 s (--timeout)\n"


def test_a_daemon_that_exits_before_taking_the_connection_is_named_with_its_log(
    tmp_path: Path,
) -> None:
    # Socket activation with a daemon that cannot start (bad state, bad configuration):
    # the shell's connection waits in the listening socket's backlog, and goes when the
    # socket does, reset.  It used to say "reading the greeting failed: [Errno 104]
    # Connection reset by peer".
    path = tmp_path / "activated.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    proc = subprocess.Popen([*SHELL, str(path), "-c", "query-version"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([server], [], [], 60)  # the shell is queued
        assert ready
    finally:
        server.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err == (
        f"migblock-shell: {path}: the connection was reset before a greeting; the daemon "
        "stopped, or failed to start: its log says why (under systemd: journalctl -u "
        "migblockd)\n")


def test_a_stopped_daemon_whose_queue_is_full_is_named(daemon: DaemonProcess) -> None:
    # It said "reading the greeting failed: [Errno 22] Invalid argument": asyncio
    # takes a Unix socket's EAGAIN (the listener's queue is full) for "in progress".
    with daemon.stopped_with_full_backlog():
        result = shell(str(daemon.socket), "-c", "query-version")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"migblock-shell: cannot connect to {daemon.socket}: the daemon is not accepting "
        "connections (its queue of pending connections is full: is it stopped or hung?)\n")


def test_daemon_going_away_mid_script_is_exit_status_2(daemon: DaemonProcess) -> None:
    proc = subprocess.Popen(
        [*SHELL, str(daemon.socket)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write("query-version\n")
    proc.stdin.flush()
    assert "return" in json.loads(proc.stdout.readline())
    daemon.stop()
    proc.stdin.write("query-version\n")
    proc.stdin.close()
    assert proc.wait(timeout=60) == 2
    err = proc.stderr.read()
    assert err.startswith(f"migblock-shell: line 2: {daemon.socket}: ")
    assert "Traceback" not in err
    assert proc.stdout.read() == ""


def _queued(pid: int, peer: int) -> int:
    """Bytes waiting to be read in process ``pid``'s Unix sockets connected to process
    ``peer``'s (ss's Recv-Q): not in its event loop's own socket pairs."""
    listing = subprocess.run(["ss", "-xpnH", "state", "established"], check=True,
                             capture_output=True, text=True, timeout=60).stdout
    # Netid, Recv-Q, Send-Q, local address and inode, peer address and inode, process.
    rows = [row for row in map(str.split, listing.splitlines()) if len(row) == 8]
    owner = {row[4]: row[7] for row in rows}  # inode: "users:((...,pid=N,fd=M))"
    return sum(int(row[1]) for row in rows if f"pid={pid}," in row[7]
               and f"pid={peer}," in owner.get(row[6], ""))


def _until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` until it holds; fails after 600 tries (a hang, not a timing claim)."""
    for _ in range(600):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("the condition never held")


def test_a_daemon_killed_mid_reply_is_a_closed_connection_not_an_unreadable_message(
        start_daemon: Callable[..., DaemonProcess]) -> None:
    # Found by review: the part of the reply written before the kill, a line with no
    # end, was parsed: "a message from the daemon cannot be read (not JSON: Unterminated
    # string ...), so the shell closed the connection", as if the daemon had sent
    # garbage.  The stream ended, as when the daemon goes between two replies.
    d = start_daemon("--ephemeral", "--max-reason-length", "50000")

    async def fill() -> None:
        async with MigblockClient(d.socket) as client:
            for n in range(100):  # a listing of 5 MB: more than the socket's buffers hold
                await client.add_blocker("r" * 50_000, id=f"b{n}")

    asyncio.run(fill())
    proc = subprocess.Popen([*SHELL, str(d.socket)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write("query-version\n")
        proc.stdin.flush()
        assert "return" in json.loads(proc.stdout.readline())
        d.signal(signal.SIGSTOP)  # it answers once the shell no longer reads
        proc.stdin.write("query-blockers\n")
        proc.stdin.flush()
        _until(lambda: _queued(d.proc.pid, proc.pid) > 0)  # the request has reached the daemon
        proc.send_signal(signal.SIGSTOP)
        d.signal(signal.SIGCONT)
        # The answer has begun to arrive; the daemon is killed while the rest waits
        # for room in the socket.
        _until(lambda: _queued(proc.pid, d.proc.pid) > 0)
        d.kill()
        proc.send_signal(signal.SIGCONT)
        proc.stdin.close()
        assert proc.wait(timeout=60) == 2
        assert proc.stderr.read() == (
            f"migblock-shell: line 2: {d.socket}: the server closed the connection; "
            "the command may or may not have taken effect\n")
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            pipe.close()


def _sockets(pid: int) -> int:
    """How many sockets process ``pid`` holds open."""
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(fd).startswith("socket:")
    return count


def test_a_shell_lets_go_of_the_socket_when_the_daemon_stops(daemon: DaemonProcess) -> None:
    # A stopping daemon half-closes each connection and waits for the peer to close
    # too.  The shell kept its end open until its next command (or its exit), so that
    # one waiting for input (a script, or an operator at the prompt) held up every
    # stop and restart of the daemon.
    proc = subprocess.Popen([*SHELL, str(daemon.socket)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("query-version\n")
        proc.stdin.flush()
        assert "return" in json.loads(proc.stdout.readline())
        connected = _sockets(proc.pid)  # the connection, and the event loop's own
        assert daemon.stop() == 0
        for _ in range(600):  # until the shell has read the daemon's EOF
            if _sockets(proc.pid) < connected:
                break
            time.sleep(0.05)
        assert _sockets(proc.pid) == connected - 1
        assert proc.poll() is None  # still waiting for its next line
    finally:
        proc.kill()
        proc.communicate()


def test_with_stderr_closed_stdout_still_holds_only_the_replies(daemon: DaemonProcess) -> None:
    # Started with stderr closed (2>&-), Python has no sys.stderr, and
    # print(file=sys.stderr) writes to stdout: the errors and the -v echo went
    # there, among the JSON replies.
    result = subprocess.run(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", *SHELL, str(daemon.socket), "-v",
         "-c", "frob", "-c", "query-version"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    (version,) = replies(result.stdout)
    assert "package" in version["return"]


def test_help_option_explains_syntax_and_exit_codes() -> None:
    result = shell("--help")
    assert result.returncode == 0
    for needle in ("key=value", "dotted keys", "Tab", "Exit status", "-c COMMAND", "SOCKET"):
        assert needle in result.stdout


def test_a_path_that_is_not_a_socket_says_so(tmp_path: Path) -> None:
    # The kernel says "Connection refused" for a directory or a regular file.
    for path, kind in ((tmp_path, "a directory"), (tmp_path / "file", "a regular file")):
        path.touch()
        result = shell(str(path), "-c", "query-version")
        assert result.returncode == 2
        assert result.stderr == (f"migblock-shell: cannot connect to {path}: not a socket "
                                 f"({kind})\n")


def test_a_stale_socket_file_says_nobody_listens(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))  # bound, never listening: what a dead daemon leaves
        result = shell(str(path), "-c", "query-version")
    assert result.returncode == 2
    assert result.stderr == (
        f"migblock-shell: cannot connect to {path}: Connection refused"
        " (no daemon is listening on this socket)\n"
    )


def test_stdout_closed_by_its_reader_ends_quietly(daemon: DaemonProcess) -> None:
    # migblock-shell -c help | head -1: the reader is gone before the shell writes.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.Popen(
            [*SHELL, str(daemon.socket), "-c", "help", "-c", "query-version"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err == ""  # no traceback, no "Exception ignored ... BrokenPipeError"


@pytest.mark.parametrize("stdout", ["/dev/full", "closed"])
def test_a_stdout_that_cannot_be_written_is_one_line_and_stops_the_script(
    daemon: DaemonProcess, stdout: str
) -> None:
    """> state.jsonl on a full disk (/dev/full fails as a full disk does), or
    >&-: before, a traceback with exit status 1, or nothing at all with status 0."""
    redirect = ">&-" if stdout == "closed" else f">{stdout}"
    proc = subprocess.run(
        ["sh", "-c", f'exec "$@" {redirect}', "sh", *SHELL, str(daemon.socket),
         "-c", "query-version", "-c", "add-blocker reason=unseen id=unseen"],
        capture_output=True, text=True, timeout=60, check=False)
    reason = ("stdout is closed; no command was run" if stdout == "closed"
              else "No space left on device")
    assert (proc.returncode, proc.stderr) == (
        1, f"migblock-shell: cannot write the replies to stdout: {reason}\n")
    # The script stopped: its next command, whose reply would be lost too, never ran.
    listed = shell(str(daemon.socket), "-c", "query-blockers")
    assert replies(listed.stdout) == [{"return": []}]


def test_started_with_stdout_closed_the_shell_runs_no_command(daemon: DaemonProcess) -> None:
    # Reported: the first command ran (a blocker added) before the shell found that
    # its reply could not be written, and nothing said that it had run.
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *SHELL, str(daemon.socket),
         "-c", "add-blocker reason=unseen id=unseen"],
        capture_output=True, text=True, timeout=60, check=False)
    assert (proc.returncode, proc.stderr) == (
        1, "migblock-shell: cannot write the replies to stdout: stdout is closed; no "
        "command was run\n")
    listed = shell(str(daemon.socket), "-c", "query-blockers")
    assert replies(listed.stdout) == [{"return": []}]


def _run_with_a_terminal(argv: list[str], terminal: str,
                         term: str = "xterm") -> tuple[int, bytes, bytes]:
    """Run ``argv`` with ``terminal`` ("stdout" or "stderr") on a pseudo-terminal of
    type ``term`` and the other stream on a pipe; returns the status, the terminal's
    and the pipe's bytes."""
    master, slave = pty.openpty()
    pipe = subprocess.PIPE
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env["TERM"] = term
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=slave if terminal == "stdout" else pipe,
        stderr=slave if terminal == "stderr" else pipe,
        env=env,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    out, err = proc.communicate(timeout=60)
    piped = err if terminal == "stdout" else out
    return proc.returncode, seen, piped


def test_stderr_is_coloured_only_when_stderr_is_a_terminal(daemon: DaemonProcess) -> None:
    argv = [*SHELL, str(daemon.socket), "-c", "add-blocker reason='open", "-c", "help nope"]
    # stdout on a terminal, stderr to a file: no escape sequences in the file.
    status, _, err = _run_with_a_terminal(argv, "stdout")
    assert status == 1
    assert b"unterminated ' quote" in err
    assert b"\x1b" not in err
    # stdout to a file, stderr on a terminal: the errors are red there.
    status, terminal, out = _run_with_a_terminal(argv, "stderr")
    assert status == 1
    assert b"\x1b[1;31merror: unterminated ' quote" in terminal
    assert b"\x1b[1;31merror: help: the daemon has no command, event or type 'nope'" in terminal
    assert out == b""
    # A dumb terminal shows no colour: the same errors, plain.
    status, terminal, out = _run_with_a_terminal(argv, "stderr", term="dumb")
    assert status == 1
    assert b"error: unterminated ' quote" in terminal
    assert b"\x1b" not in terminal


def test_a_line_that_is_not_utf8_is_an_error_and_the_script_goes_on(
    daemon: DaemonProcess,
) -> None:
    result = subprocess.run(
        [*SHELL, str(daemon.socket)], input=b"add-blocker reason=\xff\xfe\nquery-blockers\n",
        capture_output=True, timeout=60, check=False)
    assert result.returncode == 1  # the refused line counts as a failed command
    assert b"Traceback" not in result.stderr
    assert result.stderr.decode().splitlines() == [
        "migblock-shell: line 1: error: not valid UTF-8 (byte 0xff at column 20)"]
    assert replies(result.stdout.decode()) == [{"return": []}]


def test_stdin_is_read_as_utf8_whatever_the_locale_says(daemon: DaemonProcess) -> None:
    # As en_US.UTF-8 would: strict decoding, where C.UTF-8 escapes.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run(
        [*SHELL, str(daemon.socket)], env=env, capture_output=True, timeout=60, check=False,
        input="query-version\nadd-blocker reason=\xff\xfe\nadd-blocker reason=é\n"
              .encode("utf-8", "surrogateescape").replace(b"\xc3\xbf\xc3\xbe", b"\xff\xfe"))
    assert b"Traceback" not in result.stderr
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "migblock-shell: line 2: error: not valid UTF-8 (byte 0xff at column 20)"]
    version, added = replies(result.stdout.decode("utf-8"))
    assert "package" in version["return"]
    assert added["return"]["reason"] == "é"


def test_long_lines_and_a_missing_last_line_feed(daemon: DaemonProcess) -> None:
    long_comment = "# " + "x" * 300_000  # across many reads
    result = shell(str(daemon.socket), stdin=f"{long_comment}\nquery-version\n{long_comment}\n"
                   "add-blocker reason=last")
    assert result.returncode == 0, result.stderr
    version, added = replies(result.stdout)
    assert "package" in version["return"] and added["return"]["reason"] == "last"


def test_json_nested_too_deeply_is_an_input_error_and_the_script_goes_on(
    daemon: DaemonProcess,
) -> None:
    """Python's JSON decoder recurses once per level: before, a value nested
    deeper than that ended the script with a RecursionError traceback."""
    deep = "[" * 100_000 + "]" * 100_000
    script = (f"add-blocker reason=x modes={deep}\n"
              f'{{"execute": "add-blocker", "arguments": {{"reason": {deep}}}}}\n'
              "query-version\n")
    result = shell(str(daemon.socket), stdin=script)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "migblock-shell: line 1: error: 'modes': invalid JSON value " + "[" * 77
        + "...: nested too deeply",
        "migblock-shell: line 2: error: invalid JSON: nested too deeply",
    ]
    assert [list(r) for r in replies(result.stdout)] == [["return"]]


def test_a_closed_stdin_is_an_empty_script(daemon: DaemonProcess) -> None:
    result = subprocess.run([*SHELL, str(daemon.socket)], capture_output=True, text=True,
                            timeout=60, check=False, preexec_fn=lambda: os.close(0))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("to_the_reader", [False, True])
def test_ctrl_c_ends_a_script_waiting_for_its_next_line(
    daemon: DaemonProcess, to_the_reader: bool
) -> None:
    """Also when the SIGINT goes to the thread reading stdin (``to_the_reader``):
    the kernel may hand a signal sent to the process to any thread that does
    not block it.  Python runs the handler in the main thread, asleep in
    epoll_wait, which must wake for it; it used to sleep on until the next line
    came, as it did for a Ctrl-C that arrived just before it blocked (about 1 in
    50 on a busy machine)."""
    proc = subprocess.Popen([*SHELL, str(daemon.socket)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"query-version\n")
        proc.stdin.flush()
        assert b"package" in proc.stdout.readline()  # connected, and waiting for line 2
        if to_the_reader:
            readers = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")
                       if int(t) != proc.pid]
            assert readers
            for tid in readers:
                os.kill(tid, signal.SIGINT)  # a thread's id: the kernel prefers that thread
        else:
            proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130  # the writer still holds stdin open
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_control_characters_a_message_quotes_are_escaped(daemon: DaemonProcess) -> None:
    # Written as they were, an ESC [ 2 J in a script's line cleared the operator's
    # terminal when the error quoted it, and the message hid what was wrong.
    result = shell(str(daemon.socket), "-c", "\x1b[2Jquery-version",
                   "-c", "add-blocker reason.\x9b=1", "-c", "help \u202e")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "migblock-shell: -c 1: error: unknown command '\\x1b[2Jquery-version'; did you mean "
        "'query-version'?",
        "migblock-shell: -c 2: error: unknown argument 'reason.\\x9b' for add-blocker: "
        "'reason' is a string, not an object",
        "migblock-shell: -c 3: error: help: the daemon has no command, event or type '\\u202e'"]


def test_a_no_break_space_is_part_of_a_word(daemon: DaemonProcess) -> None:
    result = shell(str(daemon.socket), "-c", "add-blocker reason=Migration\u00a0impossible")
    assert result.returncode == 0, result.stderr
    assert replies(result.stdout)[0]["return"]["reason"] == "Migration\u00a0impossible"


def test_a_refused_connection_says_why(start_daemon: Any) -> None:
    d = start_daemon("--max-clients", "1", "--ephemeral")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.connect(str(d.socket))
        held.recv(4096)  # the greeting: its slot is taken
        result = shell(str(d.socket), "-c", "query-version")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"migblock-shell: {d.socket}: migblockd refused the connection: migblockd is already "
        "serving max-clients=1 clients; try again later")


def test_a_refusal_quoting_control_characters_is_printed_escaped(short_tmp: Path) -> None:
    # Whatever listens at the socket writes the refusal's text: it must not
    # clear the operator's screen or hide what it says.
    path = short_tmp / "evil.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def refuse() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(b'{"error": {"class": "GenericError", '
                             b'"desc": "go away\\u001b[2J\\u009b1m"}}\r\n')

        thread = threading.Thread(target=refuse)
        thread.start()
        result = shell(str(path), "-c", "query-version")
        thread.join(10)
    assert result.returncode == 2
    assert result.stderr == (f"migblock-shell: {path}: migblockd refused the connection: "
                             "go away\\x1b[2J\\x9b1m\n")


def test_an_empty_socket_is_a_usage_error_not_the_default(daemon: DaemonProcess) -> None:
    # migblock-shell "$SOCK" with SOCK unset: it used to connect to the default
    # socket, another daemon than the script meant, or fail with that one's error.
    result = shell("", "-c", "query-version")
    assert (result.returncode, result.stdout) == (64, "")
    *usage, error = result.stderr.splitlines()
    assert " ".join(" ".join(usage).split()) == (
        "usage: migblock-shell [-h] [-p] [-v] [-c COMMAND] [--timeout SECONDS] [--version] "
        "[SOCKET]")
    assert error == "migblock-shell: error: argument SOCKET: must be a path, not ''"
    assert shell(str(daemon.socket), "-c", "query-version").returncode == 0


def test_a_command_line_the_shell_cannot_run_is_not_a_daemon_that_is_down(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    # Found by review: a wrong command line exited 2, argparse's status, which
    # the shell also gives for a daemon it cannot reach, so a monitoring check
    # with a mistyped option ("--timeout 5s") reported a daemon down that was up.
    # Each outcome has its own status: a command failed, the daemon cannot be
    # reached, the command line is wrong (sysexits.h's EX_USAGE).
    up = str(daemon.socket)
    down = str(tmp_path / "no-daemon.sock")
    statuses = {
        "ran": shell(up, "-c", "query-version").returncode,
        "failed": shell(up, "-c", "del-blocker id=none").returncode,
        "unreachable": shell(down, "-c", "query-version").returncode,
        "unreachable, with a --timeout": shell(down, "--timeout", "5",
                                               "-c", "query-version").returncode,
    }
    for wrong in (("--timeout", "5s"), ("--timeout", "0"), ("--no-such-option",),
                  ("",), (up, "extra-argument")):
        result = shell(*wrong, "-c", "query-version")
        assert result.stdout == ""
        assert result.stderr.startswith("usage: migblock-shell "), result.stderr
        assert result.stderr.splitlines()[-1].startswith("migblock-shell: error: ")
        statuses[f"usage {wrong}"] = result.returncode
    assert statuses == {
        "ran": 0, "failed": 1, "unreachable": 2, "unreachable, with a --timeout": 2,
        **{key: 64 for key in statuses if key.startswith("usage")},
    }
    # What the statuses mean is in --help.
    assert "64 if the command line is wrong" in " ".join(shell("--help").stdout.split())
    # Asking for help or the version is no mistake.
    assert shell("--version").returncode == 0


def test_permission_denied_says_what_to_do(daemon: DaemonProcess) -> None:
    # The daemon's socket is 0600, its user root: another user is refused by the kernel.
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *SHELL,
         str(daemon.socket), "-c", "query-version"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    # The first directory on the way that others may not search refuses it (pytest's
    # 0700 one), else the socket itself; the message names it (tests/test_connect_denied.py).
    closed = next((d for d in reversed(daemon.socket.parents) if not d.stat().st_mode & 0o001),
                  None)
    if closed is None:
        assert result.stderr == (
            f"migblock-shell: cannot connect to {daemon.socket}: Permission denied: "
            f"{daemon.socket} is mode 0600, owner root, group root, which does not let uid "
            "65534 (nobody) connect to it; the daemon's --socket-mode and --socket-group (the "
            "socket unit's SocketMode= and SocketGroup=) decide who may connect\n")
    else:
        mode = closed.stat().st_mode & 0o7777
        assert result.stderr == (
            f"migblock-shell: cannot connect to {daemon.socket}: Permission denied: {closed} "
            f"is mode {mode:04o}, owner root, group root, which does not let uid 65534 "
            "(nobody) search it: run as a user it lets in, or have root open it to a group "
            f"of this user's ('chgrp GROUP {closed}' and 'chmod g+x {closed}'), or start the "
            "daemon with a --socket outside it\n")


def test_a_reason_the_locale_cannot_write_is_escaped_json(daemon: DaemonProcess) -> None:
    """Under an ISO-8859-1 locale (PYTHONIOENCODING is the same setting for
    Python), printing a reason another client wrote in Japanese ended the run
    with a UnicodeEncodeError traceback."""
    reason = "\u65e5\u672c disk \u00e9 \U0001f600"
    added = shell(str(daemon.socket), "-c", f"add-blocker reason='{reason}' id=jp")
    assert added.returncode == 0, added.stderr
    env = dict(os.environ, PYTHONIOENCODING="latin-1")
    result = subprocess.run(
        [*SHELL, str(daemon.socket), "-v", "-c", "query-blockers",
         "-c", "add-blocker reason=caf\u00e9 id=latin"],
        capture_output=True, timeout=60, env=env, check=False)
    assert (result.returncode, result.stderr.decode("latin-1")) == (0, (
        '{"execute": "query-blockers"}\n'
        '{"execute": "add-blocker", "arguments": {"reason": "caf\\u00e9", "id": "latin"}}\n'))
    assert result.stdout.isascii()
    listed, new = replies(result.stdout.decode("ascii"))
    assert [b["reason"] for b in listed["return"]] == [reason]
    assert new["return"]["reason"] == "caf\u00e9"


def test_a_raw_request_whose_command_is_no_string_is_the_daemons_to_refuse(
    daemon: DaemonProcess,
) -> None:
    # The shell looks up a request's command to bound its answer (LISTINGS); one
    # that is no string, a list (no key of a set), is sent as typed all the same.
    result = shell(str(daemon.socket), "-c", '{"execute": ["query-blockers"], "id": 1}',
                   "-c", "query-blockers")
    assert result.returncode == 1, result.stderr
    assert replies(result.stdout) == [
        {"id": 1, "error": {"class": "GenericError",
                            "desc": "QMP input member 'execute' must be a string"}},
        {"return": []}]


async def test_a_rogue_servers_endless_line_ends_the_run_at_the_shells_bound(
    tmp_path: Path,
) -> None:
    """Found by the shell review: the shell read a line of up to 1 GiB from the server
    it spoke to, whatever it waited for, holding it all.  A server that is not
    migblockd (a socket planted in its place) sends one without end: the shell ends
    the run at 10 MiB, qmp-shell's bound (qemu.qmp's, libvirt's), having stopped
    reading there, while an answer that grows with the blockers (query-blockers,
    here of 12 MiB) is still read whole."""
    path = tmp_path / "rogue.sock"
    sent = 0
    listing = [{"id": f"b{n}", "reason": "r" * 1000} for n in range(12_000)]

    async def rogue(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(json.dumps(GREETING).encode() + b"\r\n")
        while line := await reader.readline():
            request = json.loads(line)
            name = request["execute"]
            if name == "query-version":
                with contextlib.suppress(ConnectionError):
                    for _ in range(64):  # 64 MiB, and never a line feed
                        writer.write(b"x" * (1 << 20))
                        await writer.drain()
                        sent += 1 << 20
                    await reader.read()  # held open until the shell goes
                break
            answer = listing if name == "query-blockers" else INTROSPECTION.get(name, {})
            writer.write(json.dumps({"return": answer, "id": request["id"]}).encode() + b"\r\n")
        writer.close()

    server = await asyncio.start_unix_server(rogue, path)
    async with server:
        proc = await asyncio.create_subprocess_exec(
            *SHELL, str(path), "-c", "query-blockers", "-c", "query-version",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            if proc.returncode is None:  # it read on, waiting for the line to end
                proc.kill()
                await proc.wait()
    assert proc.returncode == 2, err
    assert replies(out.decode()) == [{"return": listing}]
    assert err.decode() == (
        f"migblock-shell: -c 2: {path}: a message from the daemon was longer than the "
        "10,485,760 bytes this shell reads, so the shell closed the connection" + LOST + "\n")
    assert sent < 16 << 20  # its socket took no more than the bound and a few buffers


async def test_a_reply_over_the_shells_limit_is_named_as_its_own_doing(
        daemon: DaemonProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    # Over LINE_LIMIT (1 GiB; lowered here) the shell cannot read a reply and ends the
    # connection itself; asyncio's "Separator is not found, and chunk exceed the
    # limit" would send the operator to a daemon whose log shows nothing wrong.
    monkeypatch.setattr(shell_client, "LINE_LIMIT", 4096)
    client = shell_client.QMPClient()
    await client.connect(str(daemon.socket))
    try:
        await client.negotiate()
        for n in range(30):
            added = await client.execute({"execute": "add-blocker",
                                          "arguments": {"reason": "r" * 200, "id": f"b{n}"}})
            assert added["return"]["id"] == f"b{n}"
        with pytest.raises(shell_client.ConnectionLost) as lost:
            await client.execute({"execute": "query-blockers"})
        assert str(lost.value) == ("a message from the daemon was longer than the 4,096 bytes "
                                   "this shell reads, so the shell closed the connection")
    finally:
        await client.close()


def test_a_big_request_cut_off_by_the_daemons_end_says_only_the_shells_words(
    start_daemon: Any,
) -> None:
    # A request bigger than the socket holds (64 KiB and more) was still being
    # written when the daemon went: the reader failed its reply too, and asyncio
    # printed "Future exception was never retrieved" and a traceback's last line
    # under the shell's own message.
    d = start_daemon("--ephemeral")
    proc = subprocess.Popen([*SHELL, str(d.socket)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    try:
        proc.stdin.write(b"query-version\n")
        proc.stdin.flush()
        assert b'"package": "migblockd' in proc.stdout.readline()  # connected
        d.signal(signal.SIGSTOP)  # reads nothing more: the big request stays unsent
        # (Within MAX_LINE, past which the shell would refuse it unsent.)
        proc.stdin.write(b"add-blocker reason=" + b"x" * 1_000_000 + b"\n")
        proc.stdin.flush()
        time.sleep(1)  # the shell writes it, and waits for the socket to take more
        d.proc.kill()  # the daemon's end of the socket goes
        d.proc.wait()
        proc.stdin.close()
        assert proc.wait(30) == 2
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The kernel's words once the write had begun; on a loaded machine the daemon may
    # go before it began (asyncio's words), or before the shell sent anything.
    assert re.fullmatch(rf"migblock-shell: line \d+: {re.escape(str(d.socket))}: (connection "
                        r"lost: (\[Errno \d+\] [^\n;]+|Connection lost)|the server closed the "
                        r"connection); the command may or may not have taken effect\n",
                        stderr), stderr


@pytest.mark.parametrize("when", ["between lines", "awaiting the reply"])
def test_a_lost_connection_names_its_line_and_whether_it_was_sent(
        start_daemon: Any, when: str) -> None:
    # Found by review: either way the script said only "PATH: the server closed
    # the connection", where the interactive shell says whether the command ran.
    d = start_daemon("--ephemeral")
    proc = subprocess.Popen([*SHELL, str(d.socket)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("query-blockers\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"return": []}
        if when == "between lines":
            assert d.stop() == 0  # its clients closed, the shell's too
            time.sleep(0.5)  # for the shell to read the end of its connection
        else:
            d.signal(signal.SIGSTOP)  # reads nothing, answers nothing
        proc.stdin.write("add-blocker reason=x\n")
        proc.stdin.flush()
        if when == "awaiting the reply":
            time.sleep(0.5)  # for the request to be sent
            d.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2
    outcome = ("was not sent" if when == "between lines"
               else "may or may not have taken effect")
    # Killed with the request unread, the daemon's socket is reset rather than closed.
    reason = ("the server closed the connection" if when == "between lines"
              else "connection lost: [Errno 104] Connection reset by peer")
    assert err == f"migblock-shell: line 2: {d.socket}: {reason}; the command {outcome}\n"


def test_a_script_names_the_scope_connection_blockers_that_end_with_it(
        start_daemon: Any) -> None:
    # Found by review: -c 'add-blocker ... scope=connection' exited 0 with the
    # blocker's reply, and the blocker was gone as the script ended, unsaid; the
    # interactive shell names such blockers when its session ends.
    d = start_daemon("--ephemeral")
    ran = shell(str(d.socket), "-c", "add-blocker reason=a scope=connection id=c1",
                "-c", "add-blocker reason=b scope=connection id=c2",
                "-c", "add-blocker reason=c scope=connection id=c3",
                "-c", "add-blocker reason=kept id=d1", "-c", "del-blocker id=c2")
    assert ran.returncode == 0  # every command succeeded
    assert [r["return"]["id"] for r in replies(ran.stdout)[:4]] == [
        "c1", "c2", "c3", "d1"]
    assert ran.stderr == ("migblock-shell: the script ended; the blockers it added with "
                          "scope=connection went with it (c1, c3): migration is no longer "
                          "blocked by them\n")
    after = shell(str(d.socket), "-c", "query-blockers")
    assert [b["id"] for b in replies(after.stdout)[0]["return"]] == ["d1"]
    # None held: nothing said.
    assert shell(str(d.socket), "-c", "del-blocker id=d1").stderr == ""
    # A connection lost mid-script takes them too: said with the loss.
    proc = subprocess.Popen([*SHELL, str(d.socket)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("add-blocker reason=night scope=connection id=night\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["return"]["id"] == "night"
        assert d.stop() == 0  # its clients closed, the shell's too
        time.sleep(0.5)  # for the shell to read the end of its connection
        proc.stdin.write("query-blockers\n")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 2
    assert err == (f"migblock-shell: line 2: {d.socket}: the server closed the connection; "
                   "the command was not sent; the blockers the script added with "
                   "scope=connection went with it (night): migration is no longer blocked "
                   "by them\n")
    # And a run that Ctrl-C ends (exit status 130), waiting for its next line.
    d = start_daemon("--ephemeral")
    proc = subprocess.Popen([*SHELL, str(d.socket)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("add-blocker reason=night scope=connection id=night\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["return"]["id"] == "night"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130  # the writer still holds stdin open
        assert proc.stderr is not None
        assert proc.stderr.read() == (
            "migblock-shell: the script ended; the blockers it added with scope=connection "
            "went with it (night): migration is no longer blocked by them\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_timeout_ends_a_script_whose_daemon_stopped_answering(start_daemon: Any) -> None:
    # Found by review: with a stopped daemon a script waited for ever (a cron
    # job or a monitoring check piling up); --timeout bounds each command's wait.
    d = start_daemon("--ephemeral")
    proc = subprocess.Popen([*SHELL, "--timeout", "1.5", str(d.socket)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write("query-blockers\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline()) == {"return": []}
        d.signal(signal.SIGSTOP)  # reads nothing, answers nothing
        proc.stdin.write("add-blocker reason=x\nquery-blockers\n")
        proc.stdin.close()
        out, err = proc.stdout.read(), proc.stderr.read() if proc.stderr else ""
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        d.signal(signal.SIGCONT)
    assert proc.returncode == 2
    assert out == ""  # the third line never ran
    assert err == (f"migblock-shell: line 2: {d.socket}: no reply within 1.5 s (--timeout); "
                   "the command may or may not have taken effect\n")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_a_number_of_seconds(value: str) -> None:
    result = shell("--timeout", value, "-c", "query-version")
    assert result.returncode == 64  # a usage error
    assert "argument --timeout: must be" in result.stderr


def test_an_id_that_qemu_writes_back_in_its_own_form_is_still_matched(qemu: Path) -> None:
    # QEMU parses 1E2 as a double and writes it back with %.17g, as 100: the shell
    # waited for "100.0" for ever.  It matches ids by value.
    result = shell(str(qemu), "--timeout", "20",
                   "-c", '{"execute": "query-version", "id": 1E2}',
                   "-c", '{"execute": "query-status", "id": [0.5, {"n": 2.0}]}',
                   "-c", "query-version")
    assert result.returncode == 0, result.stderr
    first, second, third = replies(result.stdout)
    assert first["id"] == 100 and "qemu" in first["return"]
    assert second["id"] == [0.5, {"n": 2}] and "status" in second["return"]
    assert "qemu" in third["return"] and "id" not in third


def test_an_integer_id_qemu_holds_as_a_double_is_still_matched(qemu: Path) -> None:
    # Found by review: QEMU keeps an integer as one only while it fits int64_t or
    # uint64_t, and writes any other back as a double (18446744073709551617 as
    # 1.8446744073709552e+19): the shell waited for its reply until --timeout.
    result = shell(str(qemu), "--timeout", "20",
                   "-c", '{"execute": "query-version", "id": 18446744073709551617}',
                   "-c", '{"execute": "query-version", "id": [-9223372036854775809]}',
                   "-c", '{"execute": "query-version", "id": 18446744073709551615}')
    assert result.returncode == 0, result.stderr
    first, second, third = replies(result.stdout)
    assert first["id"] == 2.0 ** 64 and "qemu" in first["return"]
    assert second["id"] == [-(2.0 ** 63)] and "qemu" in second["return"]
    assert third["id"] == 18446744073709551615 and "qemu" in third["return"]


def test_an_integer_id_past_a_double_is_matched_as_migblockd_echoes_it(
    daemon: DaemonProcess,
) -> None:
    # migblockd echoes such an id as it came; matched all the same.
    result = shell(str(daemon.socket), "--timeout", "20",
                   "-c", '{"execute": "query-version", "id": 18446744073709551617}')
    assert result.returncode == 0, result.stderr
    assert replies(result.stdout)[0]["id"] == 18446744073709551617


def test_help_help_says_what_help_does(daemon: DaemonProcess) -> None:
    # Found by review: help help said "the daemon has no command, event or type
    # 'help'", though help is a command of the shell's own, typed at its prompt.
    result = shell(str(daemon.socket), "-c", "help help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == [
        "help [COMMAND | EVENT | TYPE] (the shell's own command, not sent to the daemon)",
        "    Without a name, lists the daemon's commands with a summary each, and the",
        "    shell's syntax; with one, documents that command, event or type.",
    ]


def test_a_no_break_space_before_another_argument_is_refused(daemon: DaemonProcess) -> None:
    # Found by review: pasted from a web page, add-blocker reason=x<U+00A0>id=y sent
    # the reason "x\u00a0id=y" and no id, without a word: the shell, as a POSIX shell,
    # does not split words there, and qmp-shell, whose words are what its regular
    # expression's \s (any Unicode space) separates, sends reason "x" and id "y".
    # Which one was meant cannot be told: refused, and nothing sent.  A no-break space
    # inside a value that is no other argument is still part of it, and one typed
    # between quotes is always.
    result = shell(str(daemon.socket), "-c", "add-blocker reason=x\u00a0id=y",
                   "-c", "add-blocker reason=a id=b\u2003internal=true",
                   "-c", "add-blocker reason='q\u00a0id=z' id=q",
                   "-c", "add-blocker reason=Migration\u00a0impossible id=m",
                   "-c", "query-blockers")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "migblock-shell: -c 1: error: 'reason=x\\xa0id=y': U+00A0 NO-BREAK SPACE does not "
        "separate words, and what follows it reads as another argument: type a space, or "
        "quote the value to keep it",
        "migblock-shell: -c 2: error: 'id=b\\u2003internal=true': U+2003 EM SPACE does not "
        "separate words, and what follows it reads as another argument: type a space, or "
        "quote the value to keep it",
    ]
    listed = replies(result.stdout)[-1]["return"]
    assert [(b["id"], b["reason"]) for b in listed] == [
        ("q", "q\u00a0id=z"), ("m", "Migration\u00a0impossible")]


def test_a_raw_exec_oob_request_runs_as_in_qmp_shell(daemon: DaemonProcess) -> None:
    """Found by the client review: qmp-shell's qemu.qmp enables OOB whenever the
    greeting offers it, so a raw {"exec-oob": ...} request runs there; this shell
    negotiated none, and the daemon refused every one (QMP input member 'exec-oob'
    is unexpected), though `help` shows which commands allow it."""
    result = shell(str(daemon.socket),
                   "-c", '{"exec-oob": "query-migrate", "id": "fast"}',
                   "-c", '{"exec-oob": "add-blocker", "id": 2, "arguments": {"reason": "x"}}',
                   "-c", "query-blockers")
    assert result.returncode == 1, result.stderr
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert replies[0] == {"return": {}, "id": "fast"}  # no migration: as QEMU answers
    assert replies[1] == {"id": 2, "error": {
        "class": "GenericError", "desc": "The command add-blocker does not support OOB"}}
    assert replies[2] == {"return": []}
