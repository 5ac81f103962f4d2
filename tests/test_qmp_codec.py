"""The streaming JSON framing: bytes in, messages or parse errors out."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import count_calls
from hypothesis import given, settings
from hypothesis import strategies as st

from migblockd.config import Config
from migblockd.qmp import characters, encoding, lexer, lexing, patterns, resync
from migblockd.qmp.encoding import Encoded, encode, encode_event, encode_line, encode_return
from migblockd.qmp.errors import NO_ID
from migblockd.qmp.framing import NEED_DATA, StreamDecoder
from migblockd.qmp.lexer import number_token
from migblockd.qmp.limits import Limits
from migblockd.qmp.wording import NESTING_EXCEEDED, TOKEN_SIZE_EXCEEDED, ParseError

CMD = b'{"execute": "query-blockers", "id": 1}'
CMD_VALUE = {"execute": "query-blockers", "id": 1}

LIMITS = Config().limits


def decode(*chunks: bytes, eof: bool = False, limits: Limits = LIMITS) -> list[object]:
    decoder = StreamDecoder(limits)
    out: list[object] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out.extend(decoder)
    if eof:
        decoder.feed_eof()
        out.extend(decoder)
    return out


def errors(items: list[object]) -> list[str]:
    return [item.desc for item in items if isinstance(item, ParseError)]


def values(items: list[object]) -> list[object]:
    return [item for item in items if not isinstance(item, ParseError)]


# -- framing --------------------------------------------------------------------


def test_message_complete_at_closing_brace_without_newline() -> None:
    assert decode(CMD) == [{"execute": "query-blockers", "id": 1}]


def test_glued_messages() -> None:
    assert decode(b'{"a": 1}{"b": 2}{"c": 3}') == [{"a": 1}, {"b": 2}, {"c": 3}]


def test_message_spanning_lines_and_writes() -> None:
    assert decode(b'{"execute":\n', b' "x",\r\n "id"', b": [1,\n2]}") == [
        {"execute": "x", "id": [1, 2]}
    ]


def test_brackets_and_escapes_inside_strings_do_not_count() -> None:
    msg = {"a": '}]{[\\"', "b": "\u00e9\U0001f600", "c": "\\u0041"}
    assert decode(json.dumps(msg).encode()) == [msg]
    assert decode(json.dumps(msg, ensure_ascii=False).encode()) == [msg]


def test_two_hundred_pipelined_in_one_chunk() -> None:
    data = b"".join(b'{"execute": "q", "id": %d}' % i for i in range(200))
    assert decode(data) == [{"execute": "q", "id": i} for i in range(200)]


def test_split_at_every_byte_offset() -> None:
    data = b'{"execute": "add-blocker", "arguments": {"reason": "a \\" }", "modes": ["normal"]}}'
    expected = decode(data)
    assert len(expected) == 1
    for cut in range(len(data) + 1):
        assert decode(data[:cut], data[cut:]) == expected, cut


def test_one_byte_at_a_time() -> None:
    data = CMD + b"\n" + b'{"x": [[], {}, "s\\\\"]}' + b"  42 \n"
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert decode(*chunks) == [{"execute": "query-blockers", "id": 1}, {"x": [[], {}, "s\\"]}, 42]


_messages = st.lists(
    st.one_of(
        st.just(CMD),
        st.just(b'{"execute": "x", "arguments": {"l": [1, {"k": "}"}]}}'),
        st.just(b"{bad json}"),
        st.just(b"}}\n"),
        st.just(b"[[[[\n"),
        st.just(b"\x04"),
        st.just(b"  \r\n\t"),
        st.just(b'"str"'),
        st.just(b"17 "),
        st.just(b'{"s": "line\nbreak"}'),
        st.just(b'{"execute": "x" garbage\n'),
        st.just(b'{"a":\n[1,\n2]}'),
        st.just(b'{"a":\n1 2,\n"b"}'),
        st.just(b'{"a": NaN,\n"b": 1}'),
        st.just(b'{"x": [1,\n}\n'),
        st.just(b'{"a": "\xff"}'),
        st.just(b'{"a": "x\r\n"}'),
        st.just(b'"\n"'),
        st.just(b"\xff"),
        st.just(b"a \xfe"),
        st.just(b"garbage"),
        st.just(b" \t"),
        st.just(b"{"),
        st.just(b"\n"),
        # Garbage QEMU's lexer reads token by token: an array it begins, a "{"
        # in a string or in a number's error, a bracket left open.
        st.just(b"x["),
        st.just(b"]"),
        st.just(b"1."),
        st.just(b"-"),
        st.just(b"0e5 "),
        st.just(b'\x1b"{"'),
        st.just(b'"a\\q"'),
        st.just(b'{"a": [}'),
        st.just(b"+"),
        st.just(b"'{'"),
        st.just(b']"a\tb"'),
        st.just(b'x"ab\ncd"'),
        st.just(b"]" + b"1" * 80),
        st.just(b'{"a": 0'),
        st.just(b"123"),
        st.just(b".5e"),
        st.just(b"}"),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(_messages, st.data())
def test_any_chunking_gives_the_same_messages(parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode(*chunks, eof=True) == decode(stream, eof=True)


@pytest.mark.parametrize("data", [
    b'{"a": -\xc3\xa9}', b'[1.\xe2\x82\xac]', b'{"a": 1e\xf0\x9f\x98\x80}', b"-\xc3\xa9",
    b"1e+\xe2\x82\xac",
], ids=repr)
def test_a_number_cut_short_by_a_character_that_is_not_ascii_is_worded_however_split(
        data: bytes) -> None:
    # QEMU's lexer reads bytes: the token ends at the character's first byte,
    # which is what a read that ends there shows too (tests/test_qemu_wording.py).
    whole = decode(data + CMD, eof=True)
    assert errors(whole)[0].endswith("\ufffd'"), whole
    assert values(whole) == [CMD_VALUE]
    for cut in range(1, len(data)):
        assert decode(data[:cut], data[cut:] + CMD, eof=True) == whole, cut


class StepByStep(StreamDecoder):
    """Garbage at the top level skipped a byte at a time, as QEMU's lexer reads it
    (``qobject/json-lexer.c``): to the next "{" or "[" it reads as a token, line
    feed or reset byte (that reset byte's own state, and on); keywords, numbers
    (their error taking the byte it failed at) and strings read whole (a control
    character, a line feed too, breaks one: the lexer's error); after an error,
    skipping to a structural or control character (``IN_RECOVERY``)."""

    def _skip_garbage(self, buf: bytearray, n: int) -> bool:
        pos = self._scan
        state = "string" if self._in_string else "recovery" if self._recovering else "start"
        quote = self._quote
        token = pos
        while pos < n:
            c = buf[pos]
            if state == "recovery":
                if c in b"{}[],:\r\n" or c in _STEP_RESETS:
                    self._recovering = False
                    state = "start"
                    continue
            elif state == "start":
                if c in b"{[\n" or c in _STEP_RESETS:
                    self._resync_at(buf, pos)
                    return True
                token = pos
                if c in b"\"'":
                    state, quote = "string", c
                elif 0x61 <= c <= 0x7A:
                    state = "keyword"
                elif c in b"-0123456789":
                    state = "number"
                elif c not in b" \t\r}],:":
                    state = "recovery"  # a byte no token begins with
            elif state == "keyword":
                if not 0x61 <= c <= 0x7A:
                    state = "start"
                    continue
            elif state == "number":
                found = number_token(bytes(buf[token : pos + 1]))
                if found is not None:
                    ended, failed = found
                    state = "recovery" if failed else "start"
                    pos = token + ended
                    if failed and buf[pos - 1] in _STEP_RESETS:
                        state, pos = "start", pos - 1  # a reset byte is one wherever it is
                    continue
            elif state == "string":
                if c == quote:
                    state = "start"
                elif c == 0x5C:
                    state = "escape"
                elif c < 0x20 or c > 0xFD:
                    # A reset byte is one wherever it is; a tab, a carriage
                    # return or a line feed is the lexer's error.
                    state = "start" if c in _STEP_RESETS else "recovery"
                    if state == "start":
                        continue
            elif state == "escape":
                state = "string" if 0x20 <= c <= 0xFD else "start" if (
                    c in _STEP_RESETS) else "recovery"
                if state == "start":
                    continue
            pos += 1
        self._in_string = state in ("string", "escape")
        self._quote = quote
        self._recovering = state == "recovery"
        # Where to go on: at a keyword or number that may go on, or at the
        # backslash of an escape that does.
        self._scan = token if state in ("keyword", "number") else n - (state == "escape")
        return False


_STEP_RESETS = frozenset(bytes(range(0x20)) + b"\xfe\xff") - frozenset(b"\t\r\n")


def decode_with(decoder: StreamDecoder, *chunks: bytes) -> list[object]:
    out: list[object] = []
    for chunk in chunks:
        decoder.feed(chunk)
        out.extend(decoder)
    decoder.feed_eof()
    out.extend(decoder)
    return out


@settings(max_examples=300, deadline=None)
@given(_messages, st.data())
def test_garbage_and_reset_bytes_are_skipped_in_one_search_as_step_by_step(
        parts: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decode_with(StreamDecoder(LIMITS), *chunks) == decode_with(StepByStep(LIMITS), *chunks)


def test_garbage_between_reset_bytes_takes_one_search(monkeypatch: pytest.MonkeyPatch) -> None:
    # Step by step, "\xffa" over and over cost a loop iteration per reset byte:
    # 0.2 s of the only thread for one 256 KiB read.
    resyncs = count_calls(monkeypatch, StreamDecoder, "_resync_at")
    out = decode(b"\xffa" * 100_000 + CMD)
    assert errors(out) == ["JSON parse error, stray '\ufffd'"]
    assert out[1:] == [{"execute": "query-blockers", "id": 1}]
    assert len(resyncs) <= 2


# Characters QEMU takes (no surrogates; noncharacters are among the unassigned).
_CHARACTERS = st.characters(exclude_categories=("Cs", "Cn"))


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(_CHARACTERS),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(_CHARACTERS, max_size=5), children, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_round_trip_of_any_json_object(value: object) -> None:
    message = {"execute": "x", "arguments": {"v": value}}
    raw = json.dumps(message).encode()
    assert decode(raw) == [message]
    assert decode(raw[:-1], raw[-1:]) == [message]


# -- top-level values that are not objects ----------------------------------------------


def test_scalars_are_messages_once_delimited() -> None:
    assert decode(b'42 "x" null true [1]') == [42, "x", None, True, [1]]
    assert decode(b"42") == []  # a number may go on
    assert decode(b"42", eof=True) == [42]


@pytest.mark.parametrize("cut", [b"1e+", b"-", b"1."])
def test_the_byte_that_cuts_a_number_short_goes_with_it(cut: bytes) -> None:
    # QEMU's lexer takes the byte it fails at into the stray token
    # (qobject/json-lexer.c): the "{" of "1e+{" begins no request.
    stream = cut + CMD + b"\n" + CMD.replace(b"1}", b"2}")
    whole = decode(stream)
    assert whole == [ParseError(f"JSON parse error, stray '{cut.decode()}{{'"),
                     {"execute": "query-blockers", "id": 2}]
    for at in range(1, len(stream)):
        assert decode(stream[:at], stream[at:]) == whole, at


@pytest.mark.parametrize("reset", [b"\x00", b"\x1b", b"\x0c", b"\xff"])
@pytest.mark.parametrize(("token", "desc"), [
    (b"x", "JSON parse error, invalid keyword 'x'"),
    (b"tru", "JSON parse error, invalid keyword 'tru'"),
    (b"1e400", "JSON parse error, number out of range"),
])
def test_a_reset_byte_after_a_bad_token_is_an_error_of_its_own(token: bytes, desc: str,
                                                               reset: bytes) -> None:
    # QEMU's lexer ends a keyword or a whole number at any byte, and its parser
    # answers it; the reset byte is then read afresh, an error of its own.  The
    # reset took the token's error with it, as if it had cut a number short.
    stream = token + reset + CMD
    whole = decode(stream)
    assert whole == [ParseError(desc), ParseError(lexer.stray(reset)), CMD_VALUE]
    for at in range(1, len(stream)):
        assert decode(stream[:at], stream[at:]) == whole, at


@pytest.mark.parametrize("cut", [b"1e+", b"1e-", b"-", b"1.", b"1e", b"-0.5E"])
def test_a_number_the_end_of_input_cuts_short_is_named_whole(cut: bytes) -> None:
    # Where the input ends, QEMU's lexer (json_lexer_flush(), qobject/json-lexer.c)
    # fails on a number that cannot end there with the token so far, as a byte
    # that cuts it short would: "1e+" is "stray '1e+'", not "1e" nor "expecting value".
    whole = [ParseError(f"JSON parse error, stray '{cut.decode()}'")]
    assert decode(cut, eof=True) == whole
    assert decode(CMD + cut, eof=True) == [CMD_VALUE, *whole]
    for at in range(1, len(cut)):
        assert decode(cut[:at], cut[at:], eof=True) == whole, at


@pytest.mark.parametrize(("data", "desc"), [
    (b"@", "stray '@'"), (b"+", "stray '+'"), (b"T", "stray 'T'"), (b"01", "stray '01'"),
    (b"\x80", "stray '\ufffd'"),
])
def test_a_token_that_cannot_go_on_is_answered_without_waiting(data: bytes, desc: str) -> None:
    # QEMU's lexer (qobject/json-lexer.c) fails on a byte no token can start or go on
    # with the moment it reads it; only a keyword or a number waits for its delimiter.
    assert errors(decode(data)) == ["JSON parse error, " + desc]
    assert decode(b"12x") == [12]  # "12" is over, "x" may be a keyword
    assert decode(b"xY") == [ParseError("JSON parse error, invalid keyword 'x'"),
                             ParseError("JSON parse error, stray 'Y'")]
    for waits in (b"x", b"nul", b"-", b"1.", b"1e+", b"0"):
        assert decode(waits) == []


def test_a_long_number_is_not_relexed_at_each_read(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether a number may go on is asked at every read while it arrives; lexing it
    # again character by character each time made 1 MiB in 512-byte reads cost
    # minutes of the event loop.  The work must stay linear in its length.
    looked_at = count_calls(monkeypatch, lexer, "_number_class")
    data = b"-1" + b"2" * 60_000 + b".5e+7"
    chunks = [data[i : i + 512] for i in range(0, len(data), 512)]
    assert decode(*chunks) == []  # still waiting for its delimiter
    assert decode(*chunks, b" ") == [ParseError("JSON parse error, number out of range")]
    assert len(looked_at) <= 2 * len(data)


def test_a_request_that_is_not_ascii_is_not_checked_escape_by_escape(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Every request with a character beyond ASCII is searched for what QEMU takes
    # for no character; looking at each of its escapes in Python cost ten times
    # its decoding.  Only escapes that may be a surrogate or a noncharacter count.
    looked_at = count_calls(monkeypatch, characters, "_code_point")
    text = "é" + "\\n" * 10_000 + "\\u0041" * 10_000 + "\\\\uffff" + "\\ud83d\\ude00"
    data = ('{"id": "' + text + '"}').encode()
    assert decode(data) == [json.loads(data)]
    assert len(looked_at) <= 2  # the pair


# -- parse errors: wording -------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "desc"),
    [
        (b'{"a" 1}', "JSON parse error, missing : in object pair"),
        (b'{"a": 1 "b": 2}', "JSON parse error, expected separator in dict"),
        (b'{"a": [1 2]}', "JSON parse error, expected separator in list"),
        (b'{"a": }', "JSON parse error, expecting value"),
        (b'{"a": 1,}', "JSON parse error, expecting value"),
        (b'{"a": [1,]}', "JSON parse error, expecting value"),
        (b'{"a": x}', "JSON parse error, invalid keyword 'x'"),
        (b'{"a": tru}', "JSON parse error, invalid keyword 'tru'"),
        (b"{1: 2}", "JSON parse error, key is not a string in object"),
        (b'{"a": 1, "a": 2}', "JSON parse error, duplicate key"),
        (b'{"a": "\\x"}', "JSON parse error, invalid escape sequence in string"),
        (b'{"a": "\\u12g4"}', "JSON parse error, \\u12g4 is not a valid Unicode character"),
        # QEMU prints six characters of the client's own text from the backslash,
        # cut at the end of the string token (json-parser.c, parse_string()).
        (b'{"a": "\\ud800"}', "JSON parse error, \\ud800 is not a valid Unicode character"),
        (b'{"a": "\\uDC00x"}', "JSON parse error, \\uDC00 is not a valid Unicode character"),
        (b'{"a": "\\ud800\\u0041"}',
         "JSON parse error, \\ud800 is not a valid Unicode character"),
        (b'{"a": "ok\\ud83d\\ude00", "b": "\\udbff"}',
         "JSON parse error, \\udbff is not a valid Unicode character"),
        (b'{"a": "\\u12"}', 'JSON parse error, \\u12" is not a valid Unicode character'),
        # Noncharacters are no characters to QEMU either (util/unicode.c,
        # is_valid_codepoint()); a pair of escapes is shown whole.
        (b'{"a": "\\uFFFE"}', "JSON parse error, \\uFFFE is not a valid Unicode character"),
        (b'{"a": "\\ufdd0"}', "JSON parse error, \\ufdd0 is not a valid Unicode character"),
        (b'{"a": "\\udbff\\udfff"}',
         "JSON parse error, \\udbff\\udfff is not a valid Unicode character"),
        (b'{"a": "\xef\xbf\xbf", "b": "\\uffff"}',
         "JSON parse error, invalid UTF-8 sequence in string"),
        # Six bytes, not characters; what is not UTF-8 as U+FFFD, as QEMU 7.2 writes it.
        ('{"a": "\\u12é"}'.encode(), "JSON parse error, \\u12é is not a valid Unicode character"),
        (b'{"a": "\\u1\xc3"}', 'JSON parse error, \\u1\ufffd" is not a valid Unicode character'),
        # A leading surrogate then a bad escape: QEMU reads them as a pair, names the first.
        (b'{"a": "\\ud800\\u12G4"}', "JSON parse error, \\ud800 is not a valid Unicode character"),
        (b'{"a": "\\\\ud800\\u12"}', 'JSON parse error, \\u12" is not a valid Unicode character'),
        # What is not a character, as QEMU's JSON writer prints it: one U+FFFD a
        # sequence (qobject/json-writer.c, util/unicode.c mod_utf8_codepoint()).
        (b"\x80\n", "JSON parse error, stray '\ufffd'"),
        (b'{"execute": "x", \xc3 "id": 1}', "JSON parse error, stray '\ufffd'"),
        (b'{"a": "\xc3\xa9\xed\xa0\x80\xf8\x88\x80\x80\x80\xc0\x80\xef\xbf\xbf\xe2\x82\xfe"}',
         "JSON parse error, stray '\"\u00e9\ufffd\ufffd\x00\ufffd\ufffd\ufffd'"),
        (b'{"a": "\xc3("}', "JSON parse error, invalid UTF-8 sequence in string"),
        # As QEMU 7.2 answers each (its lexer's keywords are lower case, its numbers
        # strict; a token it cannot lex is "stray", the token so far included).
        (b'{"a": NaN}', "JSON parse error, stray 'N'"),
        (b'{"a": Infinity}', "JSON parse error, stray 'I'"),
        (b'{"a": -Infinity}', "JSON parse error, stray '-I'"),
        (b'{"a": True}', "JSON parse error, stray 'T'"),
        (b'{"a": xY}', "JSON parse error, stray 'Y'"),
        (b'{"a": truex}', "JSON parse error, invalid keyword 'truex'"),
        (b'{"a": 01}', "JSON parse error, stray '01'"),
        (b'{"a": -01}', "JSON parse error, stray '-01'"),
        (b'{"a": 1.}', "JSON parse error, stray '1.}'"),
        (b'{"a": 1E+}', "JSON parse error, stray '1E+}'"),
        (b'{"a": 1.5.}', "JSON parse error, stray '.'"),
        (b'{"a": 5-}', "JSON parse error, stray '-}'"),
        (b'{"a": --1}', "JSON parse error, stray '--'"),
        (b'{"a": +1}', "JSON parse error, stray '+'"),
        (b'{"a": .5}', "JSON parse error, stray '.'"),
        (b'{"a": 1, +}', "JSON parse error, stray '+'"),
        (b'[@]', "JSON parse error, stray '@'"),
        (b'{"a": 12x}', "JSON parse error, expected separator in dict"),
        (b'{"a": 0e5}', "JSON parse error, expected separator in dict"),
        (b'[-0e5]', "JSON parse error, expected separator in list"),
        (b'{"a": 0E5}', "JSON parse error, stray 'E'"),
        (b'{"a": 0e5e}', "JSON parse error, stray '5e}'"),
        # ... but its parser reads the strings before that 0 first.
        (b'["\\ud800", 0e5]', "JSON parse error, \\ud800 is not a valid Unicode character"),
        (b'{"\xef\xbf\xbf": 0e5}', "JSON parse error, invalid UTF-8 sequence in string"),
        # QEMU refuses a repeated key once it has read the pair's value, before
        # what comes after it; Python's json sees the keys when the object closes.
        (b'{"a": 1, "a": 0e5}', "JSON parse error, duplicate key"),
        (b'{"a": 1, "a": 2 3}', "JSON parse error, duplicate key"),
        (b'{"a": 1, "a": 2,}', "JSON parse error, duplicate key"),
        (b'{"a": 1, "a": 2, "b": }', "JSON parse error, duplicate key"),
        (b'{"a": 1, "a": 2, "b": "\\ud800" 3}', "JSON parse error, duplicate key"),
        (b'{"a": 1, "a": [1 2]}', "JSON parse error, expected separator in list"),
        (b'{"a": 1, "a": x}', "JSON parse error, invalid keyword 'x'"),
        (b'{"a": [], "a": truex}', "JSON parse error, invalid keyword 'truex'"),
        (b'{"a": 1, "a": nullx,\n "b": 2}', "JSON parse error, invalid keyword 'nullx'"),
        # ... in an object already closed in an array still open: QEMU's
        # parse_array() read that element whole before the next one.
        (b'{"id": [{"a": 1, "a": 2}, "\\uffff"]}', "JSON parse error, duplicate key"),
        (b'{"id": [[{"a": 1, "a": 2}], "\xef\xbf\xbf"]}', "JSON parse error, duplicate key"),
        (b'{"id": [{"a": 1, "a": 2} "\\ud800"]}', "JSON parse error, duplicate key"),
        (b'[{"a": 1, "a": 2}, "\\udc00"]', "JSON parse error, duplicate key"),
        (b'{"id": [{"a": "\\uffff", "a": 2}]}',
         "JSON parse error, \\uffff is not a valid Unicode character"),
        # QEMU parses only a complete message, lexing it as it comes: its lexer's
        # errors come first, wherever they are (qobject/json-streamer.c).
        (b'{"a": x, "b": 1.}', "JSON parse error, stray '1.}'"),
        (b'{"a" 1, "b": 01}', "JSON parse error, stray '01'"),
        (b'{"a": 1, "a": 2, "b": @}', "JSON parse error, stray '@'"),
        (b'{"execute": query-version", "id": "x"}\n', "JSON parse error, stray '-v'"),
        (b'{"a": [1 2], "b": -x\n', "JSON parse error, stray '-x'"),
        (b"01\n", "JSON parse error, stray '01'"),
        (b'{"a": 1e400}', "JSON parse error, number out of range"),
        # QEMU reads such a number as infinity and reads on: an error it finds
        # after it is the one named, in the message's lines too.
        (b'{"id": [1e400, "\xc3x"]}', "JSON parse error, invalid UTF-8 sequence in string"),
        (b'{"id": [-1e400 1]}', "JSON parse error, expected separator in list"),
        (b'{"id": [1e400, {"a": 1, "a": 2}]}', "JSON parse error, duplicate key"),
        (b'{"id": {"a": 1e400, "b": truex}}', "JSON parse error, invalid keyword 'truex'"),
        (b'{"id": [' + b"9" * 5000 + b" 1]}", "JSON parse error, expected separator in list"),
        (b'{"id": [1e400,\n truex]}\n', "JSON parse error, invalid keyword 'truex'"),
        (b'{"a": -1e400, "b": nul, "\\uffff": 1}', "JSON parse error, invalid keyword 'nul'"),
        (b'{"a": [1e400, 0e5], "\\uffff": 1}', "JSON parse error, expected separator in list"),
        (b'{"id": [1e400,\n 1]}\n', "JSON parse error, number out of range"),
        (b'{"a": "tab\there"}', "JSON parse error, stray '\"tab\t'"),
        (b"tru\n", "JSON parse error, invalid keyword 'tru'"),
        (b"}\n", "JSON parse error, expecting value"),
        (b"{'execute': 'x'}\n", "JSON parse error, single-quoted strings are not supported"),
        # An escape that is no character, before a byte that is not UTF-8 in the
        # same string: QEMU's parse_string() reads them in order.
        (b'{"id": "\x7f\\udc00\xc3x"}',
         "JSON parse error, \\udc00 is not a valid Unicode character"),
        (b'{"id": "\\\\x\\ufdd0\xc0\xafx"}',
         "JSON parse error, \\ufdd0 is not a valid Unicode character"),
        (b'{"id": "\\x\\udc00\xc3x"}', "JSON parse error, invalid escape sequence in string"),
        (b'{"id": "\\uD800\\u0041x", "execu\x80te": "x"}',
         "JSON parse error, \\uD800 is not a valid Unicode character"),
        (b'{"execute": {"k0": "\\uD800\\u0041x"}, "id": 1, "id": 2}',
         "JSON parse error, \\uD800 is not a valid Unicode character"),
        (b'{"id": [1e400, "\\uffff"]}',
         "JSON parse error, \\uffff is not a valid Unicode character"),
        (b'{false "execute": "nope"}', "JSON parse error, key is not a string in object"),
        (b'{"a": 1, null: 2}', "JSON parse error, key is not a string in object"),
        (b'{"execute": "x", "execute": "x", "arguments": ["\xc3x"]}',
         "JSON parse error, duplicate key"),
        (b'{"execute": "x", "execute": "x", "arguments": truex}',
         "JSON parse error, duplicate key"),
        (b'{"id": "\\\xc0\x80u"}', "JSON parse error, invalid escape sequence in string"),
        (b'{"a": [1 "\xc3"]}', "JSON parse error, expected separator in list"),
        # ... but a string that is no character before that key comes first, and
        # a key escaped as \' repeats its plain twin.
        (b'{"id": ["\\uffff", {"a": 1, "a": 2}, "\xc3x"]}',
         "JSON parse error, \\uffff is not a valid Unicode character"),
        (b'{"id": [{"k": "\\ud800", "a": 1, "a": 2}, "\xc3x"]}',
         "JSON parse error, \\ud800 is not a valid Unicode character"),
        (b'{"id": [{"a\\\'": 1, "a\'": 2}, "\xc3x"]}', "JSON parse error, duplicate key"),
        # ... after characters of more than a byte, too.
        (b'{"id": ["\xe4\xb8\xad\xe6\x96\x87", "\\ud800", "\xc3x"]}',
         "JSON parse error, \\ud800 is not a valid Unicode character"),
        (b'{"id": {"\xc3\xa9\xc3\xa9\xc3\xa9": "\\uffff", "k": "\xc3x"}}',
         "JSON parse error, \\uffff is not a valid Unicode character"),
        # ... in an unfinished message's lines too, checked at each line feed.
        (b'{"id": [{"\xc3": 0e5,\n "b": 1}]}\n',
         "JSON parse error, invalid UTF-8 sequence in string"),
        (b'{"id": [["\xc3x"],\n 1 2,\n 3]}\n',
         "JSON parse error, invalid UTF-8 sequence in string"),
        (b'{"id": [{"a": 0.5,\n "k": "\\uffff", "a": 1},\n 1]}\n',
         "JSON parse error, \\uffff is not a valid Unicode character"),
        (b'{"id": {"\xc0\x80": 1, "b": [,\n]}}\n', "JSON parse error, expecting value"),
        # C0 80 is U+0000 to QEMU, also where other bytes are not UTF-8.
        (b'{"id": {"\xc0\x80": "\\ud800", "k": "\xc3x"}}',
         "JSON parse error, \\ud800 is not a valid Unicode character"),
        (b'{"id": {"\xc0\x80": nul, "k": "\xc3x"}}', "JSON parse error, invalid keyword 'nul'"),
        (b'{"id": ["\xc0\x80", "\\q", "\xc3x"]}',
         "JSON parse error, invalid escape sequence in string"),
        # A lone surrogate named while a later \u escape is cut short: no crash
        # (it dropped the connection), and QEMU 7.2's words.
        (b'{"id": {"k0": "\\uD800\\u0041\\x41x", "k1":} true}',
         "JSON parse error, \\uD800 is not a valid Unicode character"),
        # A string that is not UTF-8 before a closer that does not match: QEMU's
        # parser reads it before it meets what is wrong with the message.
        (b'{"id\xc1" 1]', "JSON parse error, invalid UTF-8 sequence in string"),
        (b'{"a": "\xc3x" 1]', "JSON parse error, invalid UTF-8 sequence in string"),
        (b'["\xed\xa0\x80", 1}', "JSON parse error, invalid UTF-8 sequence in string"),
        (b'{"a" 1, "\xc1": 1]', "JSON parse error, missing : in object pair"),
        (b'{"a": "\\q\xc3x"]', "JSON parse error, invalid escape sequence in string"),
        (b'{"a": "\xc0\x80" 1]', "JSON parse error, expected separator in dict"),
    ],
)
def test_parse_error_wording(data: bytes, desc: str) -> None:
    assert decode(data) == [ParseError(desc)]


@pytest.mark.parametrize("bad", [
    b'{"id": "\\u", "x": "{"\n}',
    b'{"id": "\\u", "x": {\n}}',
    b'{"id": ["\\q"], "x": "]"\n}',
    b'{"id": "a\\u12", "x": "b"\n, "y": "{"}',
])
def test_a_bad_escape_on_a_line_of_a_message_takes_its_string_whole(bad: bytes) -> None:
    # The rest of the message was skipped from inside the string, whose closing
    # quote then opened one: the request glued after it went with it (or the
    # message's last closer got an error of its own).
    out = decode(bad + b'{"id": 2}')
    assert len(out) == 2 and isinstance(out[0], ParseError) and out[1] == {"id": 2}, out


@pytest.mark.parametrize("bad", [
    b'{"id": 1 2,\n "y": "\n"}',
    b'{"id": "\\q", "x": "b"\n, "y": "{\n"}',
    b'{"id": "a\\u12",\n "y": "x\n"}',
])
@pytest.mark.parametrize("split", [False, True])
def test_a_line_feed_in_a_string_of_a_skipped_rest_ends_the_skipping(bad: bytes,
                                                                     split: bool) -> None:
    # QEMU's lexer fails at the line feed and its streamer forgets the message;
    # the skipping went on after it, its quotes out of step with the request
    # glued after the message, which it swallowed up to the next line feed.
    data = bad + b'{"id": 2}'
    out = decode(*[data[i : i + 1] for i in range(len(data))]) if split else decode(data)
    assert len(out) == 2 and isinstance(out[0], ParseError) and out[1] == {"id": 2}, out


def test_valid_edge_values_are_accepted() -> None:
    assert decode(b'{"a": 1e300, "b": -0.5, "c": 18446744073709551615, "d": "\\ud83d\\ude00"}') == [
        {"a": 1e300, "b": -0.5, "c": 18446744073709551615, "d": "\U0001f600"}
    ]
    # An exponent after a fraction of a leading 0 is one, and a "0" in a string is no number.
    assert decode(b'{"a": 0.0e5, "b": -0.5E+1, "c": "0e5", "d": 10e-1}') == [
        {"a": 0.0, "b": -5.0, "c": "0e5", "d": 1.0}
    ]
    # C0 80, modified UTF-8's U+0000, is taken as QEMU takes it (mod_utf8_codepoint()).
    assert decode(b'{"a": "x\xc0\x80", "b": "\\\\\xc0\x80"}') == [{"a": "x\0", "b": "\\\0"}]


def test_an_escaped_apostrophe_is_an_apostrophe() -> None:
    # QEMU's parse_string() (qobject/json-parser.c) takes \' in any string.
    assert decode(b'{"a": "it\\\'s", "b\\\'": "\\\\\'"}') == [{"a": "it's", "b'": "\\'"}]
    assert decode(b'{"a\\\'": 1, "a\'": 2}') == [ParseError("JSON parse error, duplicate key")]
    # ... also where another error follows the repeated key: it comes first
    for after in (b'"\\uffff"', b"truex", b"[1 2]"):
        assert decode(b'{"a\\\'": 1, "a\'": 2, "b": ' + after + b"}") == [
            ParseError("JSON parse error, duplicate key")]
    assert decode(b'{"a\\\'": 1, "a\'": 2 "b": 1}') == [
        ParseError("JSON parse error, duplicate key")]
    # lines of an unfinished message with one are a valid beginning
    assert decode(b'{"a": "\\\'",\n', b'"b": 1}') == [{"a": "'", "b": 1}]


# -- one error per bad message, then resynchronisation ----------------------------------


def test_balanced_bad_message_then_glued_good_one() -> None:
    # qemu.qmp sends no newlines: a bad message must not swallow the next one
    assert decode(b'{"a" 1}' + CMD) == [
        ParseError("JSON parse error, missing : in object pair"),
        {"execute": "query-blockers", "id": 1},
    ]


@pytest.mark.parametrize("between", [b"\n", b" ", b"", b" {\n"])
def test_stray_closers_give_one_error_then_resync_at_a_request(between: bytes) -> None:
    # A request can start only with "{": garbage up to it (or to a line feed) is
    # one bad message, and a client that sends no line feeds is not cut off.  A
    # "{" in the garbage that runs on past a line feed was garbage too.
    assert decode(b"}}}]]] garbage" + between + CMD) == [
        ParseError("JSON parse error, expecting value"),
        {"execute": "query-blockers", "id": 1},
    ]


# What a client that sends no line feeds (qemu.qmp) may get wrong, each followed by
# the next request in a separate write: QEMU answers that request, and so must we.
BROKEN_WITHOUT_NEWLINE = [
    (b"}", "JSON parse error, expecting value"),
    (b",", "JSON parse error, expecting value"),
    (b"nope", "JSON parse error, invalid keyword 'nope'"),
    (b"NaN", "JSON parse error, stray 'N'"),
    (b"\xef\xbb\xbf", "JSON parse error, stray '\ufffd'"),
    (b"{'execute': 'x'}", "JSON parse error, single-quoted strings are not supported"),
    (b'{"execute": "query-version", "id": 0]',
     "JSON parse error, expected separator in dict"),
    (b'{"execute": "x", "arguments": {"a": [1}}, "id": 0}',
     "JSON parse error, expected separator in list"),
    (b'{"execute": "nope", "id": "a\x01b"}', 'JSON parse error, stray \'"a\x01\''),
    (b'{"execute": "nope", "id": "a\xffb"}', 'JSON parse error, stray \'"a\ufffd\''),
    (b'{"id": ' + b"[" * 70 + b"]" * 70 + b"}", "JSON nesting depth limit exceeded"),
    (b'{"id": "' + b"x]}" * 400_000 + b'"}', "JSON token size limit exceeded"),
    # QEMU's streamer forgets a message at its lexer's error, its open "[" too
    # (qobject/json-streamer.c), so the brackets after it balance nothing.
    (b'{"a": [+, "b": 1}', "JSON parse error, stray '+'"),
    (b'{"a": [01, \'x\'}', "JSON parse error, stray '01'"),
    (b'{"a": [{"b": 1.}', "JSON parse error, stray '1.}'"),
]


@pytest.mark.parametrize("bad,desc", BROKEN_WITHOUT_NEWLINE,
                         ids=[repr(b[:24])[2:-1] for b, _ in BROKEN_WITHOUT_NEWLINE])
def test_a_client_that_sends_no_newline_is_never_cut_off(bad: bytes, desc: str) -> None:
    items = decode(bad, CMD, CMD.replace(b"1}", b"2}"))
    assert [i for i in items if isinstance(i, ParseError)][:1] == [ParseError(desc)]
    assert values(items)[-2:] == [{"execute": "query-blockers", "id": 1},
                                  {"execute": "query-blockers", "id": 2}]


@pytest.mark.parametrize("bad", [
    b'{"execute": "query-version", "id": \'a]\'}',
    b'{"execute": "query-version", "id": [\'a]]}\', "b"]}',
    b"{'execute': 'query-version', 'id': '{[\\'}'}",
    b'{"id": [1, \'"]}\', "x\'"]}',
])
def test_brackets_in_a_single_quoted_string_do_not_end_the_message(bad: bytes) -> None:
    # QEMU's lexer reads a single-quoted string as a string (qobject/json-lexer.c):
    # the brackets in it count for nothing in its streamer, so the message ends at
    # its last "}", and one error answers it, however the input was split.  The
    # brackets in the string once ended it early, and its tail was a second error.
    stream = bad + CMD
    whole = decode(stream)
    assert whole == [ParseError("JSON parse error, single-quoted strings are not supported"),
                     CMD_VALUE]
    for at in range(1, len(stream)):
        assert decode(stream[:at], stream[at:]) == whole, at


@pytest.mark.parametrize(
    "bad",
    [
        b'{"execute": "query-version" garbage garbage',
        b'{"execute": "query-version", "id": 1 garbage',
        b'{"execute": "query-version" 1',
        b'{"a": {"b": 1, "b": 2},',
    ],
)
def test_unfinished_bad_message_resyncs_at_newline(bad: bytes) -> None:
    # the brackets never balance, but the line already shows the error
    items = decode(bad + b"\n" + CMD)
    assert len(errors(items)) == 1
    assert values(items) == [{"execute": "query-blockers", "id": 1}]


LINE_START_REQUEST = [
    # The unfinished message cannot go on with the "{" that begins the next
    # line: that is where a line-based client's next request is.
    (b'{"execute": "query-version",\n', "key is not a string in object"),
    (b'{"execute": "query-version"\n', "expected separator in dict"),
    (b"[1, 2\n", "expected separator in list"),
    (b'{"execute": "query-version", "arguments": {"a": [1\n', "expected separator in list"),
]


@pytest.mark.parametrize("bad,reason", LINE_START_REQUEST,
                         ids=[repr(b)[2:-1] for b, _ in LINE_START_REQUEST])
@pytest.mark.parametrize("newline", [b"", b"\n"], ids=["qemu.qmp", "line"])
def test_a_request_that_begins_a_line_runs_after_an_unfinished_message(
    bad: bytes, reason: str, newline: bytes,
) -> None:
    # With or without a line feed of its own, and however the input is split.
    data = bad + CMD + newline
    expected = [ParseError("JSON parse error, " + reason), {"execute": "query-blockers", "id": 1}]
    assert decode(data) == expected
    for cut in range(1, len(data)):
        assert decode(data[:cut], data[cut:]) == expected, cut
    assert decode(*[data[i : i + 1] for i in range(len(data))]) == expected


PRETTY = json.dumps({"execute": "migrate-set-capabilities", "arguments": {
    "capabilities": [{"capability": "events", "state": False}]}, "id": 1}, indent=2).encode()
#: One fault each in a pretty-printed request, and QEMU 7.2's one error for it:
#: its parser sees the message whole once its brackets balance.
PRETTY_FAULTS = [
    (PRETTY.replace(b'"events",', b'"events"'), "expected separator in dict"),
    (PRETTY.replace(b'"capability":', b'"capability"'), "missing : in object pair"),
    (PRETTY.replace(b"    ]\n", b"    ],\n"), "expecting value"),
    (PRETTY.replace(b'"state": false', b'"state": false nope'), "expected separator in dict"),
    (PRETTY.replace(b"\n    ]", b"\n    }"), "expected separator in list"),
    (PRETTY.replace(b"      }", b'      }\n      {"capability": "x"}'),
     "expected separator in list"),
    (PRETTY.replace(b'"execute"', b"'execute'"), "single-quoted strings are not supported"),
    (PRETTY.replace(b'"state": false', b'"state": ' + b"[" * 64 + b"\n"),
     "JSON nesting depth limit exceeded"),
]


@pytest.mark.parametrize("bad,reason", PRETTY_FAULTS, ids=[r for _, r in PRETTY_FAULTS])
def test_a_pretty_printed_bad_request_gets_one_error(bad: bytes, reason: str) -> None:
    # Its lines after the one with the error are skipped with it, up to its last
    # bracket, not answered each as garbage (a client that matches replies to
    # requests in order would misread every later reply), however split.
    data = bad + b"\n" + CMD
    prefix = "" if reason.startswith("JSON nesting") else "JSON parse error, "
    expected = [ParseError(prefix + reason), CMD_VALUE]
    assert decode(data) == expected
    for cut in range(1, len(data)):
        assert decode(data[:cut], data[cut:]) == expected, cut
    assert decode(*[data[i : i + 1] for i in range(len(data))]) == expected


def test_an_indented_brace_after_an_error_is_part_of_the_bad_message() -> None:
    # A pretty-printed request indents its inner lines: "{" there goes on with
    # it (the "," before it lost), and only a "{" at a line's start, where a
    # line-based client's next request begins, ends the skipping.
    bad = b'{"execute": "query-version", "arguments": {"a": [1\n  ' + CMD + b"\n"
    later = CMD.replace(b"1}", b"2}")
    assert decode(bad + later) == [ParseError("JSON parse error, expected separator in list"),
                                   {"execute": "query-blockers", "id": 2}]


def test_a_reset_byte_ends_the_skipping_of_a_bad_request_s_lines() -> None:
    bad = PRETTY.replace(b'"events",', b'"events"').split(b"      }")[0]
    assert decode(bad + b"     \x04" + CMD) == [
        ParseError("JSON parse error, expected separator in dict"), CMD_VALUE]


def test_a_brace_where_a_value_may_begin_continues_the_message() -> None:
    # Valid JSON so far: a multi-line request, not a new one (nor any error).
    assert decode(b'{"execute":\n' + CMD) == []
    assert decode(b'{"execute": "x", "arguments":\n{"a": 1}}') == [
        {"execute": "x", "arguments": {"a": 1}}]


def test_unfinished_good_lines_keep_waiting() -> None:
    assert decode(b'{"execute":\n"x",\n"arguments": {"a": [1,\n') == []
    assert decode(b'{"execute":\n"x",\n"arguments": {"a": [1,\n', b"2]}}") == [
        {"execute": "x", "arguments": {"a": [1, 2]}}
    ]


def test_mismatched_closer() -> None:
    items = decode(b'{"a": [1}, "b": 2}\n' + CMD)
    assert items == [
        ParseError("JSON parse error, expected separator in list"),
        {"execute": "query-blockers", "id": 1},
    ]


@pytest.mark.parametrize("broken", [b'{"a": {]', b'[{]]', b'{"a": {"b": [1, {]]'], ids=repr)
def test_a_message_ends_where_a_closer_takes_its_count_below_zero(broken: bytes) -> None:
    # As QEMU's streamer counts: "{" and "[" each on its own, and the message
    # is over once either is below zero, so a request glued after it runs
    # (qemu.qmp sends no line feeds).
    whole = decode(broken + CMD)
    assert len(errors(whole)) == 1 and values(whole) == [CMD_VALUE], whole
    stream = broken + CMD
    for cut in range(1, len(stream)):
        assert decode(stream[:cut], stream[cut:]) == whole, cut


@pytest.mark.parametrize("broken", [b'{"a": [+, "b": 1}', b'{"a": {"b": [-x}}', b'[{"c": 01]'],
                         ids=repr)
def test_a_message_is_over_at_its_lexers_error_whatever_brackets_are_open(
        broken: bytes) -> None:
    # QEMU's streamer empties its token queue and zeroes both counts at a
    # JSON_ERROR token (qobject/json-streamer.c): what follows is read afresh,
    # so a request glued after the broken message runs.  Counting on with the
    # open "[" swallowed it, and every later one up to a line feed.
    whole = decode(broken + CMD)
    assert len(errors(whole)) == 1 and values(whole) == [CMD_VALUE], whole
    stream = broken + CMD
    for cut in range(1, len(stream)):
        assert decode(stream[:cut], stream[cut:]) == whole, cut


_STRAY_PLUS = ParseError("JSON parse error, stray '+'")
_EXPECTING = ParseError("JSON parse error, expecting value")


@pytest.mark.parametrize(("stream", "answered"), [
    (b'{"a": [+, ' + CMD + b"}", [_STRAY_PLUS, CMD_VALUE, _EXPECTING]),
    # What is left after the request is one run of garbage, however long (QEMU
    # 7.2 answers each of its tokens: 9 lines here, where this gives 3).
    (b'{"a": [+, ' + CMD + b', "b": 1]}', [_STRAY_PLUS, CMD_VALUE, _EXPECTING]),
    (b'{"a": [+, ' + CMD + b'}}}, 1, "x"]', [_STRAY_PLUS, CMD_VALUE, _EXPECTING]),
    (b'{"a": [+, ' + CMD + b", " + CMD + b"]}",
     [_STRAY_PLUS, CMD_VALUE, _EXPECTING, CMD_VALUE, _EXPECTING]),
    # A string right after the request is a message, as after any message.
    (b'{"a": [+, ' + CMD + b' "b"}', [_STRAY_PLUS, CMD_VALUE, "b", _EXPECTING]),
    # An array is a message too; its own value, which the session refuses.
    (b'{"a": [+, [1, 2]]}', [_STRAY_PLUS, [1, 2], _EXPECTING]),
    (b'{"a": {"b": [-x, ' + CMD + b"]}}",
     [ParseError("JSON parse error, stray '-x'"), CMD_VALUE, _EXPECTING]),
    (b'[{"c": 01, ' + CMD + b"]",
     [ParseError("JSON parse error, stray '01'"), CMD_VALUE, _EXPECTING]),
], ids=repr)
def test_a_request_inside_a_message_broken_by_its_lexer_runs_as_in_qemu(
        stream: bytes, answered: list[object]) -> None:
    # After its lexer's error QEMU reads on at the next byte, a message at a
    # time: the "{" after the error begins a request (it ran in QEMU 7.2).  Its
    # streamer forgot the broken message, so what follows the request belongs
    # to none: the garbage there gets its one error, as QEMU answers it too.
    assert decode(stream) == answered
    assert decode(*(stream[i : i + 1] for i in range(len(stream)))) == answered
    for cut in range(1, len(stream)):
        assert decode(stream[:cut], stream[cut:]) == answered, cut


@pytest.mark.parametrize("garbage", [b'] "{x"}', b'] "{x\\"{"}', b'nope "{" ', b', "[{" "}" ',
                                     b'{"a": +, "b": "{x"}'], ids=repr)
def test_a_brace_in_a_string_in_garbage_begins_no_request(garbage: bytes) -> None:
    # QEMU's lexer reads a string in what follows garbage: the "{" in it begins
    # nothing, and the request after it runs.  Taken for a request's start, it
    # swallowed that request.
    stream = garbage + CMD
    whole = decode(stream)
    assert len(errors(whole)) == 1 and values(whole) == [CMD_VALUE], whole
    for cut in range(1, len(stream)):
        assert decode(stream[:cut], stream[cut:]) == whole, cut


@pytest.mark.parametrize("broken", [b'{"a": "q\tuery"}', b'{"a": "x\x01y", "b": "{z"}',
                                    b'{"a": +uery"}', b'+uery"}'], ids=repr)
def test_after_a_lexical_error_skipping_reads_no_string_to_a_structural_character(
        broken: bytes) -> None:
    # QEMU's lexer skips on after its error up to a structural or control
    # character (IN_RECOVERY, qobject/json-lexer.c): the quote of 'uery"' begins
    # no string there, so the request after it runs.
    stream = broken + CMD
    whole = decode(stream)
    assert errors(whole)[:1] == [errors(decode(broken + b"\n"))[0]]
    assert values(whole) == [CMD_VALUE], whole
    for cut in range(1, len(stream)):
        assert decode(stream[:cut], stream[cut:]) == whole, cut


@pytest.mark.parametrize(("stream", "answered"), [
    # An error of QEMU's lexer before a line feed, or before a byte the scan stops
    # at: the request after it runs (QEMU 7.2 runs it), however the input was split.
    (b'{\xc3\xa9-' + CMD + b"\n", [CMD_VALUE]),
    (b"[+" + CMD + b"\xff", [CMD_VALUE]),
    (b'{"a": [+, "b": 1,\n' + CMD + b"\n", [CMD_VALUE]),
    # A carriage return after a reset byte ends the lexer's skipping: the quote
    # after it begins a string, whose "{" begins nothing (QEMU 7.2 runs nothing).
    (b'\xff\r"' + CMD + b'"\n', []),
    (b'}\xff\r"' + CMD + b'"\n', []),
    # A line feed that cuts a number short is judged with its line, as before.
    (b"{-\n1\n", [1]),
], ids=repr)
def test_a_lexical_error_is_answered_as_if_the_bytes_came_one_at_a_time(
        stream: bytes, answered: list[object]) -> None:
    # The lexer fails as the bytes arrive: one read or many, the same requests run.
    # In one read, the line check (or the scan's stop at a reset byte) came first
    # and skipped the request; a byte at a time, the lexer's error did.
    whole = decode(stream, eof=True)
    assert values(whole) == answered, whole
    assert decode(*(stream[i : i + 1] for i in range(len(stream))), eof=True) == whole
    for cut in range(1, len(stream)):
        assert decode(stream[:cut], stream[cut:], eof=True) == whole, cut


def test_2000_open_brackets_do_not_wedge() -> None:
    items = decode(b"[" * 2000 + b"\n" + CMD)
    assert items == [ParseError(NESTING_EXCEEDED), {"execute": "query-blockers", "id": 1}]


def test_2000_open_brackets_split_do_not_wedge() -> None:
    items = decode(*[b"[" * 100] * 20, b"\n", CMD)
    assert items == [ParseError(NESTING_EXCEEDED), {"execute": "query-blockers", "id": 1}]


def test_deep_nesting_is_an_error_not_recursion() -> None:
    limits = replace(LIMITS, max_nesting=256, max_message_size=1 << 22)
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    assert decode(deep + CMD, limits=limits) == [
        ParseError(NESTING_EXCEEDED),
        {"execute": "query-blockers", "id": 1},
    ]


def test_nesting_limit_is_exact() -> None:
    limits = replace(LIMITS, max_nesting=4)
    assert decode(b"[[[[]]]]", limits=limits) == [[[[[]]]]]
    assert decode(b'{"a": [[[]]]}', limits=limits) == [{"a": [[[]]]}]
    assert decode(b"[[[[[]]]]]\n", limits=limits) == [ParseError(NESTING_EXCEEDED)]


def test_oversize_message_one_error_then_resync() -> None:
    limits = replace(LIMITS, max_message_size=1000)
    big = b'{"execute": "x", "arguments": {"reason": "' + b"a" * 5000 + b'"}}\n'
    assert decode(big + CMD, limits=limits) == [
        ParseError(TOKEN_SIZE_EXCEEDED),
        {"execute": "query-blockers", "id": 1},
    ]
    # the same when it trickles in: the limit is on the message, not the read
    chunks = [big[i : i + 64] for i in range(0, len(big), 64)]
    assert decode(*chunks, CMD, limits=limits) == [
        ParseError(TOKEN_SIZE_EXCEEDED),
        {"execute": "query-blockers", "id": 1},
    ]


def test_message_size_limit_is_exact() -> None:
    msg = b'{"a": "' + b"x" * 100 + b'"}'
    assert decode(msg, limits=replace(LIMITS, max_message_size=len(msg))) == [{"a": "x" * 100}]
    assert decode(msg + b"\n", limits=replace(LIMITS, max_message_size=len(msg) - 1)) == [
        ParseError(TOKEN_SIZE_EXCEEDED)
    ]


def test_oversize_top_level_token() -> None:
    assert decode(b"1" * 5000 + b"\n" + CMD, limits=replace(LIMITS, max_message_size=100)) == [
        ParseError(TOKEN_SIZE_EXCEEDED),
        {"execute": "query-blockers", "id": 1},
    ]


def test_oversize_input_is_not_kept() -> None:
    decoder = StreamDecoder(replace(LIMITS, max_message_size=1000))
    decoder.feed(b'{"a": "')
    for _ in range(100):
        decoder.feed(b"x" * 10_000)
        list(decoder)
    assert decoder.buffered < 20_000


@pytest.mark.parametrize("reset", [b"\x00", b"\x04", b"\x1b", b"\x0c", b"\xff", b"\xfe"])
def test_control_character_resets_the_parser(reset: bytes) -> None:
    items = decode(b'{"execute": "x", "arguments": {"a": [1, "unterminated' + reset + CMD)
    assert len(errors(items)) == 1
    assert errors(items)[0].startswith("JSON parse error, ")
    assert values(items) == [{"execute": "query-blockers", "id": 1}]
    items = decode(b'{"execute": "x", "arguments": {' + reset + CMD)
    assert len(errors(items)) == 1
    assert values(items) == [{"execute": "query-blockers", "id": 1}]


def test_reset_when_idle_and_runs_of_resets() -> None:
    assert decode(b"\x04") == [ParseError("JSON parse error, stray '\x04'")]
    # one run is one bad message, even split across reads
    assert decode(b"\xff\xff", b"\xff" + CMD) == [
        ParseError("JSON parse error, stray '\ufffd'"),
        {"execute": "query-blockers", "id": 1},
    ]


def test_raw_newline_in_string_resyncs_after_it() -> None:
    items = decode(b'{"execute": "oops\n' + CMD)
    assert items == [
        ParseError("JSON parse error, stray '\"oops\n'"),
        {"execute": "query-blockers", "id": 1},
    ]


@pytest.mark.parametrize(("broken", "desc"), [
    (b'{"execute": "x", "id": "oops\n"}', "stray '\"oops\n'"),
    (b'{"execute": "x", "id": "oops\r\n"}', "stray '\"oops\r'"),
    (b'{"execute": "x", "id": "a\tb\n"}', "stray '\"a\t'"),
    (b'{"execute": "x", "id": "\\\n"}', "stray '\"\\\n'"),
])
def test_a_string_broken_by_a_line_feed_does_not_swallow_a_glued_request(
        broken: bytes, desc: str) -> None:
    # QEMU's lexer fails at the string's first control character, then skips the
    # rest (a quote included) to a bracket (qobject/json-lexer.c): the request
    # glued after it runs, with one error for the broken one.
    assert decode(broken + CMD) == [ParseError("JSON parse error, " + desc), CMD_VALUE]
    assert decode(broken + b"\n" + CMD) == [ParseError("JSON parse error, " + desc), CMD_VALUE]
    # a request that begins the next line may span lines
    assert decode(b'{"execute": "x", "id": "oops\n{"execute":\n "query-blockers", "id": 1}') == [
        ParseError("JSON parse error, stray '\"oops\n'"), CMD_VALUE]


def test_errors_in_order_with_messages() -> None:
    items = decode(b'{"id": 1}\n{"a" 1}\n{"id": 2}\n}\n{"id": 3}')
    assert items == [
        {"id": 1},
        ParseError("JSON parse error, missing : in object pair"),
        {"id": 2},
        ParseError("JSON parse error, expecting value"),
        {"id": 3},
    ]


def test_truncated_message_at_eof() -> None:
    assert decode(CMD[:-1], eof=True) == [ParseError("JSON parse error, premature EOI")]
    assert decode(CMD + b"\n  ", eof=True) == [{"execute": "query-blockers", "id": 1}]
    assert decode(b'"abc', eof=True) == [ParseError("JSON parse error, premature EOI")]


def test_has_message_and_next_message() -> None:
    decoder = StreamDecoder(LIMITS)
    assert not decoder.has_message()
    assert decoder.next_message() is NEED_DATA
    decoder.feed(CMD[:10])
    assert not decoder.has_message()
    decoder.feed(CMD[10:] + b"}")
    assert decoder.has_message()
    assert decoder.has_message()  # idempotent
    assert decoder.next_message() == {"execute": "query-blockers", "id": 1}
    assert decoder.has_message()
    assert decoder.next_message() == ParseError("JSON parse error, expecting value")
    assert decoder.next_message() is NEED_DATA


def test_consumed_input_is_released() -> None:
    decoder = StreamDecoder(LIMITS)
    for _ in range(2000):
        decoder.feed(CMD * 50)
        assert len(list(decoder)) == 50
    assert decoder.buffered == 0
    assert len(decoder._buf) < 200_000


def test_limits_validation() -> None:
    with pytest.raises(ValueError):
        replace(LIMITS, max_nesting=0)
    with pytest.raises(ValueError):
        replace(LIMITS, max_nesting=10_000)
    with pytest.raises(ValueError):
        replace(LIMITS, max_message_size=0)


# -- output ------------------------------------------------------------------------


def test_encode_line_is_qemu_like_and_strict() -> None:
    assert encode_line({"return": {}}) == b'{"return": {}}\r\n'
    assert encode_line({"return": "\u00e9"}) == b'{"return": "\\u00E9"}\r\n'
    with pytest.raises(ValueError):
        encode_line({"return": float("inf")})
    with pytest.raises(ValueError):
        encode_line({"return": float("nan")})
    with pytest.raises(TypeError):
        encode_line({"return": object()})


def test_escapes_are_written_as_qemu_writes_them() -> None:
    # qobject/json-writer.c, quoted_str(): "\\u%04X", upper-case hex, a surrogate
    # pair beyond the BMP, DEL (0x7F) escaped too.
    assert encode("caf\u00e9 \x7f\x1b \U0001f600 \ufffd") == (
        '"caf\\u00E9 \\u007F\\u001B \\uD83D\\uDE00 \\uFFFD"')
    # A backslash the client sent, then the text u00ff: not an escape.
    assert encode("\\u00ff \\\u00ff") == '"\\\\u00ff \\\\\\u00FF"'
    assert encode({"k\u00e9": ["\u00ea"]}) == '{"k\\u00E9": ["\\u00EA"]}'
    line = encode_event("EV", {"reason": "\u00e9"}, 0)
    assert b'"reason": "\\u00E9"' in line


def qemu_quoted(text: str) -> str:
    """A string as QEMU's json-writer.c quoted_str() writes it, one character at a time."""
    short = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
             "\t": "\\t"}
    out = []
    for c in text:
        cp = ord(c)
        if c in short:
            out.append(short[c])
        elif 0x20 <= cp < 0x7F:
            out.append(c)
        elif cp < 0x10000:
            out.append(f"\\u{cp:04X}")
        else:
            cp -= 0x10000
            out.append(f"\\u{0xD800 | cp >> 10:04X}\\u{0xDC00 | cp & 0x3FF:04X}")
    return '"' + "".join(out) + '"'


@settings(max_examples=300)
@given(st.lists(st.sampled_from(
    ["a", "u", "0", "e", "\\", "\\u", "\\u00e9", '"', "\x00", "\x1b", "\x7f", "\u00e9",
     "\u20ac", "\U0001f600", "\n", "/"]), max_size=80).map("".join))
def test_strings_are_escaped_as_qemu_escapes_them(text: str) -> None:
    # Escapes are put in upper case without a Python call each (one at a time,
    # an id of 512 Ki "\u00e9" held the loop 0.4 s); backslashes the client sent
    # before a "u" must stay what they are.
    assert encode(text) == qemu_quoted(text)
    assert encode({text: [text]}) == "{" + qemu_quoted(text) + ": [" + qemu_quoted(text) + "]}"


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF,
                                      blacklist_categories=())))
