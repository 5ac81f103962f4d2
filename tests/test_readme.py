"""The README's promises: its two commands, CI running the second, and its client examples."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from conftest import ROOT, DaemonProcess

from migblockd.config import Config
from migblockd.options import BEGIN_MARKER, END_MARKER, markdown

README = (ROOT / "README.md").read_text(encoding="utf-8")
DEFAULT_SOCKET = "/run/migblockd/migblockd.sock"


def commands() -> list[str]:
    """The indented command lines before the first horizontal rule."""
    head = README.split("\n---\n", 1)[0]
    return [line.strip() for line in head.splitlines() if line.startswith("    ")]


def test_readme_starts_with_exactly_two_commands() -> None:
    run_daemon, run_tests = commands()
    assert run_daemon.endswith(".venv/bin/migblockd")
    assert run_tests.endswith(".venv/bin/python tools/check.py")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert commands()[1] in ci


def test_the_option_table_is_generated_from_the_options() -> None:
    begin = README.index(BEGIN_MARKER) + len(BEGIN_MARKER) + 1
    end = README.index(END_MARKER)
    assert README[begin:end] == markdown(Config), (
        "README.md's option table is stale; regenerate it with "
        "`.venv/bin/python -m migblockd.options --update README.md`")


def test_the_qemu_qmp_example_runs(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    daemon = start_daemon()
    snippet = re.search(r"```python\n(.*?)```", README, re.S)
    assert snippet is not None
    code = snippet.group(1)
    assert DEFAULT_SOCKET in code
    script = tmp_path / "example.py"
    script.write_text(code.replace(DEFAULT_SOCKET, str(daemon.socket)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "#blocker0 ['normal', 'cpr-reboot', 'cpr-transfer', 'cpr-exec']\n"
    # The blocker was connection-scoped: it went away with the example's connection.
    daemon.wait_for_log("released 1 connection-scoped blocker(s): #blocker0", timeout=20)
    assert "added blocker #blocker0" in daemon.log()


def test_the_client_example_runs(
    tmp_path: Path, start_daemon: Callable[..., DaemonProcess]
) -> None:
    daemon = start_daemon()
    snippets = [code for code in re.findall(r"```python\n(.*?)```", README, re.S)
                if "from migblockd.client import" in code]
    assert len(snippets) == 1
    code = snippets[0]
    assert DEFAULT_SOCKET in code
    script = tmp_path / "client_example.py"
    script.write_text(code.replace(DEFAULT_SOCKET, str(daemon.socket)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    # "[]": the block's end deleted the blocker, while the connection was still open.
    assert out.stdout == "#blocker0 connection ['dump in progress']\n[]\n"


def test_the_development_notes_name_every_package_check_installs() -> None:
    """tools/check.py installs these with apt-get; the README says which."""
    spec = importlib.util.spec_from_file_location("tools_check", ROOT / "tools" / "check.py")
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    development = README.split("\n## Development\n", 1)[1]
    flat = " ".join(development.split())
    missing = [pkg for pkg in sorted(set(check.SYSTEM_TOOLS.values()))
               if f"`{pkg}`" not in flat]
    assert not missing, f"README's Development section does not name {missing}"


def test_the_command_table_names_the_schemas_commands_and_arguments() -> None:
    """README's "Commands" table: every command of the schema, no other, and
    only arguments each command takes (``[x]`` optional ones, bare required
    ones or, as ``migrate uri``, one of a pair)."""
    from migblockd.contract import Contract  # noqa: PLC0415 - only this test needs it

    commands = Contract.load().commands
    section = README.split("\n### Commands\n", 1)[1].split("\n### ", 1)[0]
    named: set[str] = set()
    for row in re.findall(r"(?m)^\| (.*?) \| .* \|$", section):
        members: dict[str, object] = {}
        for cell in re.findall(r"`([^`]+)`", row):
            name, *args = cell.split()
            if name not in commands:
                # An argument of the command before it: "`migrate uri` (or `channels`)".
                assert not args and name in members, f"README: no command {name!r}"
                continue
            named.add(name)
            members = commands[name].arguments.get("properties", {})
            for shown in args:
                arg = shown.strip("[]")
                assert arg in members, f"README: {name} takes no {arg!r}"
                if shown.startswith("["):
                    assert arg not in commands[name].arguments.get("required", []), (name, arg)
    assert named == set(commands), set(commands) ^ named
