"""Undo / redo for the plan editor: a linear history of snapshots (plan JSON + pinned layers).

Snapshots are plain JSON-able values, so a history entry can never alias the live plan object.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass
class Snapshot:
    """One state of the editor: the plan as JSON and the set of pinned layers."""

    plan: dict
    pinned: tuple[str, ...] = ()
    label: str = ""

    def key(self) -> str:
        return json.dumps([self.plan, sorted(self.pinned)], sort_keys=True)


@dataclass
class History:
    """Linear undo/redo over snapshots. `present` is the current one; `limit` bounds memory."""

    present: Snapshot
    limit: int = 200
    _past: list[Snapshot] = field(default_factory=list)
    _future: list[Snapshot] = field(default_factory=list)

    def push(self, snap: Snapshot) -> bool:
        """Make `snap` the present; returns False (and records nothing) when it equals the present."""
        if snap.key() == self.present.key():
            return False
        self._past.append(self.present)
        del self._past[: -self.limit]
        self.present = snap
        self._future.clear()
        return True

    @property
    def can_undo(self) -> bool:
        return bool(self._past)

    @property
    def can_redo(self) -> bool:
        return bool(self._future)

    def undo(self) -> Snapshot | None:
        """Step back; returns the new present (None when there is nothing to undo)."""
        if not self._past:
            return None
        self._future.append(self.present)
        self.present = self._past.pop()
        return self.present

    def redo(self) -> Snapshot | None:
        """Step forward again; returns the new present (None when there is nothing to redo)."""
        if not self._future:
            return None
        self._past.append(self.present)
        self.present = self._future.pop()
        return self.present

    @property
    def undo_label(self) -> str:
        return self.present.label if self._past else ""

    @property
    def redo_label(self) -> str:
        return self._future[-1].label if self._future else ""
