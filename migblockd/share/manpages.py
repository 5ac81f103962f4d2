"""Man pages in roff: one per program (with argparse-manpage) and migblockd.toml(5).

A program's page is argparse-manpage's rendering of its documented parser (NAME,
SYNOPSIS, DESCRIPTION, ARGUMENTS, OPTIONS), followed by sections this module
writes: NOTES (the parser's epilog), FILES and SEE ALSO.  The epilog is taken
out of the parser first, because argparse-manpage would fill it into one
paragraph, running the shell's example commands together.

migblockd.toml(5) is written here from the option table alone: every setting a
file may give, with its TOML type, default, whether a reload applies it, and its
help, so a new option appears in it as it appears in ``--help``.

The pages carry no date (which would make every regeneration differ); the
footer names the version instead.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable
from typing import Any

from argparse_manpage.manpage import Manpage

from migblockd import __version__
from migblockd.config import Config
from migblockd.kinds import Boolean, FilePath, Integer, Kind, OctalMode, OneOf, Seconds
from migblockd.options import Option, Where, table
from migblockd.share.programs import PROGRAMS, SYSTEM_CONFIG, Program

MANUALS = {1: "User Commands", 5: "File Formats", 8: "System Administration"}
SOURCE = f"migblockd {__version__}"


# --------------------------------------------------------------------------- roff


def escape(text: str) -> str:
    """Plain text as roff text: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.split("\n"))


def bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def prose(text: str) -> str:
    """Text as argparse shows it (paragraphs between blank lines) as roff.

    Lines of a paragraph that are indented are shown as they are (examples);
    the others are filled.
    """
    out: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip("\n")):
        if out:
            out.append(".PP")
        literal = False
        for line in paragraph.split("\n"):
            indented = line.startswith((" ", "\t"))
            if indented and not literal:
                out += [".RS 4", ".nf"]
            elif literal and not indented:
                out += [".fi", ".RE"]
            literal = indented
            out.append(escape(line.strip()))
        if literal:
            out += [".fi", ".RE"]
    return "\n".join(out)


def section(title: str, body: str) -> str:
    return f".SH {title}\n{body}"


def tagged(items: Iterable[tuple[str, str]]) -> str:
    """A list of ``.TP`` paragraphs: a bold tag, then its text."""
    return "\n".join(f".TP\n{bold(tag)}\n{escape(text)}" for tag, text in items)


def see_also(pages: Iterable[tuple[str, int]]) -> str:
    listed = list(pages)
    return "\n".join(f".BR {escape(name)} ({number}){',' if i < len(listed) - 1 else ''}"
                     for i, (name, number) in enumerate(listed))


#: After the title: no hyphenation (it would split option names such as
#: --migration-time) and ragged right margins (paths and option names make
#: justified lines gappy).
LAYOUT = ".nh\n.ad l"


def header(title: str, number: int) -> str:
    return (f'.TH "{escape(title.upper())}" "{number}" "" "{escape(SOURCE)}" '
            f'"{MANUALS[number]}"\n{LAYOUT}')


# --------------------------------------------------------------------------- programs


def program_page(program: Program) -> str:
    """The man page of one of migblockd's commands."""
    parser = program.parser()
    epilog, parser.epilog = parser.epilog, None
    # argparse-manpage lists positional arguments under DESCRIPTION unless their
    # group has a title of its own.
    for group in parser._action_groups:
        if group.title == "positional arguments":
            group.title = "arguments"
    page = Manpage(parser, _data={
        "description": program.summary,
        "manual_section": program.section,
        "manual_title": MANUALS[program.section],
        "project_name": "migblockd",
        "version": __version__,
        "date": "-",  # replaced below; the library would put today's date
    })
    page.date = ""
    title, text = str(page).rstrip("\n").split("\n", 1)
    text = f"{title}\n{LAYOUT}\n{text}"
    sections = []
    if epilog:
        sections.append(section("NOTES", prose(epilog)))
    if program.files:
        sections.append(section("FILES", tagged(program.files)))
    if program.see_also:
        sections.append(section("SEE ALSO", see_also(program.see_also)))
    return "\n".join([text, *sections]) + "\n"


# --------------------------------------------------------------------------- migblockd.toml(5)


def value_type(o: Option) -> str:
    """What a TOML file may give for ``o``, in words."""
    kind = o.parse
    if isinstance(kind, Kind) and kind.toml_doc:
        return kind.toml_doc
    if isinstance(kind, Boolean):
        return "true or false"
    if isinstance(kind, Integer):
        number = f"a number of {kind.unit}" if kind.unit else "an integer"
        if kind.minimum is not None and kind.maximum is not None:
            return f"{number} from {kind.minimum} to {kind.maximum}"
        if kind.minimum is not None:
            return f"{number}, at least {kind.minimum}"
        if kind.maximum is not None:
            return f"{number}, at most {kind.maximum}"
        return number
    if isinstance(kind, Seconds):
        return "a number of seconds, integer or fractional, not negative"
    if isinstance(kind, OctalMode):
        return 'permission bits: a string of octal digits such as "0660" (not a TOML number, ' \
               "which is decimal: 660 would be 0o1224)"
    if isinstance(kind, OneOf):
        return "one of the strings " + ", ".join(json.dumps(c) for c in kind.choices)
    if isinstance(kind, FilePath):
        return "a string: a path"
    # A kind this page does not know yet: strings are read as the command line reads them.
    return f"a string, read as the command line reads {o.flag_name} {o.metavar or 'VALUE'}"


