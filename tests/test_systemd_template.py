"""The shipped templates, ``migblockd@.service`` and ``migblockd@.socket``, under a real
service manager: two instances side by side, as one daemon per VM runs.

The manager, its namespaces and its clean-up are test_systemd_manager's
(:func:`user_manager`); the templates are installed beside the plain units, as
committed but for the lines that module's REFUSED names.  Each instance reads a
configuration file of its own, named by a drop-in of its own, as docs/service.md
says to give per-instance settings.  The metrics test installs docs/service.md's
drop-in for the template as the document gives it; the gate test gives each instance
its own QEMU as docs/gate.md does.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT
from metricstext import Scrape
from realqemu import Qemu
from test_metrics import scrape
from test_systemd_manager import (
    GOOD_CONFIG,
    INSIDE,
    TIMEOUT,
    Manager,
    add_blocker,
    blocker_ids,
    client,
    installed_unit,
    is_running,
    reason_refused,
    user_manager,
)

INSTANCES = ("vm1", "vm2")
SERVICE_MD = ROOT / "docs" / "service.md"


def service(instance: str) -> str:
    return f"migblockd@{instance}.service"


def socket_unit(instance: str) -> str:
    return f"migblockd@{instance}.socket"


def write_config(manager: Manager, instance: str, text: str) -> None:
    path = manager.base / f"{instance}.toml"
    path.write_text(text)
    path.chmod(0o644)


def install_templates(manager: Manager, configured: tuple[str, ...] = INSTANCES) -> None:
    """The templates beside the plain units; a configuration file for each instance
    in ``configured``."""
    units = manager.base / "config/systemd/user"
    for name in ("migblockd@.service", "migblockd@.socket"):
        (units / name).write_text(installed_unit(name))
    for instance in configured:
        write_config(manager, instance, GOOD_CONFIG)
        drop_ins = units / f"{service(instance)}.d"
        drop_ins.mkdir()
        (drop_ins / "config.conf").write_text(
            f'[Service]\nEnvironment="MIGBLOCKD_OPTIONS=--config {INSIDE}/{instance}.toml"\n')
    manager.systemctl("daemon-reload")


@pytest.fixture
def instances(tmp_path: Path) -> Iterator[Manager]:
    """A user manager listening on both instances' sockets; no daemon runs yet."""
    with user_manager(tmp_path) as manager:
        install_templates(manager)
        manager.systemctl("start", *map(socket_unit, INSTANCES))
        yield manager


def database_id(manager: Manager, database: str, name: str) -> int:
    """``name``'s uid or gid in the namespace's /etc/passwd or /etc/group."""
    return next(int(line.split(":")[2]) for line in
                (manager.base / "etc" / database).read_text().splitlines()
                if line.startswith(f"{name}:"))


def socket_path(manager: Manager, instance: str) -> Path:
    # The template's ListenStream=, /run/migblockd/%i.sock, in the namespace's /run.
    return manager.inside(f"/run/migblockd/{instance}.sock")


def running(manager: Manager, instance: str) -> dict[str, str]:
    return manager.wait_for(service(instance), "start", is_running)


async def test_each_instance_is_activated_on_its_socket_with_its_state(
        instances: Manager) -> None:
    owner = (database_id(instances, "passwd", "migblockd"),
             database_id(instances, "group", "migblockd-clients"))
    for instance in INSTANCES:
        assert instances.show(socket_unit(instance), "Listen")["Listen"] == \
            f"/run/migblockd/{instance}.sock (Stream)"
        made = socket_path(instances, instance).stat()
        assert (made.st_uid, made.st_gid, made.st_mode & 0o7777) == (*owner, 0o660)
        assert instances.show(service(instance), "ActiveState", "MainPID") == \
            {"ActiveState": "inactive", "MainPID": "0"}
    await add_blocker(instances, "a1", socket_path(instances, "vm1"))
    # vm1's client started vm1's daemon only.
    assert instances.show(service("vm2"), "MainPID")["MainPID"] == "0"
    await add_blocker(instances, "b1", socket_path(instances, "vm2"))
    assert await blocker_ids(instances, socket_path(instances, "vm1")) == {"a1"}
    assert await blocker_ids(instances, socket_path(instances, "vm2")) == {"b1"}
    for instance in INSTANCES:
        state = instances.wait_for(service(instance), "status", lambda s: is_running(s)
                                   and s["StatusText"].startswith("1 blocker,"))
        shown = instances.show(service(instance), "Description", "StateDirectory")
        assert shown == {"Description": f"QEMU migration blocker registry for {instance} "
                                        "(QMP daemon)",
                         "StateDirectory": f"migblockd-instances/{instance}"}, shown
        # StateDirectory= is relative to $XDG_CONFIG_HOME under a user manager.
        assert (instances.base / f"config/migblockd-instances/{instance}/state.db").is_file()
        assert f"socket activation: serving the passed socket /run/migblockd/{instance}.sock" \
            in instances.daemon_log(), instances.log()
        assert state["MainPID"] != "0"


