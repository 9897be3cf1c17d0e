"""Per-connection observation: what was negotiated, and counters of what happened since.

The engine updates counters from the connection's own thread without locks (plain int
increments); readers take ``snapshot()``, which is consistent enough for metrics. The
``Observer`` callbacks let the appliance record sessions without nbdcore knowing about it.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from .protocol.constants import Cmd
from .protocol.handshake import NegotiationRecord

log = logging.getLogger(__name__)

# Latency histogram: bucket i counts requests that took < LATENCY_BOUNDS_US[i] microseconds;
# the last bucket is everything slower.
LATENCY_BOUNDS_US: tuple[int, ...] = tuple(2**i for i in range(3, 25))  # 8 us .. 16.8 s
_COMMANDS = len(Cmd) + 1  # the last slot counts unknown commands

_ids = itertools.count(1)


class ConnectionStats:
    __slots__ = (
        "bytes_read",
        "bytes_written",
        "errors",
        "hole_bytes",
        "latency",
        "latency_sum_us",
        "ops",
        "zero_bytes",
    )

    def __init__(self) -> None:
        self.ops = [0] * _COMMANDS
        self.bytes_read = 0  # data bytes sent to the client (holes excluded)
        self.bytes_written = 0  # payload bytes received in WRITEs
        self.hole_bytes = 0  # bytes answered as OFFSET_HOLE instead of zeroes
        self.zero_bytes = 0  # bytes zeroed or trimmed
        self.errors: dict[str, int] = {}
        self.latency = [0] * (len(LATENCY_BOUNDS_US) + 1)
        self.latency_sum_us = 0

    def count_op(self, cmd: int) -> None:
        self.ops[cmd if 0 <= cmd < _COMMANDS - 1 else _COMMANDS - 1] += 1

    def count_error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1

    def record_latency(self, elapsed_ns: int, count: int = 1) -> None:
        """``count`` requests that each took ``elapsed_ns`` (a batch seen at one time)."""
        micros = elapsed_ns // 1000
        self.latency_sum_us += micros * count
        # bit_length maps 0..7 us to bucket 0, 8..15 to 1, 16..31 to 2, ...; faster than
        # a bisect.
        bucket = max(0, micros.bit_length() - 3)
        self.latency[min(bucket, len(self.latency) - 1)] += count

    def snapshot(self) -> dict[str, Any]:
        ops = {Cmd(i).name: n for i, n in enumerate(self.ops[:-1]) if n}
        if self.ops[-1]:
            ops["UNKNOWN"] = self.ops[-1]
        return {
            "ops": ops,
            "bytes_read": self.bytes_read,
            "bytes_written": self.bytes_written,
            "hole_bytes": self.hole_bytes,
            "zero_bytes": self.zero_bytes,
            "errors": dict(self.errors),
            "latency_bounds_us": list(LATENCY_BOUNDS_US),
            "latency_counts": list(self.latency),
            "latency_sum_us": self.latency_sum_us,
        }


@dataclass(eq=False)
class ConnectionInfo:
    """One client connection as observers see it."""

    peer: str
    id: int = field(default_factory=lambda: next(_ids))
    opened_at: float = field(default_factory=time.time)
    closed_at: float | None = None
    close_reason: str = ""
    record: NegotiationRecord = field(default_factory=NegotiationRecord)
    stats: ConnectionStats = field(default_factory=ConnectionStats)
    # What TLS verified: certificate CN/DNS names or the PSK identity, and the serial.
    tls_names: tuple[str, ...] = ()
    tls_serial: int | None = None
    # Set when the client did not get what it asked for (see Observer.connection_refused).
    refusal: str | None = None
    refusal_kind: str = ""
    requested_export: str | None = None

    @property
    def export_name(self) -> str | None:
        return self.record.export_name

    @property
    def tls(self) -> bool:
        return self.record.tls

    def snapshot(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "peer": self.peer,
            "export": self.export_name,
            "opened_at": self.opened_at,
            "closed_at": self.closed_at,
            "close_reason": self.close_reason,
            "tls_names": list(self.tls_names),
            "tls_serial": self.tls_serial,
            "refusal": self.refusal,
            "refusal_kind": self.refusal_kind,
            "requested_export": self.requested_export,
            "negotiated": self.record.to_dict(),
            "stats": self.stats.snapshot(),
        }


class Observer(Protocol):
    """Callbacks from connection threads; they must be quick and must not block I/O."""

    def connection_opened(self, conn: ConnectionInfo) -> None: ...

    def handshake_finished(self, conn: ConnectionInfo) -> None: ...

    def connection_closed(self, conn: ConnectionInfo) -> None: ...

    def connection_refused(self, conn: ConnectionInfo) -> None:
        """A client was refused; ``conn.refusal`` says why. Called after connection_closed,
        or alone for a connection turned away at accept (too many connections)."""


class NullObserver:
    def connection_opened(self, conn: ConnectionInfo) -> None:
        pass

    def handshake_finished(self, conn: ConnectionInfo) -> None:
        pass

    def connection_closed(self, conn: ConnectionInfo) -> None:
        pass

    def connection_refused(self, conn: ConnectionInfo) -> None:
        pass


def notify(observer: Observer, method: str, conn: ConnectionInfo) -> None:
    """Call an observer without letting its failure reach the engine."""
    callback = getattr(observer, method, None)
    if callback is None:  # observers written before an event existed
        return
    try:
        callback(conn)
    except Exception:
        log.exception("observer %s failed for connection %s", method, conn.id)
