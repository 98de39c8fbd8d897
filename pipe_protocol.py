"""The pipe protocol between the supervisor and its child processes (the bots and the database
agent): one typed envelope, `Message`, with a closed set of kinds, carried as JSON bytes on a
`multiprocessing` Pipe. Never pickles: a message is data, and an exception crosses as text.

Who sends what:
- a bot -> the supervisor: `ready` once polling and the database are up, a `heartbeat` with its
  stats every heartbeat_interval, a `reply` (same id) to `stats` and `ping`;
- the supervisor -> a bot: `stop`, `stats`, `ping`, and `wake` (handle the inbox's pending
  updates now: an operator retried dead ones);
- the supervisor -> the database agent: `event`, `desired`, `save`, `stop`; the agent answers
  `ready` or `failed` once at start, and a `reply` to `desired`.

`EOFError` on a pipe means the peer is gone. Standard library only; imports nothing of DIMS.
"""

from __future__ import annotations

import enum
import json
from typing import Any, NamedTuple


class Kind(str, enum.Enum):
    READY = "ready"            # child -> parent: up (a bot: polling and database; the agent: migrated)
    HEARTBEAT = "heartbeat"    # bot -> parent: stats, every heartbeat_interval
    REPLY = "reply"            # child -> parent: the answer to a request, same id
    STOP = "stop"              # parent -> child: stop gracefully
    STATS = "stats"            # parent -> bot: reply with fresh stats
    PING = "ping"              # parent -> bot: reply at once
    WAKE = "wake"              # parent -> bot: handle the pending updates in the inbox now (no reply)
    FAILED = "failed"          # database agent -> parent: could not start (body: reason)
    EVENT = "event"            # parent -> database agent: a row for dims_events
    DESIRED = "desired"        # parent -> database agent: reply with the bots' desired states
    SAVE = "save"              # parent -> database agent: record one bot's desired state
    BUDGET = "budget"          # parent -> database agent: reply whether the server can hold a fleet


class Message(NamedTuple):
    """The one envelope on every pipe."""
    kind: Kind
    body: dict[str, Any] = {}
    id: int = 0

    def encode(self) -> bytes:
        return json.dumps({"kind": self.kind.value, "body": self.body, "id": self.id}, default=str).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Message":
        """Raises ValueError (or KeyError) for bytes that are not a message."""
        raw = json.loads(data)
        return cls(Kind(raw["kind"]), raw.get("body") or {}, int(raw.get("id", 0)))