async def test_restart_and_sigkill_of_one_instance(instances: Manager) -> None:
    await add_blocker(instances, "a1", socket_path(instances, "vm1"))
    await add_blocker(instances, "b1", socket_path(instances, "vm2"))
    first, other = running(instances, "vm1"), running(instances, "vm2")
    instances.systemctl("restart", service("vm1"))
    second = running(instances, "vm1")
    assert second["MainPID"] != first["MainPID"]
    assert await blocker_ids(instances, socket_path(instances, "vm1")) == {"a1"}
    await add_blocker(instances, "a2", socket_path(instances, "vm1"))
    instances.systemctl("kill", "--signal=SIGKILL", "--kill-who=main", service("vm1"))
    third = instances.wait_for(service("vm1"), "restart after SIGKILL", lambda s:
                               is_running(s) and s["MainPID"] != second["MainPID"])
    assert int(third["NRestarts"]) >= 1, third
    assert await blocker_ids(instances, socket_path(instances, "vm1")) == {"a1", "a2"}
    # vm2 was never touched: the same process, its own blocker only.
    assert await blocker_ids(instances, socket_path(instances, "vm2")) == {"b1"}
    after = running(instances, "vm2")
    assert (after["MainPID"], after["NRestarts"]) == (other["MainPID"], "0"), after


async def test_reload_and_stop_touch_one_instance(instances: Manager) -> None:
    await add_blocker(instances, "a1", socket_path(instances, "vm1"))
    await add_blocker(instances, "b1", socket_path(instances, "vm2"))
    vm1, vm2 = running(instances, "vm1")["MainPID"], running(instances, "vm2")["MainPID"]
    write_config(instances, "vm1", "max-reason-length = 16\n")
    instances.systemctl("reload", service("vm1"))
    # In effect when systemctl reload returns: ExecReload= waits for the daemon.
    assert await reason_refused(instances, 40, socket_path(instances, "vm1"))
    assert not await reason_refused(instances, 40, socket_path(instances, "vm2"))
    write_config(instances, "vm1", 'max-reason-length = "lots"\n')
    assert instances.systemctl("reload", service("vm1"), check=False).returncode != 0
    assert await reason_refused(instances, 40, socket_path(instances, "vm1"))
    assert [running(instances, i)["MainPID"] for i in INSTANCES] == [vm1, vm2]
    # One reload reached a daemon: vm1's good one.
    assert instances.daemon_log().count("INFO: reloaded configuration") == 1, instances.log()
    instances.systemctl("stop", socket_unit("vm1"), service("vm1"))
    assert not socket_path(instances, "vm1").exists()  # RemoveOnStop=
    assert await blocker_ids(instances, socket_path(instances, "vm2")) == {"b1"}
    assert running(instances, "vm2")["MainPID"] == vm2
    # Its state stays for the next start (with a file it can start with).
    write_config(instances, "vm1", GOOD_CONFIG)
    instances.systemctl("start", socket_unit("vm1"))
    assert await blocker_ids(instances, socket_path(instances, "vm1")) == {"a1"}