def test_any_string_is_escaped_as_qemu_escapes_it(text: str) -> None:
    assert encode(text) == qemu_quoted(text)
    # Among much ASCII the other characters are escaped run by run: the same text.
    padded = "u" * 8000 + text + "\\" * 4000
    assert encode(padded) == qemu_quoted(padded)


def test_a_string_of_more_distinct_characters_than_are_kept_gets_a_table_of_its_own(
        ) -> None:
    # Every BMP character from U+0100 on that is no surrogate: more than UNITS_KEPT.
    text = "".join(map(chr, range(0x100, 0xD800))) + "\U0001f600\ud800 \x7f\x1b"
    assert len(set(text)) > encoding.UNITS_KEPT
    assert encode(text) == qemu_quoted(text)
    assert encode(text) == qemu_quoted(text)  # and again, with the kept units full


def test_encoded_values_are_spliced_into_replies_verbatim() -> None:
    value = [{"id": "b", "reason": "caf\u00e9"}]
    pre = Encoded(encode(value))
    for id_ in (NO_ID, 7, "x", None, [1, {"a": 2}]):
        line = encode_return(pre, id_)
        assert line == encode_return(value, id_)
        assert line.endswith(b"\r\n")
        reply = json.loads(line)
        assert reply["return"] == value
        assert ("id" in reply) is (id_ is not NO_ID)
    assert encode_return({}, NO_ID) == b'{"return": {}}\r\n'
    assert encode_return({}, 1) == b'{"return": {}, "id": 1}\r\n'