def toml_value(o: Option, value: Any) -> str:
    """``value`` of ``o`` as a TOML literal that ``o`` reads back as ``value``.

    A number that TOML spells as it is shown (1024, 3) stays a number; anything else
    is given as the string the command line would take (``"0600"``), which the file
    reads exactly as the command line does.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    shown = o.show(value)
    if isinstance(value, int | float):
        try:
            if tomllib.loads(f"v = {shown}")["v"] == value:
                return shown
        except tomllib.TOMLDecodeError:
            pass
    return json.dumps(shown)  # a TOML basic string


def fixed_default(o: Option) -> Any:
    """The default when it is the same everywhere, else None (computed at run time)."""
    if o.default_doc is not None:
        return None
    return o.default()


def file_settings() -> list[Option]:
    return [o for o in table(Config) if Where.FILE in o.where]


def sentence(text: str) -> str:
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def setting(o: Option) -> str:
    default = fixed_default(o)
    if default is not None:
        shown_default = toml_value(o, default)
    elif o.default_doc is not None:
        shown_default = o.default_doc.replace("`", "")
    else:
        shown_default = "none"
    facts = [f"Value: {value_type(o)}.", f"Default: {shown_default}.",
             "Reload: applied." if o.reloadable else "Reload: no; read at start only."]
    if Where.COMMAND_LINE in o.where:
        facts.append(f"Command line: {o.flag_name}.")
    metavar = "BOOLEAN" if o.flag else o.metavar or "VALUE"
    return "\n".join([".TP", f"{bold(o.key)} = {italic(metavar)}", escape(sentence(o.help)),
                      *(f".br\n{escape(fact)}" for fact in facts)])


def example() -> str:
    """A file that sets every setting with a fixed default to that default."""
    lines = [f"{o.key} = {toml_value(o, value)}" for o in file_settings()
             if (value := fixed_default(o)) is not None]
    return "\n".join(lines)


def config_page() -> str:
    """migblockd.toml(5)."""
    settings = file_settings()
    reloadable = [o.key for o in settings if o.reloadable]
    command_line_only = [o.flag_name for o in table(Config) if Where.FILE not in o.where]
    file_only = [o.key for o in settings if Where.COMMAND_LINE not in o.where]
    description = [
        escape("migblockd(8) reads the TOML file named by its --config option when it starts, "
               "and again when it receives SIGHUP (systemctl reload migblockd)."),
        ".PP",
        escape("Each key is the name of a long command-line option without its leading "
               '"--" (log-level, not --log-level); underscores may stand for its dashes. '
               + (f"Only the file takes {', '.join(file_only)}. " if file_only else "")
               + "A setting given on the command line wins over the file; a setting given "
               "in neither keeps its default. A string value is read exactly as the "
               'command line reads the option, so max-clients = "100" means '
               "max-clients = 100."),
        ".PP",
        escape("An unknown key, or a value of the wrong type or out of range, stops the "
               "daemon at start with a message naming the file, the line and the key "
               "(FILE:LINE: max-clients must be at least 1). On SIGHUP such a file is refused "
               "as a whole and the daemon keeps its settings. A value found wrong only when "
               "used (a socket-group that names no group, a state-dir that is a file) stops "
               "the start, and fails migblockd --check-config, at its line too "
               "(FILE:LINE: socket-group: there is no group named 'kvm-users'); given on the "
               "command line, it is named as the option (--socket-group: ...)."),
        ".PP",
        escape("A reload applies " + (", ".join(reloadable) if reloadable else "no setting")
               + "; the other settings take effect only when the daemon starts."),
    ]
    if command_line_only:
        description += [".PP", escape("Only the command line takes "
                                      + " and ".join(command_line_only) + ".")]
    parts = [
        header("migblockd.toml", 5),
        section("NAME", escape("migblockd.toml - configuration file of migblockd")),
        section("SYNOPSIS", escape(SYSTEM_CONFIG)),
        section("DESCRIPTION", "\n".join(description)),
        section("SETTINGS", "\n".join(setting(o) for o in settings)),
        section("EXAMPLE", escape("Every setting that has a fixed default, set to it:")
                + "\n.PP\n.RS 4\n.nf\n" + escape(example()) + "\n.fi\n.RE"),
        section("FILES", tagged([(SYSTEM_CONFIG, "The file that the systemd units of "
                                  "migblockd pass with --config.")])),
        section("SEE ALSO", see_also([("migblockd", 8), ("migblock-shell", 1)])),
    ]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- all


def pages() -> dict[str, str]:
    """Every man page: ``{path under share/: roff}``."""
    files = {f"man/man{p.section}/{p.prog}.{p.section}": program_page(p) for p in PROGRAMS}
    files["man/man5/migblockd.toml.5"] = config_page()
    return files
