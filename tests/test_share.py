"""Man pages and shell completion (share/): fresh, rendered by man, loaded by bash and zsh,
stale when an option changes, and installed by the wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from migblockd.config import Config
from migblockd.options import Where, table
from migblockd.settings_file import read_file
from migblockd.share import manpages
from migblockd.share.main import generate
from migblockd.share.programs import PROGRAMS

ROOT = Path(__file__).resolve().parent.parent
SHARE = ROOT / "share"
PAGES = {
    "migblockd.8": SHARE / "man" / "man8" / "migblockd.8",
    "migblock-shell.1": SHARE / "man" / "man1" / "migblock-shell.1",
    "migblockd-qapi-gen.1": SHARE / "man" / "man1" / "migblockd-qapi-gen.1",
    "migblockd.toml.5": SHARE / "man" / "man5" / "migblockd.toml.5",
}
PROGS = [p.prog for p in PROGRAMS]


def share(*args: str, env: dict[str, str] | None = None,
          cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "migblockd.share", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False, timeout=120)


def test_missing_generator_is_one_line_naming_the_extra() -> None:
    # As in a venv made without the 'share' extra: shtab cannot be imported.
    code = ("import sys; sys.modules['shtab'] = None; "
            "from migblockd.share.main import main; sys.exit(main(['--check']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, check=False, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "python -m migblockd.share: needs shtab, from the 'share' extra: "
        "pip install 'migblockd[share]' (or, in a checkout, pip install -e '.[share]')"]


def man(page: Path) -> str:
    """``man -l PAGE`` as plain text; fails on any warning of man or groff."""
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="", LC_ALL="C.UTF-8")
    out = subprocess.run(["man", "--warnings", "-l", str(page)], env=env, capture_output=True,
                         text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr
    return out.stdout


def words(text: str) -> str:
    """Text with every run of white space made one space (man fills and wraps lines)."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- freshness