@pytest.mark.parametrize("raw", [
    b'{"execute": "a\xff\xfeb"}\n',
    b'{"execute": "a\xfe\xffb"}\n',
    b'{"execute": "a\x04b"}\n',
    b'\xff garbage "}\n',
])
def test_a_reset_byte_inside_a_message_is_one_error(raw: bytes) -> None:
    decoder = StreamDecoder(LIMITS)
    decoder.feed(raw + CMD)
    decoder.feed_eof()
    out = list(decoder)
    assert len(out) == 2 and isinstance(out[0], ParseError), out
    assert out[1] == {"execute": "query-blockers", "id": 1}


def test_after_a_reset_byte_a_new_request_on_the_same_line_runs() -> None:
    decoder = StreamDecoder(LIMITS)
    decoder.feed(b'{"execute": "broken\xff' + CMD)
    assert [type(m) for m in decoder] == [ParseError, dict]


def test_asking_again_without_new_input_does_not_rescan(
        monkeypatch: pytest.MonkeyPatch) -> None:
    decoder = StreamDecoder(LIMITS)
    decoder.feed(b'{"execute": "query-version"}\n{"execute": "query-')
    assert decoder.next_message() == {"execute": "query-version"}
    assert not decoder.has_message()  # scanned the unfinished one to its end
    scans: list[int] = []
    advance = decoder._advance

    def counted() -> object:
        scans.append(1)
        return advance()

    monkeypatch.setattr(decoder, "_advance", counted)
    for _ in range(3):
        assert not decoder.has_message()
        assert decoder.next_message() is NEED_DATA
    assert scans == []
    decoder.feed(b'blockers"}')
    assert decoder.next_message() == {"execute": "query-blockers"}
    assert decoder.next_message() is NEED_DATA
    assert len(scans) == 2
    decoder.feed(b'{"truncated"')
    decoder.feed_eof()  # the end of input is news too: the truncation is an error
    assert isinstance(decoder.next_message(), ParseError)


