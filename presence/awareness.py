"""Server-side awareness for one room, following the y-protocols rules, plus ownership.

Theory of operation
-------------------
* An entry is applied only if its clock is newer than the known one, or equal with state
  ``null`` while the client is known (a removal). Unknown clients count as clock 0, so a
  client's initial ``{}`` at clock 0 is ignored — exactly what Yjs clients do.
* Clients re-send every update they receive at the same clock; those copies are dropped here,
  so only real changes (and renewals, which carry a newer clock) are relayed. Without this,
  traffic multiplies with room size.
* Ownership: the first connection to introduce a clientID owns it. Another connection may not
  write that clientID (spoofing; counted by the caller) unless it belongs to the same user — a
  reconnecting tab that re-appears before its old socket's close was processed.
* When a connection leaves, every clientID it owned is removed and the removal is returned for
  broadcast, so cursors vanish at once instead of after the 30 s timeout.
* Entries not renewed within the timeout are expired (clients renew every 15 s).

Everything is pure and clock-injected; the room decides what to send.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from collab.protocol import AwarenessEntry

NULL = "null"


@dataclass(slots=True)
class _Known:
    clock: int
    state: str
    owner: Hashable
    user: str
    updated: float


@dataclass(slots=True)
class ApplyResult:
    changed: list[AwarenessEntry] = field(default_factory=list)
    rejected: int = 0
    over_limit: bool = False


class RoomAwareness:
    def __init__(self) -> None:
        self._states: dict[int, _Known] = {}
        # Clocks of removed clients, so that a late copy of an old update is not re-applied.
        self._removed: dict[int, tuple[int, float]] = {}
        self._owned: dict[Hashable, set[int]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def states(self) -> dict[int, str]:
        return {cid: known.state for cid, known in self._states.items()}

    def owner_of(self, client_id: int) -> Hashable | None:
        known = self._states.get(client_id)
        return known.owner if known else None

    def owned_entries(self, keep: Callable[[Hashable], bool]) -> list[tuple[AwarenessEntry, str]]:
        """Entries (with their user) whose owner passes ``keep`` — e.g. only this node's own."""
        return [(AwarenessEntry(cid, k.clock, k.state), k.user) for cid, k in self._states.items() if keep(k.owner)]

    def snapshot(self) -> list[AwarenessEntry]:
        """Every known state, for a joiner or a query-awareness request."""
        return [AwarenessEntry(cid, k.clock, k.state) for cid, k in self._states.items()]

    def apply(self, owner: Hashable, user: str, entries: Iterable[AwarenessEntry], now: float,
              max_ids: int | None = None) -> ApplyResult:
        """Apply ``owner``'s entries; ``max_ids`` bounds how many clientIDs that owner may hold."""
        result = ApplyResult()
        owned = self._owned.setdefault(owner, set())
        for entry in entries:
            cid = entry.client_id
            known = self._states.get(cid)
            if known is not None and known.owner != owner:
                if known.user != user:
                    result.rejected += 1
                    continue
                self._owned.get(known.owner, set()).discard(cid)  # same user's new tab takes over
                known.owner = owner
                owned.add(cid)
            if entry.state == NULL:
                if known is not None and entry.clock >= known.clock:
                    del self._states[cid]
                    owned.discard(cid)
                    self._removed[cid] = (entry.clock, now)
                    result.changed.append(entry)
                continue
            current = known.clock if known is not None else self._removed.get(cid, (0, 0.0))[0]
            if entry.clock <= current:
                continue  # an echo of what we already have, or stale
            if known is None:
                if max_ids is not None and cid not in owned and len(owned) >= max_ids:
                    result.over_limit = True
                    continue
                self._states[cid] = _Known(entry.clock, entry.state, owner, user, now)
                self._removed.pop(cid, None)
                owned.add(cid)
            else:
                known.clock, known.state, known.updated = entry.clock, entry.state, now
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
                del self._states[cid]
                self._owned.get(known.owner, set()).discard(cid)
                self._removed[cid] = (known.clock, now)
                removed.append(AwarenessEntry(cid, known.clock, NULL))
        for cid, (_clock, when) in list(self._removed.items()):
            if now - when >= 2 * timeout:
                del self._removed[cid]
        return removed
