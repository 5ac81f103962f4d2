"""Settings: defaults < TOML file < command line, and clear errors."""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, DaemonProcess, assert_clean_log, assert_start_refused, wait_ready
from faults import opened, stopped_at_open
from otheruids import NUMBER_NAMED_GROUP, Account
from realqemu import wait_until

from migblockd.cli import options
from migblockd.config import Config, ConfigError, build
from migblockd.kinds import HostPort, describe
from migblockd.paths import fallback_socket_dir
from migblockd.startup import EXIT_FAILURE, EXIT_NOTCONFIGURED, StartupError
from migblockd.tcp import resolve_tcp
from migblockd.trusted_file import UntrustedFile, check_trusted


def test_defaults() -> None:
    config = build(options([]))
    assert config == Config()
    assert config.socket_mode == 0o600
    assert config.log_level == "info"


def test_file_then_command_line(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(
        'log-level = "debug"\nmax-clients = 7\nsocket-mode = "0660"\nmigration-time = 2\n'
    )
    config = build(options(["--config", str(path), "--max-clients", "9"]))
    assert config.log_level == "debug"
    assert config.max_clients == 9  # the command line wins
    assert config.socket_mode == 0o660
    assert config.migration_time == 2.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 1\n", "unknown setting 'colour'"),
        ("limits = 1\n", "unknown setting 'limits'"),
        # A key of any length is cut as a value is (found by review: 100 KB lines).
        ("k" * 100_000 + " = 1\n", "unknown setting 'k{35}\\.\\.\\.'$"),
        ('max-clients = "many"\n', "max-clients must be an integer"),
        ('log-level = "loud"\n', "log-level must be one of debug, info, warning, error"),
        ('socket-mode = "rw"\n', "socket-mode must be an octal mode"),
        ("only-migratable = 1\n", "only-migratable must be true or false"),
        ("max-output = 0\n", "max-output must be at least 1"),
        ("max-nesting = 257\n", "max-nesting must be between 1 and 256"),
        ("max-message-size = 1\n", "max-message-size must be at least 2 bytes"),
        ("max-tokens = 0\n", "max-tokens must be at least 1"),
        ("migration-time = nan\n", "migration-time must be a finite, non-negative number"),
        ("migration-time = inf\n", "migration-time must be a finite, non-negative number"),
        ("log-level = \n", "Invalid value"),
    ],
)
def test_bad_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        build(options(["--config", str(path)]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # The shipped file sets log-level; an operator appends another.
        ('log-level = "info"\nmax-clients = 3\nlog-level = "debug"\n',
         "Cannot overwrite a value (at line 3, column 20): 'log-level = \"debug\"': a key "
         "(or table) given twice; give each once"),
        ('[access]\nusers = { a = "client" }\n[access]\n',
         "Cannot declare ('access',) twice (at line 3, column 8): '[access]': a key (or "
         "table) given twice; give each once"),
        ("log-level = \n", "Invalid value (at line 1, column 13): 'log-level ='"),
        # Reported: the parser's words alone, with no word of quotes.
        ("log-level = debug\n", "Invalid value (at line 1, column 13): 'log-level = debug'; a "
         'string goes in quotes: log-level = "debug"'),
        ("socket-mode = 0660  # rw\n", "Expected newline or end of document after a statement "
         "(at line 1, column 16): 'socket-mode = 0660  # rw'; a string goes in quotes: "
         'socket-mode = "0660"'),
        # Found by review: the hint repeated a line of any length (300 kB of log line).
        ("log-level = " + "d" * 300_000 + "\n", "Invalid value (at line 1, column 13): "
         f"'log-level = {'d' * 65}...'; a string goes in quotes: log-level = \"{'d' * 64}..."),
        # The last line without a newline: tomllib says only "at end of document".
        ('log-level = "info"\nlog-level = "debug"',
         "Cannot overwrite a value (at end of document, line 2): 'log-level = \"debug\"': a "
         "key (or table) given twice; give each once"),
        ("max-clients = 3\nlog-level = ", "Invalid value (at end of document, line 2): "
         "'log-level ='"),
        # tomllib counts lines as TOML ends them, at \n only.
        ("# a\u2028b\x85c\nlog-level = \n", "Invalid value (at line 2, column 13): "
         "'log-level ='"),
    ],
)
def test_a_bad_file_names_its_line_and_what_to_do(tmp_path: Path, text: str,
                                                  message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        build(options(["--config", str(path)]))
    assert str(raised.value) == f"{path}: {message}"


SHIPPED = Path(__file__).parent.parent / "systemd" / "migblockd.toml"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Found by review: a refused setting was named without its line, unlike a
        # TOML syntax error, and unlike QEMU's QAPI generator (FILE:LINE: message).
        ("max_client = 3\n", "1: unknown setting 'max_client'; did you mean 'max-clients'?"),
        ("# a comment\n\ncolour = 1\n", "3: unknown setting 'colour'"),
        ('log-level = "info"\nmax-clients = "many"\n',
         "2: max-clients must be an integer, not 'many'"),
        ('log-level = "info"\nmax-clients = 5\nmax_clients = 6\n',
         "3: max_clients is max-clients again (an underscore stands for a dash); give it once"),
        # Not the text of a multi-line string or array that looks like the key.
        ('motd = """\nmax-clients = 0\n"""\n', "1: unknown setting 'motd'"),
        ('qemu-passthrough = [\n  "stop", # ]\n  \'a]\',\n]\nmax-clients = 0\n',
         "5: max-clients must be at least 1"),
        ('"max-clients" = 0\n', "1: max-clients must be at least 1"),
        # Lines as TOML ends them, at \n only (and \r\n).
        ("# a\u2028b\x85c\r\nmax-clients = 0\n", "2: max-clients must be at least 1"),
        ('log-level = "info"\n[access]\nmax-clients = 5\n',
         "3: access has an unknown key 'max-clients' (it takes default-role, users, groups); "
         "TOML read max-clients as part of [access]: settings go before the first [table] "
         "header"),
        ('log-level = "info"\naccess.users.alice = "root"\n',
         "2: access users.alice must be one of observer, client, operator, admin"),
        # Found by review: a key of a table below [access] was named with the line of
        # the table's header, however far above it.
        ('[access]\ndefault-role = "client"\n\n[access.users]\nroot = "admin"\n'
         'alice = "bogus"\n',
         "6: access users.alice must be one of observer, client, operator, admin"),
        ('[access]\nusers = { root = "admin" }\ndefault_role = "nobody"\n',
         "3: access default-role must be one of observer"),
        ('[access]\nusers.root = "admin"\n\ngroups = { wheel = "admin", kvm = "nope" }\n',
         "4: access groups.kvm must be one of observer"),  # no line of its own: its table's
        ('[access.groups]\n"0100" = "admin"\n\n[access.users]\nbob = "client"\n'
         '[access.groups.x]\n', "6: access groups.x must be one of observer"),
        ('[access.users]\n"0100" = "admin"\n"100" = "client"\n',
         "3: access users.100 is users.0100 again (both are uid 100); give it once"),
        ('[access]\ndefault-role = "client"\ndefault_role = "admin"\n',
         "3: access default_role is default-role again"),
        ("config = '/etc/x.toml'\n", "1: config can only be given on the command line"),
        ('state-dir = "state"\n', "1: state-dir must be an absolute path"),
    ],
)
def test_a_refused_setting_is_named_with_its_line(tmp_path: Path, text: str,
                                                   message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        build(options(["--config", str(path)]))
    assert str(raised.value).startswith(f"{path}:{message}")


def test_a_refused_setting_of_the_shipped_file_is_named_with_its_line(
        tmp_path: Path) -> None:
    # The operator's usual edit: a commented-out setting of the shipped file enabled.
    path = tmp_path / "m.toml"
    lines = SHIPPED.read_text().splitlines()
    number = lines.index("# max-clients = 1024") + 1
    lines[number - 1] = "max-clients = 0"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as raised:
        build(options(["--config", str(path)]))
    assert str(raised.value) == f"{path}:{number}: max-clients must be at least 1"


def test_missing_file_is_one_line_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "migblockd", "--config", str(tmp_path / "nope.toml")],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == EXIT_NOTCONFIGURED
    assert proc.stderr.strip() == (
        f"migblockd: cannot read {tmp_path / 'nope.toml'}: No such file or directory"
    )


def test_help_explains_every_option() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "migblockd", "--help"], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0
    for option in ("--socket", "--socket-mode", "--only-migratable", "--migration-time",
                   "--log-level", "--max-clients", "--max-message-size", "--max-tokens",
                   "--max-output",
                   "--config", "SIGHUP"):
        assert option in proc.stdout


# --------------------------------------------------------------------------- StrictModes


@pytest.mark.parametrize("mode", [0o666, 0o646, 0o620])
def test_a_file_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "m.toml"
    path.write_text('log-level = "debug"\n')
    path.chmod(mode)
    with pytest.raises(ConfigError) as refused:
        build(options(["--config", str(path)]))
    assert str(refused.value) == (f"{path}: refusing a configuration file others may write "
                                  f"(mode {mode:04o}); chmod go-w {path}")
    path.chmod(0o644)
    assert build(options(["--config", str(path)])).log_level == "debug"


