"""A ``--schema``'s commands take and return what the bundled schema's do.

The handlers (:mod:`migblockd.commands`) are written against the bundled
schema: ``add-blocker`` reads ``reason``, ``modes``, ``internal``, ``id`` and
``scope``; ``query-blockers`` returns BlockerInfo as the registry makes it.  A
replacement schema may add migration modes (the values of ``MigMode`` are
data: the registry keeps a list per mode), leave commands out (they are then
not served) and say anything in its docs.  A command whose arguments or return
value it shapes otherwise would be checked against one contract and run by
code written for another: an argument the handler never reads accepted and
ignored, a member it needs missing (an internal error at each call), a reply
that breaks the schema clients were given.  So the start refuses it, at the
command's definition, as QEMU's generator points at a mistake.

Events are the daemon's to send, whatever a schema says: every event the
bundled schema defines must be defined, with the same data.  An event left
out would still reach clients told it does not exist, and one with other data
would carry members its definition does not have.  Events only the replacement
defines are never sent, as a QEMU built without a device never sends its events.

``qmp_capabilities`` must be there: without it no client leaves capabilities
negotiation (qemu/qemu ``monitor/qmp.c`` serves nothing else until then).
"""

from __future__ import annotations

import functools
from typing import Any

from migblockd.contract import CommandSpec, Contract
from migblockd.qapi.error import QAPIError
from migblockd.served import MIG_MODE
from migblockd.startup import NotConfigured

__all__ = ["check_shapes"]

NEGOTIATE = "qmp_capabilities"
#: What a JSON Schema says for readers, not for the validator.
_PROSE = frozenset({"title", "description", "$comment"})


def check_shapes(contract: Contract) -> None:
    """StartupError (``bad schema: ...``) when ``contract`` shapes a command or an event
    otherwise than the bundled schema does, lacks one of its events, or lacks
    ``qmp_capabilities``."""
    if NEGOTIATE not in contract.commands:
        raise NotConfigured(f"bad schema: {contract.root}: command '{NEGOTIATE}' is not "
                           "defined; without it no client can leave capabilities negotiation")
    bundled = _bundled().commands
    for name, spec in contract.commands.items():
        if name not in bundled:  # a handler the bundled schema does not offer
            continue
        for part in ("arguments", "returns"):
            where = _difference(_document(bundled[name], part), _document(spec, part), "")
            if where is not None:
                error = QAPIError(contract.sources[name],
                                  f"command '{name}' changes its {part} (at {where or '/'}); "
                                  "migblockd's handler takes and returns the bundled "
                                  "schema's")
                raise NotConfigured(f"bad schema: {error}")
    _check_events(contract)


def _check_events(contract: Contract) -> None:
    for name, sent in _bundled().events.items():
        defined = contract.events.get(name)
        if defined is None:
            raise NotConfigured(f"bad schema: {contract.root}: event '{name}' is not defined, "
                               "yet migblockd sends it; define it as the bundled schema does")
        where = _difference(_shape(sent.data), _shape(defined.data), "")
        if where is not None:
            error = QAPIError(contract.sources[name],
                              f"event '{name}' changes its data (at {where or '/'}); "
                              "migblockd sends the bundled schema's")
            raise NotConfigured(f"bad schema: {error}")


@functools.cache
def _bundled() -> Contract:
    return Contract.load()


def _document(spec: CommandSpec, part: str) -> Any:
    document = spec.arguments if part == "arguments" else spec.returns
    return _shape(document)


def _shape(node: Any) -> Any:
    """``node`` without prose, with ``required`` as a set (members may be reordered), and
    with MigMode's values left out: a schema may add modes."""
    if isinstance(node, dict):
        shaped = {key: _shape(value) for key, value in node.items() if key not in _PROSE}
        if isinstance(shaped.get("required"), list):
            shaped["required"] = sorted(shaped["required"])
        defs = shaped.get("$defs")
        if isinstance(defs, dict) and isinstance(defs.get(MIG_MODE), dict):
            defs[MIG_MODE] = {k: v for k, v in defs[MIG_MODE].items() if k != "enum"}
        return shaped
    if isinstance(node, list):
        return [_shape(item) for item in node]
    return node


def _difference(old: Any, new: Any, at: str) -> str | None:
    """The JSON pointer of the first place ``new`` differs from ``old`` (None: nowhere)."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in (*old, *(k for k in new if k not in old)):
            if key not in old or key not in new:
                return f"{at}/{_escaped(key)}"
            found = _difference(old[key], new[key], f"{at}/{_escaped(key)}")
            if found is not None:
                return found
        return None
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (a, b) in enumerate(zip(old, new, strict=True)):
            found = _difference(a, b, f"{at}/{index}")
            if found is not None:
                return found
        return None
    return None if old == new and type(old) is type(new) else at


def _escaped(key: str) -> str:
    # RFC 6901: '~' and '/' in a member name.
    return key.replace("~", "~0").replace("/", "~1")
