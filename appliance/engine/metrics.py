"""Engine metrics: an nbdcore Observer whose work happens off the I/O path.

Connection threads only append to a bounded deque (never a network call). A flusher
thread, once a second, writes live counters to Redis (per session and per export, with a
TTL), records sessions in the database on connect and disconnect (and every
``db_interval_s`` for long ones), records each refused connection with its reason, and
stores a per-export history sample every ``sample_interval_s``. When Redis or the database
is away the engine keeps serving: events wait in the deque and catch up, and what no
longer fits is dropped and counted.
"""

from __future__ import annotations

import collections
import copy
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from nbdcore.stats import ConnectionInfo

log = logging.getLogger(__name__)

COUNTERS = ("bytes_read", "bytes_written", "hole_bytes", "zero_bytes")
MAX_EVENTS = 10_000


def _sum_stats(total: dict[str, Any], stats: dict[str, Any]) -> None:
    for key in COUNTERS:
        total[key] = total.get(key, 0) + stats.get(key, 0)
    ops = total.setdefault("ops", {})
    for name, count in stats.get("ops", {}).items():
        ops[name] = ops.get(name, 0) + count
    errors = total.setdefault("errors", {})
    for name, count in stats.get("errors", {}).items():
        errors[name] = errors.get(name, 0) + count
    latency = total.setdefault("latency_counts", [0] * len(stats.get("latency_counts", [])))
    for i, count in enumerate(stats.get("latency_counts", [])):
        if i < len(latency):
            latency[i] += count
    total["latency_sum_us"] = total.get("latency_sum_us", 0) + stats.get("latency_sum_us", 0)
    total["latency_bounds_us"] = stats.get("latency_bounds_us", total.get("latency_bounds_us"))


