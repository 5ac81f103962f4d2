"""The unit files and snippets in systemd/, checked with systemd's own offline tools.

The machine running the tests need not be booted with systemd: everything here
works on files (``--root``, ``--offline=yes``).  The committed units are checked
as they are; only the binaries they name are provided inside a scratch root.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT

from migblockd.startup import (
    EXIT_FAILURE,
    EXIT_INVALIDARGUMENT,
    EXIT_NOTCONFIGURED,
    EXIT_STATUSES,
)

UNITS = ROOT / "systemd"
SERVICE_MD = ROOT / "docs" / "service.md"
#: Where the README's install steps put the daemon; the units' ExecStart.
INSTALLED = "/opt/migblockd/bin/migblockd"
MAX_EXPOSURE = 2.0
SYSTEM_UNIT_DIR = Path("/usr/lib/systemd/system")
#: Unit names to check: the templates through an instance.
CHECKED = ["migblockd.service", "migblockd.socket", "migblockd@vm1.service", "migblockd@vm1.socket"]

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt install systemd)"
)


def parse_unit(path: Path) -> configparser.RawConfigParser:
    # Units allow repeated keys (SystemCallFilter=); keep every value.
    class MultiDict(dict[str, list[str]]):
        def __setitem__(self, key: str, value: object) -> None:
            if isinstance(value, list) and key in self:
                self[key].extend(value)
            else:
                super().__setitem__(key, value)  # type: ignore[assignment]

    parser = configparser.RawConfigParser(
        dict_type=MultiDict,  # type: ignore[arg-type]
        strict=False, empty_lines_in_values=False, interpolation=None,
        comment_prefixes=("#", ";"),
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return parser


def values(unit: configparser.RawConfigParser, section: str, key: str) -> list[str]:
    raw = unit[section].get(key)
    return [] if raw is None else raw.split("\n")


def exec_paths(unit: Path) -> set[str]:
    parsed = parse_unit(unit)
    paths = set()
    section = "Socket" if unit.suffix == ".socket" else "Service"
    for key in ("ExecStart", "ExecReload", "ExecStartPre", "ExecStartPost", "ExecStop"):
        for line in values(parsed, section, key):
            paths.add(shlex.split(line.lstrip("-@:+!"))[0])
    return paths


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with systemd's own units, our units, and the binaries they run."""
    root = tmp_path_factory.mktemp("root")
    # verify --recursive-errors=yes follows the dependencies into these.
    shutil.copytree(SYSTEM_UNIT_DIR, root / "usr/lib/systemd/system", symlinks=True)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS.glob("migblockd*.s*"):
        shutil.copy(unit, unit_dir)
    for service in [*UNITS.glob("*.service"), *UNITS.glob("*.socket")]:
        for command in exec_paths(service):
            target = root / command.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if command.startswith(str(Path(INSTALLED).parent) + "/"):
                # Not installed here; verify only needs an executable at the path.
                target.write_text("#!/bin/sh\n")
                target.chmod(0o755)
            else:
                assert Path(command).exists(), f"{service.name} runs {command}, missing here"
                shutil.copy(command, target)
    return root


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    # SYSTEMD_LOG_LEVEL: verify reports problems as log messages; keep them all.
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="info", SYSTEMD_COLORS="0", SYSTEMD_PAGER="")
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, check=False, env=env,
        timeout=120,
    )


def test_the_units_exist() -> None:
    names = sorted(p.name for p in UNITS.glob("migblockd*.s*"))
    assert names == ["migblockd.service", "migblockd.socket", "migblockd@.service",
                     "migblockd@.socket"]


@needs_analyze
@pytest.mark.parametrize("unit", CHECKED)
def test_verify(fake_root: Path, unit: str) -> None:
    proc = analyze("verify", f"--root={fake_root}", "--recursive-errors=yes", "--man=no", unit)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # verify exits 0 on some warnings (e.g. unknown keys in a dependency); we
    # want none about our units.
    ours = [line for line in proc.stderr.splitlines() if "migblockd" in line]
    assert ours == [], proc.stderr