async def test_an_instances_changed_options_fail_its_reload_only(instances: Manager) -> None:
    # The template's ExecReload= check reads its own daemon's environment, in its
    # sandbox; vm2, started with the options it has, reloads.
    await add_blocker(instances, "a1", socket_path(instances, "vm1"))
    await add_blocker(instances, "b1", socket_path(instances, "vm2"))
    vm1 = running(instances, "vm1")["MainPID"]
    (instances.base / "config/systemd/user" / f"{service('vm1')}.d/config.conf").write_text(
        f'[Service]\nEnvironment="MIGBLOCKD_OPTIONS=--config {INSIDE}/vm2.toml"\n')
    instances.systemctl("daemon-reload")
    assert instances.systemctl("reload", service("vm1"), check=False).returncode != 0
    assert (f"migblockd: MIGBLOCKD_OPTIONS is '--config {INSIDE}/vm2.toml' now, but the "
            f"daemon (pid {vm1}) started with '--config {INSIDE}/vm1.toml': ") in \
        instances.daemon_log(), instances.log()
    instances.systemctl("reload", service("vm2"))
    vm2 = running(instances, "vm2")["MainPID"]
    # Its reload is over when systemctl reload returns, as its ExecReload= said.
    assert f"migblockd: pid {vm2}: reloaded configuration: " in instances.daemon_log(), \
        instances.log()
    instances.wait_for(service("vm2"), "reload", lambda s: is_running(s)
                       and "INFO: reloaded configuration" in instances.daemon_log())
    assert instances.daemon_log().count("INFO: reloaded configuration") == 1, instances.log()
    assert running(instances, "vm1")["MainPID"] == vm1


def documented_metrics_drop_in() -> tuple[str, str]:
    """docs/service.md's drop-in for the template's metrics: its file name and text."""
    blocks = re.findall(r"```ini\n(.*?)```", SERVICE_MD.read_text(), re.S)
    block = next(b for b in blocks if "migblockd-metrics-%i" in b)
    where, _, text = block.partition("\n")
    # Its first line says where it goes: `# systemctl edit UNIT`, which writes
    # UNIT.d/override.conf, or `# PATH` of the file.
    if where == "# systemctl edit migblockd@.service":
        return "override.conf", text
    directory, _, name = where.removeprefix("# ").rpartition("/")
    assert directory == "/etc/systemd/system/migblockd@.service.d", where
    return name, text


def as_user_manager(text: str) -> str:
    """A system unit's paths as this user manager has them: RuntimeDirectory= is made
    in $XDG_RUNTIME_DIR (%t) rather than /run, and /etc/migblockd is the test's."""
    for system, here in (("/run/migblockd-metrics-%i/", "%t/migblockd-metrics-%i/"),
                         ("/etc/migblockd/", f"{INSIDE}/")):
        assert system in text, (system, text)
        text = text.replace(system, here)
    return text


def metrics_path(manager: Manager, instance: str) -> Path:
    return manager.inside(f"{INSIDE}/runtime/migblockd-metrics-{instance}/metrics.sock")


async def test_metrics_on_a_unix_socket_per_instance_as_documented(tmp_path: Path) -> None:
    with user_manager(tmp_path) as manager:
        install_templates(manager, configured=())
        name, text = documented_metrics_drop_in()
        drop_ins = manager.base / "config/systemd/user/migblockd@.service.d"
        drop_ins.mkdir()
        (drop_ins / name).write_text(as_user_manager(text))
        # vm1's own settings, as `systemctl edit migblockd@vm1.service` (override.conf)
        # gives them (docs/gate.md's --qemu, say): repeating --metrics, as the
        # document says, and applied over the template's.
        (manager.base / "config/systemd/user/migblockd@vm1.service.d").mkdir()
        (manager.base / "config/systemd/user/migblockd@vm1.service.d/override.conf").write_text(
            '[Service]\nEnvironment="MIGBLOCKD_OPTIONS=--config '
            f'{INSIDE}/migblockd.toml --max-reason-length 16 '
            '--metrics %t/migblockd-metrics-%i/metrics.sock"\n')
        manager.systemctl("daemon-reload")
        manager.systemctl("start", *map(socket_unit, INSTANCES))
        for count, instance in enumerate(INSTANCES, start=1):
            try:
                for n in range(count):
                    await add_blocker(manager, f"b{n}", socket_path(manager, instance))
            except OSError as exc:  # the daemon exited: its log says why
                pytest.fail(f"{instance}: {exc!r}\n{manager.log()}")
            running(manager, instance)
            # The metrics socket is bound before the QMP socket is served.
            result: Scrape = scrape(metrics_path(manager, instance))
            assert result.value("migblockd_blockers", source="migblockd",
                                mode="normal") == count
        # vm1's own option is in effect too.
        assert await reason_refused(manager, 40, socket_path(manager, "vm1"))
        assert not await reason_refused(manager, 40, socket_path(manager, "vm2"))


