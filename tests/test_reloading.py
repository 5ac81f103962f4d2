"""What a reload applies and says, decided without a daemon (migblockd.reloading).

The daemon-level tests (test_config, test_durable, test_systemd_e2e) send a
real SIGHUP; these pin each branch of the decision.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
from pathlib import Path

from migblockd.config import Config
from migblockd.reloading import next_state, outvoted, plan
from migblockd.sources import Sources


def test_nothing_changed() -> None:
    config = Config(config=Path("/etc/migblockd/migblockd.toml"))
    reload = plan(config, config, socket_passed=False)
    assert reload.config == config
    assert reload.changed == {}
    assert reload.messages() == [(logging.INFO, "reloaded configuration: nothing changed")]


def test_the_roles_a_reload_changed_are_named_bounded() -> None:
    config = Config(config=Path("/etc/migblockd/migblockd.toml"))
    roles = [f"uid {n} is operator (was client)" for n in range(1001, 1008)]
    reload = dataclasses.replace(plan(config, config.replace(max_blockers=7),
                                      socket_passed=False), roles=roles)
    assert reload.messages() == [(logging.INFO, (
        "reloaded configuration: max-blockers=7; the roles of 7 connected uids changed: "
        + ", ".join(roles[:5]) + " and 2 more"))]
    # Without a file, the databases were still read again.
    bare = dataclasses.replace(plan(Config(), Config(), socket_passed=False), roles=roles[:1])
    assert bare.messages()[1] == (logging.INFO, "reload: the user and group databases "
                                  "changed the role of a connected uid: " + roles[0])


def test_without_a_config_file_a_reload_says_it_has_nothing_to_read() -> None:
    # migblockd started by hand, without --config, and a file edited meanwhile.
    reload = plan(Config(), Config(), socket_passed=False)
    assert reload.changed == {}
    assert reload.messages() == [
        (logging.WARNING, "reload: nothing to re-read: this migblockd was started without "
                          "--config, so its settings are its command line's")]


def test_a_reloadable_setting_is_applied_and_named() -> None:
    reload = plan(Config(), Config(max_clients=7, log_level="debug"), socket_passed=False)
    assert reload.config == Config(max_clients=7, log_level="debug")
    assert reload.changed == {"log_level": "debug", "max_clients": 7}
    assert reload.messages() == [
        (logging.INFO, "reloaded configuration: log-level=debug, max-clients=7")]


def test_a_restart_only_setting_keeps_its_running_value_and_is_warned_of() -> None:
    running = Config()
    reload = plan(running, Config(socket_mode=0o660, max_clients=7), socket_passed=False)
    assert reload.config.socket_mode == running.socket_mode
    assert reload.config.max_clients == 7
    assert reload.restart_only == ["socket-mode"]
    assert reload.messages()[1] == (
        logging.WARNING, "reload: socket-mode changed, which only a restart applies")
    # Each at the line of the file that now gives it; one it no longer gives, bare.
    reload = plan(running, Config(socket_mode=0o660, migration_time=9), socket_passed=False,
                  sources=Sources(Path("/etc/m.toml"), frozenset({"socket_mode"}),
                                  {"socket_mode": 4}))
    assert reload.messages()[1] == (
        logging.WARNING, "reload: /etc/m.toml:4: socket-mode, migration-time changed, which "
        "only a restart applies")


def test_only_restart_only_changes_say_no_reloadable_setting_changed() -> None:
    reload = plan(Config(), Config(socket=Path("/run/other.sock")), socket_passed=False)
    assert reload.messages()[0] == (
        logging.INFO, "reloaded configuration: no setting a reload applies changed")


def test_with_a_passed_socket_its_settings_are_the_socket_units() -> None:
    reload = plan(Config(), Config(socket=Path("/run/other.sock"), socket_mode=0o660),
                  socket_passed=True)
    assert reload.restart_only == []
    assert reload.unit_owned == ["socket", "socket-mode"]
    level, text = reload.messages()[1]
    assert level == logging.WARNING
    assert text.startswith("reload: socket, socket-mode changed, which the socket unit sets")
    assert text.endswith("the daemon serves the socket systemd passed")


def test_an_edit_the_command_line_outvotes_is_named_with_the_value_that_wins() -> None:
    # Reproduced first: started with --log-level info --max-clients 50, the file
    # edited to debug and 10, and the reload said only "nothing changed".
    file = Path("/etc/migblockd/migblockd.toml")
    cli = {"config": file, "log_level": "info",
           "max_clients": 50, "migration_time": 2.5, "only_migratable": None}
    before = {"log_level": "info", "only_migratable": True}
    now = {"log_level": "debug", "max_clients": 10, "migration_time": 2.5,
           "only_migratable": False}
    # Not one the file left as it was, nor one the command line does not set.
    # In --help's order, as the other lines name settings.
    assert outvoted(cli, before, now) == ["migration_time", "log_level", "max_clients"]
    assert outvoted(cli, now, now) == []
    running = Config(config=file, max_clients=50, migration_time=2.5)
    reload = plan(running, running, socket_passed=False,
                  overridden=["migration_time", "log_level", "max_clients"])
    assert reload.config == running
    assert reload.messages() == [
        (logging.INFO, "reloaded configuration: no setting a reload applies changed"),
        (logging.WARNING, "reload: migration-time changed in the file, but the command line "
                          "sets it (2.5); the command line wins"),
        (logging.WARNING, "reload: log-level changed in the file, but the command line sets "
                          "it (info); the command line wins"),
        (logging.WARNING, "reload: max-clients changed in the file, but the command line "
                          "sets it (50); the command line wins")]
    # Named at the line of the file that gives it, where the file is known.
    reload = plan(running, running, socket_passed=False, overridden=["max_clients"],
                  sources=Sources(Path("/etc/m.toml"), frozenset(), {"max_clients": 7}))
    assert reload.messages()[1] == (
        logging.WARNING, "reload: /etc/m.toml:7: max-clients changed in the file, but the "
        "command line sets it (50); the command line wins")


def test_the_next_start_with_another_state_dir_or_none(tmp_path: Path) -> None:
    # What a reload says the next start does with the state it keeps (the daemon
    # test, in test_durable, has them as the log says them to the operator).
    old, other, link = tmp_path / "old", tmp_path / "other", tmp_path / "link"
    old.mkdir()
    other.mkdir()
    link.symlink_to(old)
    running = Config(state_dir=old)
    assert next_state(running, Config(state_dir=old), 3) is None
    assert next_state(running, Config(state_dir=link), 3) is None  # the same directory
    assert next_state(Config(ephemeral=True, state_dir=old), Config(state_dir=other), 3) is None
    assert next_state(running, Config(state_dir=other), 1) == (
        f"with state-dir as the file now sets it, the next start finds no database in {other} "
        f"and will not restore the 1 blocker kept in {old}/state.db (it creates an empty one); "
        f"to keep it, stop the daemon, move state.db and its state.db-wal, if there, from "
        f"{old} to {other}, then start it")
    # Found by review: with a directory not made yet, "move state.db ... to NEW"
    # done as written (mv) made the database the file NEW, and the next start
    # refused it as no directory.
    missing = tmp_path / "missing" / "state"
    user = f"uid {os.geteuid()} ({pwd.getpwuid(os.geteuid()).pw_name})"
    assert next_state(running, Config(state_dir=missing), 3) == (
        f"with state-dir as the file now sets it, the next start finds no database in "
        f"{missing}, which does not exist yet, and will not restore the 3 blockers kept in "
        f"{old}/state.db (it makes the directory, with an empty database); to keep them, "
        f"stop the daemon, make {missing} as a start would (mode 0700, owned by {user}, "
        "the user the daemon runs as; any directory made above it writable by no one "
        "else), move state.db and its state.db-wal, if there, from "
        f"{old} into {missing}, then start it")
    # No blocker: still its settings and the counter of generated ids.
    assert next_state(running, Config(state_dir=other, ephemeral=True), 0) == (
        "with ephemeral as the file now sets it, the next start keeps nothing and ignores "
        f"the state kept in {old}/state.db (no blockers now)")
    # Led by the line of the file that sets it, where the file is known.
    sources = Sources(Path("/etc/m.toml"), frozenset({"ephemeral", "state_dir"}),
                      {"state_dir": 3, "ephemeral": 5})
    assert next_state(running, Config(state_dir=other, ephemeral=True), 0, sources) == (
        "/etc/m.toml:5: with ephemeral as the file now sets it, the next start keeps nothing "
        f"and ignores the state kept in {old}/state.db (no blockers now)")
    (other / "state.db").touch()
    assert next_state(running, Config(state_dir=other), 2) == (
        f"with state-dir as the file now sets it, the next start restores {other}/state.db, "
        f"not the 2 blockers kept in {old}/state.db")
    assert next_state(running, Config(state_dir=other), 2, sources) == (
        f"/etc/m.toml:3: with state-dir as the file now sets it, the next start restores "
        f"{other}/state.db, not the 2 blockers kept in {old}/state.db")