@needs_analyze
def test_verify_catches_mistakes(fake_root: Path, tmp_path: Path) -> None:
    """The check above can fail: a misspelt key or a missing binary is an error."""
    broken = tmp_path / "root"
    shutil.copytree(fake_root, broken, symlinks=True)
    service = broken / "etc/systemd/system/migblockd.service"
    service.write_text(service.read_text().replace("PrivateTmp=", "PrivateTemp="))
    proc = analyze("verify", f"--root={broken}", "--recursive-errors=yes", "--man=no",
                   "migblockd.service")
    assert proc.returncode != 0
    assert "PrivateTemp" in proc.stderr
    service.write_text(service.read_text().replace("PrivateTemp=", "PrivateTmp="))
    (broken / INSTALLED.lstrip("/")).unlink()
    proc = analyze("verify", f"--root={broken}", "--recursive-errors=yes", "--man=no",
                   "migblockd.service")
    assert proc.returncode != 0
    assert "is not executable" in proc.stderr


def exposure(fake_root: Path, unit: str) -> float:
    proc = analyze("security", "--offline=yes", f"--root={fake_root}", "--no-pager", unit)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", ["migblockd.service", "migblockd@vm1.service"])
def test_security_exposure(fake_root: Path, unit: str) -> None:
    assert exposure(fake_root, unit) <= MAX_EXPOSURE


@needs_analyze
def test_the_documented_exposure_is_the_measured_one(fake_root: Path) -> None:
    figure = exposure(fake_root, "migblockd.service")
    for doc in (SERVICE_MD, SERVICE_MD.parent.parent / "README.md"):
        m = re.search(r"exposure level of \*\*(\d+\.\d)\*\*", doc.read_text())
        assert m, f"{doc.name} must state the figure as 'exposure level of **N.N**'"
        assert float(m.group(1)) == figure, doc


def test_templates_run_the_same_service() -> None:
    """The same [Service] but for the state directory: each instance has its own
    (a daemon locks its directory), beside the plain unit's, not inside it: moving
    /var/lib/migblockd away, or `systemctl clean` of the plain unit, must not take
    an instance's blockers with it."""
    plain = parse_unit(UNITS / "migblockd.service")
    template = parse_unit(UNITS / "migblockd@.service")
    plain_service, template_service = dict(plain["Service"]), dict(template["Service"])
    assert plain_service.pop("StateDirectory") == "migblockd"
    instance_dir = template_service.pop("StateDirectory")
    assert instance_dir == "migblockd-instances/%i"
    assert not instance_dir.startswith("migblockd/")
    assert plain_service == template_service
    assert values(template, "Unit", "Requires") == ["migblockd@%i.socket"]
    assert values(plain, "Unit", "Requires") == ["migblockd.socket"]
    assert values(template, "Install", "Also") == ["migblockd@%i.socket"]
    plain_socket = parse_unit(UNITS / "migblockd.socket")
    template_socket = parse_unit(UNITS / "migblockd@.socket")
    assert values(template_socket, "Socket", "ListenStream") == ["/run/migblockd/%i.sock"]
    assert values(plain_socket, "Socket", "ListenStream") == ["/run/migblockd/migblockd.sock"]
    for key in ("SocketUser", "SocketGroup", "SocketMode", "DirectoryMode", "FileDescriptorName"):
        assert values(plain_socket, "Socket", key) == values(template_socket, "Socket", key)
    # Each checks its own ListenStream= before systemd binds there.
    for unit in (plain_socket, template_socket):
        assert values(unit, "Socket", "ExecStartPre") == [
            "/opt/migblockd/bin/python3 -m migblockd.vacant "
            + values(unit, "Socket", "ListenStream")[0]]


