"""``python -m migblockd.share [--check] [-o DIR]``: regenerate (or check) share/.

DIR defaults to ``share/`` at the top of the source checkout this package is
in; an installed package has no such directory, so DIR must then be named.
Without ``--check`` the files are written and migblockd's files under DIR's
``man/``, ``bash-completion/`` and ``zsh/`` that are no longer generated are
removed (other programs' files there are left alone); with
``--check`` nothing is written and the exit status is 1, with a unified diff on
stdout, when DIR differs from what the programs generate.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from migblockd import generated

PROG = "python -m migblockd.share"
#: The files under DIR this generator owns: migblockd's, and no other program's (DIR
#: may be an installation prefix's share/, which other packages' files share).
OWNED = ("man/man*/migblock*", "bash-completion/completions/migblock*",
         "zsh/site-functions/_migblock*")
#: The top of a source checkout, when the package runs from one.
CHECKOUT = Path(__file__).resolve().parent.parent.parent


def generate() -> dict[str, str]:
    """Every generated file: ``{path relative to share/: text}``."""
    from migblockd.share.completions import scripts  # noqa: PLC0415 - keeps --help fast
    from migblockd.share.manpages import pages  # noqa: PLC0415

    return dict(sorted({**pages(), **scripts()}.items()))


def existing(output_dir: Path) -> dict[str, str]:
    """The files of ``output_dir`` that this generator owns (see :data:`OWNED`)."""
    return generated.existing(output_dir, OWNED)


def diffs(files: dict[str, str], output_dir: Path) -> list[str]:
    """Unified diffs (committed -> fresh) of every file that differs."""
    return generated.diffs(files, output_dir, OWNED)


def write(files: dict[str, str], output_dir: Path) -> None:
    generated.write(files, output_dir, OWNED)


def default_output_dir() -> Path | None:
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "migblockd").is_dir():
        return CHECKOUT / "share"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate migblockd's man pages and bash and zsh completion scripts "
        "from its command lines and option table.")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 and print a diff when DIR is stale")
    parser.add_argument("-o", "--output-dir", metavar="DIR", type=Path,
                        help="where the files go (default: share/ in the source checkout)")
    args = parser.parse_args(argv)
    output_dir: Path | None = args.output_dir or default_output_dir()
    if output_dir is None:
        parser.error("not run from a source checkout of migblockd: name the directory "
                     "with --output-dir")
    try:
        files = generate()
    except ModuleNotFoundError as e:
        # The generators are an optional extra: the daemon does not need them.
        print(f"{PROG}: needs {e.name}, from the 'share' extra: "
              "pip install 'migblockd[share]' (or, in a checkout, pip install -e '.[share]')",
              file=sys.stderr)
        return 2
    if args.check:
        stale = diffs(files, output_dir)
        if stale:
            sys.stdout.write("".join(stale))
            print(f"{PROG}: {len(stale)} file(s) in {output_dir} are stale; run {PROG}",
                  file=sys.stderr)
            return 1
        return 0
    try:
        write(files, output_dir)
    except OSError as err:
        # One line, as migblockd-qapi-gen says it: a directory that cannot be made
        # (a file in the way) or written (permissions) is the user's to fix.
        print(f"{PROG}: can't write to '{output_dir}': {err.filename}: {err.strerror}",
              file=sys.stderr)
        return 1
    return 0