def test_a_file_whose_acl_lets_only_trusted_users_write_is_read(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    """Found by review of the directories' ACL rule: under an access ACL the mode's
    group bits are only its mask, and a file that ``setfacl -m u:65534:r,m::rw`` made
    0664, which nobody but its owner may write, was refused as "others may write (mode
    0664)" by --check-config, at start and at reload.  Its entries decide, as the
    kernel reads them: one that lets another user or a group write is refused, with
    the setfacl that takes the write away.  Real setfacl, the daemon as a process."""
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    path.chmod(0o644)
    # A named entry for this user itself lets no one else write.
    subprocess.run(["setfacl", "-m", f"u:65534:r,u:{os.geteuid()}:rw,m::rw", str(path)],
                   check=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664  # the mask's bits
    check = [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral", "--socket",
             str(tmp_path / "s.sock"), "--config", str(path)]
    valid = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert valid.returncode == 0, valid.stderr
    d = start_daemon("--config", str(path), "--ephemeral")

    path.write_text('log-level = "debug"\n')
    subprocess.run(["setfacl", "-m", "u:65534:rw,g::rw", str(path)], check=True)
    gid = path.stat().st_gid
    fix = f"setfacl -n -m u:65534:r,g::r {path}"
    refusal = (f"{path}: refusing a configuration file with an ACL that lets uid 65534 "
               f"(nobody), the members of gid {gid} ({grp.getgrgid(gid).gr_name}) write to "
               f"it (mode 0664, whose group bits are the ACL's mask); {fix}")
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"reload failed, keeping the running configuration: {refusal}\n")
    refused = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert (refused.returncode, refused.stderr) == (EXIT_NOTCONFIGURED, f"migblockd: {refusal}\n")
    subprocess.run(fix.split(), check=True)  # what the refusal says to do
    assert build(options(["--config", str(path)])).log_level == "debug"

    # The others' entry is not masked: it lets everyone write, whatever the mask.
    subprocess.run(["setfacl", "-m", "o::rw,m::r", str(path)], check=True)
    with pytest.raises(ConfigError) as everyone:
        build(options(["--config", str(path)]))
    assert str(everyone.value) == (
        f"{path}: refusing a configuration file with an ACL that lets everyone write to it "
        f"(mode 0646, whose group bits are the ACL's mask); setfacl -n -m o::r {path}")
    assert d.stop() == 0


def test_the_acl_judged_is_the_one_of_the_file_opened(tmp_path: Path) -> None:
    """The ACL is read from the descriptor the file is read through, not by name:
    whatever the name holds by then is not the file read."""
    path = tmp_path / "m.toml"
    path.write_text('log-level = "debug"\n')
    path.chmod(0o644)
    subprocess.run(["setfacl", "-m", "u:65534:rw", str(path)], check=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        clean = tmp_path / "clean.toml"
        clean.write_text('log-level = "info"\n')
        clean.chmod(0o644)
        os.replace(clean, path)  # the name now holds a file nobody else may write
        with pytest.raises(UntrustedFile, match=r"^.* with an ACL that lets uid 65534 "):
            check_trusted(path, fd, os.fstat(fd), "configuration file", "the daemon's settings")
    finally:
        os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
def test_a_file_owned_by_another_user_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('log-level = "debug"\n')
    os.chown(path, 65534, 65534)
    proc = subprocess.run(
        [sys.executable, "-m", "migblockd", "--config", str(path)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == EXIT_NOTCONFIGURED
    # Who owns it, who may, and what to run.
    assert proc.stderr.strip() == (f"migblockd: {path}: refusing a configuration file owned "
                                   "by uid 65534 (nobody): only root may own it, since its "
                                   f"owner sets the daemon's settings; chown root {path}")



@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user takes root")
def test_a_daemon_of_its_own_user_names_it_among_the_owners_it_takes(short_tmp: Path) -> None:
    short_tmp.chmod(0o755)
    path = short_tmp / "m.toml"
    path.write_text('log-level = "debug"\n')
    os.chown(path, 65534, 65534)
    proc = subprocess.run(["setpriv", "--reuid=1", "--regid=1", "--clear-groups",
                           sys.executable, "-m", "migblockd", "--check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (EXIT_NOTCONFIGURED, (
        f"migblockd: {path}: refusing a configuration file owned by uid 65534 (nobody): only "
        f"root or the daemon's user, uid 1 ({pwd.getpwuid(1).pw_name}), may own it, since its "
        f"owner sets the daemon's settings; chown root {path}\n"))


def in_a_directory_others_may_write(path: Path) -> str:
    return (f"{path.parent}, above configuration file {path}, is writable by others (mode "
            f"0777), so they could replace it and so set the daemon's settings; chmod go-w "
            f"{path.parent}, or choose another place for it")


def test_a_file_in_a_directory_others_may_write_is_refused(short_tmp: Path) -> None:
    # Reproduced first: the file alone was judged, so whoever could write its directory
    # could put any root-owned file in its place (an empty one: default-role client).
    etc = short_tmp / "etc"
    etc.mkdir()
    path = etc / "m.toml"
    path.write_text('log-level = "debug"\n')
    etc.chmod(0o777)
    args = ["--config", str(path), "--ephemeral", "--socket", str(short_tmp / "s")]
    for proc in (check_config(*args),
                 subprocess.run([sys.executable, "-m", "migblockd", *args],
                                capture_output=True, text=True, timeout=30)):
        assert (proc.returncode, proc.stderr) == (
            EXIT_NOTCONFIGURED, f"migblockd: {in_a_directory_others_may_write(path)}\n")
    # Sticky, as /tmp: others may add names there, not rename root's.
    etc.chmod(0o1777)
    assert check_config(*args).returncode == 0
    # A link from a trusted place is judged by where it leads, too.
    etc.chmod(0o777)
    link = short_tmp / "link.toml"
    link.symlink_to(path)
    proc = check_config("--config", str(link), "--ephemeral", "--socket", str(short_tmp / "s"))
    assert (proc.returncode, proc.stderr) == (EXIT_NOTCONFIGURED, (
        f"migblockd: {etc}, above configuration file {link} (which is {path}), is "
        f"writable by others (mode 0777), so they could replace it and so set the daemon's "
        f"settings; chmod go-w {etc}, or choose another place for it\n"))


@pytest.mark.skipif(os.geteuid() != 0, reason="another user's swap takes root to set up")
async def test_a_file_another_user_swapped_through_its_directory_is_refused_at_reload(
    start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
) -> None:
    short_tmp.chmod(0o755)
    etc = short_tmp / "etc"
    etc.mkdir()
    path = etc / "m.toml"
    path.write_text('max-clients = 1\n')
    empty = short_tmp / "empty"
    empty.touch()
    d = start_daemon("--config", str(path), "--ephemeral")
    etc.chmod(0o777)
    # nobody puts a root-owned file of no settings in its place.
    subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c",
                    f"mv {path} {etc}/old && ln -s {empty} {path}"], check=True, timeout=30)
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"ERROR: reload failed, keeping the running configuration: {etc}, on the "
                   f"way to configuration file {path} (which is {empty}), is writable by "
                   "others (mode 0777), so they could replace it and so set the daemon's "
                   f"settings; chmod go-w {etc}, or choose another place for it\n")
    assert "reloaded configuration" not in d.log()
    assert d.stop() == 0


@pytest.mark.parametrize(("text", "message"), [
    # Each named with its own line (not the header's, above it).
    ('[access]\ndefault-role = "observer"\nmax-blockers = 5\n',
     "3: access has an unknown key 'max-blockers' \\(it takes default-role, users, groups\\); "
     "TOML read max-blockers as part of \\[access\\]: settings go before the first \\[table\\] "
     "header"),
    # Read as a user named log-level, once with nothing to say why.
    ('[access.users]\nalice = "admin"\nlog_level = "debug"\n',
     "3: access users.log_level must be one of observer, client, operator, admin, not 'debug'; "
     "TOML read log_level as part of \\[access.users\\]: settings go before the first "
     "\\[table\\] header"),
    ('[access.users]\nalice = "boss"\n',
     "2: access users.alice must be one of observer, client, operator, admin, not 'boss'"),
])
def test_a_setting_below_a_table_header_is_said_to_belong_there(tmp_path: Path, text: str,
                                                                message: str) -> None:
    path = tmp_path / "m.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"^{path}:{message}$"):
        build(options(["--config", str(path)]))


@pytest.mark.parametrize(("text", "message"), [
    ("access = " + "[" * 5000 + "]" * 5000 + "\n", ": arrays or tables nested too deeply to read"),
    ("[access]\nusers = " + "{a = " * 5000 + "1" + "}" * 5000 + "\n",
     ": arrays or tables nested too deeply to read"),
    # A value that a setting reads as TOML in its turn.
    ('access = "' + "[" * 5000 + "]" * 5000 + '"\n',
     ":1: access has arrays or tables nested too deeply to read"),
    ('qemu-passthrough = "' + "[" * 5000 + "]" * 5000 + '"\n',
     ":1: qemu-passthrough has arrays or tables nested too deeply to read"),
])
def test_a_file_nested_too_deeply_is_one_line_error(tmp_path: Path, text: str,
                                                     message: str) -> None:
    # Reproduced first: tomllib's RecursionError, some 3,000 lines of traceback.
    path = tmp_path / "m.toml"
    path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "migblockd", "--config", str(path)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == EXIT_NOTCONFIGURED
    assert proc.stderr.strip() == f"migblockd: {path}{message}"


async def test_a_file_nested_too_deeply_is_refused_at_reload(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral")
    path.write_text("max-clients = 1\naccess = " + "[" * 5000 + "]" * 5000 + "\n")
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"ERROR: reload failed, keeping the running configuration: {path}: arrays "
                   "or tables nested too deeply to read\n")
    async with d.client() as a, d.client() as b:  # max-clients = 1 was not applied
        await a.ok("query-version")
        await b.ok("query-version")
    assert "Traceback" not in d.log()


async def test_a_file_made_world_writable_is_refused_at_reload(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: the reload read it, and log-level = "debug" logged every
    # message on the wire.
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral")
    path.write_text('log-level = "debug"\nmax-clients = 1\n')
    path.chmod(0o666)
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"reload failed, keeping the running configuration: {path}: refusing a "
                   f"configuration file others may write (mode 0666); chmod go-w {path}")
    async with d.client() as a, d.client() as b:  # max-clients = 1 was not applied
        await a.ok("query-version")
        await b.ok("query-version")
    assert d.stop() == 0


async def test_a_reload_names_the_changes_that_wait_for_a_restart(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral")
    path.write_text('log-level = "info"\nmax-clients = 7\nmigration-time = 9\n'
                    'socket-mode = "0660"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log("reloaded configuration: max-clients=7")
    # Read, but not applied: said, rather than silently dropped.
    # Each at the line the file now gives it (reproduced first: the bare keys).
    d.wait_for_log(f"WARNING: reload: {path}:4: socket-mode, {path}:3: migration-time changed, "
                   "which only a restart applies")
    assert d.socket.stat().st_mode & 0o777 == 0o600
    # Only such changes: the info line does not say "nothing changed" above the warning.
    path.write_text('log-level = "info"\nmax-clients = 7\nmigration-time = 5\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log("reloaded configuration: no setting a reload applies changed")
    d.wait_for_log(f"WARNING: reload: {path}:3: migration-time changed, which only a restart "
                   "applies")
    assert "nothing changed" not in d.log()
    assert d.stop() == 0


async def test_a_reload_that_lowers_the_log_level_still_reports_itself(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Found by review: the new level was set before the reload's own lines were
    # logged, so with "error" not one line said the file was read, nor that the
    # socket mode waits for a restart, nor that the next start would fail.
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral", log_level=None)
    missing = tmp_path / "nonexistent.json"
    path.write_text(f'log-level = "error"\nsocket-mode = "0660"\nschema = "{missing}"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log("INFO: reloaded configuration: log-level=error")
    d.wait_for_log(f"WARNING: reload: {path}:2: socket-mode, {path}:3: schema changed, which "
                   "only a restart applies")
    d.wait_for_log(f"WARNING: reload: with schema as the file now sets it, the next start "
                   f"would fail: {path}:3: schema: cannot read the schema {missing}")
    # The level applies once the report is out: a client's change logs nothing now.
    async with d.client() as c:
        await c.ok("add-blocker", {"id": "quiet", "reason": "r"})
        await c.ok("query-version")
    # Raised back from "error": the report says so, at the level it comes to.
    path.write_text('log-level = "info"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log("INFO: reloaded configuration: log-level=info")
    assert "quiet" not in d.log()
    assert d.stop() == 0


async def test_a_configuration_file_past_1_mib_is_refused_at_start_and_at_reload(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Found by review: a reload read a 200 MB file on the event loop (every client
    # waited 2 s), and the start took it (414 MB of memory).
    path = tmp_path / "m.toml"
    huge = 'log-level = "info"\n' + "# padding\n" * 110_000
    path.write_text(huge)
    with pytest.raises(ConfigError, match=r"m\.toml is larger than 1024 KiB, which no "
                       "configuration file needs"):
        build(options(["--config", str(path)]))
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral", log_level=None)
    path.write_text(huge)
    d.signal(signal.SIGHUP)
    d.wait_for_log("ERROR: reload failed, keeping the running configuration: "
                   f"{path} is larger than 1024 KiB")
    async with d.client() as c:
        await c.ok("query-version")
    assert d.stop() == 0


async def test_a_reload_says_which_edits_the_command_line_outvotes(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: the reload said only "nothing changed", and the operator
    # who had edited the file could not tell why.
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\nmax-clients = 50\n')
    d = start_daemon("--config", str(path), "--ephemeral", "--log-level", "info",
                     "--max-clients", "50")
    path.write_text('# m\n\nlog-level = "debug"\n\nmax-clients = 10\nmax-clients-per-uid = 3\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log("INFO: reloaded configuration: max-clients-per-uid=3\n")
    # Each at the line the operator edited (reproduced first: no file, no line).
    d.wait_for_log(f"WARNING: reload: {path}:3: log-level changed in the file, but the command "
                   "line sets it (info); the command line wins\n")
    d.wait_for_log(f"WARNING: reload: {path}:5: max-clients changed in the file, but the "
                   "command line sets it (50); the command line wins\n")
    # Compared with the file as the last reload read it: said once, not at every reload.
    d.signal(signal.SIGHUP)
    d.wait_for_log("INFO: reloaded configuration: nothing changed\n")
    assert d.log().count("the command line wins") == 2
    assert " DEBUG: " not in d.log()
    assert d.stop() == 0


async def test_reloaded_input_limits_apply_to_open_connections(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral")
    big = {"reason": "x" * 1000}  # within max-reason-length, past the new max-message-size
    async with d.client() as before:
        assert "return" in await before.execute("add-blocker", big, id=1)
        path.write_text('log-level = "info"\nmax-message-size = 1000\n')
        d.signal(signal.SIGHUP)
        d.wait_for_log("reloaded configuration: max-message-size=1000")
        # The connection made before the reload is held to the new bound, as a new one is.
        async with d.client() as after:
            expected = await after.execute("add-blocker", big, id=2)
        assert "error" in expected
        assert await before.execute("add-blocker", big, id=2) == expected
        before.send_raw(b"\n")  # the decoder skips the rest of the line (docs/protocol.md)
        assert "return" in await before.execute("query-version", id=3)
    # Both warnings name the bound in force, the old connection's too.
    d.wait_for_log(re.compile(r"(past max-message-size=1000 bytes[\s\S]*){2}"))
    assert d.stop() == 0


async def test_a_sighup_while_starting_is_a_reload_once_ready(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: SIGHUP's default action killed a daemon still starting
    # (a reload asked for while it restored its blockers), with nothing logged.
    schema = tmp_path / "schema"
    shutil.copytree(ROOT / "schema", schema)
    root = schema / "migblockd.json"
    path = tmp_path / "m.toml"
    path.write_text("max-clients = 5\n")
    # Held in its start-up, stopped as it opens the schema, until the test continues it.
    d = start_daemon("--config", str(path), "--schema", str(schema), "--ephemeral", wait=False,
                     python=stopped_at_open(root, tmp_path, "the daemon's start"))
    await wait_until(lambda: opened(d.proc.pid, root), "the daemon at the schema")
    path.write_text("max-clients = 7\n")
    d.signal(signal.SIGHUP)
    d.signal(signal.SIGCONT)
    wait_ready(d)
    d.wait_for_log("reloading: SIGHUP received while starting")
    d.wait_for_log("reloaded configuration: max-clients=7")
    assert d.stop() == 0
    assert_clean_log(d)


def test_a_sighup_while_waiting_for_qemu_at_start_does_not_say_ready_early(
    start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
) -> None:
    # Reproduced first: a SIGHUP while the daemon waited for QEMU's greeting (up
    # to 5 s) was reloaded at once, and its READY=1 told systemd the daemon was
    # ready seconds before it served.
    qemu = socket.socket(socket.AF_UNIX)  # accepts (the backlog), never greets
    qemu.bind(str(short_tmp / "qemu.sock"))
    qemu.listen()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_tmp / "notify"))
    notify.settimeout(20)
    with qemu, notify:
        d = start_daemon("--qemu", str(short_tmp / "qemu.sock"), "--ephemeral", wait=False,
                         env=dict(os.environ, NOTIFY_SOCKET=str(short_tmp / "notify")))
        d.wait_for_log("listening on")
        time.sleep(0.5)  # into the wait for QEMU's greeting
        d.signal(signal.SIGHUP)
        # A STATUS= alone may come before READY=1: at 5 s, as the start gives up
        # waiting, QEMU's silence is noted ("not answering"), which systemctl status
        # may show while the unit is activating.
        got: list[str] = []
        while len(got) < 3:
            first = notify.recv(4096).decode().split("\n")[0]
            if not first.startswith("STATUS="):
                got.append(first)
        assert got == ["READY=1", "RELOADING=1", "READY=1"]
        reloading = d.wait_for_log("reloading: SIGHUP received while starting")
        assert d.wait_for_log("ready on").start() < reloading.start()
        assert d.stop() == 0


def test_a_fifo_is_refused_at_start_without_waiting_for_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    os.mkfifo(path, 0o600)
    proc = subprocess.run(
        [sys.executable, "-m", "migblockd", "--config", str(path)],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == EXIT_NOTCONFIGURED
    assert proc.stderr.strip() == (
        f"migblockd: {path} is not a regular file; --config takes a TOML file")


def test_what_is_not_a_file_is_called_so_whatever_its_mode(tmp_path: Path) -> None:
    # Reported: a FIFO, /dev/null or /tmp that others may write got "refusing a ...
    # file others may write; chmod go-w /dev/null", advice that breaks the system.
    fifo = tmp_path / "open.toml"
    os.mkfifo(fifo)
    fifo.chmod(0o666)
    includer = tmp_path / "includer.json"
    includer.write_text("{ 'include': '/tmp' }\n")
    check = [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral"]
    said = {}
    for option, path in (("--config", fifo), ("--schema", "/dev/null"),
                         ("--schema", includer)):
        proc = subprocess.run([*check, option, str(path)], capture_output=True, text=True,
                              timeout=30)
        assert proc.returncode == EXIT_NOTCONFIGURED
        said[str(path)] = proc.stderr
    assert said == {
        str(fifo): f"migblockd: {fifo} is not a regular file; --config takes a TOML file\n",
        "/dev/null": "migblockd: /dev/null is not a regular file; --schema takes a QAPI "
                     "schema file\n",
        # A directory, in QEMU's generator's words (its open() fails on one).
        str(includer): f"migblockd: bad schema: {includer}:1:14: can't read include file "
                       "'/tmp': Is a directory\n",
    }


async def test_a_fifo_in_place_of_the_file_is_refused_at_reload(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: the reload's open() waited for a writer, and with it the
    # event loop: every client hung until someone opened the FIFO.
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral")
    path.unlink()
    os.mkfifo(path, 0o600)
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"reload failed, keeping the running configuration: {path} is not a "
                   "regular file; --config takes a TOML file")
    async with d.client() as c:
        await c.ok("query-version")
    assert d.stop() == 0


def notifying(start_daemon: Callable[..., DaemonProcess], config: Path,
              notify: socket.socket) -> DaemonProcess:
    """A daemon on ``config`` (written now), telling ``notify`` as it would systemd."""
    config.write_text('log-level = "info"\n')
    return start_daemon("--config", str(config), "--ephemeral",
                        env={**os.environ, "NOTIFY_SOCKET": notify.getsockname()})


async def test_a_fifo_as_the_schema_is_refused_at_reload(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path, notify: socket.socket,
) -> None:
    # Reproduced first: the reload's check of the schema waited for a writer, so
    # systemd heard RELOADING=1 and never READY=1, and after SIGTERM the daemon
    # logged "stopped" but did not exit until someone wrote to the FIFO.
    path = tmp_path / "m.toml"
    d = notifying(start_daemon, path, notify)
    fifo = tmp_path / "schema.json"
    os.mkfifo(fifo, 0o600)
    path.write_text(f'log-level = "info"\nschema = "{fifo}"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"WARNING: reload: with schema as the file now sets it, the next start "
                   f"would fail: {path}:2: schema: {fifo} is not a regular file; --schema "
                   "takes a QAPI schema file\n")
    notify.settimeout(20)
    got = [notify.recv(4096).decode().split("\n")[0] for _ in range(3)]
    assert got == ["READY=1", "RELOADING=1", "READY=1"]
    async with d.client() as c:
        await c.ok("query-version")
    assert d.stop() == 0


def check_config(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migblockd", "--check-config", *args],
                          capture_output=True, text=True, timeout=30)


AS_NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """``migblockd ARGS`` run as nobody (a start, or ``--check-config``)."""
    return subprocess.run([*AS_NOBODY, sys.executable, "-m", "migblockd", *args],
                          capture_output=True, text=True, timeout=30)


def assert_check_and_start_refuse(args: list[str], message: str) -> None:
    """nobody's ``--check-config`` and nobody's start refuse ``args`` in the same words."""
    checked = as_nobody("--check-config", *args)
    assert (checked.returncode, checked.stdout, checked.stderr) == (
        EXIT_NOTCONFIGURED, "", f"migblockd: {message}\n")
    started = as_nobody(*args)
    assert started.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {message}\n" in started.stderr, started.stderr


def root_run_nobody_state(short_tmp: Path) -> tuple[Path, Path]:
    """A socket directory of root's (0755) and a state directory of nobody's (0700)."""
    short_tmp.chmod(0o755)
    run, state = short_tmp / "run", short_tmp / "state"
    run.mkdir(mode=0o755)
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    return run, state


def test_check_config_says_valid_and_starts_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(f'log-level = "debug"\nstate-dir = "{tmp_path / "state"}"\n')
    path.chmod(0o600)
    proc = check_config("--config", str(path), "--socket", str(tmp_path / "s.sock"))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (f"migblockd: {path} and the command line: valid; socket "
                           f"{tmp_path / 's.sock'}, state in {tmp_path / 'state'}, which "
                           "does not exist yet: a start makes it, with an empty state "
                           "database\n")
    assert sorted(tmp_path.iterdir()) == [path]  # no state directory, no socket


def test_check_config_gives_the_error_a_start_would(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text("max-clients = 0\n")
    path.chmod(0o600)
    proc = check_config("--config", str(path))
    assert (proc.returncode, proc.stdout) == (EXIT_NOTCONFIGURED, "")
    assert proc.stderr == f"migblockd: {path}:1: max-clients must be at least 1\n"
    assert check_config("--ephemeral").stdout.endswith("state in memory only (ephemeral)\n")


@pytest.mark.parametrize(("text", "message"), [
    # Named as the file sets it, not as an option nobody gave.
    ('socket-group = "no-such-group-here"\n',
     "{path}:1: socket-group: there is no group named 'no-such-group-here'"),
    ('schema = "/nonexistent/migblockd.json"\n',
     "{path}:1: schema: cannot read the schema /nonexistent/migblockd.json: No such file or "
     "directory"),
    ('metrics = "no-such-host.invalid:9715"\n', "{path}:1: metrics no-such-host.invalid:9715: "),
    ('metrics = "[:1"\n', "{path}:1: metrics [:1: "),
])
def test_check_config_refuses_what_would_stop_the_start(tmp_path: Path, text: str,
                                                         message: str) -> None:
    # Reproduced first: each was "valid" to --check-config, and the start that
    # followed exited 1 with this very line.
    path = tmp_path / "m.toml"
    path.write_text(text)
    path.chmod(0o600)
    args = ("--config", str(path), "--socket", str(tmp_path / "s.sock"), "--ephemeral")
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout) == (EXIT_NOTCONFIGURED, "")
    assert proc.stderr.startswith(f"migblockd: {message.format(path=path)}")
    assert sorted(tmp_path.iterdir()) == [path]  # nothing was made
    start = subprocess.run([sys.executable, "-m", "migblockd", *args],
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {proc.stderr.removeprefix('migblockd: ')}" in start.stderr


def test_a_setting_is_named_where_it_came_from(tmp_path: Path) -> None:
    # Reproduced first: a socket-group or metrics from the file was named as the
    # option (--socket-group), which the operator had not given.  Where the
    # command line gives it too, it wins, and is named as its option.
    path = tmp_path / "m.toml"
    path.write_text('socket-group = "no-such-group-here"\nmetrics = "[:1"\n')
    path.chmod(0o600)
    proc = check_config("--config", str(path), "--ephemeral", "--socket",
                        str(tmp_path / "s.sock"), "--socket-group", "no-such-group-either")
    assert (proc.returncode, proc.stdout) == (EXIT_NOTCONFIGURED, "")
    group, metrics = proc.stderr.splitlines()
    assert group == "migblockd: --socket-group: there is no group named 'no-such-group-either'"
    assert metrics.startswith(f"migblockd: {path}:2: metrics [:1: ")


#: What a metrics host that Python's IDNA codec refuses is told.
UNASKABLE = ("metrics must be host:port with a host that is an IP address or a DNS name "
             "(labels of 1 to 63 characters between single dots), not ")


@pytest.mark.parametrize("host", ["a..b", ".a", "a" * 64])
def test_a_metrics_host_the_resolver_cannot_be_asked_about_is_one_line(tmp_path: Path,
                                                                       host: str) -> None:
    # Reproduced first: --check-config and the start each ended in a traceback
    # ("UnicodeError: encoding with 'idna' codec failed"), not in one line.
    path = tmp_path / "m.toml"
    path.write_text(f'metrics = "{host}:9715"\n')
    path.chmod(0o600)
    args = ("--config", str(path), "--socket", str(tmp_path / "s.sock"), "--ephemeral")
    message = f"migblockd: {path}:1: {UNASKABLE}{describe(f'{host}:9715')}\n"
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (EXIT_NOTCONFIGURED, "", message)
    start = subprocess.run([sys.executable, "-m", "migblockd", *args],
                           capture_output=True, text=True, timeout=30)
    assert (start.returncode, start.stderr) == (EXIT_NOTCONFIGURED, message)
    assert sorted(tmp_path.iterdir()) == [path]  # nothing was made


def test_resolving_a_host_the_codec_refuses_is_a_startup_error() -> None:
    # A HostPort made in code, not parsed: the start's own resolve says so in words.
    with pytest.raises(StartupError, match=r"^--metrics a\.\.b:9715: not a host name the "
                       r"resolver can be asked about"):
        resolve_tcp(HostPort("a..b", 9715))


async def test_a_reload_refuses_a_metrics_host_the_resolver_cannot_be_asked_about(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path, notify: socket.socket,
) -> None:
    # Reproduced first: the reload applied max-clients = 1, its check of the
    # metrics host raised UnicodeError ("Task exception was never retrieved"), and
    # systemd heard RELOADING=1 and never READY=1: the unit stayed "reloading".
    path = tmp_path / "m.toml"
    d = notifying(start_daemon, path, notify)
    path.write_text('log-level = "info"\nmax-clients = 1\nmetrics = "a..b:9715"\n')
    d.signal(signal.SIGHUP)
    notify.settimeout(20)
    got = [notify.recv(4096).decode().split("\n")[0] for _ in range(3)]
    assert got == ["READY=1", "RELOADING=1", "READY=1"]
    d.wait_for_log(f"ERROR: reload failed, keeping the running configuration: {path}:3: "
                   f"{UNASKABLE}'a..b:9715'\n")
    async with d.client() as a, d.client() as b:  # max-clients = 1 was not applied
        await a.ok("query-version")
        await b.ok("query-version")
    assert d.log().count("ERROR") == 1
    assert d.stop() == 0
    assert_clean_log(d)


@pytest.mark.parametrize("setting", ["socket", "metrics"])
def test_check_config_refuses_a_socket_path_a_start_could_not_bind(tmp_path: Path,
                                                                   setting: str) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a socket\n")
    path = tmp_path / "m.toml"
    path.write_text(f'{setting} = "{taken}"\n')
    path.chmod(0o600)
    # The QMP socket elsewhere when the metrics' is the one checked.
    others = [] if setting == "socket" else ["--socket", str(tmp_path / "s")]
    proc = check_config("--config", str(path), "--ephemeral", *others)
    assert (proc.returncode, proc.stdout) == (EXIT_NOTCONFIGURED, "")
    # Each says which setting to change, where it is set.
    assert proc.stderr == (f"migblockd: {path}:1: {setting}: {taken} exists and is not a "
                           "socket; refusing to replace it (move it away, or choose another "
                           f"{setting} in {path})\n")
    long = tmp_path / ("x" * 120)
    proc = check_config("--ephemeral", *others, f"--{setting}", str(long))
    assert proc.returncode == EXIT_NOTCONFIGURED
    assert proc.stderr == (f"migblockd: cannot bind {long}: AF_UNIX path too long "
                           f"({len(os.fsencode(long))} bytes; the limit is 107); choose a "
                           f"shorter --{setting}\n")
    assert taken.read_text() == "not a socket\n"


@pytest.mark.parametrize("setting", ["socket", "metrics"])
def test_check_config_refuses_a_socket_directory_others_may_change(tmp_path: Path,
                                                                   setting: str) -> None:
    # The start refused it ("... or choose another --socket", for --metrics too);
    # --check-config called it valid.
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    others = [] if setting == "socket" else ["--socket", str(tmp_path / "s")]
    args = ["--ephemeral", *others, f"--{setting}", str(shared / "x.sock")]
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout) == (EXIT_NOTCONFIGURED, "")
    assert proc.stderr == (f"migblockd: refusing to serve from {shared}: socket directory "
                           f"{shared} is writable by others (mode 0777), so they could "
                           f"replace the socket; chmod go-w {shared}, or choose another "
                           f"--{setting}\n")
    start = subprocess.run([sys.executable, "-m", "migblockd", *args],
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {proc.stderr.removeprefix('migblockd: ')}" in start.stderr


def refused_alike(args: list[str], message: str) -> None:
    """``--check-config`` and the start with ``args`` both refuse them with ``message``."""
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        EXIT_NOTCONFIGURED, "", f"migblockd: {message}\n")
    start = subprocess.run([sys.executable, "-m", "migblockd", *args],
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {message}\n" in start.stderr


@pytest.mark.parametrize("setting", ["socket", "metrics"])
@pytest.mark.parametrize("where", ["in", "under", "deep under", "in a link to nothing",
                                   "under a link to nothing"])
def test_a_socket_in_or_under_a_file_is_refused_by_check_and_start(
    tmp_path: Path, setting: str, where: str
) -> None:
    # Found by checking README.md's list of what --check-config refuses: a socket
    # whose directory, or a directory above it, is a regular file (or a symbolic
    # link to nothing) was "valid", and the start that followed exited 1.
    file = tmp_path / "file"
    if where.endswith("a link to nothing"):
        file.symlink_to(tmp_path / "nowhere")
    else:
        file.write_text("in the way\n")
    if where == "in":
        path = file / "x.sock"
        message = (f"cannot open the socket's lock file {path}.lock: Not a directory; "
                   f"choose another --{setting}")
    elif where == "in a link to nothing":
        path = file / "x.sock"
        message = (f"cannot check socket directory {file}: {tmp_path / 'nowhere'}: No such "
                   f"file or directory; choose another --{setting}")
    else:
        directory = file / "sub" if where == "under" else file / "a" / "b"
        path = directory / "x.sock"
        message = (f"cannot create {directory}: {file} is not a directory; move it away, "
                   f"or choose another --{setting}")
    others = [] if setting == "socket" else ["--socket", str(tmp_path / "s.sock")]
    refused_alike(["--ephemeral", *others, f"--{setting}", str(path)], message)
    assert os.path.lexists(file) and not file.is_dir()


@pytest.mark.parametrize("link", [False, True])
@pytest.mark.parametrize("depth", [1, 2])
def test_a_state_directory_under_a_file_is_refused_by_check_and_start(
    tmp_path: Path, depth: int, link: bool
) -> None:
    # Found alike: --check-config said "which does not exist yet: a start makes it";
    # under a link to nothing, the start named the state directory as not one.
    file = tmp_path / "file"
    if link:
        file.symlink_to(tmp_path / "nowhere")
    else:
        file.write_text("in the way\n")
    state = file.joinpath(*["sub"] * depth)
    refused_alike(["--socket", str(tmp_path / "s.sock"), "--state-dir", str(state)],
                  f"cannot create state directory {state}: {file} is not a directory; "
                  "move it away, or choose another --state-dir")
    assert os.path.lexists(file) and not file.is_dir()


def test_check_config_refuses_a_qemu_that_is_the_daemons_own_socket(tmp_path: Path) -> None:
    # Reproduced first: --check-config said "valid", and the start refused it.
    own, alias, state = tmp_path / "s.sock", tmp_path / "alias.sock", tmp_path / "state"
    alias.symlink_to(own)
    for qemu in (own, alias):
        args = ["--socket", str(own), "--state-dir", str(state), "--qemu", str(qemu)]
        message = (f"--qemu {qemu}: that is migblockd's own socket; --qemu names the QMP "
                   "monitor of the QEMU to gate (its -qmp)")
        refused_alike(args, message)
    # Refused before the socket's lock or the state directory was made.
    assert sorted(tmp_path.iterdir()) == [alias]


def test_a_qemu_path_too_long_for_a_unix_socket_is_refused_by_check_and_start(
        tmp_path: Path) -> None:
    # Found by review: --check-config said "valid", and the daemon retried forever,
    # logging "AF_UNIX path too long" at info only: it can never connect there.
    qemu = tmp_path / ("q" * (120 - len(str(tmp_path))))
    size = len(str(qemu))
    args = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(tmp_path / "state"),
            "--qemu", str(qemu)]
    refused_alike(args, f"--qemu {qemu}: AF_UNIX path too long ({size} bytes; migblockd "
                        "connects to paths of at most 107); choose a shorter --qemu")
    assert sorted(tmp_path.iterdir()) == []  # refused before anything was made


def test_a_qemu_from_the_file_that_is_the_daemons_own_socket_is_named_as_the_files(
        tmp_path: Path) -> None:
    # Reproduced first: both said "--qemu S: ...; --qemu names ...", an option
    # nobody had given.
    own, state, path = tmp_path / "s.sock", tmp_path / "state", tmp_path / "m.toml"
    path.write_text(f'qemu = "{own}"\n')
    path.chmod(0o600)
    refused_alike(["--config", str(path), "--socket", str(own), "--state-dir", str(state)],
                  f"{path}:1: qemu {own}: that is migblockd's own socket; qemu in {path} names "
                  "the QMP monitor of the QEMU to gate (its -qmp)")


def test_a_state_dir_from_the_file_is_named_as_the_files(tmp_path: Path) -> None:
    # Reproduced first: both said "or choose another --state-dir", an option
    # nobody had given.
    state, path = tmp_path / "state", tmp_path / "m.toml"
    state.write_text("")
    path.write_text(f'state-dir = "{state}"\n')
    path.chmod(0o600)
    refused_alike(["--config", str(path), "--socket", str(tmp_path / "s.sock")],
                  f"{path}:1: state-dir: state directory {state} is not a directory; move it "
                  f"away, or choose another state-dir in {path}")
    # Given on the command line, it is the option that is named.
    refused_alike(["--config", str(path), "--socket", str(tmp_path / "s.sock"),
                   "--state-dir", str(state)],
                  f"state directory {state} is not a directory; move it away, or choose "
                  "another --state-dir")


#: A file whose setting of interest is on its fifth line, below a comment, a blank
#: line and another setting: the line named must be the setting's own.
LEADING = '# migblockd\n\nlog-level = "info"\nmax-clients = 64\n'


@pytest.mark.parametrize("setting", ["socket-group", "schema", "state-dir", "socket",
                                     "metrics socket", "metrics host", "qemu"])
def test_a_setting_from_the_file_is_named_with_its_line_by_check_and_start(
        tmp_path: Path, setting: str) -> None:
    # Reproduced first: each was named with the file and no line (socket-group,
    # metrics, qemu) or with no place at all, the setting only at the end ("choose
    # another state-dir in FILE") or not even that (the schema): an operator with a
    # long file had to search it.  Now FILE:LINE: key, as the file's other errors.
    path, sock, state = tmp_path / "m.toml", tmp_path / "s.sock", tmp_path / "state"
    file = tmp_path / "file"
    file.write_text("in the way\n")
    value, message = {
        "socket-group": ("no-such-group-here",
                         "socket-group: there is no group named 'no-such-group-here'"),
        "schema": (f"{tmp_path}/nonexistent.json",
                   f"schema: cannot read the schema {tmp_path}/nonexistent.json: No such file "
                   "or directory"),
        "state-dir": (str(file), f"state-dir: state directory {file} is not a directory; "
                      f"move it away, or choose another state-dir in {path}"),
        "socket": (f"{file}/x.sock", f"socket: cannot open the socket's lock file "
                   f"{file}/x.sock.lock: Not a directory; choose another socket in {path}"),
        "metrics socket": (f"{file}/m.sock", f"metrics: cannot open the socket's lock file "
                           f"{file}/m.sock.lock: Not a directory; choose another metrics in "
                           f"{path}"),
        "metrics host": ("[:1", "metrics [:1: "),
        "qemu": (str(sock), f"qemu {sock}: that is migblockd's own socket; qemu in {path} "
                 "names the QMP monitor of the QEMU to gate (its -qmp)"),
    }[setting]
    key = setting.split(maxsplit=1)[0]
    path.write_text(f'{LEADING}{key} = "{value}"\n')
    path.chmod(0o600)
    # The file's setting, not the command line's.
    others = [arg for k, v in (("socket", sock), ("state-dir", state)) if k != key
              for arg in (f"--{k}", str(v))]
    args = ["--config", str(path), *others]
    expected = f"{path}:5: {message}"
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout) == (EXIT_NOTCONFIGURED, "")
    assert proc.stderr.startswith(f"migblockd: {expected}"), proc.stderr
    start = subprocess.run([sys.executable, "-m", "migblockd", *args],
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {proc.stderr.removeprefix('migblockd: ')}" in start.stderr
    assert "ERROR: " + expected in start.stderr
    # Given on the command line instead, it is the option that is named, no line.
    path.write_text(LEADING)
    proc = check_config(*args, f"--{key}", value)
    assert (proc.returncode, proc.stdout) == (EXIT_NOTCONFIGURED, "")
    assert str(path) not in proc.stderr, proc.stderr


def test_check_config_refuses_metrics_at_the_qmp_socket_through_a_symlink(
        tmp_path: Path) -> None:
    # Reproduced first: --check-config said "valid", and the start took its own
    # QMP socket's lock for another daemon's ("another migblockd (pid <its own>)").
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir(mode=0o700)
    link.symlink_to(real.name)
    metrics = link / "q.sock"
    args = ["--ephemeral", "--socket", str(real / "q.sock"), "--metrics", str(metrics)]
    message = f"--metrics {metrics}: that is the QMP socket; metrics need an address of their own"
    refused_alike(args, message)
    # No socket left (the lock file of the QMP socket stays, as after any start refused).
    assert [p.name for p in real.iterdir()] == ["q.sock.lock"]


@pytest.mark.parametrize("metrics_name, qmp_name, what", [
    ("q.sock.lock", "q.sock", "that is the QMP socket's lock file"),
    ("m.sock", "m.sock.lock", "its lock file {metrics}.lock is the QMP socket"),
], ids=["metrics-at-the-lock", "lock-at-the-qmp-socket"])
def test_check_config_refuses_metrics_and_qmp_socket_at_each_others_lock(
        tmp_path: Path, metrics_name: str, qmp_name: str, what: str) -> None:
    # Found by review: --check-config said "valid"; the start made the lock file
    # where the other socket was to be bound, refused it as "not a socket", and
    # left it there to fail every later start the same way.
    metrics, qmp = tmp_path / metrics_name, tmp_path / qmp_name
    args = ["--ephemeral", "--socket", str(qmp), "--metrics", str(metrics)]
    refused_alike(args, f"--metrics {metrics}: {what.format(metrics=metrics)}; metrics "
                  "need an address of their own")
    # Only the QMP socket's own lock is left, as after any start refused: no
    # socket, nothing at the other's name.
    assert [p.name for p in tmp_path.iterdir()] == [f"{qmp_name}.lock"]


@pytest.mark.parametrize("kind", ["file", "shared", "missing under shared"])
def test_check_config_refuses_a_state_directory_the_start_would(tmp_path: Path,
                                                                kind: str) -> None:
    state = tmp_path / "state"
    if kind == "file":
        state.write_text("")
        message = (f"state directory {state} is not a directory; move it away, or choose "
                   "another --state-dir")
    elif kind == "shared":
        state.mkdir()
        state.chmod(0o777)
        message = (f"refusing to keep state in {state}: state directory {state} is "
                   "writable by others (mode 0777), so they could replace the database; "
                   f"chmod go-w {state}, or choose another --state-dir")
    else:
        # Reproduced first: "valid", and the start made it, refused it and left it.
        shared = tmp_path / "shared"
        shared.mkdir()
        shared.chmod(0o777)
        state = shared / "state"
        message = (f"refusing to keep state in {state}: {shared}, above state directory "
                   f"{state}, is writable by others (mode 0777), so they could replace the "
                   f"database; chmod go-w {shared}, or choose another --state-dir")
    made = sorted(tmp_path.iterdir())
    args = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(state)]
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        EXIT_NOTCONFIGURED, "", f"migblockd: {message}\n")
    assert sorted(tmp_path.iterdir()) == made  # nothing made, nothing locked
    start = subprocess.run([sys.executable, "-m", "migblockd", *args],
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {message}\n" in start.stderr
    assert os.path.lexists(state) == (kind != "missing under shared")
    # Ephemeral, the directory is not used, so nothing to refuse.
    assert check_config(*args, "--ephemeral").returncode == 0


def test_check_config_names_a_state_directory_that_is_not_utf8(tmp_path: Path) -> None:
    # Found by review: a --state-dir whose name is not UTF-8 (Linux names are bytes)
    # starts since 13da10b, but --check-config, as ExecReload= runs it, printed its
    # summary to a stdout that is strict under a UTF-8 locale other than C.UTF-8
    # (en_US.UTF-8, as systemd passes from locale.conf): a UnicodeEncodeError
    # traceback and exit status 1, so each reload of such a daemon failed.
    state = tmp_path / os.fsdecode(b"st\xffate")
    proc = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--socket",
         str(tmp_path / "s.sock"), "--state-dir", str(state)],
        capture_output=True, text=True, timeout=30, errors="surrogateescape",
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    # Escaped as the log escapes it.
    assert f"state in {tmp_path}/st\\udcffate, which does not exist yet" in proc.stdout


def test_a_relative_state_directory_from_the_environment_is_refused(tmp_path: Path) -> None:
    # Found by review: STATE_DIRECTORY=relstate (set by hand: systemd passes absolute
    # paths) was taken from the working directory, 'state in relstate', although the
    # file refuses a relative state-dir; a daemon started elsewhere found another.
    env = {**os.environ, "STATE_DIRECTORY": "relstate"}
    for check in (["--check-config"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "migblockd", *check, "--socket", str(tmp_path / "s.sock")],
            capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
        assert proc.returncode == EXIT_NOTCONFIGURED, proc.stderr
        assert "STATE_DIRECTORY is the relative path 'relstate'" in proc.stderr, proc.stderr
    assert not (tmp_path / "relstate").exists()
    # Ephemeral, nothing is kept, so nothing is refused.
    proc = subprocess.run(
        [sys.executable, "-m", "migblockd", "--check-config", "--ephemeral", "--socket",
         str(tmp_path / "s.sock")], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr


def test_a_relative_tmpdir_is_not_where_the_fallback_socket_goes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A relative TMPDIR put the fallback socket under whatever directory the daemon
    # started in, where the shell, started elsewhere, did not look.
    monkeypatch.setenv("TMPDIR", "reltmp")
    assert fallback_socket_dir() == Path(f"/tmp/migblockd-{os.geteuid()}")
    monkeypatch.setenv("TMPDIR", "/var/tmp")
    assert fallback_socket_dir() == Path(f"/var/tmp/migblockd-{os.geteuid()}")


def make_state(state: Path) -> Path:
    """A state directory holding a database as a daemon leaves it (0600); its path."""
    made = subprocess.run([sys.executable, "-c",
                           "import sys; from pathlib import Path; "
                           "from migblockd.state import Store; "
                           "Store.open(Path(sys.argv[1]), restore=lambda s: None).close()",
                           str(state)], capture_output=True, text=True, timeout=30)
    assert made.returncode == 0, made.stderr
    return state / "state.db"


def contents(directory: Path) -> dict[str, tuple[int, int, bytes]]:
    """Each file in ``directory``: its mode, owner and bytes."""
    return {p.name: (p.lstat().st_mode, p.lstat().st_uid, p.read_bytes())
            for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("kind", ["shared", "log shared", "empty", "not a database"])
def test_check_config_refuses_a_state_database_the_start_would(tmp_path: Path,
                                                               kind: str) -> None:
    # Reproduced first: "valid" for each, and the start refused the database.
    state = tmp_path / "state"
    database = make_state(state)
    if kind == "shared":
        database.chmod(0o666)
        message = (f"refusing to keep state in {state}: {database} is writable by others "
                   f"(mode 0666), so they could change the blockers; chmod go-w {database}, "
                   "or choose another --state-dir")
    elif kind == "log shared":
        log = state / "state.db-wal"
        log.touch(mode=0o600)
        log.chmod(0o666)
        message = (f"refusing to keep state in {state}: {log} is writable by others "
                   f"(mode 0666), so they could change the blockers; chmod go-w {log}, "
                   "or choose another --state-dir")
    elif kind == "empty":
        database.write_bytes(b"")
        message = (f"{database} is empty (0 bytes): it was truncated; restore it from a "
                   "backup, or move it away to start from scratch")
    else:
        database.write_bytes(os.urandom(4096))
        message = (f"{database} is not a migblockd state database (file is not a "
                   "database); move it away to start from scratch")
    args = ["--socket", str(tmp_path / "s.sock"), "--state-dir", str(state)]
    before = contents(state)
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        EXIT_NOTCONFIGURED, "", f"migblockd: {message}\n")
    assert contents(state) == before  # nothing made, changed or left behind
    start = subprocess.run([sys.executable, "-m", "migblockd", *args],
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {message}\n" in start.stderr, start.stderr


def test_check_config_beside_the_running_daemon_changes_nothing(
        tmp_path: Path, start_daemon: Callable[..., DaemonProcess]) -> None:
    # As ExecReload= runs it: the database open, its log and index there, all
    # judged without SQLite, which could rebuild the index or take locks.
    state = tmp_path / "state"
    d = start_daemon("--state-dir", str(state))
    assert (state / "state.db-wal").exists() and (state / "state.db-shm").exists()
    names = sorted(p.name for p in state.iterdir())
    proc = check_config("--socket", str(d.socket), "--state-dir", str(state))
    assert (proc.returncode, proc.stderr) == (0, "")
    assert sorted(p.name for p in state.iterdir()) == names
    assert d.stop() == 0
    assert_clean_log(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="root makes a file another uid may not open")
def test_check_config_refuses_a_state_database_this_user_may_not_open(
        short_tmp: Path) -> None:
    # Reproduced first: nobody's check said "valid" for a database restored with
    # cp as root, and nobody's start refused it.
    run, state = root_run_nobody_state(short_tmp)
    os.chown(run, 65534, 65534)
    os.chown(state, 0, 0)
    database = make_state(state)  # root's, 0600, as cp leaves a copy
    for path in (state, state / "lock"):
        os.chown(path, 65534, 65534)
    assert_check_and_start_refuse(
        ["--socket", str(run / "q.sock"), "--state-dir", str(state)],
        f"cannot read and write {database}: Permission denied (it belongs to uid 0 (root), "
        "mode 0600, and this daemon runs as uid 65534 (nobody): a copy made as root "
        f"belongs to root); chown nobody: {database}, or choose another --state-dir")


@pytest.mark.skipif(os.geteuid() != 0, reason="root checks for a daemon of another uid")
def test_check_config_as_root_judges_the_daemon_users_database_as_its_start(
        short_tmp: Path, accounts: dict[str, Account]) -> None:
    # Root does not know the daemon's user: the database of the directory's owner
    # is that user's, its access left to the start, as the directory's is; its
    # mode and a second owner are refused, as that user's start refuses them.
    olga, bob = accounts["mbt-olga"], accounts["mbt-bob"]
    short_tmp.chmod(0o755)
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    state = short_tmp / "state"
    database = make_state(state)
    for path in (run, state, state / "lock", database):
        os.chown(path, olga.uid, olga.gid)
    args = ["--socket", str(run / "q.sock"), "--state-dir", str(state)]
    proc = check_config(*args)
    assert proc.returncode == 0, proc.stderr
    as_olga = ["setpriv", f"--reuid={olga.uid}", f"--regid={olga.gid}", "--clear-groups"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}

    def start() -> subprocess.CompletedProcess[str]:
        return subprocess.run([*as_olga, sys.executable, "-m", "migblockd", *args], env=env,
                              capture_output=True, text=True, timeout=30)

    database.chmod(0o660)
    message = (f"refusing to keep state in {state}: {database} is writable by others "
               f"(mode 0660), so they could change the blockers; chmod go-w {database}, "
               "or choose another --state-dir")
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        EXIT_NOTCONFIGURED, "", f"migblockd: {message}\n")
    assert f"ERROR: {message}\n" in start().stderr
    database.chmod(0o600)
    os.chown(database, bob.uid, bob.gid)
    proc = check_config(*args)
    assert (proc.returncode, proc.stderr) == (EXIT_NOTCONFIGURED, (
        f"migblockd: refusing to keep state in {state}: {database} is owned by uid "
        f"{bob.uid} (mbt-bob), not by this user (uid 0), uid {olga.uid} (mbt-olga) or root, "
        "so its owner could change the blockers; chown it, or choose another --state-dir\n"))
    assert (f"ERROR: refusing to keep state in {state}: {database} is owned by uid {bob.uid} "
            f"(mbt-bob), not by this user (uid {olga.uid}) or root, so its owner could change "
            "the blockers; chown it, or choose another --state-dir\n") in start().stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="root checks for a daemon of another uid")
def test_check_config_as_root_takes_the_daemon_users_own_directories(short_tmp: Path) -> None:
    # As service.md has it: root checks the file of a daemon that runs as its own
    # user, whose state directory that user owns (0700).  The trust rule judges
    # it for the daemon's user, whom root does not know: valid, not refused.
    short_tmp.chmod(0o755)
    state, run = short_tmp / "state", short_tmp / "run"
    for directory in (state, run):
        directory.mkdir(mode=0o700)
        os.chown(directory, 65534, 65534)
    args = ["--socket", str(run / "q.sock"), "--state-dir", str(state)]
    assert check_config(*args).returncode == 0
    # One that user's start would make there, too.
    assert check_config("--socket", str(run / "q.sock"),
                        "--state-dir", str(state / "vm1")).returncode == 0
    # The daemon's user itself gets the same answer, and so does its start.
    proc = as_nobody("--check-config", *args)
    assert (proc.returncode, proc.stderr) == (0, "")
    # Root's own directory, which others may write, is refused.
    os.chown(state, 0, 0)
    state.chmod(0o777)
    assert "writable by others (mode 0777)" in check_config(*args).stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="root makes the directories of another uid")
def test_a_socket_directory_the_daemon_may_not_write_in_is_named_with_its_owner(
        short_tmp: Path) -> None:
    # Reproduced first: "cannot open the socket's lock file ...: Permission denied",
    # and not a word of whose directory it is or what to do.
    run, state = root_run_nobody_state(short_tmp)
    proc = as_nobody("--socket", str(run / "q.sock"), "--state-dir", str(state))
    assert proc.returncode == EXIT_NOTCONFIGURED
    assert (f"ERROR: cannot open the socket's lock file {run}/q.sock.lock: Permission "
            f"denied; {run} belongs to uid 0 (root), mode 0755, and this daemon runs as uid "
            "65534 (nobody): let this user write in it, or choose another --socket\n"
            ) in proc.stderr, proc.stderr
    # A lock file root left there: it is the file that is in the way.
    run.chmod(0o777)
    (run / "q.sock.lock").touch(mode=0o644)
    run.chmod(0o755)
    proc = as_nobody("--socket", str(run / "q.sock"), "--state-dir", str(state))
    assert (f"{run}/q.sock.lock belongs to uid 0 (root), mode 0644, and this daemon runs as "
            "uid 65534 (nobody): remove it, or choose another --socket\n") in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as nobody")
@pytest.mark.parametrize("kind", ["in root's", "to be made in root's", "lock left",
                                  "stale socket", "metrics in root's"])
def test_check_config_refuses_a_socket_this_user_could_not_bind(short_tmp: Path,
                                                                 kind: str) -> None:
    # Reproduced first: nobody's --check-config said "valid" for a socket in root's
    # directory (or one to be made there), and nobody's start failed on it.
    run, state = root_run_nobody_state(short_tmp)
    theirs = short_tmp / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    whose = (f"{run} belongs to uid 0 (root), mode 0755, and this daemon runs as uid 65534 "
             "(nobody): let this user write in it")
    sock = run / "q.sock"
    args = ["--socket", str(sock), "--state-dir", str(state)]
    if kind == "in root's":
        message = (f"cannot open the socket's lock file {sock}.lock: Permission denied; "
                   f"{whose}, or choose another --socket")
    elif kind == "to be made in root's":
        sock = run / "sub" / "q.sock"
        args[1] = str(sock)
        message = f"cannot create {run}/sub: Permission denied; {whose}, or choose another --socket"
    elif kind == "lock left":
        # A lock file nobody may write, left by an earlier start as nobody when the
        # directory was still its: the lock is taken, and the bind fails.
        Path(f"{sock}.lock").touch(mode=0o600)
        os.chown(f"{sock}.lock", 65534, 65534)
        message = f"cannot bind {sock}: Permission denied"
    elif kind == "stale socket":
        # Left by a start as nobody when the directory was still its: the lock is
        # taken, and removing the socket fails (the start ended in a traceback).
        Path(f"{sock}.lock").touch(mode=0o600)
        os.chown(f"{sock}.lock", 65534, 65534)
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(sock))
        sock.chmod(0o777)  # nobody may try it: nothing answers, so it is stale
        args = ["--socket", str(sock), "--state-dir", str(state)]
        checked = as_nobody("--check-config", *args)
        assert (checked.returncode, checked.stderr) == (
            EXIT_NOTCONFIGURED, f"migblockd: cannot bind {sock}: Permission denied\n")
        started = as_nobody(*args)
        assert started.returncode == EXIT_NOTCONFIGURED
        assert (f"ERROR: cannot remove the stale socket {sock}: Permission denied; remove "
                "it, or choose another --socket\n") in started.stderr, started.stderr
        assert "Traceback" not in started.stderr
        return
    else:
        args = ["--socket", str(theirs / "q.sock"), "--state-dir", str(state),
                "--metrics", str(run / "metrics.sock")]
        message = (f"cannot open the socket's lock file {run}/metrics.sock.lock: Permission "
                   f"denied; {whose}, or choose another --metrics")
    assert_check_and_start_refuse(args, message)
    # Root may bind there: valid for root.
    assert check_config(*args).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as nobody")
@pytest.mark.parametrize("kind", ["a file", "a dangling link", "lock a link", "lock a directory",
                                  "fallback of root's"])
def test_check_config_says_what_the_start_says_of_what_is_in_the_socket_s_way(
        short_tmp: Path, kind: str) -> None:
    # Found by review: the check said "cannot create ...; let this user write in it"
    # (or "valid") where the start met something else, and for a fallback socket
    # directory of root's it advised the unsafe fix the start refuses.
    run, state = root_run_nobody_state(short_tmp)
    mine = short_tmp / "mine"
    mine.mkdir(mode=0o700)
    os.chown(mine, 65534, 65534)
    env = dict(os.environ)
    if kind == "a file":
        (run / "f").write_text("")
        sock = run / "f" / "q.sock"
    elif kind == "a dangling link":
        (run / "gone").symlink_to("/nonexistent")
        sock = run / "gone" / "q.sock"
    elif kind == "lock a link":
        sock = mine / "q.sock"
        (mine / "target").touch()
        os.chown(mine / "target", 65534, 65534)
        os.symlink(mine / "target", f"{sock}.lock")
        os.lchown(f"{sock}.lock", 65534, 65534)
    elif kind == "lock a directory":
        sock = mine / "q.sock"
        os.mkdir(f"{sock}.lock")
        os.chown(f"{sock}.lock", 65534, 65534)
    else:
        tmpdir = short_tmp / "tmp"
        tmpdir.mkdir(mode=0o1777)
        tmpdir.chmod(0o1777)
        (tmpdir / "migblockd-65534").mkdir(mode=0o755)  # root's, where nobody's goes
        env["TMPDIR"] = str(tmpdir)
        env.pop("XDG_RUNTIME_DIR", None)
        sock = tmpdir / "migblockd-65534" / "migblockd.sock"
    args = ["--state-dir", str(state)] if kind == "fallback of root's" else [
        "--socket", str(sock), "--state-dir", str(state)]

    def run_as_nobody(*more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AS_NOBODY, sys.executable, "-m", "migblockd", *more, *args],
                              capture_output=True, text=True, timeout=30, env=env)

    checked, started = run_as_nobody("--check-config"), run_as_nobody()
    assert started.returncode == EXIT_NOTCONFIGURED, started.stderr
    said = started.stderr.split(" ERROR: ", 1)[1].split("\n", 1)[0]
    assert (checked.returncode, checked.stderr) == (EXIT_NOTCONFIGURED, f"migblockd: {said}\n") or (
        kind in ("a file", "a dangling link") and checked.returncode == 0), checked.stderr
    assert "let this user write in it" not in checked.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as nobody")
@pytest.mark.parametrize("option", ["--socket", "--metrics"])
@pytest.mark.parametrize("where", ["below", "in", "through a link"])
def test_a_socket_behind_a_directory_this_user_may_not_search_is_named(
        short_tmp: Path, option: str, where: str) -> None:
    # Reproduced first: the start ended in a PermissionError traceback (from
    # Path.is_dir() and from the lock's remedy), on every Python; the check said
    # "cannot examine".  Both now name the directory and what lets the daemon in.
    state = root_run_nobody_state(short_tmp)[1]
    closed = short_tmp / "closed"
    closed.mkdir(mode=0o700)  # root's
    (closed / "sub").mkdir(mode=0o755)
    sock = closed / "sub" / "q.sock" if where == "below" else closed / "q.sock"
    if where == "through a link":  # found by review: /tmp was named, not where it leads
        (short_tmp / "link").symlink_to(closed / "sub")
        sock = short_tmp / "link" / "q.sock"
    mine = short_tmp / "mine"
    mine.mkdir(mode=0o700)
    os.chown(mine, 65534, 65534)
    args = ["--state-dir", str(state)]
    args += (["--socket", str(sock)] if option == "--socket"
             else ["--socket", str(mine / "q.sock"), "--metrics", str(sock)])
    fix = (f"this daemon, running as uid 65534 (nobody), may not search {closed} (uid 0 "
           f"(root)'s, mode 0700): let it (chmod o+x {closed}, say), or choose another "
           f"{option}")
    if where != "in":
        message = (f"cannot check socket directory {sock.parent}: {sock.parent}: Permission "
                   f"denied; {fix}")
    else:
        message = f"cannot open the socket's lock file {sock}.lock: Permission denied; {fix}"
    assert_check_and_start_refuse(args, message)
    assert "Traceback" not in as_nobody(*args).stderr
    # Let in as it says, nobody's check goes past it (to the next refusal: root's
    # directory, which nobody may not write in).
    closed.chmod(0o701)
    checked = as_nobody("--check-config", *args)
    assert "may not search" not in checked.stderr, checked.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as nobody")
@pytest.mark.parametrize("home", ["missing", "root's"])
def test_a_default_state_directory_under_a_home_not_this_user_s_says_so(
        short_tmp: Path, home: str) -> None:
    # Reproduced first: nobody's default state directory is under its home,
    # /nonexistent, and the start advised "install -d ... /nonexistent/.local/...";
    # with the HOME that su and setpriv keep (root's), it advised a chown of root's
    # own state directory to nobody.  Both now say the home is the cause.
    run = short_tmp / "run"
    short_tmp.chmod(0o755)
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    if home == "missing":
        where = short_tmp / "nonexistent"
        why = "which does not exist (an account without a home, such as nobody)"
        fix = "give --state-dir DIR, a directory this user may write, or --ephemeral"
    else:
        where = short_tmp / "root-home"
        (where / ".local" / "state" / "migblockd").mkdir(mode=0o700, parents=True)
        where.chmod(0o755)
        why = ("which belongs to uid 0 (root), mode 0755, and this daemon runs as uid 65534 "
               "(nobody) (a HOME kept from another user, as su and setpriv keep it?)")
        fix = "set HOME to this user's home, or give --state-dir DIR, or --ephemeral"
    default = where / ".local" / "state" / "migblockd"
    message = (f"the default state directory {default} is under HOME ({where}), {why}; "
               f"{fix} to keep nothing")
    env = {k: v for k, v in os.environ.items()
           if k not in ("STATE_DIRECTORY", "XDG_STATE_HOME")} | {"HOME": str(where)}
    args = ["--socket", str(run / "q.sock")]
    for check in (["--check-config"], []):
        proc = subprocess.run([*AS_NOBODY, sys.executable, "-m", "migblockd", *check, *args],
                              capture_output=True, text=True, timeout=30, env=env)
        assert proc.returncode == EXIT_NOTCONFIGURED
        assert (f"migblockd: {message}\n" if check else f"ERROR: {message}\n") in proc.stderr, (
            proc.stderr)
    assert not (default / "lock").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as nobody")
@pytest.mark.parametrize("runtime", ["missing", "root's, 0700", "root's, 0755"])
def test_a_default_socket_under_a_runtime_directory_not_this_user_s_says_so(
        short_tmp: Path, runtime: str) -> None:
    # Reproduced first: with the XDG_RUNTIME_DIR that su keeps (root's /run/user/0),
    # the start advised "chmod o+x /run/user/0" (0700) or "let this user write in"
    # root's runtime directory (0755); with one that does not exist (no session of
    # this user's made it), "let this user write in" /run/user.
    short_tmp.chmod(0o755)
    state = short_tmp / "state"
    state.mkdir(mode=0o700)
    os.chown(state, 65534, 65534)
    users = short_tmp / "user"
    users.mkdir(mode=0o755)
    if runtime == "missing":
        where = users / "65534"
        why = ("which does not exist (systemd-logind makes it when this user logs in; "
               "it was not made for this one)")
        fix = "unset XDG_RUNTIME_DIR, or give --socket PATH"
    else:
        where = users / "0"
        where.mkdir(mode=0o700 if runtime == "root's, 0700" else 0o755)
        mode = "0700" if runtime == "root's, 0700" else "0755"
        why = (f"which belongs to uid 0 (root), mode {mode}, and this daemon runs as uid "
               "65534 (nobody) (an XDG_RUNTIME_DIR kept from another user, as su keeps it?)")
        fix = "set XDG_RUNTIME_DIR to this user's, or unset it, or give --socket PATH"
    default = where / "migblockd" / "migblockd.sock"
    message = f"the default socket {default} is under XDG_RUNTIME_DIR ({where}), {why}; {fix}"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(where))
    for check in (["--check-config"], []):
        proc = subprocess.run([*AS_NOBODY, sys.executable, "-m", "migblockd", *check,
                               "--state-dir", str(state)],
                              capture_output=True, text=True, timeout=30, env=env)
        assert proc.returncode == EXIT_NOTCONFIGURED
        assert (f"migblockd: {message}\n" if check else f"ERROR: {message}\n") in proc.stderr, (
            proc.stderr)
    assert not (where / "migblockd").exists()
    # Another socket there, given by path, is judged as ever: not the default's fault.
    proc = subprocess.run([*AS_NOBODY, sys.executable, "-m", "migblockd", "--check-config",
                           "--state-dir", str(state), "--socket", str(where / "vm1.sock")],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == EXIT_NOTCONFIGURED
    assert "XDG_RUNTIME_DIR" not in proc.stderr, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as another user")
def test_a_system_account_s_own_root_owned_home_is_not_taken_for_a_borrowed_one(
        short_tmp: Path) -> None:
    # Found by review: Debian's daemon account (uid 1) has /usr/sbin, root's, for
    # its home; "set HOME to this user's home" changed nothing there.
    home = pwd.getpwuid(1).pw_dir
    assert os.stat(home).st_uid == 0, "uid 1's home is its own here: nothing to tell"
    short_tmp.chmod(0o755)
    run = short_tmp / "run"
    run.mkdir(mode=0o700)
    os.chown(run, 1, 1)
    default = Path(home) / ".local" / "state" / "migblockd"
    env = {k: v for k, v in os.environ.items()
           if k not in ("STATE_DIRECTORY", "XDG_STATE_HOME")} | {"HOME": home}
    proc = subprocess.run(["setpriv", "--reuid=1", "--regid=1", "--clear-groups", sys.executable,
                           "-m", "migblockd", "--check-config", "--socket",
                           str(run / "q.sock")],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == EXIT_NOTCONFIGURED
    assert proc.stderr.startswith(f"migblockd: cannot create state directory {default}: "
                                  "Permission denied ("), proc.stderr
    assert f"install -d -m 0700 -o {pwd.getpwuid(1).pw_name} {default}" in proc.stderr
    assert "HOME" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the daemon as nobody")
def test_check_config_refuses_a_state_directory_this_user_could_not_make(
        short_tmp: Path) -> None:
    # Reproduced first: nobody's --check-config said "valid" for a state directory
    # to be made in root's directory (nobody's default is under /nonexistent), and
    # nobody's start failed on it.
    short_tmp.chmod(0o755)
    run, parent = short_tmp / "run", short_tmp / "root-s"
    run.mkdir(mode=0o700)
    os.chown(run, 65534, 65534)
    parent.mkdir(mode=0o755)  # root's
    state = parent / "state" / "deeper"
    args = ["--socket", str(run / "q.sock"), "--state-dir", str(state)]
    message = (f"cannot create state directory {state}: Permission denied ({parent} belongs "
               "to uid 0 (root), mode 0755, and this daemon runs as uid 65534 (nobody)); as "
               f"root, make it for this user: install -d -m 0700 -o nobody {state}, or choose "
               "another --state-dir")
    assert_check_and_start_refuse(args, message)
    # Made as the message says, the check finds it fine.
    subprocess.run(["install", "-d", "-m", "0700", "-o", "nobody", str(state)], check=True)
    checked = as_nobody("--check-config", *args)
    assert checked.returncode == 0, checked.stderr
    # Root may make it there: valid for root, who is not refused.
    assert check_config("--socket", str(run / "r.sock"), "--state-dir",
                        str(parent / "other")).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="root checks for a daemon of another uid")
@pytest.mark.parametrize("kind", ["state", "state to be made", "socket"])
def test_check_config_as_root_judges_the_modes_of_the_daemon_users_directories(
        short_tmp: Path, accounts: dict[str, Account], kind: str) -> None:
    # Reproduced first: a directory of the daemon's user that others may write was
    # "valid" to root's --check-config (its owner left to the start), and that
    # user's start refused it for its mode, as every daemon's would.
    olga = accounts["mbt-olga"]
    short_tmp.chmod(0o755)
    state, run = short_tmp / "state", short_tmp / "run"
    for directory in (state, run):
        directory.mkdir(mode=0o700)
        os.chown(directory, olga.uid, olga.gid)
    shared = run if kind == "socket" else state
    shared.chmod(0o777)
    args = ["--socket", str(run / "q.sock"),
            "--state-dir", str(state / "vm1" if kind == "state to be made" else state)]
    if kind == "socket":
        message = (f"refusing to serve from {run}: socket directory {run} is writable by "
                   f"others (mode 0777), so they could replace the socket; chmod go-w {run}, "
                   "or choose another --socket")
    elif kind == "state":
        message = (f"refusing to keep state in {state}: state directory {state} is writable "
                   f"by others (mode 0777), so they could replace the database; chmod go-w "
                   f"{state}, or choose another --state-dir")
    else:
        message = (f"refusing to keep state in {state}/vm1: {state}, above state directory "
                   f"{state}/vm1, is writable by others (mode 0777), so they could replace "
                   f"the database; chmod go-w {state}, or choose another --state-dir")
    proc = check_config(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        EXIT_NOTCONFIGURED, "", f"migblockd: {message}\n")
    as_olga = ["setpriv", f"--reuid={olga.uid}", f"--regid={olga.gid}", "--clear-groups"]
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)}
    start = subprocess.run([*as_olga, sys.executable, "-m", "migblockd", *args], env=env,
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == EXIT_NOTCONFIGURED
    assert f"ERROR: {message}\n" in start.stderr
    assert sorted(state.iterdir()) == []  # nothing made
    # Fixed as it says: valid, its owner still left to the start.
    shared.chmod(0o700)
    proc = check_config(*args)
    assert proc.returncode == 0, proc.stderr
    assert "belongs to uid" in proc.stderr
    if kind == "state to be made":
        # A second user's directory on the way: no one user's daemon trusts both.
        theirs = state / "vm1"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, accounts["mbt-bob"].uid, accounts["mbt-bob"].gid)
        proc = check_config(*args)
        assert (proc.returncode, proc.stderr) == (EXIT_NOTCONFIGURED, (
            f"migblockd: refusing to keep state in {theirs}: state directory {theirs} is "
            f"owned by uid {accounts['mbt-bob'].uid} (mbt-bob), not by this user (uid 0), "
            f"uid {olga.uid} (mbt-olga) or root, so its owner could replace the database; "
            "chown it, or choose another --state-dir\n"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs a directory this uid cannot search")
def test_check_config_says_what_it_cannot_examine(tmp_path: Path) -> None:
    # tmp_path's parents are root's, 0700: nobody can look in them, nor start there.
    args = ["--socket", str(tmp_path / "q.sock"), "--state-dir", str(tmp_path / "state")]
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "migblockd", "--check-config", *args],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == EXIT_NOTCONFIGURED
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"migblockd: cannot check socket directory {tmp_path}: "
                                  f"{tmp_path}: Permission denied; this daemon, running as "
                                  "uid 65534 (nobody), may not search /tmp/"), proc.stderr
    # The state directory there too, in its own words.
    assert f"cannot check state directory {tmp_path / 'state'}: " in proc.stderr


IGNORED_SOCKET = ("migblockd: socket activation: --socket is ignored (the socket unit's "
                  "ListenStream= applies)\n")


def test_check_config_socket_activated_leaves_the_socket_to_the_socket_unit(
        tmp_path: Path) -> None:
    # Reproduced first under systemd --user: the units' daemon started with this file
    # (it ignores socket-group), and `systemctl reload`, whose check refused the
    # group, failed.  Without --socket-activated the check is as strict as before.
    taken, shared = tmp_path / "taken", tmp_path / "shared"
    taken.write_text("not a socket\n")
    shared.mkdir()
    shared.chmod(0o777)
    path = tmp_path / "m.toml"
    path.write_text('socket-group = "no-such-group-here"\n')
    path.chmod(0o600)
    for where in (taken, shared / "x.sock", tmp_path / ("x" * 120)):
        args = ["--config", str(path), "--ephemeral", "--socket", str(where)]
        strict = check_config(*args)
        assert (strict.returncode, strict.stdout) == (EXIT_NOTCONFIGURED, ""), strict
        assert (f"{path}:1: socket-group: there is no group named 'no-such-group-here'"
                in strict.stderr)
        activated = check_config("--socket-activated", *args)
        # The option given is named as such, the file's setting at its line.
        assert (activated.returncode, activated.stderr) == (0, IGNORED_SOCKET + (
            f"migblockd: socket activation: {path}:1: socket-group is ignored (the socket "
            "unit's SocketGroup= applies)\n"))
        assert activated.stdout == (f"migblockd: {path} and the command line: valid; socket "
                                    "passed by systemd (the socket unit's ListenStream=), "
                                    "state in memory only (ephemeral)\n")
    assert taken.read_text() == "not a socket\n"
    assert sorted(shared.iterdir()) == []
    # No socket settings, nothing to say it ignores.
    quiet = check_config("--socket-activated", "--ephemeral")
    assert (quiet.returncode, quiet.stderr) == (0, "")


def test_check_config_socket_activated_names_each_socket_setting_it_ignores(
        tmp_path: Path) -> None:
    # An operator who sets the path or mode in the file, under the units, and then
    # looks for the socket there hears why it is not.
    # Reproduced first: they were named "--socket" and "--socket-mode", options
    # nobody gave, with no line of the file that gives them.
    path = tmp_path / "m.toml"
    path.write_text(f'{LEADING}socket = "{tmp_path}/mine.sock"\n\nsocket-mode = "0660"\n')
    path.chmod(0o600)
    proc = check_config("--socket-activated", "--ephemeral", "--config", str(path))
    assert (proc.returncode, proc.stderr) == (0, (
        f"migblockd: socket activation: {path}:5: socket is ignored (the socket unit's "
        "ListenStream= applies)\n"
        f"migblockd: socket activation: {path}:7: socket-mode is ignored (the socket unit's "
        "SocketMode= applies)\n")), proc
    # Given on the command line as well, the option wins, and is what is named.
    proc = check_config("--socket-activated", "--ephemeral", "--config", str(path),
                        "--socket", str(tmp_path / "mine.sock"))
    assert proc.stderr.startswith(IGNORED_SOCKET), proc
    # The defaults, given in so many words, were not asked for by anyone else.
    path.write_text('socket-mode = "0600"\n')
    same = check_config("--socket-activated", "--ephemeral", "--config", str(path))
    assert (same.returncode, same.stderr) == (0, ""), same


@pytest.mark.parametrize(("setting", "message"), [
    ("--schema", "cannot read the schema /nonexistent/migblockd.json"),
    ("--state-dir", "state directory /dev/null is not a directory"),
])
def test_check_config_socket_activated_refuses_what_would_stop_the_start(
        setting: str, message: str) -> None:
    value = "/nonexistent/migblockd.json" if setting == "--schema" else "/dev/null"
    proc = check_config("--socket-activated", setting, value)
    assert (proc.returncode, proc.stdout) == (EXIT_NOTCONFIGURED, ""), proc
    assert proc.stderr.startswith(f"migblockd: {message}"), proc.stderr


def test_socket_activated_without_a_passed_socket_does_not_start(tmp_path: Path) -> None:
    # The check judged the settings as those of a daemon serving systemd's socket:
    # one that bound --socket instead would not be the daemon it judged.
    start = subprocess.run([sys.executable, "-m", "migblockd", "--socket-activated",
                            "--ephemeral", "--socket", str(tmp_path / "s.sock")],
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == EXIT_NOTCONFIGURED
    assert ("ERROR: --socket-activated: systemd passed no socket (start the daemon through "
            "its socket unit)\n") in start.stderr
    assert sorted(tmp_path.iterdir()) == []


def running_check(pid: int, options: str | None, *args: str,
                  as_user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """The units' reload check, ``--check-config --running-pid PID``, with
    ``MIGBLOCKD_OPTIONS`` set to ``options`` (None: unset) and its words given."""
    env = {k: v for k, v in os.environ.items() if k != "MIGBLOCKD_OPTIONS"}
    if options is not None:
        env["MIGBLOCKD_OPTIONS"] = options
    return subprocess.run([*(as_user or []), sys.executable, "-m", "migblockd", "--check-config",
                           "--running-pid", str(pid), *(options or "").split(), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)


RESTART = (": a reload keeps the options the daemon started with, and re-reads only the file "
           "they name; a restart of its unit (systemctl restart) applies the new ones\n")


def test_the_reload_check_refuses_options_the_daemon_did_not_start_with(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first under systemd --user: a drop-in changed MIGBLOCKD_OPTIONS, the
    # check judged the new file and passed, and the daemon re-read its old one.
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    old.write_text('log-level = "info"\n')
    new.write_text('max-clients = "many"\n')  # not judged: the options are refused first
    for path in (old, new):
        path.chmod(0o600)
    started = f"--config {old} --ephemeral"
    d = start_daemon(*started.split(), env={**os.environ, "MIGBLOCKD_OPTIONS": started})
    pid = d.proc.pid
    changed = running_check(pid, f"--config {new} --ephemeral")
    assert (changed.returncode, changed.stdout) == (EXIT_NOTCONFIGURED, ""), changed
    assert changed.stderr == (f"migblockd: MIGBLOCKD_OPTIONS is '--config {new} --ephemeral' "
                              f"now, but the daemon (pid {pid}) started with '{started}'"
                              + RESTART)
    unset = running_check(pid, None, "--ephemeral")
    assert unset.stderr == (f"migblockd: MIGBLOCKD_OPTIONS is not set now, but the daemon "
                            f"(pid {pid}) started with '{started}'" + RESTART), unset
    # The same words, however spaced: the same command line, judged as ever.
    same = running_check(pid, f"\t--config  {old}   --ephemeral ")
    assert (same.returncode, same.stderr) == (0, ""), same
    assert same.stdout.startswith(f"migblockd: {old} and the command line: valid;")
    assert d.stop() == 0


def test_the_reload_check_refuses_options_a_daemon_started_without(
    start_daemon: Callable[..., DaemonProcess],
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MIGBLOCKD_OPTIONS"}
    d = start_daemon("--ephemeral", env=env)
    given = running_check(d.proc.pid, "--ephemeral")
    assert (given.returncode, given.stderr) == (EXIT_NOTCONFIGURED, (
        f"migblockd: MIGBLOCKD_OPTIONS is '--ephemeral' now, but the daemon (pid "
        f"{d.proc.pid}) started without MIGBLOCKD_OPTIONS" + RESTART)), given
    # Neither has it: the same options.
    assert running_check(d.proc.pid, None, "--ephemeral").returncode == 0
    assert d.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="a daemon of another uid takes root")
def test_a_reload_check_that_cannot_read_the_daemons_options_fails(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # A check that cannot tell whether the reload would apply its options must
    # not pass: root's daemon, checked by another uid; then one that has exited.
    d = start_daemon("--ephemeral", env={**os.environ, "MIGBLOCKD_OPTIONS": "--ephemeral"})
    other = running_check(d.proc.pid, "--ephemeral", as_user=AS_NOBODY)
    assert (other.returncode, other.stdout) == (EXIT_FAILURE, ""), other
    assert other.stderr == (f"migblockd: --running-pid {d.proc.pid}: cannot read "
                            f"/proc/{d.proc.pid}/environ as uid 65534: Permission denied; run "
                            "the check as the daemon's user (as ExecReload= does) or as root\n")
    # Root refused too (here pid 1 of a container, another user namespace's): no
    # advice to run it as root.
    if not os.access("/proc/1/environ", os.R_OK):
        root = running_check(1, "--ephemeral")
        assert root.stderr == ("migblockd: --running-pid 1: cannot read /proc/1/environ as "
                               "uid 0: Permission denied; run the check as the daemon's user "
                               "(as ExecReload= does)\n"), root
    assert d.stop() == 0
    gone = running_check(d.proc.pid, "--ephemeral")
    assert (gone.returncode, gone.stderr) == (EXIT_FAILURE, (
        f"migblockd: --running-pid {d.proc.pid}: there is no process {d.proc.pid} (has the "
        "daemon exited?)\n")), gone


def test_running_pid_is_for_the_check_only(tmp_path: Path) -> None:
    # A daemon told --running-pid would only ignore it.
    start = subprocess.run([sys.executable, "-m", "migblockd", "--running-pid", "1",
                            "--ephemeral", "--socket", str(tmp_path / "s.sock")],
                           capture_output=True, text=True, timeout=30)
    assert start.returncode == 2
    assert start.stderr.endswith("migblockd: error: --running-pid is for --check-config only "
                                 "(as ExecReload= runs it)\n"), start.stderr
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra", [["--check-config"], ["--running-pid", "1"]])
def test_reload_checks_on_its_own(tmp_path: Path, extra: list[str]) -> None:
    # --reload is the check and the signal in one: a second check given with it
    # would have to name the same daemon, so it is refused, and nothing is signalled.
    both = subprocess.run([sys.executable, "-m", "migblockd", "--reload", "1", *extra,
                           "--ephemeral", "--socket", str(tmp_path / "s.sock")],
                          capture_output=True, text=True, timeout=30)
    assert both.returncode == 2
    assert both.stderr.endswith("migblockd: error: --reload checks the settings itself, as "
                                "--check-config --running-pid PID does: give it alone\n"), \
        both.stderr
    assert sorted(tmp_path.iterdir()) == []


async def test_a_reload_says_when_the_next_start_would_fail(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # A restart-only change is not applied, so not tried: without a word, the
    # operator learnt of a mistyped group only when the next restart failed.
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral")
    path.write_text('log-level = "info"\nsocket-group = "no-such-group-here"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"WARNING: reload: {path}:2: socket-group changed, which only a restart "
                   "applies")
    d.wait_for_log("WARNING: reload: with socket-group as the file now sets it, the next "
                   f"start would fail: {path}:2: socket-group: there is no group named "
                   "'no-such-group-here'")
    # One that would start says nothing more.
    path.write_text('log-level = "info"\nsocket-group = "0"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log(re.compile(r"socket-group changed[^\n]*\n[\s\S]*socket-group changed"))
    async with d.client() as c:
        await c.ok("query-version")
    assert d.log().count("the next start would fail") == 1
    assert d.stop() == 0


async def test_a_reload_says_when_only_migratable_would_refuse_a_stored_blocker(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Found by review: turning only-migratable on in the file, the reload said only
    # that a restart applies it (and --check-config "valid"); the restart then
    # refused the state, which holds a blocker of the normal mode that is not
    # internal, and the daemon did not start.
    path = tmp_path / "m.toml"
    path.write_text("only-migratable = false\n")
    state = tmp_path / "kept"
    d = start_daemon("--config", str(path), "--state-dir", str(state))
    async with d.client() as c:
        # Older than the one named below, and no start refuses them: one of another
        # mode, an internal one, and one not kept (the connection's).
        await c.ok("add-blocker", {"reason": "cpr only", "id": "c", "modes": ["cpr-reboot"]})
        await c.ok("add-blocker", {"reason": "internal", "id": "i", "internal": True})
        await c.ok("add-blocker", {"reason": "held", "id": "h", "scope": "connection"})
        path.write_text("only-migratable = true\n")
        d.signal(signal.SIGHUP)
        d.wait_for_log(f"WARNING: reload: {path}:1: only-migratable changed, which only a "
                       "restart applies")
        await c.ok("add-blocker", {"reason": "plain", "id": "p", "modes": ["cpr-reboot",
                                                                           "normal"]})
        # The file unchanged, a reload says it again (the running setting is the old one).
        d.signal(signal.SIGHUP)
        refusal = (f"{state.absolute() / 'state.db'}: stored blocker 'p' blocks the normal "
                   "mode and is not internal, which --only-migratable refuses; start without "
                   "--only-migratable and delete it, or move the state directory away to "
                   "start from scratch")
        d.wait_for_log("WARNING: reload: with only-migratable as the file now sets it, the "
                       f"next start would fail: {refusal}\n")
    assert d.log().count("the next start would fail") == 1
    assert d.stop() == 0
    # What the restart says, word for word.
    assert_start_refused(path, state, tmp_path / "2.sock", refusal)


async def test_a_reload_says_a_qemu_that_is_its_own_socket_would_fail(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: the reload said only "qemu changed, which only a restart
    # applies", and the restart refused it.
    path = tmp_path / "m.toml"
    path.write_text('log-level = "info"\n')
    d = start_daemon("--config", str(path), "--ephemeral")
    path.write_text(f'log-level = "info"\nqemu = "{d.socket}"\n')
    d.signal(signal.SIGHUP)
    d.wait_for_log(f"WARNING: reload: {path}:2: qemu changed, which only a restart applies")
    d.wait_for_log(f"WARNING: reload: with qemu as the file now sets it, the next start would "
                   f"fail: {path}:2: qemu {d.socket}: that is migblockd's own socket; qemu in "
                   f"{path} names the QMP monitor of the QEMU to gate (its -qmp)\n")
    async with d.client() as c:  # still serving, not gating itself
        await c.ok("query-version")
    assert d.stop() == 0


def test_a_group_named_by_a_number_that_a_group_also_is_named_is_warned_of(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
    accounts: dict[str, Account],
) -> None:
    # Found by review: with a group *named* "2002" (gid 5002), groups = {"2002" =
    # "admin"} and --socket-group 2002 meant gid 2002, which no group has, and
    # --check-config said "valid" without a word; chown(1) would take the name.
    named = NUMBER_NAMED_GROUP
    gid = grp.getgrnam(named).gr_gid
    path = tmp_path / "m.toml"
    path.write_text(f'{LEADING}socket-group = "{named}"\n[access]\n'
                    f'groups = {{ "{named}" = "admin" }}\n')
    # Each at the line of the file that gives it (the socket-group's had none).
    warnings = [f"{path}:7: access: the policy gives group '{named}' role admin: a number is "
                f"read as an id, but a group is named '{named}' (id {gid}); to mean that group, "
                f"give {gid}",
                f"{path}:5: socket-group {named} is read as gid {named}, but a group is named "
                f"'{named}' (gid {gid}); to mean that group, give {gid}"]
    proc = check_config("--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "".join(f"migblockd: {line}\n" for line in warnings)
    daemon = start_daemon("--config", str(path), "--ephemeral")
    for line in warnings:
        assert f"WARNING: {line}\n" in daemon.log()
    assert daemon.socket.stat().st_gid == int(named)  # the number, as systemd reads it


def test_a_directory_that_keeps_out_whom_the_files_socket_mode_lets_in_names_its_line(
    start_daemon: Callable[..., DaemonProcess], short_tmp: Path,
) -> None:
    # Reproduced first: "socket mode 0606 lets every user connect to ..., but ... which
    # they may not search", with neither file nor line, at start and from
    # --check-config, though the mode that lets them in was the file's.
    short_tmp.chmod(0o755)
    socket_path = short_tmp / "run" / "s.sock"
    socket_path.parent.mkdir(mode=0o700)
    path = short_tmp / "m.toml"
    path.write_text(f'{LEADING}socket = "{socket_path}"\nsocket-mode = "0606"\n')
    warning = (f"{path}:6: socket-mode: socket mode 0606 lets every user connect to "
               f"{socket_path}, but {socket_path.parent} is mode 0700, owner root, group "
               "root, which they may not search, so they cannot connect; chmod o+x "
               f"{socket_path.parent} (or remove it: the daemon creates it searchable for "
               "them)")
    proc = check_config("--config", str(path), "--ephemeral")
    assert (proc.returncode, proc.stderr) == (0, f"migblockd: {warning}\n"), proc.stderr
    daemon = start_daemon("--config", str(path), "--ephemeral", socket=socket_path)
    assert f"WARNING: {warning}\n" in daemon.log()
    assert daemon.stop() == 0
    # Given on the command line, the mode is the message's own subject, as before.
    proc = check_config("--config", str(path), "--ephemeral", "--socket-mode", "0606")
    assert (proc.returncode, proc.stderr) == (
        0, f"migblockd: {warning.removeprefix(f'{path}:6: socket-mode: ')}\n"), proc.stderr
    # One above the socket's own directory: the way out is another socket, which the
    # file gives (reproduced first: "or choose a --socket outside it").
    top = short_tmp / "top"
    top.mkdir(mode=0o700)
    (top / "run").mkdir(mode=0o755)
    deeper = top / "run" / "s.sock"
    path.write_text(f'{LEADING}socket = "{deeper}"\nsocket-mode = "0606"\n')
    warning = (f"{path}:6: socket-mode: socket mode 0606 lets every user connect to {deeper}, "
               f"but {top} is mode 0700, owner root, group root, which they may not search, "
               f"so they cannot connect; chmod o+x {top}, or choose a socket in {path} "
               f"outside {top}")
    proc = check_config("--config", str(path), "--ephemeral")
    assert (proc.returncode, proc.stderr) == (0, f"migblockd: {warning}\n"), proc.stderr
    # Started with the file's socket alone (start_daemon would give a --socket).
    log = short_tmp / "deeper.log"
    argv = [sys.executable, "-m", "migblockd", "--config", str(path), "--ephemeral"]
    with log.open("wb") as out:
        daemon = DaemonProcess(deeper, subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                                        stdout=out, stderr=out), log, argv)
    wait_ready(daemon)
    assert f"WARNING: {warning}\n" in daemon.log()
    assert daemon.stop() == 0


async def test_an_access_entry_the_start_warns_of_is_named_with_its_line(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: "access: the policy names user 'mbt-no-such-user', which does
    # not exist", with neither file nor line, at start, at reload and from
    # --check-config: an operator with a long [access] table had to search it.
    path = tmp_path / "m.toml"
    path.write_text(f'{LEADING}[access]\ndefault-role = "client"\n\n[access.users]\n'
                    'root = "operator"\nmbt-no-such-user = "operator"\n'
                    '[access.groups]\nmbt-no-such-group = "client"\n')
    warnings = [f"{path}:10: access: the policy names user 'mbt-no-such-user', which does "
                "not exist",
                f"{path}:12: access: the policy names group 'mbt-no-such-group', which does "
                "not exist",
                f"{path}:9: access: the policy gives user 'root' role operator, but root and "
                "the daemon's own user are always admin"]
    proc = check_config("--config", str(path))
    assert proc.returncode == 0
    assert proc.stderr == "".join(f"migblockd: {line}\n" for line in warnings)
    daemon = start_daemon("--config", str(path), "--ephemeral")
    daemon.wait_for_log(f"WARNING: {warnings[0]}\n")
    for line in warnings:
        assert f"WARNING: {line}\n" in daemon.log()
    # An entry of an inline table, at the reload: the line of the table.
    path.write_text(f'{LEADING}\n[access]\nusers = {{ mbt-no-such-user = "operator" }}\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(f"WARNING: {path}:7: access: the policy names user "
                        "'mbt-no-such-user', which does not exist\n")
    assert daemon.stop() == 0


async def test_a_default_role_spelled_with_an_underscore_is_named_at_its_own_line(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: default_role = "admin" (an underscore for the dash, which the
    # file takes) was named at the line of [access], not at its own, at start and at
    # reload and from --check-config, while default-role was named at its own.
    path = tmp_path / "m.toml"
    path.write_text(f'{LEADING}[access]\n\ndefault_role = "admin"\n')
    warning = (f"{path}:7: access: default-role is admin: every user who can connect to "
               "the socket")
    proc = check_config("--config", str(path))
    assert proc.returncode == 0
    assert proc.stderr.startswith(f"migblockd: {warning}"), proc.stderr
    daemon = start_daemon("--config", str(path), "--ephemeral")
    daemon.wait_for_log(f"WARNING: {warning}")
    # A dotted key before any header, at the reload: its own line too.
    path.write_text(f'{LEADING}\naccess.users.root = "admin"\n\naccess.default_role = "admin"\n')
    daemon.signal(signal.SIGHUP)
    daemon.wait_for_log(f"WARNING: {path}:8: access: default-role is admin: ")
    assert daemon.stop() == 0


async def test_what_the_start_warns_of_in_qemu_passthrough_is_named_at_its_line(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: "qemu-passthrough: human-monitor-command lets admins migrate
    # ...", with neither file nor line, at start and from --check-config, though the
    # setting can only come from the file.
    path = tmp_path / "m.toml"
    path.write_text(f'{LEADING}qemu-passthrough = ["query-status"]\n')
    unused = (f"{path}:5: qemu-passthrough: query-status not forwarded: there is no QEMU "
              "to forward to without qemu (--qemu SOCKET)")
    proc = check_config("--config", str(path))
    assert (proc.returncode, proc.stderr) == (0, f"migblockd: {unused}\n")
    daemon = start_daemon("--config", str(path), "--ephemeral")
    assert f"WARNING: {unused}\n" in daemon.log()
    assert daemon.stop() == 0
    # With a QEMU to forward to (away: the start serves without it), its own warnings.
    path.write_text(f'{LEADING}qemu = "{tmp_path}/qmp.sock"\n\n'
                    'qemu-passthrough = [\n  "query-blockers",\n  "human-monitor-command",\n]\n')
    warnings = [f"{path}:7: qemu-passthrough: ignoring query-blockers: migblockd's own "
                "command(s)",
                f"{path}:7: qemu-passthrough: human-monitor-command lets admins migrate or "
                "snapshot the VM past migblockd's blockers (QEMU consults only its own for "
                "its HMP migrate and savevm)"]
    proc = check_config("--config", str(path))
    assert (proc.returncode, proc.stderr) == (
        0, "".join(f"migblockd: {line}\n" for line in warnings)), proc.stderr
    daemon = start_daemon("--config", str(path), "--ephemeral")
    for line in warnings:
        assert f"WARNING: {line}\n" in daemon.log()
    assert daemon.stop() == 0


def test_check_config_prints_what_the_start_would_warn_of(
    start_daemon: Callable[..., DaemonProcess], tmp_path: Path,
) -> None:
    # Reproduced first: with a typo in a user's name (access.md's example names
    # accounts this machine may not have) --check-config said only "valid", and
    # the start logged a warning; qemu-passthrough without qemu was ignored by both.
    path = tmp_path / "m.toml"
    path.write_text('qemu-passthrough = ["query-status"]\n'
                    '[access]\nusers = { mbt-no-such-user = "operator" }\n')
    warnings = [f"{path}:3: access: the policy names user 'mbt-no-such-user', which does "
                "not exist",
                f"{path}:1: qemu-passthrough: query-status not forwarded: there is no QEMU "
                "to forward to without qemu (--qemu SOCKET)"]
    proc = check_config("--config", str(path))
    assert proc.returncode == 0
    assert proc.stderr == "".join(f"migblockd: {line}\n" for line in warnings)
    daemon = start_daemon("--config", str(path), "--ephemeral")
    for line in warnings:
        assert f"WARNING: {line}\n" in daemon.log()
    # With a QEMU to forward to, the pass-through's own warnings.
    path.write_text('qemu = "/nonexistent/qmp.sock"\n'
                    'qemu-passthrough = ["query-blockers", "human-monitor-command"]\n')
    assert check_config("--config", str(path)).stderr == (
        f"migblockd: {path}:2: qemu-passthrough: ignoring query-blockers: migblockd's own "
        "command(s)\n"
        f"migblockd: {path}:2: qemu-passthrough: human-monitor-command lets admins migrate or "
        "snapshot "
        "the VM past migblockd's blockers (QEMU consults only its own for its HMP migrate "
        "and savevm)\n")