@pytest.mark.parametrize("stream", [
    b'x{\n{"execute":"b"}\'',      # a single quote in a "{" found in garbage
    b'{"a" x\n{"execute":"b"}\'',  # a single quote after an error on an earlier line
])
def test_a_single_quote_is_judged_whatever_the_split(stream: bytes) -> None:
    whole = decode(stream, eof=True)
    assert decode(*(stream[i:i + 1] for i in range(len(stream))), eof=True) == whole


def test_a_message_cut_by_the_size_limit_at_an_escape_does_not_swallow_what_follows() -> None:
    # The limit falls on the backslash of \": the escaped quote is still inside the
    # string, and the requests after the message are answered (no line feeds).
    limits = Limits(max_message_size=64, max_nesting=64, max_tokens=1 << 14)
    message = b'{"a":"' + b"x" * 57 + b'\\"y"}'
    assert message.index(b"\\") == 63
    items = decode(message + CMD + CMD, limits=limits)
    assert items == [ParseError("JSON token size limit exceeded"),
                     {"execute": "query-blockers", "id": 1},
                     {"execute": "query-blockers", "id": 1}]


# -- skipping the rest of a broken message -------------------------------------------


def _skip_step_by_step(buf: bytes, counts: patterns.Open) -> tuple[int, patterns.Open] | None:
    """Where a broken message with ``counts`` open ends in ``buf`` (no strings, line
    feeds or reset bytes in it), a bracket at a time; None if it does not."""
    for i, c in enumerate(buf):
        if c in b"{}[]":
            counts = patterns.counted(counts, c)
            if patterns.message_over(counts):
                return i + 1, counts
    return None


