"""The option table: every option declared once, and everything derived from it agrees."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from migblockd import options as table_module
from migblockd import settings_file
from migblockd.cli import options, parser
from migblockd.config import RELOADABLE, Config, ConfigError, build, read_file
from migblockd.kinds import FilePath, OneOf
from migblockd.options import (
    Option,
    Where,
    add_arguments,
    flag,
    markdown,
    option,
    reloadable,
    table,
)

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = table(Config)


def ids(o: Option) -> str:
    return o.key


def test_every_setting_is_an_option() -> None:
    assert [o.name for o in OPTIONS] == [f.name for f in dataclasses.fields(Config)]


def test_the_reloadable_settings_are_unchanged() -> None:
    assert RELOADABLE == (  # in the option table's order
        "log_level", "max_clients", "max_clients_per_uid", "negotiation_timeout",
        "idle_timeout", "max_message_size", "max_nesting", "max_tokens", "max_output",
        "max_blockers", "max_blockers_per_uid", "max_reason_length", "access")


@pytest.mark.parametrize("o", OPTIONS, ids=ids)
def test_help_shows_every_command_line_option_with_its_default(o: Option) -> None:
    text = " ".join(parser().format_help().split())
    if Where.COMMAND_LINE not in o.where:
        assert o.flag_name not in text
        return
    assert o.flag_name in text
    shown = o.shown_default(documented=False)
    if shown is not None and not o.flag:
        assert f"default: {shown}" in text
    if o.reloadable:
        assert f"default: {shown}; SIGHUP applies it" in text


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root and setpriv, to be a uid with no home")
def test_help_shows_a_default_it_cannot_compute_without_markdown() -> None:
    # Reproduced as uid 12345 with no HOME: --help said "(default: `$STATE_DIRECTORY`
    # (set by systemd's `StateDirectory=`), else `/var/lib/migblockd` ...", backticks
    # and all, where every other default is plain text.
    env = {k: v for k, v in os.environ.items()
           if k not in ("HOME", "STATE_DIRECTORY", "XDG_STATE_HOME")}
    proc = subprocess.run(["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups",
                           sys.executable, "-m", "migblockd", "--help"],
                          capture_output=True, text=True, timeout=60, env=env)
    text = " ".join(proc.stdout.split())
    assert "(default: $STATE_DIRECTORY (set by systemd's StateDirectory=), else " \
           "/var/lib/migblockd as root, else ${XDG_STATE_HOME:-~/.local/state}/migblockd)" \
           in text, text
    assert "`" not in proc.stdout


@pytest.mark.parametrize("o", [o for o in OPTIONS if o.default() is not None], ids=ids)
def test_the_shown_default_parses_back_to_the_default(o: Option) -> None:
    if o.flag:
        assert o.parse(False) is o.default() is False
    else:
        assert o.parse(o.show(o.default())) == o.default()


@pytest.mark.parametrize("o", OPTIONS, ids=ids)
def test_every_file_option_is_read_from_toml(tmp_path: Path, o: Option) -> None:
    path = tmp_path / "m.toml"
    if o.flag:
        path.write_text(f"{o.key} = true\n")
        expected: object = True
    else:
        text = o.show(o.default()) if o.default() is not None else "/some/file"
        path.write_text(f'{o.key} = "{text}"\n')
        expected = o.parse(text)
    if Where.FILE in o.where:
        assert read_file(path) == {o.name: expected}
    else:
        with pytest.raises(ConfigError, match=f"{o.key} can only be given on the command line"):
            read_file(path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max-clients", "0"),
        ("max-clients", "many"),
        ("max-message-size", "1"),
        ("max-nesting", "257"),
        ("max-output", "-5"),
        ("log-level", "loud"),
        ("socket-mode", "rw"),
        ("socket-mode", "1777"),
        ("migration-time", "-1"),
        ("migration-time", "inf"),
        ("schema", ""),
        ("state-dir", "~/state"),
    ],
)
def test_the_same_check_and_message_on_the_command_line_and_in_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: str
) -> None:
    with pytest.raises(SystemExit):
        options([f"--{key}", value])
    cli_error = capsys.readouterr().err.splitlines()[-1]
    prefix = f"migblockd: error: argument --{key}: "
    assert cli_error.startswith(prefix)
    message = cli_error.removeprefix(prefix)

    path = tmp_path / "m.toml"
    path.write_text(f'{key} = "{value}"\n')
    with pytest.raises(ConfigError) as caught:
        build(options(["--config", str(path)]))
    assert str(caught.value) == f"{path}:1: {key} {message}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max-clients = 1.5\n", "1: max-clients must be an integer, not 1.5"),
        ("max-clients = true\n", "1: max-clients must be an integer, not true"),
        # Found by review: what int() and float() take beyond ASCII digits passed,
        # Arabic-Indic digits as 3, blanks and underscores ignored, "inf" as a number.
        ('max-clients = "\u0663"\n', "1: max-clients must be an integer, not '\u0663'"),
        ('max-clients = " 5 "\n', "1: max-clients must be an integer, not ' 5 '"),
        ('max-clients = "1_000"\n', "1: max-clients must be an integer, not '1_000'"),
        ('idle-timeout = "1_0"\n', "1: idle-timeout must be a finite, non-negative number "
         "of seconds, not '1_0'"),
        ('idle-timeout = "\u0665"\n', "1: idle-timeout must be a finite, non-negative "
         "number of seconds, not '\u0665'"),
        ("log-level = [1]\n",
         "1: log-level must be one of debug, info, warning, error, not an array"),
        ("schema = 3\n", "1: schema must be a path, not 3"),
        # Reported: a directory named "~" made under the working directory.
        ('state-dir = "~/.local/state/migblockd"\n', "1: state-dir must spell the home "
         "directory out (nothing here expands ~), not '~/.local/state/migblockd'"),
        # Reproduced: the same file, a daemon started from another directory, and the
        # blockers kept under the first one's were not restored.
        ('state-dir = "mb-state"\n', "1: state-dir must be an absolute path in the "
         "configuration file (a relative one is taken from the daemon's working directory, "
         "which differs between starts), not 'mb-state'"),
        ('socket = "run/s.sock"\n', "1: socket must be an absolute path in the configuration "
         "file (a relative one is taken from the daemon's working directory, which differs "
         "between starts), not 'run/s.sock'"),
        ("only-migratable = \"yes\"\n", "1: only-migratable must be true or false, not 'yes'"),
        ("[socket]\nx = 1\n", "1: socket must be a path, not a table"),
        # Reported: 400 is decimal in TOML, 0o620, and the group could connect.
        ("socket-mode = 400\n", '1: socket-mode must be an octal mode in quotes, such as '
                                 '"0660", not a TOML number (400, which is 0o620)'),
        # Reported: told that a TOML number is read as decimal, of one spelled in octal.
        ("socket-mode = 0o640\n", '1: socket-mode must be an octal mode in quotes, such as '
                                   '"0660", not a TOML number (416, which is 0o640)'),
        ('qemu-passthrough = ["query status"]\n',
         "1: qemu-passthrough must be a list of command names, and 'query status' is not one"),
        ("max-reason-length = 0\n", "1: max-reason-length must be at least 1 character"),
        # Reported: a traceback (UnicodeDecodeError) at start, and on SIGHUP a task
        # that died before telling systemd READY=1.
        ("max-clients = 3\n# \udcff\n", " not UTF-8 text (byte 18); TOML files are UTF-8"),
        ("max-clients = 1\nmax_clients = 2\n",
         "2: max_clients is max-clients again (an underscore stands for a dash); give it once"),
    ],
)
def test_a_wrong_toml_type_names_the_key_and_what_is_expected(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "m.toml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))  # \udcff: a byte 0xff
    with pytest.raises(ConfigError) as caught:
        read_file(path)
    # A setting is named with its line (FILE:LINE: ...), the file as a whole without one.
    assert str(caught.value) == f"{path}:{message}"


def test_toml_reads_a_string_as_the_command_line_does(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('max-clients = "12"\nmigration-time = "0.5"\nsocket-mode = "640"\n')
    from_file = build(options(["--config", str(path)]))
    from_cli = build(options(["--max-clients", "12", "--migration-time", "0.5",
                              "--socket-mode", "640"]))
    assert from_file.replace(config=None) == from_cli
    assert (from_cli.max_clients, from_cli.migration_time, from_cli.socket_mode) == (12, 0.5,
                                                                                   0o640)


def test_the_command_line_turns_off_what_the_file_turns_on(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("only-migratable = true\n")
    assert build(options(["--config", str(path)])).only_migratable is True
    assert build(options(["--config", str(path), "--no-only-migratable"])).only_migratable is False


@pytest.mark.parametrize("gid", ["4294967295", "99999999999999999999"])
def test_a_group_number_past_the_last_one_is_refused(gid: str) -> None:
    # Reported: a traceback (OverflowError), or for 2**32 - 1, chown()'s "no change":
    # the log named the group, the socket kept root's.
    with pytest.raises(SystemExit):
        options(["--socket-group", gid])


def test_the_command_line_gives_checked_values() -> None:
    cli = options(["--socket-mode", "0660", "--socket", "/x/s", "--only-migratable"])
    assert cli["socket_mode"] == 0o660
    assert cli["socket"] == Path("/x/s")
    assert cli["only_migratable"] is True
    assert cli["max_clients"] is None  # not given: the file or the default decides


# --------------------------------------------------------------------------- README


def test_markdown_lists_every_option() -> None:
    text = markdown(Config)
    for o in OPTIONS:
        assert (f"`{o.flag_name}" if Where.COMMAND_LINE in o.where else f"`{o.key} =") in text
        if o.help:
            assert o.help.replace("|", "\\|") in text


def test_the_markdown_command_prints_the_table() -> None:
    out = subprocess.run([sys.executable, "-m", "migblockd.options", "--markdown"],
                         capture_output=True, text=True, check=True, timeout=30, cwd=ROOT)
    assert out.stdout == markdown(Config)


def test_the_update_command_rewrites_a_stale_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{table_module.BEGIN_MARKER}\n| old |\n"
                      f"{table_module.END_MARKER}\n\noutro\n")
    subprocess.run([sys.executable, "-m", "migblockd.options", "--update", str(readme)],
                   check=True, timeout=30, cwd=ROOT)
    assert readme.read_text() == (f"intro\n\n{table_module.BEGIN_MARKER}\n{markdown(Config)}"
                                  f"{table_module.END_MARKER}\n\noutro\n")


# --------------------------------------------------------------------------- expressiveness


@dataclass(frozen=True)
class Access:
    roles: dict[str, str] = dataclasses.field(default_factory=dict)
    default_role: str = "none"


def parse_access(value: object) -> Access:
    if not isinstance(value, dict) or set(value) - {"users", "default-role"}:
        raise ValueError("must be a table of users and default-role")
    users = value.get("users", {})
    if not isinstance(users, dict) or not all(isinstance(r, str) for r in users.values()):
        raise ValueError("users must map user names to roles")
    return Access(roles=dict(users), default_role=str(value.get("default-role", "none")))


def parse_strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("must be an array of strings")
    return tuple(value)


def state_directory() -> Path:
    return Path(os.environ.get("STATE_DIRECTORY", "/var/lib/migblockd"))


@dataclass(frozen=True)
class Upcoming:
    """Options of kinds the daemon does not have yet, each declared once."""

    state_dir: Path = option(factory=state_directory, parse=FilePath(), metavar="DIR",
                             default_doc="`$STATE_DIRECTORY`, else `/var/lib/migblockd`",
                             help="where the blockers are kept")
    ephemeral: bool = flag(help="keep nothing on disk")
    qemu: Path | None = option(None, parse=FilePath(), metavar="SOCKET",
                               help="QEMU's QMP socket to pass commands on to")
    qemu_passthrough: tuple[str, ...] = option((), parse=parse_strings, where=Where.FILE,
                                               metavar="[COMMAND, ...]", default_doc="none",
                                               help="commands passed on to QEMU")
    log_format: str = option("text", parse=OneOf("text", "json"), help="log line format")
    access: Access = option(factory=Access, parse=parse_access, where=Where.FILE,
                            reloadable=True, metavar="TABLE", help="who may do what")


def test_the_table_expresses_the_upcoming_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse  # noqa: PLC0415

    monkeypatch.setenv("STATE_DIRECTORY", "/srv/state")
    p = argparse.ArgumentParser(prog="x")
    add_arguments(p, Upcoming)
    ns = vars(p.parse_args(["--ephemeral", "--qemu", "/q.sock", "--log-format", "json"]))
    assert ns == {"state_dir": None, "ephemeral": True, "qemu": Path("/q.sock"),
                  "log_format": "json"}  # file-only options are not on the command line
    assert "{" not in p.format_usage()  # choices shown as the metavar text|json

    path = tmp_path / "u.toml"
    path.write_text('qemu-passthrough = ["query-status"]\n'
                    '[access]\ndefault-role = "reader"\n[access.users]\nalice = "admin"\n')
    values = settings_file.read_file(path, Upcoming)
    assert values == {"qemu_passthrough": ("query-status",),
                      "access": Access(roles={"alice": "admin"}, default_role="reader")}
    path.write_text("[access]\ncolour = 1\n")
    with pytest.raises(ConfigError, match="access must be a table of users and default-role"):
        settings_file.read_file(path, Upcoming)

    assert reloadable(Upcoming) == ("access",)
    assert Upcoming().state_dir == Path("/srv/state")  # computed at run time
    assert "default: /srv/state" in " ".join(p.format_help().split())
    readme = markdown(Upcoming)
    assert "| `qemu-passthrough = [COMMAND, ...]` (file only) | none |" in readme
    assert "`$STATE_DIRECTORY`, else `/var/lib/migblockd`" in readme
