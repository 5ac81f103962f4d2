"""The string patterns of the error path: unrolled, and the same as the plain ones.

Wording the error of a message re-reads its strings with regular expressions
(:mod:`migblockd.qmp.lexer`, :mod:`migblockd.qmp.decoder`,
:mod:`migblockd.qmp.wording`).  They were written ``"(?:[^"\\]|\\.)*"``, which
Python's engine walks one character at a time, keeping backtracking state for
each: a 1 MiB string cost 150 MB and a quarter of a second of the only
thread, per pattern.  They are now unrolled (``"[^"\\]*+(?:\\.[^"\\]*+)*+"``).
The plain forms are kept here as the reference: each new pattern must match
exactly where, and what, its plain form does, so that the error wording (which
test_qemu_wording.py compares with a real QEMU) cannot change.
"""

from __future__ import annotations

import re
import tracemalloc
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from migblockd.qmp import decoder, lexer, wording
from migblockd.qmp.characters import RAW
from migblockd.qmp.wording import ParseError, decode_message

_NOT_IN_STRING = "\\x00-\\x1f\\udcfe\\udcff"
_NUMBER = (r"|-?(?:0(?![.0-9])"
           r"|(?:0\.[0-9]+|[1-9][0-9]*(?:\.[0-9]+)?)(?:[eE][-+]?[0-9]+)?(?![.eE0-9]))")

#: The patterns as they were, one character per step: the reference.
PLAIN: dict[str, str] = {
    # A string left open (the text ends in it) is one token, to the end.
    "decoder._CONTAINER_TOKENS": r'(?s)"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{}]',
    "decoder._PAIR_TOKENS": r'(?s)"(?:[^"\\]|\\.)*(?:"|\\?\Z)|[\[\]{},]',
    "decoder._STRINGS": r'(?s)"((?:[^"\\]|\\.)*+)(?:("\s*+:)|"|\\?\Z)',
    "lexer._TOKENS": (
        r"(?:([ \t\r\n]+|[{}\[\]:,]|[a-z]+"
        rf'|"(?:[^"\\{_NOT_IN_STRING}]|\\[^{_NOT_IN_STRING}])*"'
        rf"|'(?:[^'\\{_NOT_IN_STRING}]|\\[^{_NOT_IN_STRING}])*'"
        rf"{_NUMBER}))*+"),
    'lexer._STRING_SO_FAR["\\""]': rf'"(?:[^"\\{_NOT_IN_STRING}]|\\[^{_NOT_IN_STRING}])*',
    "lexer._STRING_SO_FAR[\"'\"]": rf"'(?:[^'\\{_NOT_IN_STRING}]|\\[^{_NOT_IN_STRING}])*",
    # Unrolled already; now built from the same piece as _TOKENS' strings.
    "lexer._ONE_TOKEN": (
        r"[ \t\r\n]*+(?:[{}\[\]:,]|[a-z]++"
        rf'|"[^"\\{_NOT_IN_STRING}]*+(?:\\[^{_NOT_IN_STRING}][^"\\{_NOT_IN_STRING}]*+)*+"'
        rf"|'[^'\\{_NOT_IN_STRING}]*+(?:\\[^{_NOT_IN_STRING}][^'\\{_NOT_IN_STRING}]*+)*+'"
        rf"{_NUMBER})"),
    "wording.BEFORE_OPEN_STRING": r'(?:[^"]++|"(?:[^"\\]|\\.)*+")*+',
    "wording._ZERO_EXPONENT_AT": r'"(?:[^"\\]|\\.)*"|(?<![0-9.])-?0([eE])',
}