@settings(max_examples=400, deadline=None)
@given(st.binary(min_size=0, max_size=600).map(
           lambda b: b.translate(bytes(b"{}[] ,1a"[x % 8] for x in range(256)))),
       st.integers(0, 3), st.integers(0, 3), st.integers(1, 600))
def test_skipping_in_bulk_ends_a_broken_message_where_a_bracket_at_a_time_does(
        body: bytes, braces: int, brackets: int, cut: int) -> None:
    if patterns.message_over((braces, brackets)):
        braces += 1
    buf = bytearray(body + b"\n")
    expected = _skip_step_by_step(body, (braces, brackets))
    pos, counts, _, stop = patterns.skip_broken(buf, len(buf), 0, (braces, brackets),
                                                        0)
    if expected is None:
        assert (pos, stop) == (len(body), patterns.RESYNC_POINT)
    else:
        assert (pos, counts, stop) == (*expected, patterns.MESSAGE_END)
    # The same when the input is cut in two: the counts carry over.
    first = bytearray(body[:cut])
    pos, counts, _, stop = patterns.skip_broken(first, len(first), 0,
                                                        (braces, brackets), 0)
    if stop is None:
        pos, counts, _, stop = patterns.skip_broken(buf, len(buf), pos, counts, 0)
    if expected is None:
        assert (pos, stop) == (len(body), patterns.RESYNC_POINT)
    else:
        assert (pos, counts, stop) == (*expected, patterns.MESSAGE_END)


