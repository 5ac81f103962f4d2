"""The generator's command line: golden files, --check, MigMode as the single
source of truth, and a wheel that carries the schema."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from migblockd import __version__
from migblockd.contract import Contract, schema_dir

ROOT = Path(__file__).resolve().parent.parent
CASES = Path(__file__).parent / "qapi_cases"
SCHEMA = ROOT / "schema"


def gen(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run ``migblockd-qapi-gen`` (as ``python -m``, which is the same code)."""
    return subprocess.run(
        [sys.executable, "-m", "migblockd.qapi", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_schema_dir_is_the_checkout_schema() -> None:
    assert schema_dir() == SCHEMA
    assert (schema_dir() / "migblockd.json").is_file()


def test_committed_generated_files_are_fresh() -> None:
    result = gen("--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_console_script_is_installed_and_checks() -> None:
    script = Path(sys.executable).with_name("migblockd-qapi-gen")
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    result = subprocess.run(
        [str(script), "--check"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_version_names_the_program_and_the_release() -> None:
    result = subprocess.run([sys.executable, "-m", "migblockd.qapi", "--version"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout) == (0, f"migblockd-qapi-gen {__version__}\n")


def test_golden_output_of_the_good_case() -> None:
    result = gen(
        "--check",
        "-o",
        str(CASES / "good-everything.generated"),
        str(CASES / "good-everything.json"),
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("redirect", "said"), [
    (">/dev/full", "cannot write the diff to stdout: No space left on device\n"),
    (">&-", "cannot write the diff to stdout: stdout is closed\n"),
    ("| head -c 10 >/dev/null", ""),
], ids=["full", "closed", "reader-gone"])
@pytest.mark.parametrize("module", ["migblockd.qapi", "migblockd.qapi.main"])
def test_a_diff_stdout_cannot_take_is_one_line_not_a_traceback(
        tmp_path: Path, redirect: str, said: str, module: str) -> None:
    copy = tmp_path / "schema"
    shutil.copytree(SCHEMA, copy)
    for generated in (copy / "generated" / "commands").iterdir():
        generated.write_text("{}\n" * 20_000, encoding="utf-8")  # a diff bigger than a pipe
    # The module run as it is too: its helpers must be defined before main() runs.
    command = (f"set -o pipefail; {sys.executable} -m {module} --check "
               f"{copy / 'migblockd.json'} {redirect}; echo status=$?")
    result = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True,
                            text=True, check=False)
    assert result.stdout == "status=1\n"
    stale = " file(s) in "
    lines = result.stderr.splitlines(keepends=True)
    assert lines[-1].startswith("migblockd-qapi-gen: ") and stale in lines[-1]
    assert "".join(lines[:-1]) == ("migblockd-qapi-gen: " + said if said else "")


def test_stale_copy_fails_check_with_a_diff(tmp_path: Path) -> None:
    copy = tmp_path / "schema"
    shutil.copytree(SCHEMA, copy)
    target = copy / "generated" / "commands" / "add-blocker.arguments.json"
    doc = load_json(target)
    del doc["properties"]["scope"]
    target.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (copy / "generated" / "events" / "MIGRATION.json").unlink()
    (copy / "generated" / "events" / "STALE_EVENT.json").write_text("{}\n", encoding="utf-8")

    result = gen("--check", str(copy / "migblockd.json"))
    assert result.returncode == 1
    assert "--- a/commands/add-blocker.arguments.json" in result.stdout
    assert "+++ b/commands/add-blocker.arguments.json" in result.stdout
    assert '+    "scope": {' in result.stdout
    assert "+++ b/events/MIGRATION.json" in result.stdout  # missing file
    assert "--- a/events/STALE_EVENT.json" in result.stdout  # extra file
    assert "stale" in result.stderr
    # --check writes nothing.
    assert not (copy / "generated" / "events" / "MIGRATION.json").exists()

    # Regenerating repairs all three, and the check passes again.
    assert gen(str(copy / "migblockd.json")).returncode == 0
    assert not (copy / "generated" / "events" / "STALE_EVENT.json").exists()
    assert gen("--check", str(copy / "migblockd.json")).returncode == 0
    assert load_json(target) == load_json(
        SCHEMA / "generated" / "commands" / "add-blocker.arguments.json"
    )


def test_a_generated_file_not_in_utf8_is_stale_and_rewritten(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    schema = str(SCHEMA / "migblockd.json")
    assert gen("-o", str(out), schema).returncode == 0
    target = out / "qmp-schema.json"
    # What an editor that saves as UTF-16 leaves: not UTF-8, from its first byte (a BOM).
    target.write_bytes(target.read_text(encoding="utf-8").encode("utf-16"))

    result = gen("--check", "-o", str(out), schema)
    assert result.returncode == 1
    assert "+++ b/qmp-schema.json" in result.stdout
    assert "are stale; run migblockd-qapi-gen" in result.stderr

    # Doing what the check says repairs it, without a word.
    result = gen("-o", str(out), schema)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert target.read_bytes() == (SCHEMA / "generated" / "qmp-schema.json").read_bytes()
    assert gen("--check", "-o", str(out), schema).returncode == 0


def test_a_generated_file_with_crlf_or_no_final_newline_is_stale(tmp_path: Path) -> None:
    # Reproduced first: a file converted to CRLF passed --check (it was read as
    # text, which folds CRLF), and one without its final newline gave a diff
    # ending "-}+}" on one line, which patch(1) refuses.
    out = tmp_path / "generated"
    schema = str(SCHEMA / "migblockd.json")
    assert gen("-o", str(out), schema).returncode == 0
    crlf = out / "commands" / "del-blocker.arguments.json"
    crlf.write_bytes(crlf.read_bytes().replace(b"\n", b"\r\n"))
    result = gen("--check", "-o", str(out), schema)
    assert result.returncode == 1
    assert "+++ b/commands/del-blocker.arguments.json" in result.stdout

    assert gen("-o", str(out), schema).returncode == 0
    cut = out / "commands" / "add-blocker.arguments.json"
    cut.write_bytes(cut.read_bytes().removesuffix(b"\n"))
    result = gen("--check", "-o", str(out), schema)
    assert result.returncode == 1
    assert result.stdout.endswith("-}\n\\ No newline at end of file\n+}\n"), result.stdout
    # The diff applies: patch(1) turns the committed file back into the fresh one.
    patched = subprocess.run(["patch", "-p1", "-d", str(out)], input=result.stdout,
                             capture_output=True, text=True, check=False)
    assert patched.returncode == 0, patched.stdout + patched.stderr
    assert gen("--check", "-o", str(out), schema).returncode == 0


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_migmode_is_the_single_source_of_truth(tmp_path: Path) -> None:
    copy = tmp_path / "schema"
    shutil.copytree(SCHEMA, copy)
    before = _tree(copy)

    # The one edit: a new MigMode member (with its doc, which is required).
    migration = copy / "migration.json"
    text = migration.read_text(encoding="utf-8")
    old = "'data': [ 'normal', 'cpr-reboot', 'cpr-transfer', 'cpr-exec' ] }"
    assert text.count(old) == 1
    new = (
        "'data': [ 'normal', 'cpr-reboot', 'cpr-transfer', 'cpr-exec',\n            'cpr-test' ] }"
    )
    text = text.replace(old, new)
    doc_anchor = "#\n# Since: 0.1\n##\n{ 'enum': 'MigMode',"
    assert text.count(doc_anchor) == 1
    text = text.replace(doc_anchor, "#\n# @cpr-test: A mode added by a test.\n" + doc_anchor)
    migration.write_text(text, encoding="utf-8")

    result = gen(str(copy / "migblockd.json"))
    assert result.returncode == 0, result.stderr

    # Only migration.json (edited) and generated files changed.
    after = _tree(copy)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert "migration.json" in changed
    assert all(p == "migration.json" or p.startswith("generated/") for p in changed)

    args = load_json(copy / "generated" / "commands" / "add-blocker.arguments.json")
    validator = jsonschema.Draft202012Validator(args)
    assert validator.is_valid({"reason": "r", "modes": ["cpr-test"]})
    assert not validator.is_valid({"reason": "r", "modes": ["cpr-nope"]})
    # The committed (unedited) schema rejects it: the change came from the edit.
    committed = load_json(SCHEMA / "generated" / "commands" / "add-blocker.arguments.json")
    assert not jsonschema.Draft202012Validator(committed).is_valid(
        {"reason": "r", "modes": ["cpr-test"]}
    )
    # Every other generated document that reaches MigMode follows too.
    params = load_json(copy / "generated" / "commands" / "migrate-set-parameters.arguments.json")
    assert jsonschema.Draft202012Validator(params).is_valid({"mode": "cpr-test"})

    introspection = load_json(copy / "generated" / "qmp-schema.json")
    enums = [e for e in introspection if e["meta-type"] == "enum"]
    migmode = [e for e in enums if "cpr-test" in e["values"]]
    assert len(migmode) == 1
    assert migmode[0]["values"] == ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec", "cpr-test"]
    assert {"name": "cpr-test"} in migmode[0]["members"]

    contract = Contract.load(copy)
    assert contract.enums["MigMode"][-1] == "cpr-test"
    assert contract.commands["add-blocker"].arguments == args
    assert contract.introspection == introspection
    assert "cpr-test" in contract.docs.values("add-blocker", "modes")


def test_non_editable_wheel_carries_the_schema(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("migblockd-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert "migblockd/_schema/migblockd.json" in names
        assert "migblockd/_schema/migration.json" in names
        assert "migblockd/_schema/generated/qmp-schema.json" in names
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)  # GPL
        zf.extractall(unpacked)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import json, migblockd, migblockd.contract as c\n"
        "k = c.Contract.load()\n"
        "print(json.dumps([migblockd.__file__, str(c.schema_dir()), list(k.enums['MigMode']),"
        " len(k.commands)]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(unpacked)
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    module, found, modes, ncommands = json.loads(run.stdout)
    assert Path(module).is_relative_to(unpacked)
    assert Path(found) == unpacked / "migblockd" / "_schema"
    assert modes == ["normal", "cpr-reboot", "cpr-transfer", "cpr-exec"]
    assert ncommands == 14


# The last two once escaped as tracebacks (an assert, a UnicodeDecodeError).
@pytest.mark.parametrize(
    "name",
    ["bad-member-undocumented.json", "bad-struct-data-not-object.json", "bad-utf8.json"],
)
def test_cli_reports_schema_error_without_traceback(name: str, tmp_path: Path) -> None:
    result = gen("-o", str(tmp_path), name, cwd=CASES)
    assert result.returncode == 1
    assert result.stderr == (CASES / name).with_suffix(".err").read_text()
    assert result.stdout == ""
    assert not any(tmp_path.iterdir())


def test_cli_reports_missing_schema_file(tmp_path: Path) -> None:
    result = gen("nonexistent.json", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "can't read schema file 'nonexistent.json'" in result.stderr


def test_output_dir_holding_the_schema_keeps_it(tmp_path: Path) -> None:
    # Only the generator's own files are its to delete: the schema beside them stays.
    copy = tmp_path / "schema"
    shutil.copytree(SCHEMA, copy)
    shutil.rmtree(copy / "generated")
    (copy / "notes.json").write_text("{}\n", encoding="utf-8")
    (copy / "events").mkdir()
    (copy / "events" / "STALE_EVENT.json").write_text("{}\n", encoding="utf-8")
    sources = {p.name: p.read_bytes() for p in copy.glob("*.json")}
    result = gen("-o", str(copy), str(copy / "migblockd.json"))
    assert result.returncode == 0, result.stderr
    kept = {p.name: p.read_bytes() for p in copy.glob("*.json") if p.name != "qmp-schema.json"}
    assert kept == sources
    assert (copy / "qmp-schema.json").is_file()
    assert (copy / "commands" / "add-blocker.arguments.json").is_file()
    assert not (copy / "events" / "STALE_EVENT.json").exists()


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    result = gen("-o", str(blocker), str(SCHEMA / "migblockd.json"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"migblockd-qapi-gen: can't write to '{blocker}': ")
    assert len(result.stderr.splitlines()) == 1


def test_crlf_line_ends_read_as_qemus_parser_reads_them(tmp_path: Path) -> None:
    crlf = tmp_path / "good-everything.json"
    text = (CASES / "good-everything.json").read_bytes()
    crlf.write_bytes(text.replace(b"\n", b"\r\n"))
    (tmp_path / "sub").mkdir()
    for include in (CASES / "sub").glob("*.json"):
        (tmp_path / "sub" / include.name).write_bytes(
            include.read_bytes().replace(b"\n", b"\r\n"))
    result = gen("--check", "-o", str(CASES / "good-everything.generated"), str(crlf))
    assert result.returncode == 0, result.stdout + result.stderr