class EngineMetrics:
    """Observer + flusher. ``record_session``, ``record_sample`` and ``record_refusal``
    write the database."""

    def __init__(
        self,
        *,
        node: str,
        run: str,
        redis_factory: Callable[[], Any] | None,
        record_session: Callable[[dict[str, Any]], None] | None = None,
        record_sample: Callable[[str, dict[str, Any], float], None] | None = None,
        record_refusal: Callable[[dict[str, Any]], None] | None = None,
        interval_s: float = 1.0,
        db_interval_s: float = 30.0,
        sample_interval_s: float = 10.0,
    ) -> None:
        self.node = node
        self.run = run
        self.redis_factory = redis_factory
        self.record_session = record_session
        self.record_sample = record_sample
        self.record_refusal = record_refusal
        self.interval_s = interval_s
        self.db_interval_s = db_interval_s
        self.sample_interval_s = sample_interval_s
        self.connections: Callable[[], list[ConnectionInfo]] = list
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        # Refusals wait apart: a flood of them (a port scan, half-open connections) must
        # not push session events out, nor the other way round.
        self._refused: collections.deque[dict[str, Any]] = collections.deque()
        self.refusals: collections.Counter[str] = collections.Counter()  # by kind, this run
        self._lock = threading.Lock()
        self._closed_totals: dict[str, dict[str, Any]] = {}  # per export, ended connections
        self._previous: dict[str, tuple[float, dict[str, Any]]] = {}  # for rates
        self.dropped = 0  # events or writes given up, by design rather than by bug
        self.failures: collections.Counter[str] = collections.Counter()
        self._redis: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_db = 0.0
        self._last_sample = 0.0
        self._last_complaint = 0.0

    # ------------------------------------------------------------ Observer (I/O threads)

    def connection_opened(self, conn: ConnectionInfo) -> None:
        pass

    def handshake_finished(self, conn: ConnectionInfo) -> None:
        self._push(conn.snapshot())

    def connection_closed(self, conn: ConnectionInfo) -> None:
        if conn.export_name is None:
            return  # never reached transmission: no session to record
        snapshot = conn.snapshot()
        with self._lock:
            total = self._closed_totals.setdefault(conn.export_name, {"sessions": 0})
            total["sessions"] += 1
            _sum_stats(total, snapshot["stats"])
        self._push(snapshot)

    def connection_refused(self, conn: ConnectionInfo) -> None:
        snapshot = conn.snapshot()
        with self._lock:
            self.refusals[conn.refusal_kind or "other"] += 1
            if len(self._refused) >= MAX_EVENTS:
                self._refused.popleft()
                self.dropped += 1
            self._refused.append(snapshot)

    def _push(self, snapshot: dict[str, Any]) -> None:
        with self._lock:
            if len(self._events) >= MAX_EVENTS:
                self._events.popleft()
                self.dropped += 1
            self._events.append(snapshot)

    # ------------------------------------------------------------ flusher thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-metrics", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self.flush()  # the last sessions' closes

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self) -> None:
        now = time.time()
        live = [c for c in self.connections() if c.export_name is not None]
        self._write_sessions(live, now)
        self._write_refusals()
        self._publish_live(live, now)
        if self.record_sample is not None and now - self._last_sample >= self.sample_interval_s:
            self._last_sample = now
            self._write_samples(live, now)

    def complain(self, what: str, exc: BaseException) -> None:
        self.failures[what] += 1
        now = time.monotonic()
        if now - self._last_complaint > 30:  # a warning per episode, not per second
            self._last_complaint = now
            log.warning("engine metrics: %s failed (%s); serving goes on, %d dropped so far",
                        what, exc, self.dropped)

    def _write_sessions(self, live: list[ConnectionInfo], now: float) -> None:
        if self.record_session is None:
            with self._lock:
                self._events.clear()
            return
        if now - self._last_db >= self.db_interval_s:
            self._last_db = now
            for conn in live:  # long sessions get their counters refreshed
                self._push(conn.snapshot())
        self._drain(self._events, self.record_session, "recording a session")

    def _write_refusals(self) -> None:
        if self.record_refusal is None:
            with self._lock:
                self._refused.clear()
            return
        self._drain(self._refused, self.record_refusal, "recording a refused connection")

    def _drain(self, queue: collections.deque[dict[str, Any]],
               record: Callable[[dict[str, Any]], None], what: str) -> None:
        """Record queued snapshots oldest first; one that fails stays for the next tick."""
        while True:
            with self._lock:
                if not queue:
                    return
                snapshot = queue[0]
            try:
                record(snapshot)
            except Exception as exc:
                self.complain(what, exc)
                return
            with self._lock:
                if queue and queue[0] is snapshot:
                    queue.popleft()

    def export_totals(self, live: list[ConnectionInfo]) -> dict[str, dict[str, Any]]:
        """Per export: counters of ended connections plus those of live ones."""
        with self._lock:
            totals = copy.deepcopy(self._closed_totals)
        for conn in live:
            total = totals.setdefault(conn.export_name or "", {"sessions": 0})
            _sum_stats(total, conn.stats.snapshot())
        for name, total in totals.items():
            total["clients"] = sum(1 for c in live if c.export_name == name)
        return totals

    def _publish_live(self, live: list[ConnectionInfo], now: float) -> None:
        if self.redis_factory is None:
            return
        from . import mailbox

        try:
            if self._redis is None:
                self._redis = self.redis_factory()
            pipe = self._redis.pipeline(transaction=False)
            for conn in live:
                snapshot = conn.snapshot()
                snapshot.update(node=self.node, run=self.run, at=now)
                pipe.set(mailbox.session_live_key(self.node, self.run, conn.id),
                         json.dumps(snapshot), ex=mailbox.LIVE_TTL_S)
            for name, total in self.export_totals(live).items():
                total.update(self._rates(name, total, now), node=self.node, at=now)
                pipe.set(mailbox.export_live_key(name), json.dumps(total),
                         ex=mailbox.LIVE_TTL_S)
            pipe.execute()
        except Exception as exc:
            self._redis = None  # reconnect next time
            self.dropped += 1
            self.complain("publishing live counters to Redis", exc)

    def _rates(self, name: str, total: dict[str, Any], now: float) -> dict[str, float]:
        ops = sum(total.get("ops", {}).values())
        current = {"ops": ops, **{k: total.get(k, 0) for k in COUNTERS}}
        previous = self._previous.get(name)
        self._previous[name] = (now, current)
        if previous is None or now <= previous[0]:
            return {f"{k}_per_s": 0.0 for k in current}
        elapsed = now - previous[0]
        return {f"{k}_per_s": max(0.0, (v - previous[1].get(k, 0)) / elapsed)
                for k, v in current.items()}

    def _write_samples(self, live: list[ConnectionInfo], now: float) -> None:
        assert self.record_sample is not None
        for name, total in self.export_totals(live).items():
            try:
                self.record_sample(name, total, now)
            except Exception as exc:
                self.dropped += 1
                self.complain("storing a history sample", exc)
                return