@pytest.mark.parametrize(("body", "counts"), [
    # Both counts at zero at once, never below it: over there.
    (b" " * 70 + b"}" + b" " * 70 + b"]" + b"[{" * 40, (1, 1)),
    (b"[]" * 40 + b"}{][" * 40 + b"}]" + b"{[" * 40, (1, 1)),
    # One count below zero while the other stays above it.
    (b"]]" + b" " * 70 + b"[[[", (1, 1)),
    (b"[" * 70 + b"}}" + b"{{{", (1, 1)),
    # Each at zero in turn, never both: not over.
    (b"}{][" * 40, (1, 1)),
    (b"{}" * 50 + b"]", (0, 1)),
    (b"[[" * 50 + b"]" * 101, (3, 1)),
], ids=repr)
def test_skipping_in_bulk_ends_where_a_bracket_at_a_time_does(
        body: bytes, counts: patterns.Open) -> None:
    buf = bytearray(body + b"\n")
    expected = _skip_step_by_step(body, counts)
    pos, after, _, stop = patterns.skip_broken(buf, len(buf), 0, counts, 0)
    if expected is None:
        assert (pos, stop) == (len(body), patterns.RESYNC_POINT)
    else:
        assert (pos, after, stop) == (*expected, patterns.MESSAGE_END)