CURRENT: dict[str, re.Pattern[str]] = {
    "decoder._CONTAINER_TOKENS": decoder._CONTAINER_TOKENS,
    "decoder._PAIR_TOKENS": decoder._PAIR_TOKENS,
    "decoder._STRINGS": decoder._STRINGS,
    "lexer._TOKENS": lexer._TOKENS,
    'lexer._STRING_SO_FAR["\\""]': lexer._STRING_SO_FAR['"'],
    "lexer._STRING_SO_FAR[\"'\"]": lexer._STRING_SO_FAR["'"],
    "lexer._ONE_TOKEN": lexer._ONE_TOKEN,
    "wording.BEFORE_OPEN_STRING": wording.BEFORE_OPEN_STRING,
    "wording._ZERO_EXPONENT_AT": wording._ZERO_EXPONENT_AT,
}
PAIRS = [(name, re.compile(PLAIN[name]), CURRENT[name]) for name in PLAIN]
#: The patterns that read strings one character at a time before.
UNROLLED = [name for name in PLAIN if name != "lexer._ONE_TOKEN"]
#: How the code runs each pattern: anchored, or scanning the whole text.
ANCHORED = {"lexer._TOKENS", "lexer._ONE_TOKEN",
            *(n for n in PLAIN if n.startswith("lexer._STRING")),
            "wording.BEFORE_OPEN_STRING"}

Found = list[tuple[tuple[int, int], tuple[str | None, ...]]]


def _found(pattern: re.Pattern[str], text: str, end: int) -> Found:
    return [(m.span(), m.groups()) for m in pattern.finditer(text, 0, end)]


def _at(pattern: re.Pattern[str], text: str, pos: int) -> tuple[tuple[int, int],
                                                                  tuple[str | None, ...]] | None:
    m = pattern.match(text, pos)
    return None if m is None else (m.span(), m.groups())


