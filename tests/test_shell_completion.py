"""Completion and help, computed from a real daemon's query-qmp-schema answer.

The introspection is fetched from a running ``python -m migblockd`` with the
``qemu.qmp`` library (an independent client), never written by hand.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import DaemonProcess
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from qmpclient import qemu_qmp_client

from migblockd.qapi.doc import DefinitionDoc, SchemaDocs
from migblockd.shell import helptext
from migblockd.shell.completion import ShellCompleter, complete
from migblockd.shell.history import history_path
from migblockd.shell.schema import Schema


async def _introspect(path: Path) -> list[dict[str, Any]]:
    async with qemu_qmp_client(path, "completion-test") as client:
        result = await client.execute("query-qmp-schema")
    assert isinstance(result, list)
    return result


@pytest.fixture(scope="module")
def schema(module_daemon: DaemonProcess) -> Schema:
    return Schema(asyncio.run(_introspect(module_daemon.socket)))


def texts(schema: Schema, line: str) -> list[str]:
    return [c.text for c in complete(schema, line)]


def applied(schema: Schema, line: str) -> list[str]:
    """The line after each candidate is applied."""
    return [line[: c.start] + c.text for c in complete(schema, line)]


def test_command_names_come_from_the_schema(schema: Schema) -> None:
    names = texts(schema, "")
    assert set(names) == {f"{n} " for n in (*schema.commands, "help")}
    assert "add-blocker " in names
    # A completed command name is followed by a space (as readline does): the
    # arguments can be typed at once.
    assert applied(schema, "query-bl") == ["query-blockers "]
    assert applied(schema, "query-blockers") == ["query-blockers "]
    assert set(texts(schema, "migrate")) == {
        f"{n} " for n in schema.commands if n.startswith("migrate")
    }
    assert texts(schema, "nope") == []


def test_help_completes_command_names(schema: Schema) -> None:
    assert applied(schema, "help del-") == ["help del-blocker "]
    assert texts(schema, "help add-blocker ") == []


def test_help_completes_event_names(schema: Schema) -> None:
    assert "BLOCKER_ADDED" in schema.events
    assert applied(schema, "help BLOCKER_A") == ["help BLOCKER_ADDED "]
    assert "MIGRATION " in texts(schema, "help ")
    assert "MIGRATION " not in texts(schema, "")  # not a command


def test_argument_names_of_the_command_being_typed(schema: Schema) -> None:
    expected = [f"{m.name}=" for m in schema.arguments("add-blocker")]
    assert texts(schema, "add-blocker ") == expected
    assert {"reason=", "modes=", "internal=", "id=", "scope="} <= set(expected)
    assert applied(schema, "add-blocker reason=x mo") == ["add-blocker reason=x modes="]
    assert texts(schema, "del-blocker ") == ["id="]
    assert texts(schema, "query-blockers ") == ["mode="]


def test_arguments_already_given_are_not_offered_again(schema: Schema) -> None:
    offered = texts(schema, "add-blocker reason='a b' internal=true ")
    assert "reason=" not in offered
    assert "internal=" not in offered
    assert "modes=" in offered


def test_argument_candidates_say_type_and_optionality(schema: Schema) -> None:
    meta = {c.text: c.meta for c in complete(schema, "add-blocker ")}
    assert meta["reason="] == "string (required)"
    assert meta["internal="] == "boolean (optional)"
    assert "one of: normal, cpr-reboot" in meta["modes="]


def test_enum_values_for_a_list_argument(schema: Schema) -> None:
    modes = schema.enum_values(
        str(schema.element_type(str(schema.resolve("add-blocker", ["modes"]))))
    )
    assert modes is not None
    assert modes[:2] == ["normal", "cpr-reboot"]
    assert texts(schema, "add-blocker modes=") == modes
    assert applied(schema, "add-blocker modes=cpr-t") == ["add-blocker modes=cpr-transfer"]


def test_comma_list_offers_the_values_not_yet_listed(schema: Schema) -> None:
    assert applied(schema, "add-blocker modes=normal,cpr-r") == [
        "add-blocker modes=normal,cpr-reboot"
    ]
    assert "normal" not in texts(schema, "add-blocker modes=normal,")
    assert "cpr-reboot" in texts(schema, "add-blocker modes=normal,")


def test_json_list_offers_quoted_values(schema: Schema) -> None:
    assert applied(schema, 'add-blocker modes=["normal", "cpr-e') == [
        'add-blocker modes=["normal", "cpr-exec"'
    ]
    offered = texts(schema, 'add-blocker modes=["normal",')
    assert '"normal"' not in offered
    assert '"cpr-reboot"' in offered
    # A Python literal, as qmp-shell takes it: in its own quotes.
    assert applied(schema, "add-blocker modes=['normal', 'cpr-e") == [
        "add-blocker modes=['normal', 'cpr-exec'"
    ]
    offered = texts(schema, "add-blocker modes=['normal', '")
    assert "'normal'" not in offered
    assert "'cpr-reboot'" in offered


def test_scalar_enum_and_boolean_values(schema: Schema) -> None:
    assert texts(schema, "query-blockers mode=cpr-") == [
        m for m in texts(schema, "query-blockers mode=") if m.startswith("cpr-")
    ]
    # A scalar value is complete once chosen: a space follows it.
    assert texts(schema, "migrate-set-parameters mode=n") == ["normal "]
    assert texts(schema, "add-blocker internal=") == ["true ", "false "]
    assert applied(schema, "add-blocker internal=f") == ["add-blocker internal=false "]


def test_no_completion_for_free_text_raw_json_or_unknown_commands(schema: Schema) -> None:
    assert texts(schema, "add-blocker reason=") == []
    assert texts(schema, '{"execute": "add') == []
    assert texts(schema, "no-such-command ") == []
    assert texts(schema, "add-blocker bogus=") == []


def test_a_blank_that_is_part_of_the_value_does_not_end_it(schema: Schema) -> None:
    # Found by review: after an escaped space (reason=x\ <Tab>) the value was taken
    # for ended, and the argument names offered went into it: reason="x modes=".
    assert texts(schema, "add-blocker reason=x\\ ") == []
    assert texts(schema, "add-blocker reason='a b ") == []
    assert texts(schema, 'add-blocker reason="a b ') == []
    # A blank after the escaped one, or after a closed quote, does end the word.
    assert "modes=" in texts(schema, "add-blocker reason=x\\  ")
    assert applied(schema, 'add-blocker reason="a b" mo') == ['add-blocker reason="a b" modes=']
    # Inside a JSON list the blank is the list's: its items are still offered.
    assert applied(schema, 'add-blocker modes=["normal", cpr-e') == [
        'add-blocker modes=["normal", "cpr-exec"']


def test_prompt_toolkit_adapter_replaces_the_word_being_typed(schema: Schema) -> None:
    completer = ShellCompleter(lambda: schema)
    text = "add-blocker reason=x modes=normal,cpr-r"
    found = list(
        completer.get_completions(Document(text), CompleteEvent(completion_requested=True))
    )
    assert [(c.text, c.start_position) for c in found] == [("cpr-reboot", -5)]


def test_help_lists_every_command_with_a_summary(schema: Schema) -> None:
    text = helptext.overview(schema, helptext.load_docs())
    for name in schema.commands:
        line = next(li for li in text.splitlines() if li.split()[:1] == [name])
        assert len(line.split()) > 1, f"no summary for {name}"


def _long_summaries(schema: Schema) -> SchemaDocs:
    """Docs whose first sentences are longer than a terminal line."""
    long = "does something worth a long line, " * 4
    commands = {n: DefinitionDoc(n, "command", f"{n} {long}really.") for n in schema.commands}
    return SchemaDocs(commands, {}, {})


def test_help_wraps_long_summaries_under_themselves(schema: Schema) -> None:
    text = helptext.overview(schema, _long_summaries(schema), columns=80)
    lines = text.split("Syntax:")[0].splitlines()[1:-1]
    assert all(len(line) < 80 for line in lines)
    firsts = [li for li in lines if li.split()[0] in schema.commands]
    assert len(firsts) == len(schema.commands)
    summary_column = max(len(n) for n in schema.commands) + 4
    continued = [li for li in lines if li not in firsts]
    assert len(continued) >= len(schema.commands)
    assert all(li.startswith(" " * summary_column) for li in continued)


def test_help_for_a_command_shows_doc_arguments_types_and_optionality(schema: Schema) -> None:
    text = helptext.help_text(schema, helptext.load_docs(), "add-blocker")
    assert text is not None
    assert "reason: string (required)" in text
    assert "modes: [MigMode] (optional)" in text
    assert "values: normal, cpr-reboot" in text
    assert "Returns:" in text
    # A member whose documented type only names an object or array type also
    # shows its structure, from introspection.
    text = helptext.help_text(schema, helptext.load_docs(), "migrate-set-capabilities")
    assert text is not None
    assert "capabilities: [MigrationCapabilityStatus] (required)" in text
    assert "shape: list of (object {capability: one of: events, state: boolean})" in text


def test_help_names_built_in_types_in_qemus_words(schema: Schema) -> None:
    # Found by review: help wrote migblockd's own arguments as the schema spells
    # them (reason: str, internal: bool) and those only introspection describes
    # in QEMU's words (string, boolean), as in QEMU's QMP reference (doc_type()
    # in its scripts/qapi/schema.py): one screen said both (owner's shape).
    docs = helptext.load_docs()
    names = [*schema.commands, *schema.events, *docs.types]
    texts = [helptext.help_text(schema, docs, name) or "" for name in names]
    spelled = re.compile(r": \[?(str|bool|int|int8|int16|int32|int64|uint8|uint16|uint32"
                         r"|uint64|size|any)\b(?! JSON)")
    found = [(n, m.group()) for n, t in zip(names, texts, strict=True) if (m := spelled.search(t))]
    assert found == []
    text = helptext.help_text(schema, docs, "add-blocker") or ""
    assert "internal: boolean (optional)" in text
    assert "modes: [MigMode] (optional)" in text


def test_help_and_the_generator_render_the_same_model(schema: Schema) -> None:
    # Where the live daemon and the local docs agree, help shows exactly the
    # generator's doc text: one model, one renderer.
    docs = helptext.load_docs()
    for name in ("add-blocker", "del-blocker", "query-version", "query-blockers"):
        assert helptext.help_text(schema, docs, name) == docs.commands[name].text
    assert helptext.help_text(schema, docs, "MigMode") == docs.types["MigMode"].text
    # Events come from the daemon too, with the local prose.
    text = helptext.help_text(schema, docs, "BLOCKER_ADDED")
    assert text is not None
    assert text.startswith("BLOCKER_ADDED (event)\n    Emitted when a blocker has been added")
    assert "modes: [MigMode]\n" in text
    assert "owner: BlockerOwner (optional)" in text


def test_help_without_local_docs_falls_back_to_introspection(schema: Schema) -> None:
    text = helptext.help_text(schema, SchemaDocs.empty(), "add-blocker")
    assert text is not None
    assert "reason: string (required)" in text
    assert "modes: list of (one of: normal, cpr-reboot" in text
    assert helptext.help_text(schema, SchemaDocs.empty(), "no-such-command") is None


def test_help_for_a_command_the_local_docs_do_not_know(schema: Schema) -> None:
    # A newer daemon: the local docs lack add-blocker, the daemon has it.
    docs = helptext.load_docs()
    older = SchemaDocs(
        {n: d for n, d in docs.commands.items() if n != "add-blocker"}, docs.events, docs.types
    )
    text = helptext.help_text(schema, older, "add-blocker")
    assert text is not None
    assert text.startswith("add-blocker (command)\n\nArguments:\n    reason: string (required)")
    assert "scope: one of: daemon, connection (optional)" in text
    assert "Returns: object {id: string, reason: string, " in text
    listing = helptext.overview(schema, older).splitlines()
    assert "  add-blocker" in listing  # listed, without a summary
    assert any(li.startswith("  del-blocker") and "Delete" in li for li in listing)


def test_history_path_follows_xdg_state_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", "/x/state")
    assert history_path() == Path("/x/state/migblockd/shell-history")
    monkeypatch.setenv("XDG_STATE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", "/home/op")
    assert history_path() == Path("/home/op/.local/state/migblockd/shell-history")
    monkeypatch.delenv("XDG_STATE_HOME")
    assert history_path() == Path(os.path.expanduser("~/.local/state/migblockd/shell-history"))


def test_a_no_break_space_does_not_end_a_word(schema: Schema) -> None:
    # As the parser splits: only ASCII blanks end a word, so this is still the reason.
    assert not any(line.endswith("=") for line in applied(schema, "add-blocker reason=a\u00a0"))
    assert "add-blocker reason=a modes=" in applied(schema, "add-blocker reason=a ")
