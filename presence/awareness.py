"""Server-side awareness for one room, following the y-protocols rules, plus ownership.

Theory of operation
-------------------
* An entry is applied only if its clock is newer than the known one, or equal with state
  ``null`` while the client is known (a removal). Unknown clients count as clock 0, so a
  client's initial ``{}`` at clock 0 is ignored — exactly what Yjs clients do.
* Clients re-send every update they receive at the same clock; those copies are stale here and
  dropped quietly, so only real changes (and renewals, which carry a newer clock) are relayed.
  Without this, traffic multiplies with room size. Staleness is decided *before* ownership: an
  echo of somebody else's entry is not an attack and is not counted as one.
* Ownership: the first connection to introduce a clientID owns it. Another connection may not
  write that clientID (spoofing; counted by the caller) unless it belongs to the same user — a
  reconnecting tab that re-appears before its old socket's close was processed.
* When a connection leaves, every clientID it owned is removed and the removal is returned for
  broadcast, so cursors vanish at once instead of after the 30 s timeout.
* Entries not renewed within the timeout are expired (clients renew every 15 s).

Everything is pure and clock-injected; ``presence.room`` decides what to send. ``check`` only
classifies, ``put``/``remove`` mutate, so callers can stamp or rate-limit in between.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from collab.protocol import AwarenessEntry

NULL = "null"


class Verdict(enum.Enum):
    STALE = "stale"  # an echo or an old copy: nothing to do
    FOREIGN = "foreign"  # a write to a clientID another user's connection owns: refused
    NEW_ID = "new-id"  # the first state of a clientID this owner introduces
    UPDATE = "update"  # a newer state of a clientID this owner (or this user) holds
    REMOVE = "remove"  # the owner removes its state


@dataclass(slots=True)
class Known:
    clock: int
    state: str
    owner: Hashable
    user: str
    updated: float
    session: str = ""  # the owning connection's id, "<node>/<conn>" for entries learnt from peers


@dataclass(slots=True)
class ApplyResult:
    changed: list[AwarenessEntry] = field(default_factory=list)
    rejected: int = 0
    over_limit: bool = False


class RoomAwareness:
    def __init__(self) -> None:
        self._states: dict[int, Known] = {}
        # Clocks of removed clients, so that a late copy of an old update is not re-applied.
        self._removed: dict[int, tuple[int, float]] = {}
        self._owned: dict[Hashable, set[int]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._states

    def get(self, client_id: int) -> Known | None:
        return self._states.get(client_id)

    def items(self) -> Iterable[tuple[int, Known]]:
        return self._states.items()

    def states(self) -> dict[int, str]:
        return {cid: known.state for cid, known in self._states.items()}

    def owner_of(self, client_id: int) -> Hashable | None:
        known = self._states.get(client_id)
        return known.owner if known else None

    def owned_by(self, owner: Hashable) -> set[int]:
        return set(self._owned.get(owner, ()))

    def owned_entries(self, keep: Callable[[Hashable], bool]) -> list[tuple[AwarenessEntry, Known]]:
        """Entries whose owner passes ``keep`` — e.g. only this node's own."""
        return [(AwarenessEntry(cid, k.clock, k.state), k) for cid, k in self._states.items() if keep(k.owner)]

    def snapshot(self) -> list[AwarenessEntry]:
        """Every known state, for a joiner or a query-awareness request."""
        return [AwarenessEntry(cid, k.clock, k.state) for cid, k in self._states.items()]

    # -- deciding ------------------------------------------------------------------------------

    def check(self, owner: Hashable, user: str, entry: AwarenessEntry) -> Verdict:
        known = self._states.get(entry.client_id)
        if entry.state == NULL:
            if known is None or entry.clock < known.clock:
                return Verdict.STALE
        else:
            current = known.clock if known is not None else self._removed.get(entry.client_id, (0, 0.0))[0]
            if entry.clock <= current:
                return Verdict.STALE
        if known is not None and known.owner != owner and known.user != user:
            return Verdict.FOREIGN
        if entry.state == NULL:
            return Verdict.REMOVE
        return Verdict.NEW_ID if known is None else Verdict.UPDATE

    def holds(self, owner: Hashable) -> int:
        return len(self._owned.get(owner, ()))

    # -- changing ------------------------------------------------------------------------------

    def put(self, owner: Hashable, user: str, entry: AwarenessEntry, now: float, session: str = "") -> None:
        """Store ``entry`` (already checked) as ``owner``'s; a same-user takeover moves ownership."""
        cid = entry.client_id
        known = self._states.get(cid)
        if known is None:
            self._states[cid] = Known(entry.clock, entry.state, owner, user, now, session)
            self._removed.pop(cid, None)
        else:
            if known.owner != owner:
                self._owned.get(known.owner, set()).discard(cid)
                known.owner, known.user = owner, user
            known.clock, known.state, known.updated = entry.clock, entry.state, now
            if session:
                known.session = session
        self._owned.setdefault(owner, set()).add(cid)

    def remove(self, client_id: int, clock: int, now: float) -> AwarenessEntry | None:
        known = self._states.pop(client_id, None)
        if known is None:
            return None
        owned = self._owned.get(known.owner)
        if owned is not None:
            owned.discard(client_id)
            if not owned:
                del self._owned[known.owner]
        clock = max(clock, known.clock)
        self._removed[client_id] = (clock, now)
        return AwarenessEntry(client_id, clock, NULL)

    def apply(self, owner: Hashable, user: str, entries: Iterable[AwarenessEntry], now: float,
              max_ids: int | None = None, session: str = "") -> ApplyResult:
        """Check and apply ``owner``'s entries as they are (peers' entries: already stamped)."""
        result = ApplyResult()
        for entry in entries:
            verdict = self.check(owner, user, entry)
            if verdict is Verdict.STALE:
                continue
            if verdict is Verdict.FOREIGN:
                result.rejected += 1
            elif verdict is Verdict.REMOVE:
                removed = self.remove(entry.client_id, entry.clock, now)
                if removed is not None:
                    result.changed.append(removed)
            else:
                if verdict is Verdict.NEW_ID and max_ids is not None and self.holds(owner) >= max_ids:
                    result.over_limit = True
                    continue
                self.put(owner, user, entry, now, session)
                result.changed.append(entry)
        return result

    def remove_owner(self, owner: Hashable, now: float) -> list[AwarenessEntry]:
        removed = []
        for cid in self._owned.pop(owner, set()):
            known = self._states.pop(cid, None)
            if known is not None:
                self._removed[cid] = (known.clock, now)
                removed.append(AwarenessEntry(cid, known.clock, NULL))
        return removed

    def expire(self, now: float, timeout: float) -> list[AwarenessEntry]:
        removed = []
        for cid, known in list(self._states.items()):
            if now - known.updated >= timeout:
                entry = self.remove(cid, known.clock, now)
                if entry is not None:
                    removed.append(entry)
        for cid, (_clock, when) in list(self._removed.items()):
            if now - when >= 2 * timeout:
                del self._removed[cid]
        return removed