def test_committed_files_are_fresh() -> None:
    result = share("--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_every_program_has_a_page_and_completion_for_both_shells() -> None:
    names = set(generate())
    for prog in PROGS:
        assert f"bash-completion/completions/{prog}" in names
        assert f"zsh/site-functions/_{prog}" in names
    assert {f"man/man{name.rsplit('.', 1)[1]}/{name}" for name in PAGES} <= names


def test_the_check_fails_when_an_option_is_edited(tmp_path: Path) -> None:
    """Edit an option's help in a copy of the package: the committed files are now stale."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "migblockd", copy / "migblockd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / "migblockd" / "config.py"
    source = config.read_text(encoding="utf-8")
    # The first option's help, whatever the table holds: help="..." or help=f"...".
    edited, count = re.subn(r'(help=f?")', r"\1EDITED ", source, count=1)
    assert count == 1
    config.write_text(edited, encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(copy))

    probe = subprocess.run([sys.executable, "-c", "import migblockd; print(migblockd.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()).is_relative_to(copy)

    result = share("--check", "--output-dir", str(SHARE), env=env, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "are stale" in result.stderr
    changed = re.findall(r"^\+\+\+ b/(\S+)", result.stdout, re.M)
    assert "man/man8/migblockd.8" in changed
    assert "man/man5/migblockd.toml.5" in changed
    assert re.search(r"^\+.*EDITED ", result.stdout, re.M)


def test_write_replaces_stale_files_and_leaves_other_programs_alone(tmp_path: Path) -> None:
    out = tmp_path / "share"
    foreign = out / "man" / "man1" / "other.1"
    foreign.parent.mkdir(parents=True)
    foreign.write_text(".TH OTHER 1\n")
    stale = out / "man" / "man1" / "migblock-old.1"
    stale.write_text(".TH OLD 1\n")
    assert share("-o", str(out)).returncode == 0
    assert foreign.read_text() == ".TH OTHER 1\n"
    assert not stale.exists()
    assert share("--check", "-o", str(out)).returncode == 0

    page = out / "man" / "man8" / "migblockd.8"
    page.write_text(page.read_text().replace("QMP", "QMP!"))
    result = share("--check", "-o", str(out))
    assert result.returncode == 1
    assert result.stdout.startswith("--- a/man/man8/migblockd.8\n+++ b/man/man8/migblockd.8\n")


def test_a_file_not_in_utf8_is_stale_and_rewritten(tmp_path: Path) -> None:
    out = tmp_path / "share"
    assert share("-o", str(out)).returncode == 0
    page = out / "man" / "man8" / "migblockd.8"
    fresh = page.read_bytes()
    page.write_bytes(fresh.decode("utf-8").encode("utf-16"))  # an editor's UTF-16

    result = share("--check", "-o", str(out))
    assert result.returncode == 1
    assert "+++ b/man/man8/migblockd.8" in result.stdout
    assert "are stale" in result.stderr

    result = share("-o", str(out))
    assert (result.returncode, result.stderr) == (0, "")
    assert page.read_bytes() == fresh
    assert share("--check", "-o", str(out)).returncode == 0


def test_an_output_dir_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    # Before, a NotADirectoryError traceback.
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    result = share("-o", str(blocker))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"python -m migblockd.share: can't write to '{blocker}': ")
    assert len(result.stderr.splitlines()) == 1


def test_an_installed_package_must_be_told_where_to_write(tmp_path: Path) -> None:
    copy = tmp_path / "site"
    shutil.copytree(ROOT / "migblockd", copy / "migblockd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    result = share("--check", env=dict(os.environ, PYTHONPATH=str(copy)), cwd=tmp_path)
    assert result.returncode == 2
    assert "--output-dir" in result.stderr


# --------------------------------------------------------------------------- man pages


@pytest.mark.parametrize("name", list(PAGES))
def test_man_renders_the_page(name: str) -> None:
    text = man(PAGES[name])
    title = name.rsplit(".", 1)[0]
    assert text.startswith(f"{title.upper()}({name.rsplit('.', 1)[1]})")
    assert f"NAME\n       {title} - " in text


def test_the_daemon_page_documents_every_option_of_the_table() -> None:
    text = words(man(PAGES["migblockd.8"]))
    for o in table(Config):
        if Where.COMMAND_LINE in o.where:
            spelled = o.flag_name if o.flag else f"{o.flag_name} {o.metavar}"
            assert spelled in text
            assert words(o.help) in text
            # Defaults as documented, not as computed for whoever generated the page.
            default = o.shown_default(documented=True)
            if default is not None and not o.flag:
                assert words(f"default: {default.replace('`', '')}") in text


def test_the_configuration_page_documents_every_file_setting() -> None:
    text = man(PAGES["migblockd.toml.5"])
    settings = text.split("\nSETTINGS\n", 1)[1].split("\nEXAMPLE\n", 1)[0]
    # Each entry starts with "KEY = METAVAR" at the section's indentation.
    parts = re.split(r"^ {7}(\S+) = \S+\n", settings, flags=re.M)[1:]
    entries = {key: words(body) for key, body in zip(parts[::2], parts[1::2], strict=True)}
    in_file = [o for o in table(Config) if Where.FILE in o.where]
    assert list(entries) == [o.key for o in in_file]
    for o in in_file:
        body = entries[o.key]
        assert body.startswith(words(o.help[0].upper() + o.help[1:]))
        assert ("Reload: applied." if o.reloadable else "Reload: no;") in body
        if Where.COMMAND_LINE not in o.where:
            # No command-line spelling to point at: the page says what the file gives.
            assert "read as the command line reads" not in body, o.key
            assert f"Command line: {o.flag_name}" not in body
            assert o.key in words(text).split("Only the file takes ", 1)[1].split(".")[0]
    for o in table(Config):
        if Where.FILE not in o.where:
            only = words(text).split("Only the command line takes ", 1)[1].split(".")[0]
            assert o.flag_name in only.split(" and "), only


def test_the_configuration_page_example_is_a_valid_file_of_defaults(tmp_path: Path) -> None:
    path = tmp_path / "migblockd.toml"
    path.write_text(manpages.example() + "\n")
    values = read_file(path, Config)
    assert values, "the example sets nothing"
    defaults = Config()
    for name, value in values.items():
        assert value == getattr(defaults, name), name


def test_the_shell_page_keeps_its_examples_on_their_own_lines() -> None:
    text = man(PAGES["migblock-shell.1"])
    assert re.search(r"^ +migblock-shell -c 'add-blocker reason=\"SEV: no migration\" "
                     r"modes=normal,cpr-reboot'$", text, re.M)


# --------------------------------------------------------------------------- completion


def bash(script: str) -> str:
    out = subprocess.run(["bash", "--norc", "--noprofile", "-c", script], cwd=ROOT,
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", out.stderr
    return out.stdout


def completions(prog: str, *words: str, cwd: Path = ROOT) -> list[str]:
    """What bash offers for the last of ``words`` after ``prog`` (after sourcing its script)."""
    script = SHARE / "bash-completion" / "completions" / prog
    function = "_shtab_" + re.sub(r"\W", "_", prog)
    quoted = " ".join(f"'{w}'" for w in (prog, *words))
    out = bash(f"source {script}; cd {cwd}; COMP_WORDS=({quoted}); "
               f"COMP_CWORD={len(words)}; {function}; printf '%s\\n' \"${{COMPREPLY[@]}}\"")
    return [line for line in out.splitlines() if line]


@pytest.mark.parametrize("prog", PROGS)
def test_bash_loads_the_completion(prog: str) -> None:
    script = SHARE / "bash-completion" / "completions" / prog
    function = "_shtab_" + re.sub(r"\W", "_", prog)
    out = bash(f"source {script}; complete -p {prog}")
    assert out == f"complete -o bashdefault -F {function} {prog}\n"


def test_bash_completes_options_and_values_from_the_table(tmp_path: Path) -> None:
    options = [o for o in table(Config) if Where.COMMAND_LINE in o.where]
    assert set(completions("migblockd", "--")) >= {o.flag_name for o in options}
    for o in options:
        if o.choices:
            assert completions("migblockd", o.flag_name, "") == list(o.choices)
    (tmp_path / "migblockd.toml").write_text("")
    (tmp_path / "other").mkdir()
    assert completions("migblockd", "--config", "mig", cwd=tmp_path) == ["migblockd.toml"]
    assert completions("migblockd-qapi-gen", "--output-dir", "", cwd=tmp_path) == ["other"]
    assert "--command" in completions("migblock-shell", "--c")


@pytest.mark.parametrize("prog", PROGS)
def test_zsh_loads_the_completion(prog: str, tmp_path: Path) -> None:
    functions = SHARE / "zsh" / "site-functions"
    # As installed: a directory on $fpath; compinit reads each file's #compdef line.
    script = (f"fpath=({functions} $fpath); autoload -Uz compinit; "
              f"compinit -u -d {tmp_path}/zcompdump; print -r -- $_comps[{prog}]; "
              f"autoload +X _{prog} && print loaded")
    out = subprocess.run(["zsh", "-f", "-c", script], capture_output=True, text=True,
                         check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert out.stdout == f"_{prog}\nloaded\n"


# --------------------------------------------------------------------------- the wheel


def test_the_wheel_installs_the_pages_and_completions_under_share(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path),
         str(ROOT)], capture_output=True, text=True, check=False, timeout=240)
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("migblockd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        data = {name.split(".data/data/", 1)[1]: zf.read(name).decode()
                for name in zf.namelist() if ".data/data/share/" in name}
    committed = {f"share/{rel}": (SHARE / rel).read_text() for rel in generate()}
    assert data == committed