def test_the_service_is_what_the_issue_asks_for() -> None:
    service = parse_unit(UNITS / "migblockd.service")["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert shlex.split(service["ExecStart"])[0] == INSTALLED
    # The reload checks the settings as the daemon's user first: a bad file fails it, and
    # so do options the running daemon did not start with; then it signals and waits.
    assert service["ExecReload"].split("\n") == [
        f"{INSTALLED} --reload $MAINPID --socket-activated $MIGBLOCKD_OPTIONS"]
    assert service["Restart"] == "on-failure"
    # The start limit counts 5 starts in a minute, not systemd's 10 s, which a start
    # failing in 2 s or more (a loaded machine's) never reached.
    for name in ("migblockd.service", "migblockd@.service"):
        unit = parse_unit(UNITS / name)["Unit"]
        assert (unit["StartLimitIntervalSec"], unit["StartLimitBurst"]) == ("60s", "5"), name
    assert service["WatchdogSec"]
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["PrivateTmp"] == "yes"
    assert service["RestrictAddressFamilies"] == "AF_UNIX"
    assert service["CapabilityBoundingSet"] == ""
    assert "@system-service" in service["SystemCallFilter"].split("\n")
    assert service["MemoryDenyWriteExecute"] == "yes"
    # Durable state: systemd makes the directory (private to the daemon's user) and
    # passes it as $STATE_DIRECTORY, the daemon's default --state-dir; no
    # --state-dir on the command line overrides it.
    assert service["StateDirectory"] == "migblockd"
    assert service["StateDirectoryMode"] == "0700"
    assert "--state-dir" not in service["ExecStart"] and "--ephemeral" not in service["ExecStart"]


def test_no_restart_after_what_no_restart_cures() -> None:
    """Restart=on-failure leaves out the exit statuses migblockd.startup declares as
    needing an operator, in both units; the rest (1) is still restarted."""
    prevented = {s.code for s in EXIT_STATUSES if not s.restarted and s.code != 0}
    assert prevented == {EXIT_INVALIDARGUMENT, EXIT_NOTCONFIGURED}
    assert EXIT_FAILURE not in prevented
    for name in ("migblockd.service", "migblockd@.service"):
        service = parse_unit(UNITS / name)["Service"]
        assert service["Restart"] == "on-failure", name
        listed = {int(word) for line in values(parse_unit(UNITS / name), "Service",
                                               "RestartPreventExitStatus")
                  for word in line.split()}
        assert listed == prevented, name


@needs_analyze
def test_the_exit_statuses_are_systemds_and_documented() -> None:
    """Each status has the name systemd gives it (``systemctl status`` shows
    ``status=6/NOTCONFIGURED``), and docs/service.md's table says the same."""
    proc = analyze("exit-status", *(str(s.code) for s in EXIT_STATUSES))
    assert proc.returncode == 0, proc.stderr
    named = {int(code): name for name, code, _ in
             (line.split() for line in proc.stdout.splitlines()[1:])}
    assert named == {s.code: s.name for s in EXIT_STATUSES}
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \| .* \| (.*) \|$", SERVICE_MD.read_text(),
                      re.MULTILINE)
    assert [(int(code), name, restart != "no" and not restart.startswith("no:"))
            for code, name, restart in rows] == [
        (s.code, s.name, s.restarted) for s in EXIT_STATUSES]


def test_users_groups_and_directories_agree() -> None:
    service = parse_unit(UNITS / "migblockd.service")["Service"]
    socket_unit = parse_unit(UNITS / "migblockd.socket")["Socket"]
    sysusers = [line.split() for line in (UNITS / "sysusers.d/migblockd.conf").read_text()
                .splitlines() if line and not line.startswith("#")]
    users = {fields[1] for fields in sysusers if fields[0] == "u"}
    groups = users | {fields[1] for fields in sysusers if fields[0] == "g"}
    assert service["User"] in users
    assert service["Group"] in groups
    assert socket_unit["SocketUser"] in users
    assert socket_unit["SocketGroup"] in groups
    assert socket_unit["SocketMode"] == "0660"
    tmpfiles = [line.split() for line in (UNITS / "tmpfiles.d/migblockd.conf").read_text()
                .splitlines() if line and not line.startswith("#")]
    (kind, path, mode, _user, group, _age), = tmpfiles
    assert (kind, path) == ("d", str(Path(socket_unit["ListenStream"]).parent))
    assert mode == socket_unit["DirectoryMode"]
    assert group == socket_unit["SocketGroup"]


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None
    or os.geteuid() != 0,
    reason="needs systemd-sysusers, systemd-tmpfiles and root (to chown in the scratch root)",
)
def test_sysusers_and_tmpfiles_apply(tmp_path: Path) -> None:
    """The snippets do what they say, applied to a scratch root."""
    (tmp_path / "etc").mkdir()
    subprocess.run(
        ["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d/migblockd.conf")],
        check=True, capture_output=True, timeout=60,
    )
    passwd = {line.split(":")[0]: line.split(":") for line in
              (tmp_path / "etc/passwd").read_text().splitlines()}
    group = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc/group").read_text().splitlines()}
    assert set(group) == {"migblockd", "migblockd-clients"}
    user = passwd["migblockd"]
    assert user[3] == group["migblockd"][2]  # primary group
    assert user[6].endswith("nologin")
    assert int(user[2]) < 1000  # a system user

    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create",
         str(UNITS / "tmpfiles.d/migblockd.conf")],
        check=True, capture_output=True, timeout=60,
    )
    st = (tmp_path / "run/migblockd").stat()
    assert oct(st.st_mode & 0o7777) == "0o750"
    assert st.st_uid == 0
    assert st.st_gid == int(group["migblockd-clients"][2])