@dataclass
class ChildQemu(Qemu):
    """A QEMU killed with this process, however the test ends (pytest killed too)."""

    def argv(self) -> list[str]:
        return ["setpriv", "--pdeathsig=SIGKILL", "--", *super().argv()]


async def test_each_instance_gates_its_own_qemu(tmp_path: Path) -> None:
    with user_manager(tmp_path) as manager:
        install_templates(manager, configured=())
        qemus = {instance: ChildQemu(manager.base / f"qemu-{instance}")
                 for instance in INSTANCES}
        try:
            for instance, qemu in qemus.items():
                qemu.start()
                # The daemon's user connects: QEMU's socket is root's here (docs/gate.md
                # gives it a group of the daemon's user instead).
                qemu.gate_socket.chmod(0o666)
                # docs/gate.md's drop-in, as `systemctl edit migblockd@vm1.service` writes it.
                drop_ins = manager.base / f"config/systemd/user/{service(instance)}.d"
                drop_ins.mkdir()
                (drop_ins / "override.conf").write_text(
                    f"[Unit]\nBefore=qemu@{instance}.service\n[Service]\n"
                    f'Environment="MIGBLOCKD_OPTIONS=--config {INSIDE}/migblockd.toml '
                    f'--qemu {INSIDE}/qemu-{instance}/gate.sock"\n')
            manager.systemctl("daemon-reload")
            manager.systemctl("start", *map(socket_unit, INSTANCES))
            async with qemus["vm1"].monitor() as monitor:
                await monitor.add_blocker("n1")
                text = monitor.blocker_text("n1")
            c = await client(manager, socket_path(manager, "vm1"))
            try:
                listed = await c.ok("query-blockers")
                assert [(b["source"], b["reason"]) for b in listed] == [("qemu", text)], listed
                refused = await c.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
                assert refused["error"]["desc"] == text, refused
            finally:
                await c.close()
            c = await client(manager, socket_path(manager, "vm2"))
            try:
                assert await c.ok("query-blockers") == []
            finally:
                await c.close()
            for instance in INSTANCES:
                assert "QEMU" in running(manager, instance)["StatusText"]
            assert f"gating the QEMU at {INSIDE}/qemu-vm2/gate.sock" in manager.daemon_log()
        finally:
            for qemu in qemus.values():
                qemu.kill()


async def test_a_monitor_in_tmp_is_out_of_the_sandboxs_sight(tmp_path: Path) -> None:
    # Found by review: docs/gate.md said the units' sandbox "allows AF_UNIX, which is
    # all the link needs"; a QEMU started with -qmp unix:/tmp/vm1.qmp (as QEMU's own
    # examples do) was never reached, since PrivateTmp= gives the daemon a /tmp of
    # its own, and the log said only that the socket was not there.  The page now
    # says where the monitor may be; this is what it describes.
    with user_manager(tmp_path) as manager:
        install_templates(manager, configured=())
        manager.inside("/tmp/qemu-vm1").mkdir()
        qemu = ChildQemu(manager.inside("/tmp/qemu-vm1"))
        try:
            qemu.start()
            qemu.gate_socket.chmod(0o666)
            drop_ins = manager.base / f"config/systemd/user/{service('vm1')}.d"
            drop_ins.mkdir()
            (drop_ins / "override.conf").write_text(
                f'[Service]\nEnvironment="MIGBLOCKD_OPTIONS=--config {INSIDE}/migblockd.toml '
                '--qemu /tmp/qemu-vm1/gate.sock"\n')
            manager.systemctl("daemon-reload")
            manager.systemctl("start", socket_unit("vm1"))
            await blocker_ids(manager, socket_path(manager, "vm1"))  # starts the daemon
            assert running(manager, "vm1")["StatusText"].endswith(", QEMU not connected")
            assert ("QEMU at /tmp/qemu-vm1/gate.sock is not available: No such file or "
                    "directory; retrying") in manager.daemon_log(), manager.log()
            text = (ROOT / "docs" / "gate.md").read_text()
            assert "must not be in `/tmp` or `/var/tmp`" in " ".join(text.split())
        finally:
            qemu.kill()


