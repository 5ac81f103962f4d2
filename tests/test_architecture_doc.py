"""docs/ARCHITECTURE.md's module table names every module and package of migblockd,
and nothing that is gone: a maintainer reads it to find where a concern lives."""

from __future__ import annotations

import re

from conftest import ROOT

PACKAGE = ROOT / "migblockd"


def table_names() -> set[str]:
    """The backquoted names in the first column of the "## Modules" table."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names.update(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def test_the_module_table_names_every_module_and_package() -> None:
    present = {path.name for path in PACKAGE.glob("*.py")} | {
        f"{path.parent.name}/" for path in PACKAGE.glob("*/__init__.py")}
    present.discard("__init__.py")  # the package itself
    named = table_names()
    assert sorted(present - named) == [], "modules the table does not name"
    assert sorted(named - present) == [], "names in the table that are not modules"