@pytest.mark.parametrize("before", [b'{"a": ', b'x{"a": ', b'{"a": [}', b"]"], ids=repr)
def test_a_long_number_arriving_in_pieces_is_lexed_about_once(
        before: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # Found by review: a number of 1 MiB arriving 4 KiB at a time was lexed whole
    # at every read (9 s of the event loop for one client's megabyte).
    lexed = [0]
    real_progress, real_token = lexer.lexical_progress, lexer.number_token

    def progress(text: str) -> tuple[str, int] | int:
        lexed[0] += len(text)
        return real_progress(text)

    def token(data: bytes) -> tuple[int, bool] | None:
        lexed[0] += len(data)
        return real_token(data)
    monkeypatch.setattr(lexing, "lexical_progress", progress)
    monkeypatch.setattr(resync, "number_token", token)
    size = 1 << 20
    data = before + b"1" * size + b"}" + CMD
    decoder = StreamDecoder(replace(LIMITS, max_message_size=2 * size))
    out = decode_with(decoder, *[data[i : i + 4096] for i in range(0, len(data), 4096)])
    assert out[-1] == CMD_VALUE
    assert lexed[0] < 3 * size, lexed[0]


@pytest.mark.parametrize("message, eof", [
    (b"[1,1,1,1,1,1,[[[[", False),  # the bracket past max-nesting
    (b"[1,[[", False),  # ... which is also the token past max-tokens
    (b"[1,1,1}", False),  # a closer that does not match
    (b"[1,1,1,'a']", False),  # a single-quoted string
    (b"[1,1,1,1", True),  # the end of the input
    (b"[1,1,1,1\n{", False),  # a line's request after an unfinished message
])
def test_past_the_token_limit_no_later_error_is_the_one_named(message: bytes,
                                                               eof: bool) -> None:
    # QEMU's streamer checks the token count at each token, before the nesting
    # and before its parser sees the message (json-streamer.c): past max-tokens,
    # the message is refused for its tokens, whatever error would come later.
    # The daemon counts only brackets and strings as they come, and named the
    # later error (JSON nesting depth limit exceeded, a parser's, premature EOI).
    limits = Limits(max_message_size=1 << 20, max_nesting=2, max_tokens=4)
    for chunks in ((message,), (message[:-1], message[-1:])):
        got = errors(decode(*chunks, b" \n", eof=eof, limits=limits))
        assert got[:1] == ["JSON token count limit exceeded"], (chunks, got)


def test_at_the_token_limit_a_later_error_is_still_the_one_named() -> None:
    limits = Limits(max_message_size=1 << 20, max_nesting=2, max_tokens=5)
    assert errors(decode(b"[1,[[ \n", limits=limits)) == [NESTING_EXCEEDED]
    assert errors(decode(b"[1,[", eof=True, limits=limits)) == [
        "JSON parse error, premature EOI"]


def test_past_the_token_limit_within_the_size_limit_the_token_limit_is_named() -> None:
    # 1,1,... has more than max-tokens tokens long before max-message-size bytes:
    # QEMU's streamer refuses it at the token past the limit; only a message that
    # reaches the size with fewer tokens is refused for its size.
    limits = Limits(max_message_size=64, max_nesting=2, max_tokens=4)
    for message, desc in ((b"[" + b"1," * 40, "JSON token count limit exceeded"),
                          (b'["' + b"x" * 80, TOKEN_SIZE_EXCEEDED)):
        for chunks in ((message,), (message[:30], message[30:])):
            assert errors(decode(*chunks, b'"]\n', limits=limits))[:1] == [desc], chunks