async def test_no_socket_unit_takes_over_a_path_another_serves(tmp_path: Path) -> None:
    # The instance named migblockd has the plain unit's path, /run/migblockd/migblockd.sock;
    # systemd unlinks whatever is at ListenStream= before it binds.
    with user_manager(tmp_path) as manager:  # migblockd.socket listens
        install_templates(manager, configured=("migblockd",))
        await add_blocker(manager, "p1")
        served = manager.socket.stat().st_ino
        refused = manager.systemctl("start", socket_unit("migblockd"), check=False)
        assert refused.returncode != 0, refused
        assert manager.socket.stat().st_ino == served
        assert await blocker_ids(manager) == {"p1"}
        # The other way round: the instance listens, the plain unit may not start.
        manager.systemctl("stop", "migblockd.socket", "migblockd.service")
        manager.systemctl("start", socket_unit("migblockd"))
        await add_blocker(manager, "i1", socket_path(manager, "migblockd"))
        served = manager.socket.stat().st_ino
        refused = manager.systemctl("start", "migblockd.socket", check=False)
        assert refused.returncode != 0, refused
        assert manager.socket.stat().st_ino == served
        assert await blocker_ids(manager) == {"i1"}


async def test_enable_clean_and_uninstall_as_documented(tmp_path: Path) -> None:
    with user_manager(tmp_path) as manager:  # migblockd.socket listens
        install_templates(manager)
        units = manager.base / "config/systemd/user"
        for instance in INSTANCES:
            manager.systemctl("enable", "--now", socket_unit(instance))
            assert (units / f"sockets.target.wants/{socket_unit(instance)}").is_symlink()
            await add_blocker(manager, f"{instance}-1", socket_path(manager, instance))
        # `systemctl clean --what=state migblockd` takes the plain unit's state only.
        await add_blocker(manager, "p1")
        manager.systemctl("stop", "migblockd.socket", "migblockd.service")
        manager.systemctl("clean", "--what=state", "migblockd.service")
        assert not (manager.base / "config/migblockd").exists()
        manager.systemctl("restart", *map(service, INSTANCES))
        for instance in INSTANCES:
            assert await blocker_ids(manager, socket_path(manager, instance)) == {f"{instance}-1"}
        # The README's uninstall steps for per-VM instances.
        manager.systemctl("stop", "migblockd@*.socket", "migblockd@*.service")
        manager.systemctl("disable", "migblockd@.socket", "migblockd@.service")
        assert not list(units.glob("*.wants/migblockd@*")), list(units.glob("*.wants/*"))
        # Stopped and disabled units are unloaded by the manager's garbage collection,
        # a moment later on a loaded machine ("loaded inactive dead" until then).
        deadline = time.monotonic() + 30
        while left := manager.systemctl("list-units", "--all", "--plain", "--no-legend",
                                        "migblockd@*").stdout.strip():
            assert time.monotonic() < deadline, left
            time.sleep(0.1)
        for instance in INSTANCES:
            assert not socket_path(manager, instance).exists()
            # What the uninstall steps leave to the operator: the blockers.
            assert (manager.base / f"config/migblockd-instances/{instance}/state.db").is_file()


