"""Where each setting came from, for the messages that name one.

What the start, ``--check-config`` and a reload find wrong with a value comes
long after the file and the command line were read, and :mod:`migblockd.config`
builds the settings without keeping where each came from: :class:`Sources` is
what those messages consult to name a setting at its line of the ``--config``
file, or by its option.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migblockd import settings_file
from migblockd.startup import StartupError

__all__ = ["COMMAND_LINE", "Sources"]


@dataclass(frozen=True)
class Sources:
    """Where the settings came from, for a message that names one.

    A setting the file sets, and the command line does not, is named as the
    file's other errors name it, with the line that gives it
    (``/etc/migblockd/migblockd.toml:12: socket-group``): an operator told
    ``--socket-group`` looks for an option nobody gave, and one told only the file
    searches it.  Any other, given on the command line or left to its default, by
    its option.
    """

    #: The ``--config`` file (None: none, or what it set is not known).
    file: Path | None = None
    #: Field names of the settings the file sets and the command line does not.
    from_file: frozenset[str] = frozenset()
    #: The line of the file that gives each setting (field name -> number).
    lines: Mapping[str, int] = dataclasses.field(default_factory=dict)
    #: The first line that gives each key path inside a setting (``access``,
    #: ``users``, ``alice``), or a key inside it.
    entries: Mapping[tuple[str, ...], int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, cli: Mapping[str, Any], file: settings_file.FileSettings | None) -> Sources:
        """``cli`` as :func:`migblockd.config.build` takes it; ``file``: what the
        file set (:func:`migblockd.config.read_settings`)."""
        path = cli.get("config")
        if path is None or not file:
            return cls()
        return cls(Path(path), frozenset(k for k in file if cli.get(k) is None), file.lines,
                   file.entries)

    def named(self, name: str) -> str:
        """The setting (a field name) as a message's subject: ``FILE:LINE: metrics``,
        ``--metrics``."""
        key = name.replace("_", "-")
        if name not in self.from_file:
            return f"--{key}"
        line = self.lines.get(name)
        return f"{self.file}: {key}" if line is None else f"{self.file}:{line}: {key}"

    def entry(self, name: str, *keys: str) -> str:
        """The key ``keys`` of the table setting ``name`` (``access``: ``users``,
        ``alice``) as a message's subject: ``FILE:LINE: access`` with the entry's own
        line (else the deepest table's holding it: an inline table's), ``access``
        without a file."""
        key = name.replace("_", "-")
        if name not in self.from_file:
            return key
        wanted = [(key, *keys)]
        if keys and "-" in keys[0]:
            # The table's own keys take an underscore for a dash (default_role), as
            # the settings do: the entries are kept as the file spells them.
            wanted.append((key, keys[0].replace("-", "_"), *keys[1:]))
        line = next((self.entries[spelled[:end]] for end in range(len(keys) + 1, 1, -1)
                     for spelled in wanted if spelled[:end] in self.entries),
                    self.lines.get(name))
        return f"{self.file}: {key}" if line is None else f"{self.file}:{line}: {key}"

    def leading(self, name: str, message: str) -> str:
        """``message``, which begins with the key of the setting ``name`` (a field
        name: ``qemu-passthrough: ignoring ...``, ``socket-group 100 is read ...``),
        with that key named at its line when the file sets it: ``FILE:LINE:
        qemu-passthrough: ...``.  As it is otherwise: a setting only the file gives
        has no option to be named by, and where it came from may not be known."""
        key = name.replace("_", "-")
        if not message.startswith((f"{key} ", f"{key}:")):
            return message
        return self.keyed(name) + message[len(key):]

    def keyed(self, name: str) -> str:
        """The setting (a field name) as a message that names it by its key names
        it: ``FILE:LINE: socket-mode`` when the file sets it, else ``socket-mode``."""
        return self.named(name) if name in self.from_file else name.replace("_", "-")

    def in_file(self, name: str) -> str:
        """The setting (a field name) as the file gives it, also where the command
        line outvotes it: ``FILE:LINE: max-clients``; the bare key when the file
        does not give it (any more)."""
        key = name.replace("_", "-")
        line = self.lines.get(name)
        return key if self.file is None or line is None else f"{self.file}:{line}: {key}"

    def choice(self, name: str) -> str:
        """The setting as what to change ("choose another ..."): ``socket in FILE``,
        ``--socket``."""
        key = name.replace("_", "-")
        return f"{key} in {self.file}" if name in self.from_file else f"--{key}"

    def located(self, name: str, message: str) -> str:
        """``message``, about the setting ``name`` (a field name), led by the file's
        line when the file set it: ``FILE:LINE: state-dir: ...``.

        The start's lower layers know a path, not where it was given: they name the
        setting only as what to change (:meth:`choice`), at the end.  A message that
        leads with :meth:`named` already is left as it is; one from the command line
        too, since it names its option already."""
        if name not in self.from_file or message.startswith(self.named(name)):
            return message
        return f"{self.named(name)}: {message}"

    @contextlib.contextmanager
    def locating(self, name: str) -> Iterator[None]:
        """A StartupError within, about the setting ``name``, :meth:`located`."""
        try:
            yield
        except StartupError as exc:
            raise exc.reworded(self.located(name, str(exc))) from None


#: Every setting named by its option: where nothing came from a file, or it is not known.
COMMAND_LINE = Sources()
