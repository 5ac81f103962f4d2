"""The generator's command line on hostile schema files: big, deep, oddly laid out.

Each case runs the real ``migblockd-qapi-gen`` (as ``python -m``) on a file
written here, and asks for what QEMU's generator gives: an answer in bounded
time and, for a mistake, one ``FILE:LINE:COL: message`` line (with QEMU's second
line where QEMU prints one), never a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: Seconds a case may take; the fixed code needs a few, the old one took minutes.
LIMIT = 60


def gen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migblockd.qapi", *args],
                          capture_output=True, text=True, check=False, timeout=LIMIT)


def doc(symbol: str, members: list[str], returns: bool = False) -> str:
    lines = [f"# @{m}: {m}." for m in members]
    ret = ["#", "# Returns: it."] if returns else []
    return "\n".join(["##", f"# @{symbol}:", "#", f"# {symbol}.", "#", *lines, *ret, "##"]) + "\n"


def big_enum(values: int, one_line: bool) -> str:
    names = [f"v{i}" for i in range(values)]
    sep = ", " if one_line else ",\n  "
    return doc("Big", names) + "{ 'enum': 'Big', 'data': [ " + sep.join(
        f"'{n}'" for n in names) + " ] }\n"


@pytest.mark.parametrize(("values", "one_line"), [(20000, True), (100000, False)])
def test_a_huge_enum_is_read_in_linear_time(values: int, one_line: bool,
                                            tmp_path: Path) -> None:
    # Each token's column was counted from the start of its line (minutes for
    # one long line of 20000 values), and each documented value was looked up
    # in a list of all of them (a minute for 100000 values).
    schema = tmp_path / "big.json"
    schema.write_text(big_enum(values, one_line), encoding="utf-8")
    result = gen("-o", str(tmp_path / "out"), str(schema))
    assert (result.returncode, result.stderr) == (0, "")


def test_an_error_at_the_end_of_a_long_line_has_its_column(tmp_path: Path) -> None:
    # The column is counted as the line is read, tabs included.
    schema = tmp_path / "big.json"
    text = big_enum(20000, one_line=True).replace("'v19999' ]", "'v19999' 'x' ]")
    text = text.replace("{ 'enum'", "\t{ 'enum'")
    schema.write_text(text, encoding="utf-8")
    line = text.splitlines()[-1]
    col = 9 + len(line[1 : line.index("'x' ]")])  # the tab reaches column 9
    result = gen("-o", str(tmp_path / "out"), str(schema))
    assert result.returncode == 1
    assert result.stderr == f"{schema}:{len(text.splitlines())}:{col}: expected ',' or ']'\n"


@pytest.mark.parametrize("array", [False, True])
def test_a_long_chain_of_structs_is_generated(array: bool, tmp_path: Path) -> None:
    # Every struct holds the one before: the JSON Schema back end described a
    # struct's members while describing the struct, one recursion per link,
    # and a few hundred links ended in a RecursionError traceback.
    parts = [doc("Link0", []) + "{ 'struct': 'Link0', 'data': {} }\n"]
    for i in range(1, 3000):
        prev = f"[ 'Link{i - 1}' ]" if array else f"'Link{i - 1}'"
        parts.append(doc(f"Link{i}", ["prev"])
                     + f"{{ 'struct': 'Link{i}', 'data': {{ 'prev': {prev} }} }}\n")
    parts.append(doc("get-chain", [], returns=True)
                 + "{ 'command': 'get-chain', 'returns': 'Link2999' }\n")
    parts.append(doc("CHAINED", []) + "{ 'event': 'CHAINED', 'data': 'Link2999' }\n")
    schema = tmp_path / "chain.json"
    schema.write_text("\n".join(parts), encoding="utf-8")
    out = tmp_path / "out"
    result = gen("-o", str(out), str(schema))
    assert (result.returncode, result.stderr) == (0, "")
    returns = (out / "commands" / "get-chain.returns.json").read_text(encoding="utf-8")
    assert '"Link0": {' in returns and '"Link2999": {' in returns


def test_control_characters_in_a_message_are_escaped(tmp_path: Path) -> None:
    # A stray token is quoted as the file holds it: NULs and a terminal's escape
    # sequences went raw to stderr (and to the daemon's log).
    schema = tmp_path / "nul.json"
    schema.write_bytes(b"{ 'enum': 'Foo', 'data': [] }\n\x00\x1bc\n")
    result = gen("-o", str(tmp_path / "out"), str(schema))
    assert result.returncode == 1
    assert result.stderr == f"{schema}:2:1: stray '\\x00\\x1bc'\n"


@pytest.mark.parametrize("name", ["x" * 1_000_000, "x " * 500_000])
def test_a_megabyte_name_is_quoted_cut(tmp_path: Path, name: str) -> None:
    # Reported: the error line quoted all of it, and so did the daemon's log; then,
    # of a name with spaces in it, each word was judged alone.
    schema = tmp_path / "long.json"
    schema.write_text(doc("Ss", ["a"]) + f"{{ 'struct': 'Ss', 'data': {{ 'a': '{name}' }} }}\n")
    result = gen("-o", str(tmp_path / "out"), str(schema))
    assert result.returncode == 1
    assert result.stderr == (f"{schema}:8:34: member 'a' of 'Ss' uses unknown type "
                             f"'{name[:256]}...' (1,000,000 characters)\n")


def test_thousands_of_unknown_keys_are_counted_not_all_listed(tmp_path: Path) -> None:
    # QEMU's check_keys() lists every unknown key: 20,000 of them made one line
    # of 240,000 characters, in the daemon's log too.
    schema = tmp_path / "keys.json"
    keys = ", ".join(f"'k{i:05}': true" for i in range(20000))
    schema.write_text(doc("Ss", ["a"])
                      + f"{{ 'struct': 'Ss', 'data': {{ 'a': 'str' }}, {keys} }}\n")
    col = schema.read_text().splitlines()[-1].index("'k00000'") + 1
    result = gen("-o", str(tmp_path / "out"), str(schema))
    assert result.returncode == 1
    listed = ", ".join(f"'k{i:05}'" for i in range(16))
    assert result.stderr == (f"{schema}:8:{col}: struct 'Ss' has unknown keys {listed}, ... "
                             "(20,000 keys)\nValid keys are 'data', 'struct'.\n")


def test_a_fifo_included_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    # QEMU's generator opens it as a file, and waits for a writer.
    schema = tmp_path / "root.json"
    schema.write_text("{ 'include': 'sub.json' }\n")
    os.mkfifo(tmp_path / "sub.json", 0o600)
    result = gen("-o", str(tmp_path / "out"), str(schema))
    assert result.returncode == 1
    assert result.stderr == (f"{schema}:1:14: include file '{tmp_path / 'sub.json'}' is not a "
                             "regular file\n")


def test_a_directory_is_refused_in_qemus_words(tmp_path: Path) -> None:
    # QEMU's generator open()s the file and says "Is a directory"; migblockd's
    # said "not a regular file", its words for a FIFO, which QEMU waits on.
    schema = tmp_path / "root.json"
    schema.write_text("{ 'include': 'sub.json' }\n")
    (tmp_path / "sub.json").mkdir()
    result = gen("-o", str(tmp_path / "out"), str(schema))
    assert result.returncode == 1
    assert result.stderr == (f"{schema}:1:14: can't read include file "
                             f"'{tmp_path / 'sub.json'}': Is a directory\n")
    result = gen("-o", str(tmp_path / "out"), str(tmp_path / "sub.json"))
    assert result.returncode == 1
    assert result.stderr == ("migblockd-qapi-gen: can't read schema file "
                             f"'{tmp_path / 'sub.json'}': Is a directory\n")
