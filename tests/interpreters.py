"""The Python versions the daemon is tested on: every CPython 3.11+ found on this machine.

Found, not configured: ``python3.N`` on ``PATH``, and every interpreter pyenv keeps
(``$(pyenv root)/versions/*/bin/python``, ``$PYENV_ROOT``, ``~/.pyenv``).  Each
candidate is run once to learn what it really is (a pyenv shim may resolve to
nothing; a name says nothing about the implementation).  One interpreter per
minor version: for the project venv's own version the venv's interpreter itself,
otherwise the newest patch release found.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

OLDEST = (3, 11)
_PROBE = ("import platform, sys; "
          "print(platform.python_implementation(), *sys.version_info[:3], sys.executable)")


def version_key(version: str) -> tuple[int, ...]:
    """``"3.12"`` as ``(3, 12)``, for sorting."""
    return tuple(int(part) for part in version.split("."))


def _pyenv_roots() -> list[Path]:
    roots = []
    if os.environ.get("PYENV_ROOT"):
        roots.append(Path(os.environ["PYENV_ROOT"]))
    pyenv = shutil.which("pyenv")
    if pyenv is not None:
        out = subprocess.run([pyenv, "root"], capture_output=True, text=True, check=False,
                             timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            roots.append(Path(out.stdout.strip()))
    roots.append(Path.home() / ".pyenv")
    return roots


def _candidates() -> Iterator[Path]:
    for directory in os.get_exec_path():
        for exe in sorted(Path(directory).glob("python3.*")):
            name = re.fullmatch(r"python3\.(\d+)", exe.name)
            if name and (3, int(name[1])) >= OLDEST:
                yield exe
    for root in _pyenv_roots():
        for exe in sorted(root.glob("versions/*/bin/python")):
            # "3.9.18" is too old without asking; "pypy3.10-7.3" or "miniconda3-4.7" must be run.
            named = re.match(r"(\d+)\.(\d+)(\.|$)", exe.parent.parent.name)
            if named is None or (int(named[1]), int(named[2])) >= OLDEST:
                yield exe


@functools.cache
def interpreters() -> dict[str, str]:
    """``{"3.11": path, "3.12": path, ...}``: one CPython per minor version, 3.11 or newer."""
    seen: set[str] = set()
    probes = []
    for exe in _candidates():
        real = os.path.realpath(exe)
        if real in seen or not os.access(real, os.X_OK):
            continue
        seen.add(real)
        probes.append(subprocess.Popen([str(exe), "-c", _PROBE], stdout=subprocess.PIPE,
                                       stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                       text=True))
    best: dict[str, tuple[int, str]] = {}
    for proc in probes:  # all started at once: the probes run in parallel
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            continue
        fields = out.split(maxsplit=4)
        if proc.returncode != 0 or len(fields) != 5 or fields[0] != "CPython":
            continue
        major, minor, micro = int(fields[1]), int(fields[2]), int(fields[3])
        version = f"{major}.{minor}"
        if (major, minor) >= OLDEST and micro > best.get(version, (-1, ""))[0]:
            best[version] = (micro, fields[4].strip())
    found = {version: path for version, (_, path) in best.items()}
    found[f"{sys.version_info.major}.{sys.version_info.minor}"] = sys.executable
    return dict(sorted(found.items(), key=lambda item: version_key(item[0])))


class VenvBuilder:
    """Builds one venv per other interpreter, all in parallel, the first time one is needed.

    Each gets a non-editable ``pip install`` of the project (needs PyPI for the
    dependencies), so the installed copy and its packaged schema are what runs.
    """

    def __init__(self, base: Path, project: Path) -> None:
        self.base = base
        self.project = project
        self.lock = threading.Lock()
        self.procs: dict[str, tuple[subprocess.Popen[bytes], Path, Path]] = {}
        self.results: dict[str, str] = {}

    def _start_all(self) -> None:
        for version, interpreter in interpreters().items():
            if interpreter == sys.executable:
                continue
            venv = self.base / f"venv-{version}"
            log = self.base / f"venv-{version}.log"
            script = (f'"{interpreter}" -m venv "{venv}" && '
                      f'"{venv}/bin/python" -m pip install -q --disable-pip-version-check '
                      f'"{self.project}"')
            with log.open("wb") as out:
                proc = subprocess.Popen(["sh", "-c", script], stdout=out, stderr=out,
                                        stdin=subprocess.DEVNULL)
            self.procs[version] = (proc, venv, log)

    def python(self, version: str) -> str:
        """The interpreter to run the daemon with on ``version``."""
        if interpreters()[version] == sys.executable:
            return sys.executable
        with self.lock:
            if not self.procs and not self.results:
                self._start_all()
            if version in self.results:
                return self.results[version]
            proc, venv, log = self.procs[version]
            rc = proc.wait(600)
            assert rc == 0, f"building the {version} venv failed:\n{log.read_text()}"
            self.results[version] = str(venv / "bin" / "python")
            return self.results[version]

    def kill(self) -> None:
        """Stop builds still running (the session is ending)."""
        for proc, _, _ in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