def assert_same(text: str, *, every: bool = True) -> None:
    """Each pattern finds what its plain form finds in ``text``: every match
    and its groups, scanning (up to every end, as the code passes ``endpos``)
    and anchored at every position.  With ``every`` False (a long text), at a
    few positions only, and each pattern run only as the code runs it: a scan
    for tokens from every position of a long run of letters is quadratic."""
    ends = range(len(text) + 1) if every else sorted({0, 1, len(text) // 2, len(text)})
    for name, plain, unrolled in PAIRS:
        if every or name not in ANCHORED:
            for end in ends:
                assert _found(unrolled, text, end) == _found(plain, text, end), (name, end)
        for pos in ends:
            assert _at(unrolled, text, pos) == _at(plain, text, pos), (name, pos)


#: What the patterns tell apart, and what QEMU refuses in a string.
ALPHABET = '"\'\\{}[]:, \t\r\nazeEu0189-+.\x00\x01\x1f\x7fé\u2028\udcfe\udcff\udc80\ud800\U0001f600'
EDGE_CASES = [
    "", '"', '""', '"\\"', '"\\""', '"\\\\"', '"\\\\\\"', '"\\', '"a\\', '"\\\\\\', "'\\'",
    '"\\\n"', '"\\\x01"', '"a\x01"', '"a\nb"', '"\\u"', '"\\ud800"', '"\\uDCFF\\uFFFF"',
    '"é\U0001f600"', '"\udcff"', '"\\\udcfe"', '"\udc80"', "'it\\'s'", "'\"'", "\"'\"",
    '{"a": "b\\"c", "a": 1}', '["a" 1]', '{"a": 0e5, "b": "0e5"}', '"0e5" 0E1 -0e',
    '{"k\\"": [1, {"x": "]"}], "k\\"": 2}', '"\\"\\\\\\/\\b\\f\\n\\r\\t\\u0041"',
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases_match_as_the_plain_patterns_do(text: str) -> None:
    assert_same(text)
    assert_same("{" + text + ":", every=True)


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=ALPHABET, max_size=40))
@example('"\\')
def test_the_unrolled_patterns_match_as_the_plain_ones_do(text: str) -> None:
    assert_same(text)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_so_do_they_on_bytes_that_are_no_utf8(data: bytes) -> None:
    assert_same(data.decode("utf-8", RAW))


#: What goes in a string: characters of every kind, escapes whole and cut short.
_IN_STRING = st.sampled_from([
    "a", "é", "\U0001f600", "\u2028", "\x7f", "'", "\x00", "\x01", "\n", "\x1f", "\udcfe",
    "\udcff", "\udc80", "\\\\", '\\"', "\\'", "\\n", "\\u00e9", "\\ud800", "\\uDCFF", "\\",
    "\\\n", "\\\x01", "\\\udcff", "\\é", "{", "]", ":", "0e5",
])
_STRINGS = st.builds(
    lambda quote, body, closed: quote + "".join(body) + (quote if closed else ""),
    st.sampled_from("\"'"), st.lists(_IN_STRING, max_size=8), st.booleans())
_BETWEEN = st.sampled_from(["{", "}", "[", "]", ":", ", ", " ", "\n", "0e5", "-0E1", "1.5", "x"])
_MESSAGES = st.lists(st.one_of(_STRINGS, _BETWEEN, st.text(alphabet=ALPHABET, max_size=2)),
                     max_size=8).map("".join)


@settings(max_examples=400, deadline=None)
@given(_MESSAGES)
def test_so_do_they_on_strings_among_tokens(text: str) -> None:
    assert_same(text)


LONG = 1 << 17


@pytest.mark.parametrize("text", [
    '{"a": "' + "a" * LONG,
    '{"a": "' + "a" * LONG + '" 1}',
    '["' + "\\n" * LONG + '" 0e5]',
    '["' + "\\n" * LONG + "\\",
    '{"a": "' + "é" * LONG + '\x01"}',
    "'" + "\\'" * LONG + "'",
    '"' + "a\\" * LONG + '\udcff"',
])
def test_so_do_they_on_long_runs(text: str) -> None:
    assert_same(text, every=False)


def _peak(work: Callable[[], object]) -> int:
    """The most memory ``work`` held at once: counted by the allocator, so the
    same on every run and on any machine, unlike a time."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


MIB = 1 << 20
BROKEN = {  # a string that runs to the end, and one that is whole
    "open": '{"a": "' + "a" * MIB,
    "closed": '{"a": "' + "a" * MIB + '" :',
    "apostrophes": "{'a': '" + "a" * MIB,
}




@pytest.mark.parametrize("name", UNROLLED)
@pytest.mark.parametrize("text", BROKEN.values(), ids=BROKEN)
def test_a_long_string_keeps_no_state_per_character(name: str, text: str) -> None:
    """The engine keeps what it would backtrack into on the heap: the plain
    forms held some 150 bytes per character of a string (150 MB for 1 MiB);
    the unrolled ones hold none."""
    pattern = CURRENT[name]
    if name in ANCHORED:
        start = 0
        if name.startswith("lexer._STRING"):  # from the long string's opening quote
            quote = name[-3]
            text = text.replace('"', quote).replace("'", quote)
            start = text.index(quote + "a" * 8)
        assert _peak(lambda: pattern.match(text, start)) < 64 * 1024, name
    else:  # what is left is the key findall returns
        assert _peak(lambda: pattern.findall(text)) < MIB + 64 * 1024, name


@pytest.mark.parametrize("message", [
    b'{"execute": "' + b"a" * (MIB - 64) + b'" 1}',  # expected separator in dict
    b'{"a": "' + b"a" * (MIB - 64) + b'", "b": 0e5}',  # 0e5 after a long string
    b'{"execute": "' + b"a" * (MIB - 64) + b'\x01"}',  # stray, with the string
    b'{"execute": "' + b"a" * (MIB - 64) + b'\\q"}',  # invalid escape
    b'{"a": "' + b"a" * (MIB - 64) + b'\xc3"}',  # invalid UTF-8
    b'["' + b"\\n" * (MIB // 2 - 64) + b'" 1]',  # expected separator in list
])
def test_wording_a_long_string_costs_a_few_copies_of_it(message: bytes) -> None:
    """A message of 1 MiB is worded with a few copies of its text, not with a
    hundred times its size of backtracking state."""
    found: list[object] = []
    peak = _peak(lambda: found.append(decode_message(message, 1 << 14)))
    assert isinstance(found[0], ParseError)
    assert peak < 16 * MIB, peak