def test_the_docs_install_what_the_units_run() -> None:
    text = SERVICE_MD.read_text()
    assert "python3 -m venv /opt/migblockd" in text
    assert INSTALLED.rsplit("/bin/", 1)[0] in text
    for snippet in ("sysusers.d/migblockd.conf", "tmpfiles.d/migblockd.conf",
                    "migblockd.toml", "systemctl enable --now migblockd.socket"):
        assert snippet in text
    options = parse_unit(UNITS / "migblockd.service")["Service"]["Environment"]
    assert options == '"MIGBLOCKD_OPTIONS=--config /etc/migblockd/migblockd.toml"'


def install_commands(doc: Path) -> list[list[str]]:
    """The commands of a doc's install steps (its ```sh block after "Install"), one per
    line as a shell would split it, continuation lines joined and comments dropped."""
    block = re.search(r"(?ms)^#+ Install\n.*?^```sh\n(.*?)^```", doc.read_text())
    assert block, doc
    commands = []
    for line in block.group(1).replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


@pytest.mark.parametrize("doc", [SERVICE_MD, ROOT / "README.md"], ids=lambda p: p.name)
def test_the_docs_install_steps_copy_into_a_bare_etc(doc: Path, tmp_path: Path) -> None:
    """The steps' ``install`` commands, run as written with /etc in a scratch root that
    has what Debian 12's systemd package puts there (systemd/system and tmpfiles.d, no
    sysusers.d), put each file where the next steps read it."""
    etc = tmp_path / "etc"
    (etc / "systemd/system").mkdir(parents=True)
    (etc / "tmpfiles.d").mkdir()
    copies = [words for words in install_commands(doc)
              if words[0] == "install" and words[-1].startswith("/etc/")]
    assert len(copies) == 4, copies  # sysusers.d, tmpfiles.d, the TOML file, the units
    for words in copies:
        moved = [str(tmp_path) + word if word.startswith("/etc/") else word for word in words]
        done = subprocess.run(moved, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (words, done.stderr)
    for path in ("sysusers.d/migblockd.conf", "tmpfiles.d/migblockd.conf",
                 "migblockd/migblockd.toml", "systemd/system/migblockd@.socket"):
        assert (etc / path).read_bytes() == (UNITS / path.replace("migblockd/", "", 1)
                                             .replace("systemd/system/", "")).read_bytes()


def test_the_docs_disable_no_glob() -> None:
    """``systemctl disable`` takes unit names, not patterns: given
    'migblockd@*.socket' it says that globs are not supported and disables nothing
    (an instance is disabled through its template's name)."""
    for doc in (SERVICE_MD, ROOT / "README.md"):
        for command in re.findall(r"systemctl disable[^`\n]*", doc.read_text()):
            assert "*" not in command, (doc.name, command)


def test_the_example_configuration_is_valid(tmp_path: Path) -> None:
    from migblockd.config import Config, read_file  # noqa: PLC0415 - only this test needs it

    example = UNITS / "migblockd.toml"
    assert read_file(example) == {"log_level": "info"}
    # The commented-out settings are valid too, once uncommented.
    uncommented = tmp_path / "all.toml"
    uncommented.write_text(re.sub(r"(?m)^# (\S+ = )", r"\1", example.read_text()))
    settings = read_file(uncommented)
    assert len(settings) > 1
    Config(**settings)


def test_the_example_configuration_shows_the_defaults(tmp_path: Path) -> None:
    """The commented-out settings of systemd/migblockd.toml show each one's default
    (all but [access], whose line is an example of a policy): an operator reads them
    as what the daemon does without them."""
    from migblockd.config import Config, read_file  # noqa: PLC0415 - only this test needs it

    example = UNITS / "migblockd.toml"
    shown = tmp_path / "shown.toml"
    shown.write_text(re.sub(r"(?m)^# ((?!access)\S+ = )", r"\1", example.read_text()))
    settings = read_file(shown)
    defaults = Config()
    assert settings, "no commented-out setting found"
    for name, value in settings.items():
        if name == "log_level":  # set, not commented out: the file's one choice
            continue
        assert value == getattr(defaults, name), (name, value)
