"""migblock-shell input syntax: key=value, JSON values, quoting, dotted keys, raw JSON."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from migblockd.config import Config
from migblockd.contract import Contract
from migblockd.shell.entries import MAX_CHARS, MAX_LINES, Entries, entered_commands
from migblockd.shell.render import Renderer
from migblockd.shell.schema import Schema
from migblockd.shell.syntax import MAX_LINE, Help, Nothing, Request, parse_line
from migblockd.shell.words import ParseError, tokenize


def args(line: str, schema: Schema | None = None) -> dict[str, Any]:
    parsed = parse_line(line, schema.hint if schema is not None else None)
    assert isinstance(parsed, Request)
    assert not parsed.raw
    result: dict[str, Any] = parsed.message.get("arguments", {})
    return result


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema(Contract.load().introspection)


def test_command_without_arguments_has_no_arguments_member() -> None:
    assert parse_line("query-blockers") == Request({"execute": "query-blockers"})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42),
        ("-1.5", -1.5),
        ("true", True),
        ("false", False),
        ("null", None),
        ("hello", "hello"),
        # What qmp-shell takes for a boolean or an integer, and JSON does not.
        ("True", True),
        ("FALSE", False),
        ("+5", 5),
        ("007", 7),
        ("1_000", 1000),
        ("None", "None"),  # a Python literal only inside brackets, as in qmp-shell
        ("\u0663", "\u0663"),  # int() reads an ARABIC-INDIC DIGIT THREE: not here
        ("NaN", "NaN"),  # not JSON
        ("Infinity", "Infinity"),
        ("", ""),
        ('[1,"a",{"b":null}]', [1, "a", {"b": None}]),
        ('{"x":[1,2]}', {"x": [1, 2]}),
    ],
)
def test_value_is_json_when_it_parses_as_json_else_string(text: str, value: Any) -> None:
    assert args(f"cmd k={text}") == {"k": value}


def test_json_value_may_contain_spaces_and_brackets_in_strings() -> None:
    line = 'cmd a=[ "x y", "]" ] b={"k": "} {"} c=1'
    assert args(line) == {"a": ["x y", "]"], "b": {"k": "} {"}, "c": 1}


def test_invalid_json_value_is_an_error_that_says_how_to_send_a_string() -> None:
    with pytest.raises(ParseError, match="quote it to send a string"):
        parse_line("cmd reason=[WIP]")
    assert args("cmd reason='[WIP] disk'") == {"reason": "[WIP] disk"}


@pytest.mark.parametrize(("value", "expected"), [
    ("{'a': True, 'b': [None, False, 'x ]'], \"c\": -1.5}",
     {"a": True, "b": [None, False, "x ]"], "c": -1.5}),
    ("[true, false, null, 'it\\'s']", [True, False, None, "it's"]),  # qmp-shell's FuzzyJSON
    ("[(1, 2), +3]", [[1, 2], 3]),
])
def test_a_python_literal_is_taken_where_json_is_not(value: str, expected: Any) -> None:
    # qmp-shell reads a bracketed value that is not JSON as a Python literal.
    assert args(f"cmd k={value}") == {"k": expected}


@pytest.mark.parametrize(("value", "why"), [
    ("{'a': 1, 'a': 2}", "invalid value {'a': 1, 'a': 2}: duplicate key 'a'"),
    ("['a', -1e400]", "invalid value ['a', -1e400]: number 1e400 is out of range"),
    ("{1, 2}", "invalid value {1, 2}: {1, 2} is a set, not a JSON value"),
    ("{1: 'a'}", "invalid value {1: 'a'}: key 1 is not a string"),
    ("[b'x']", "invalid value [b'x']: b'x' is not a JSON value"),
    # Neither JSON nor a literal (no name is evaluated): JSON's reason.
    ("[x for x in y]", "invalid JSON value [x for x in y]: Expecting value"),
    ("[__import__('os')]", "invalid JSON value [__import__('os')]: Expecting value"),
])
def test_a_python_literal_json_cannot_say_as_typed_is_refused(value: str, why: str) -> None:
    with pytest.raises(ParseError) as refused:
        parse_line(f"cmd k={value}")
    assert str(refused.value).startswith(f"'k': {why}")


def test_an_invalid_json_list_says_how_to_write_a_list() -> None:
    # Quoting it, as the general hint said, sends one string the daemon refuses.
    with pytest.raises(ParseError) as bad:
        parse_line("add-blocker reason=x modes=[normal]",
                   lambda command, path, given: "list-of-strings")
    assert str(bad.value).endswith(
        "(write the list as modes=a,b, or as JSON with its strings quoted, "
        'modes=["a", "b"])')


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("cmd reason='two words'", {"reason": "two words"}),
        ('cmd reason="two words"', {"reason": "two words"}),
        ('cmd reason="say \\"hi\\" \\\\ ok"', {"reason": 'say "hi" \\ ok'}),
        ("cmd reason=two\\ words", {"reason": "two words"}),
        ("cmd reason=it\\'s", {"reason": "it's"}),
        ("cmd reason='a \"b\"'", {"reason": 'a "b"'}),
        ('cmd "reason=x y"', {"reason": "x y"}),
        ("cmd reason=a'b c'd", {"reason": "ab cd"}),
        ("cmd reason=x=y", {"reason": "x=y"}),
        # Escapes read left to right, in pairs: outside quotes any character, inside
        # "..." only \" and \\ (the backslash is kept before any other).
        ("cmd reason=a\\\\\\ b\\=c", {"reason": "a\\ b=c"}),
        ('cmd reason="a\\\\\\"b\\x\\\\"', {"reason": 'a\\"b\\x\\'}),
        ("cmd re\\=ason=x", {"re=ason": "x"}),
        ("cmd reason=\\[1]", {"reason": "[1]"}),
        # A quoted value is always a string, even when it looks like JSON.
        ('cmd id="42"', {"id": "42"}),
        ("cmd flag='true'", {"flag": "true"}),
        ("cmd list='[1]'", {"list": "[1]"}),
    ],
)
def test_shell_quoting(line: str, expected: dict[str, Any]) -> None:
    assert args(line) == expected


def test_list_advice_is_for_lists_of_names_only(schema: Schema) -> None:
    # A list of objects written as a list of names would not do either: the
    # advice was "write the list as capabilities=a,b".
    for value in ('[{"capability":"events","capability":"events"}]',
                  '[{capability: "events", "state": true}]'):
        with pytest.raises(ParseError) as bad:
            parse_line(f"migrate-set-capabilities capabilities={value}", schema.hint)
        assert "write the list" not in str(bad.value)
        assert "quote it" not in str(bad.value)
    assert str(bad.value) == (
        """'capabilities': invalid JSON value [{capability: "events", "state": true}]: """
        "Expecting property name enclosed in double quotes: line 1 column 3 (char 2)")


def test_quoted_reason_keeps_no_quote_characters() -> None:
    # qmp-shell sends '"SEV: no"' (with the quotes) for this line.
    assert args('add-blocker reason="SEV: no migration"') == {"reason": "SEV: no migration"}


@pytest.mark.parametrize("line", ["cmd reason='open", 'cmd reason="open', "cmd a=\\", "cmd a=[1,"])
def test_unterminated_quotes_are_errors(line: str) -> None:
    with pytest.raises(ParseError):
        parse_line(line)


def test_dotted_keys_build_nested_objects() -> None:
    assert args("cmd a.b=1 a.c=2") == {"a": {"b": 1, "c": 2}}


def test_arguments_after_a_dotted_key_stay_at_the_top_level() -> None:
    # qmp-shell's _cli_expr descends into "a" and never comes back up, giving
    # {"a": {"b": 1, "d": 3, "c": {"x": 4}}}.
    assert args("cmd a.b=1 d=3 c.x=4 e=5") == {"a": {"b": 1}, "d": 3, "c": {"x": 4}, "e": 5}


def test_dotted_keys_nest_deeply_and_merge() -> None:
    line = "cmd a.b.c=1 a.b.d=x a.e=[1] f=null"
    assert args(line) == {"a": {"b": {"c": 1, "d": "x"}, "e": [1]}, "f": None}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("cmd a=1 a=2", "'a' is given more than once"),
        ("cmd a=1 a.b=2", "'a' is given a value and also used for 'a.b'"),
        ("cmd a.b=2 a=1", "'a' is given a value and also used for 'a.b'"),
        ("cmd a.b.c=1 a.b=2", "'a.b' is given a value and also used for 'a.b.c'"),
        ("cmd a..b=1", "empty name"),
        ("cmd .a=1", "empty name"),
        ("cmd a.=1", "empty name"),
        ("cmd =1", "missing key"),
        ("cmd value", "expected key=value, got 'value'"),
        ("a=1", "expected a command name first"),
        ('cmd a=[1] b="x', 'unterminated " quote'),
        ("cmd a=[1]x", "unexpected text after the JSON value of 'a'"),
    ],
)
def test_bad_lines_give_one_line_errors(line: str, message: str) -> None:
    with pytest.raises(ParseError) as info:
        parse_line(line)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_line_of_a_hundred_thousand_keys_is_built_whole() -> None:
    # Found by review: each key was compared with every key before it, so such a
    # line (pasted, about 1 MB, within MAX_LINE) held the shell for minutes, deaf
    # to Ctrl-C.
    count = 70_000
    keys = " ".join(f"k{i}.v={i}" for i in range(count))
    assert args(f"cmd {keys}") == {f"k{i}": {"v": i} for i in range(count)}
    for tail, message in [(f"k{count - 1}.v=0", f"'k{count - 1}.v' is given more than once"),
                          ("k7=0", "'k7' is given a value and also used for 'k7.v'"),
                          ("k7.v.w=0", "'k7.v' is given a value and also used for 'k7.v.w'")]:
        with pytest.raises(ParseError) as info:
            parse_line(f"cmd {keys} {tail}")
        assert str(info.value) == message


def test_a_line_of_words_past_the_daemons_default_request_size_is_refused_unread() -> None:
    # Found by the shell review: a 50 MB pasted line took 90 s to split into words,
    # a character at a time.  The bound is the daemon's own default.
    assert Config().max_message_size == MAX_LINE
    with pytest.raises(ParseError) as info:
        parse_line("add-blocker" + " a=b" * (MAX_LINE // 4))
    assert str(info.value).startswith(
        f"a line of {MAX_LINE + 11:,} characters is more than the 1,048,576 this shell "
        "reads as key=value words")
    # Within it, a line of one long value is read whole, escapes and all.
    reason = "x\\ y'z'" * (MAX_LINE // 10)
    assert args(f"add-blocker reason={reason} id=\"{'q' * 1000}\"") == {
        "reason": "x yz" * (MAX_LINE // 10), "id": "q" * 1000}
    # Raw JSON is sent as typed, whatever its size: the daemon judges it.
    raw = parse_line(json.dumps({"execute": "add-blocker", "arguments": {"reason": reason}}))
    assert isinstance(raw, Request) and raw.message["arguments"]["reason"] == reason


def test_a_key_of_a_hundred_thousand_parts_is_built_whole() -> None:
    # Found by review of the fix above: keeping every prefix of a key as a tuple
    # made one long dotted key quadratic (6.8 s and 1.6 GB for 20,000 parts).
    depth = 100_000
    built = args(f"cmd {'.'.join(['m'] * depth)}=1 n=2")
    assert built["n"] == 2
    node = built["m"]
    for _ in range(depth - 2):
        assert isinstance(node, dict) and list(node) == ["m"]
        node = node["m"]
    assert node == {"m": 1}
    deep = ".".join(["m"] * 50)
    shown = deep[:77] + "..."  # a key longer than a message quotes whole is cut
    with pytest.raises(ParseError) as info:
        parse_line(f"cmd {deep}=1 m.m=2")
    assert str(info.value) == f"'m.m' is given a value and also used for '{shown}'"
    with pytest.raises(ParseError) as info:
        parse_line(f"cmd m.m=2 {deep}=1")
    assert str(info.value) == f"'m.m' is given a value and also used for '{shown}'"


def test_raw_json_line_is_sent_as_is() -> None:
    line = ' {"execute": "add-blocker", "arguments": {"reason": "x"}, "id": [1]}'
    assert parse_line(line) == Request(
        {"execute": "add-blocker", "arguments": {"reason": "x"}, "id": [1]}, text=line.strip()
    )


def test_raw_json_is_not_validated_locally() -> None:
    # The daemon is the judge of what a request may contain.
    parsed = parse_line('{"execute": 42, "foo": 1}')
    assert parsed == Request({"execute": 42, "foo": 1}, text='{"execute": 42, "foo": 1}')


@pytest.mark.parametrize("text", [
    '{"execute":"query-version","arguments":{"a":0e5}}',  # Python's 0.0; QEMU's error
    '{ "id" : 1E2 ,\t"execute" :"query-version"}',
    '{"execute": "x", "arguments": {"b": 1.50, "a": -0, "c": "\\u00e9\\/"}}',
    '{\n    "execute": "query-blockers",\r\n    "id": 7\n}',
    '{"execute": "x", "id": "\\ud800"}',  # a lone surrogate, escaped: for the daemon to judge
])
def test_raw_json_is_sent_as_typed_whitespace_order_and_numbers_included(text: str) -> None:
    # Found by review: the request was parsed and written again, so {"a": 0e5}, which
    # the daemon refuses as QEMU does, went as {"a": 0.0}, and "id": 1E2 as 100.0.
    parsed = parse_line(f"  {text}  ")
    assert isinstance(parsed, Request) and parsed.raw
    assert parsed.text == text
    assert parsed.message == json.loads(text)


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"execute": ', "invalid JSON"),
     ('{"a": NaN}', "invalid JSON: NaN is not JSON"),
     ('{"a": 1, "a": 2}', "invalid JSON: duplicate key 'a'"),
     ('{"a": 1e400}', "invalid JSON: number 1e400 is out of range"),
     ('{"a": ' + "1" * 5000 + "}", "invalid JSON: an integer of 5,000 digits"),
     ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "invalid JSON: nested too deeply"),
     ('{"a": 1} {"b": 2}', "invalid JSON: Extra data"),
     ('{"a": 01}', "invalid JSON"),
     ('{"a": "\x01"}', "invalid JSON: Invalid control character"),
     ('{"a": 1}\udcff', "not valid UTF-8"),
     ('{"a": "\udcff"}', "not valid UTF-8")],
)
def test_raw_json_errors(line: str, message: str) -> None:
    # What the shell refused before it sent raw JSON as typed, it still refuses.
    with pytest.raises(ParseError, match=re.escape(message)):
        parse_line(line)


def test_help_empty_and_comment_lines() -> None:
    assert parse_line("help") == Help(None)
    assert parse_line("  help add-blocker ") == Help("add-blocker")
    assert parse_line("") == Nothing()
    assert parse_line("   ") == Nothing()
    assert parse_line("# a comment") == Nothing()
    with pytest.raises(ParseError, match="usage: help"):
        parse_line("help a b")


def test_schema_keeps_string_arguments_strings(schema: Schema) -> None:
    assert args("add-blocker reason=1234 id=true", schema) == {"reason": "1234", "id": "true"}
    # qmp-shell would send id=True as a boolean, which the daemon refuses.
    assert args("add-blocker reason=+5 id=True", schema) == {"reason": "+5", "id": "True"}
    assert args("add-blocker reason=x internal=FALSE", schema)["internal"] is False
    # Arguments that are not strings are still converted.
    assert args("add-blocker reason=x internal=true", schema) == {
        "reason": "x",
        "internal": True,
    }


def test_schema_splits_unquoted_list_arguments_at_commas(schema: Schema) -> None:
    assert args("add-blocker reason=x modes=normal,cpr-reboot", schema)["modes"] == [
        "normal",
        "cpr-reboot",
    ]
    assert args("add-blocker reason=x modes=normal", schema)["modes"] == ["normal"]
    assert args("add-blocker reason=x modes=", schema)["modes"] == []
    # The JSON form works too, with or without spaces.
    assert args('add-blocker reason=x modes=["normal", "cpr-exec"]', schema)["modes"] == [
        "normal",
        "cpr-exec",
    ]


def test_without_schema_comma_lists_are_plain_strings() -> None:
    assert args("add-blocker modes=normal,cpr-reboot") == {"modes": "normal,cpr-reboot"}


def test_unknown_commands_and_arguments_get_plain_rules(schema: Schema) -> None:
    assert args("add-blocker bogus=12", schema) == {"bogus": 12}
    assert args("no-such-command reason=12", schema) == {"reason": 12}


def test_partial_tokenize_reports_what_is_open() -> None:
    words = tokenize('add-blocker reason="half', partial=True)
    assert [w.open for w in words] == [None, '"']
    assert words[1].key == "reason"
    assert words[1].value == "half"
    words = tokenize('x modes=["normal", "cp', partial=True)
    assert words[-1].open == "json"
    assert words[-1].json


@pytest.mark.parametrize(("line", "why"), [
    # Python would send these on changed: Infinity (not JSON), and the last "id".
    ('{"execute": "query-version", "id": 1e400}', "invalid JSON: number 1e400 is out of range"),
    ('{"execute": "query-version", "id": 1, "id": 2}', "invalid JSON: duplicate key 'id'"),
    ('migrate-set-parameters x={"a": 1, "a": 2}', "duplicate key 'a'"),
    # A byte that is not UTF-8, as Python reads it from a terminal or a script.
    (b"add-blocker reason=\xff".decode("utf-8", "surrogateescape"),
     "not valid UTF-8 (byte 0xff at column 20)"),
    # A request pretty-printed over lines is one entry: the byte's own line is named.
    (b'{"execute": "add-blocker",\n "arguments": {"reason": "\xff"}}'.decode(
        "utf-8", "surrogateescape"), "not valid UTF-8 (byte 0xff at line 2 column 27)"),
])
def test_what_cannot_be_sent_as_typed_is_refused(line: str, why: str) -> None:
    with pytest.raises(ParseError) as refused:
        parse_line(line)
    assert why in str(refused.value)


def test_the_renderer_escapes_what_would_steer_the_terminal() -> None:
    shown = Renderer().json({"reason": "a\x9b2Jb\u202ec\u00e9\x1b[0m"})
    assert shown == '{"reason": "a\\u009b2Jb\\u202ec\u00e9\\u001b[0m"}'
    assert all(ord(c) < 0x7F or c == "\u00e9" for c in shown)


@pytest.mark.parametrize("reason", [
    "vf\u200bio",          # zero-width space: two ids that look the same
    "\ufeffdump",          # byte order mark
    "a\u061cb\u2060c",     # Arabic letter mark, word joiner
    "tag\U000e0041",       # an invisible tag character, outside the BMP
    "lone \ud800 half",    # a lone surrogate (json.loads makes them)
    "nb\u00a0sp",          # a no-break space looks like a space
])
@pytest.mark.parametrize("pretty", [False, True])
def test_the_renderer_shows_invisible_characters_escaped(reason: str, pretty: bool) -> None:
    value = {"id": reason, "list": [reason]}
    shown = Renderer(pretty=pretty).json(value)
    assert shown.replace("\n", "").isprintable()
    assert "\\u" in shown
    assert json.loads(shown) == value  # still the JSON the daemon sent
    shown.encode("utf-8")  # printable: no lone surrogate left to fail the terminal


@pytest.mark.parametrize(("entered", "commands"), [
    ("query-version", ["query-version"]),
    ('{"execute": "x"} trailing', ['{"execute": "x"} trailing']),  # one line: as typed
    ("a\nb x=1\n", ["a", "b x=1", ""]),
    ('{\n "execute": "q"\n}\nnext', ['{\n "execute": "q"\n}', "next"]),
    # Its brace never closes: the line alone, for its error; the next runs.
    ('{"execute":\nnext\nlast', ['{"execute":', "next", "last"]),
    # Closed but not JSON: the whole of it, for its error.
    ('{\n "execute": "q",,\n}\nnext', ['{\n "execute": "q",,\n}', "next"]),
    ('{\n "a": "}{\\""\n}\nnext', ['{\n "a": "}{\\""\n}', "next"]),  # in strings
])
def test_what_is_entered_at_once_is_split_into_commands(entered: str,
                                                        commands: list[str]) -> None:
    assert entered_commands(entered) == commands


def test_entries_number_each_command_by_its_first_line() -> None:
    entries = Entries()
    assert entries.feed("query-version") == [(1, "query-version")]
    assert entries.feed("{") == []
    assert entries.feed(' "execute": "a\\') == []  # a backslash at the end of a line
    assert entries.feed('}"') == []  # escapes the line feed: still in the string
    assert entries.feed('}') == [(2, '{\n "execute": "a\\\n}"\n}')]
    assert entries.feed("next") == [(6, "next")]
    assert entries.end() == []


def test_a_brace_left_open_holds_at_most_max_lines_then_the_rest_is_read_again() -> None:
    entries = Entries()
    assert entries.feed('{"execute":') == []
    assert entries.feed("{") == []  # a request of its own, inside the first's window
    for _ in range(MAX_LINES - 2):
        assert entries.feed("x") == []
    # The first one's window is full: it is its line alone; the second opens again.
    assert entries.feed("}") == [(1, '{"execute":'), (2, "{\n" + "x\n" * (MAX_LINES - 2) + "}")]
    assert entries.feed("{") == []
    assert entries.end() == [(MAX_LINES + 2, "{")]


def test_a_brace_left_open_holds_at_most_max_chars() -> None:
    entries = Entries()
    assert entries.feed("{") == []
    assert entries.feed("a" * (MAX_CHARS // 2)) == []
    assert entries.feed("b" * (MAX_CHARS // 2)) == [
        (1, "{"), (2, "a" * (MAX_CHARS // 2)), (3, "b" * (MAX_CHARS // 2))]
