"""What clients were told, and what a restarted daemon may therefore hold.

The crash soak (:mod:`benchmarks.crash_soak`) records every change a client
sends and whether its reply arrived (*acknowledged*) before the daemon was
killed.  After the restart, :meth:`Ledger.check` compares the daemon's
``query-blockers`` and mode with that record:

- an acknowledged add is there (same id, reason, modes, internal), unless
  its delete was acknowledged; an acknowledged delete did not come back;
- an add or delete sent but not acknowledged may or may not have happened
  after a kill; after a clean stop (SIGTERM), which answers every request the
  daemon read before it exits, it did not happen;
- nothing else is there: no blocker nobody added, no connection-scoped one;
- blockers that survived keep their order (oldest first), and come before
  every blocker added since, which are in the order each client sent them;
- a generated id is never handed out twice (counting every id ever
  acknowledged or seen after a restart);
- the mode is the last one acknowledged, or (after a kill) one sent after it.

Every add carries a unique reason (its *tag*), which identifies it even when
its reply, and so its generated id, never arrived.  After a check the record
becomes what the daemon holds: the uncertain changes are settled by it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Add", "Ledger"]

GENERATED = re.compile(r"#blocker\d+")

# Where an add stands.
SENT = "sent"            # add sent, no reply (yet)
PRESENT = "present"      # acknowledged, or seen after a restart
DELETING = "deleting"    # present, and its delete sent without a reply (yet)
DELETED = "deleted"      # delete acknowledged

#: What the report counts for a daemon-scoped add after a restart, by its
#: status and whether the daemon holds it (the impossible ones are violations).
OUTCOMES = {
    (PRESENT, True): "acknowledged add kept",
    (PRESENT, False): "acknowledged add lost",
    (DELETED, False): "acknowledged delete kept",
    (DELETED, True): "acknowledged delete undone",
    (SENT, True): "unanswered add done",
    (SENT, False): "unanswered add not done",
    (DELETING, True): "unanswered delete not done",
    (DELETING, False): "unanswered delete done",
}

#: The outcomes of changes sent but never answered that the daemon made: after
#: a kill they may be, after a clean stop not.
UNANSWERED_DONE = {"unanswered add done": "added", "unanswered delete done": "deleted"}


@dataclass
class Add:
    """One add-blocker request, identified by its reason (``tag``)."""

    tag: str
    client: int
    order: int  # when it was sent: across clients and rounds, increasing
    id: str | None  # requested, or (once known) generated
    modes: list[str]
    internal: bool
    scope: str
    status: str = SENT

    @property
    def durable(self) -> bool:
        return self.scope == "daemon"


@dataclass
class Ledger:
    """The clients' record across rounds; ``violations`` collects what broke a rule."""

    modes: list[str]
    adds: dict[str, Add] = field(default_factory=dict)  # by tag
    generated: set[str] = field(default_factory=set)  # every generated id ever known
    mode: str = "normal"  # the last mode acknowledged (or seen)
    unsure_modes: list[str] = field(default_factory=list)  # sent after it, unanswered
    order: list[str] = field(default_factory=list)  # tags, as the last check saw them
    violations: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    #: Unanswered changes found made, in all (after kills: allowed).
    unanswered_done: int = 0
    _sent = 0

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    # -- what the clients do ---------------------------------------------------
    def sent_add(self, tag: str, client: int, id: str | None, modes: list[str] | None,
                 internal: bool, scope: str) -> Add:
        self._sent += 1
        # The daemon lists modes in the schema's order, whatever the request's.
        wanted = [m for m in self.modes if modes is None or m in modes]
        add = Add(tag, client, self._sent, id, wanted, internal, scope)
        self.adds[tag] = add
        self.count("add sent")
        return add

    def acked_add(self, tag: str, reply: dict[str, Any]) -> None:
        add = self.adds[tag]
        if "return" not in reply:
            self.violations.append(f"add {tag!r} failed: {reply}")
            del self.adds[tag]
            return
        info = reply["return"]
        got = info.get("id")
        if add.id is None:
            if not isinstance(got, str) or not GENERATED.fullmatch(got):
                self.violations.append(f"add {tag!r}: generated id {got!r}")
            elif got in self.generated:
                self.violations.append(f"add {tag!r}: generated id {got} handed out again")
            add.id = got
            self.generated.add(str(got))
        elif got != add.id:
            self.violations.append(f"add {tag!r}: asked for id {add.id}, got {got!r}")
        add.status = PRESENT
        self.count("add acknowledged")

    def deletable(self, client: int) -> list[Add]:
        """This client's blockers known to be there, with no delete in flight."""
        return [a for a in self.adds.values()
                if a.client == client and a.status == PRESENT and a.durable]

    def sent_delete(self, add: Add) -> None:
        add.status = DELETING
        self.count("delete sent")

    def acked_delete(self, add: Add, reply: dict[str, Any]) -> None:
        if "return" not in reply:
            self.violations.append(f"delete of {add.id} ({add.tag!r}) failed: {reply}")
            return
        add.status = DELETED
        self.count("delete acknowledged")

    def sent_mode(self, mode: str) -> None:
        self.unsure_modes.append(mode)
        self.count("mode sent")

    def acked_mode(self, reply: dict[str, Any]) -> None:
        mode = self.unsure_modes.pop(0)
        if "return" not in reply:
            self.violations.append(f"mode {mode} failed: {reply}")
            return
        self.mode = mode
        self.count("mode acknowledged")

    # -- after a restart ---------------------------------------------------------
    def check(self, listing: list[dict[str, Any]], mode: str, where: str, *,
              clean: bool = False) -> int:
        """Compare a restarted daemon's blockers and mode with the record, then
        take them as the new record.  ``clean``: the daemon before the restart
        was stopped (SIGTERM), not killed, so nothing unanswered was made.
        Returns how many violations were found."""
        found = len(self.violations)
        seen: dict[str, dict[str, Any]] = {}
        for info in listing:
            tag = info.get("reason")
            if not isinstance(tag, str) or tag not in self.adds or tag in seen:
                self.violations.append(f"{where}: a blocker nobody added: {info}")
                continue
            seen[tag] = info
        self._check_order([tag for tag in seen if self.adds[tag].durable], where)
        for tag, add in list(self.adds.items()):
            there = seen.get(tag)
            if there is not None:
                self._check_present(add, there, where)
            elif add.status == PRESENT and add.durable:
                self.violations.append(f"{where}: acknowledged add {add.id} ({tag!r}) is gone")
            if add.durable:
                outcome = OUTCOMES[add.status, there is not None]
                self.count(outcome)
                if outcome in UNANSWERED_DONE:
                    self.unanswered_done += 1
                    if clean:
                        self.violations.append(
                            f"{where}: {add.id} ({tag!r}): {UNANSWERED_DONE[outcome]} "
                            "before a clean stop, yet never answered")
                elif clean and add.status in (SENT, DELETING):
                    self.count("unanswered not done at stop")
            if there is None or not add.durable:
                del self.adds[tag]
            else:
                add.status = PRESENT
        if clean and mode != self.mode:
            self.violations.append(f"{where}: mode {mode}, not {self.mode} (acknowledged), "
                                   "after a clean stop")
        elif mode != self.mode and mode not in self.unsure_modes:
            self.violations.append(f"{where}: mode {mode}, not {self.mode} (acknowledged) nor "
                                   f"any of {self.unsure_modes} (unanswered)")
        self.mode, self.unsure_modes = mode, []
        return len(self.violations) - found

    def _check_present(self, add: Add, info: dict[str, Any], where: str) -> None:
        what = f"{where}: {info['id']} ({add.tag!r})"
        if not add.durable:
            self.violations.append(f"{what}: connection-scoped, yet restored")
            return
        if add.status == DELETED:
            self.violations.append(f"{what}: its delete was acknowledged, yet it is back")
        if add.status == SENT and add.id is None:  # unanswered, generated: the id is new
            if not GENERATED.fullmatch(info["id"]):
                self.violations.append(f"{what}: not a generated id")
            elif info["id"] in self.generated:
                self.violations.append(f"{what}: generated id handed out twice")
            add.id = info["id"]
            self.generated.add(info["id"])
        elif info["id"] != add.id:
            self.violations.append(f"{what}: the id should be {add.id}")
        expected = {"modes": add.modes, "internal": add.internal, "scope": "daemon"}
        actual = {key: info.get(key) for key in expected}
        if actual != expected:
            self.violations.append(f"{what}: {actual}, should be {expected}")

    def _check_order(self, tags: list[str], where: str) -> None:
        """Survivors first, in their old order; then the new ones, each client's
        in the order it sent them."""
        before = set(self.order)
        survivors = [tag for tag in tags if tag in before]
        if tags[:len(survivors)] != survivors or survivors != [
                tag for tag in self.order if tag in set(survivors)]:
            self.violations.append(f"{where}: restored blockers out of order: {tags} "
                                   f"(before the crash: {self.order})")
        new = [self.adds[tag] for tag in tags[len(survivors):]]
        for client in {add.client for add in new}:
            sent = [add.order for add in new if add.client == client]
            if sent != sorted(sent):
                self.violations.append(f"{where}: client {client}'s blockers out of order: "
                                       f"{[a.tag for a in new if a.client == client]}")
        self.order = tags
