"""``migblockd-qapi-gen``: regenerate (or check) the committed JSON Schemas.

Usage: ``migblockd-qapi-gen [--check] [-o OUTPUT_DIR] [--version] [SCHEMA]``.

SCHEMA defaults to the project's ``migblockd.json`` (see
``migblockd.contract.schema_dir``) and OUTPUT_DIR to ``generated/`` next to
it.  Without ``--check`` the files are written and stale generated files in
OUTPUT_DIR (``qmp-schema.json``, ``commands/*.json``, ``events/*.json``) are
removed, and nothing else there is touched; with ``--check`` nothing is written and the exit status
is 1, with a unified diff on stdout, when OUTPUT_DIR differs from what the
schema generates.  Schema mistakes are printed as ``FILE:LINE:COL: message``
with exit status 1.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from migblockd import __version__
from migblockd.generated import diffs
from migblockd.generated import write as write_files
from migblockd.regular import NotRegularFile

from .builder import load_schema
from .error import QAPIError
from .introspect import introspect
from .jsonschema import command_documents, event_documents
from .schema import Schema

PROG = "migblockd-qapi-gen"


def dump_json(value: Any, sort_keys: bool = False) -> str:
    """The one JSON layout of every generated file (stable diffs)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=sort_keys) + "\n"


def generate(schema: Schema) -> dict[str, str]:
    """Every generated file: ``{path relative to the output dir: text}``.

    Key order inside JSON Schema documents is meaningful (properties follow
    schema order), so those are not key-sorted; the introspection answer is,
    as QEMU sorts the keys of its QLIT literals.
    """
    files: dict[str, str] = {}
    for name, (args, rets) in command_documents(schema).items():
        files[f"commands/{name}.arguments.json"] = dump_json(args)
        if rets is not None:
            files[f"commands/{name}.returns.json"] = dump_json(rets)
    for name, data in event_documents(schema).items():
        files[f"events/{name}.json"] = dump_json(data)
    files["qmp-schema.json"] = dump_json(introspect(schema), sort_keys=True)
    return dict(sorted(files.items()))


#: The files under the output directory the generator owns: only the ones it
#: makes, so that an OUTPUT_DIR holding other files (the schema itself) keeps them.
OWNED = ("qmp-schema.json", "commands/*.json", "events/*.json")


def check(files: dict[str, str], output_dir: Path) -> list[str]:
    """Unified diffs (committed -> fresh) of every file that differs."""
    return diffs(files, output_dir, OWNED)


def write(files: dict[str, str], output_dir: Path) -> None:
    """Write ``files`` under ``output_dir``; delete generated files no longer generated."""
    write_files(files, output_dir, OWNED)


#: The schema of a source checkout, relative to its top: what a developer edits.
CHECKOUT_SCHEMA = Path("schema") / "migblockd.json"


EPILOG = """\
Without --check the files are written, and generated files in OUTPUT_DIR
(qmp-schema.json, commands/*.json, events/*.json) that SCHEMA no longer generates are
removed; nothing else there is touched.  With --check nothing is written; the exit status is 1,
with a unified diff on stdout, when OUTPUT_DIR differs from what SCHEMA generates.
Mistakes in the schema are reported as FILE:LINE:COL: message, with exit status 1.
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line (the man page and shell completion are generated from it)."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Generate migblockd's JSON Schemas from its QAPI schema.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 and print a diff when OUTPUT_DIR is stale",
    )
    parser.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        help="where the generated files go (default: generated/ next to SCHEMA)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "schema", nargs="?", type=Path, metavar="SCHEMA",
        help=f"root schema file (default: {CHECKOUT_SCHEMA} when run from a checkout, "
        "else the schema installed with migblockd)",
    )
    return parser


def _show(diff: str) -> None:
    """Write ``diff`` to stdout; a reader gone (``| head``) ends it quietly, and a
    stdout that cannot take it (closed, a full disk) is one line on stderr."""
    try:
        if sys.stdout is None:
            raise OSError(errno.EBADF, "stdout is closed")
        sys.stdout.write(diff)
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    except OSError as err:
        print(f"{PROG}: cannot write the diff to stdout: {err.strerror or err}",
              file=sys.stderr)
    else:
        return
    if sys.stdout is not None:
        # What failed is still in its buffer: the interpreter's last flush would
        # fail on it again ("Exception ignored ...").
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (also when used as a console script)."""
    args = build_parser().parse_args(argv)

    installed = False
    if args.schema is None:
        if CHECKOUT_SCHEMA.is_file():
            args.schema = CHECKOUT_SCHEMA
        else:
            from ..contract import schema_dir  # noqa: PLC0415 - contract imports this package

            args.schema = schema_dir() / "migblockd.json"
            installed = "site-packages" in args.schema.parts
    output_dir: Path = args.output_dir or args.schema.parent / "generated"
    if installed and not args.check and args.output_dir is None:
        print(
            f"{PROG}: refusing to write into the installed package ({output_dir}); "
            "run it from a checkout of migblockd, or name SCHEMA and --output-dir",
            file=sys.stderr,
        )
        return 1
    try:
        schema = load_schema(args.schema)
    except QAPIError as err:
        print(err, file=sys.stderr)
        return 1
    except OSError as err:
        # A directory is "not a regular file" to read_regular(); QEMU's
        # generator, which open()s it, says what it is.
        why = (os.strerror(errno.EISDIR) if isinstance(err, NotRegularFile)
               and args.schema.is_dir() else err.strerror)
        print(f"{PROG}: can't read schema file '{args.schema}': {why}", file=sys.stderr)
        return 1
    files = generate(schema)
    if args.check:
        diffs = check(files, output_dir)
        if diffs:
            _show("".join(diffs))
            print(
                f"{PROG}: {len(diffs)} file(s) in {output_dir} are stale; run {PROG}",
                file=sys.stderr,
            )
            return 1
        return 0
    try:
        write(files, output_dir)
    except OSError as err:
        print(f"{PROG}: can't write to '{output_dir}': "
              f"{err.filename}: {err.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