async def test_the_reload_check_judges_the_socket_activated_daemons_settings(
        tmp_path: Path) -> None:
    # Reproduced first: both units started with this file (the daemon logs that it
    # ignores socket-group), yet `systemctl reload` failed: the check refused "there is
    # no group named 'nosuchgroup'", and said "valid; socket" of the user's default path.
    with user_manager(tmp_path) as manager:  # migblockd.socket listens
        install_templates(manager, configured=("vm1",))
        manager.systemctl("start", socket_unit("vm1"))
        units = {"migblockd.service": ("migblockd", manager.socket),
                 service("vm1"): ("vm1", socket_path(manager, "vm1"))}
        for unit, (name, path) in units.items():
            (manager.base / f"{name}.toml").write_text('socket-group = "nosuchgroup"\n')
            (manager.base / f"{name}.toml").chmod(0o644)
            assert not await reason_refused(manager, 40, path)
            pid = manager.wait_for(unit, "start", is_running)["MainPID"]
            (manager.base / f"{name}.toml").write_text(
                'socket-group = "nosuchgroup"\nmax-reason-length = 16\n')
            reloaded = manager.systemctl("reload", unit, check=False)
            assert reloaded.returncode == 0, (reloaded, manager.log())
            assert await reason_refused(manager, 40, path)
            assert manager.wait_for(unit, "state", is_running)["MainPID"] == pid
        said = manager.daemon_log()
        for name, _ in units.values():
            ignored = (f"socket activation: {INSIDE}/{name}.toml:1: socket-group is ignored "
                       "(the socket unit's SocketGroup= applies)")
            # Each start logs it, at the line of the file; each check notes it in the
            # same words, and refuses nothing.
            assert said.count(f"INFO: {ignored}") == 1, manager.log()
            assert said.count(f"migblockd: {ignored}") == 1, manager.log()
        assert "no group named" not in said
        for name, _ in units.values():
            assert (f"migblockd: {INSIDE}/{name}.toml and the command line: valid; socket "
                    "passed by systemd (the socket unit's ListenStream=), state in "
                    in said), manager.log()



#: A path-derived instance name: ``systemd-escape --path /var/run/foo-bar``.
ESCAPED = r"var-run-foo\x2dbar"


def wait_for_line(manager: Manager, line: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while line not in manager.daemon_log():
        assert time.monotonic() < deadline, f"no {line!r}: {manager.log()}"
        time.sleep(0.1)


async def test_an_escaped_instance_name_is_what_the_document_says(tmp_path: Path) -> None:
    with user_manager(tmp_path) as manager:
        install_templates(manager, configured=())
        # Not through install_templates: its --config would name the instance, which
        # MIGBLOCKD_OPTIONS takes the backslash out of (what the end of this test shows).
        drop_ins = manager.base / f"config/systemd/user/{service(ESCAPED)}.d"
        drop_ins.mkdir()
        (drop_ins / "config.conf").write_text(
            f'[Service]\nEnvironment="MIGBLOCKD_OPTIONS=--config {INSIDE}/migblockd.toml"\n')
        manager.systemctl("daemon-reload")
        path = socket_path(manager, ESCAPED)  # /run/migblockd/var-run-foo\x2dbar.sock
        # The socket unit's check (ExecStartPre=, %i) looks where it listens (%i too):
        # a live socket at the escaped path is not taken over.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
            live.bind(os.fspath(path))
            live.listen()
            refused = manager.systemctl("start", socket_unit(ESCAPED), check=False)
            assert refused.returncode != 0, refused
            assert (f"another daemon is already listening on /run/migblockd/{ESCAPED}.sock"
                    in manager.daemon_log()), manager.log()
        manager.systemctl("start", socket_unit(ESCAPED))  # the dead socket is replaced
        await add_blocker(manager, "e1", path)
        running(manager, ESCAPED)
        assert (manager.base / f"config/migblockd-instances/{ESCAPED}/state.db").exists()
        assert await blocker_ids(manager, path) == {"e1"}
        # After a daemon-reload systemd 252 passes such a socket unit's socket no more.
        manager.systemctl("daemon-reload")
        manager.systemctl("restart", service(ESCAPED), check=False)
        wait_for_line(manager, "--socket-activated: systemd passed no socket")
        manager.systemctl("stop", service(ESCAPED), socket_unit(ESCAPED))
        manager.systemctl("reset-failed", service(ESCAPED), socket_unit(ESCAPED), check=False)
        # docs/service.md's metrics drop-in, which such a name does not survive.
        name, text = documented_metrics_drop_in()
        template_drop_ins = manager.base / "config/systemd/user/migblockd@.service.d"
        template_drop_ins.mkdir()
        (template_drop_ins / name).write_text(as_user_manager(text))
        (drop_ins / "config.conf").unlink()
        manager.systemctl("daemon-reload")
        manager.systemctl("start", socket_unit(ESCAPED))
        with contextlib.suppress(OSError):
            await blocker_ids(manager, path)
        said = "migblockd-metrics-var-run-foox2dbar: Permission denied"
        wait_for_line(manager, said)
        document = " ".join(SERVICE_MD.read_text().split())
        assert f"/run/{said}" in document
        assert "--socket-activated: systemd passed no socket" in document
