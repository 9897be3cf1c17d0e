"""The engine worker owns its node's engine process: started with the worker, restarted
when it dies or stops beating, drained when the worker stops. It also keeps the node's
row in the database (``appliance.nodes``): registered when the worker starts, before the
engine, and refreshed every 5 s, so that the cluster sees the node up, and down soon after
the worker stops.

This is a Celery worker bootstep rather than a task on purpose: a forever-running task
could be redelivered after a broker visibility timeout and start a second copy.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class EngineSupervisor:
    def __init__(
        self,
        *,
        node: str,
        bind: str,
        port: int,
        redis_url: str,
        stale_after_s: float = 10.0,
        drain_timeout_s: float = 30.0,
        handshake_timeout_s: float = 10.0,
        max_connections: int = 1024,
        max_option_length: int = 65536,
        spin_us: int = 50,
    ) -> None:
        self.node = node
        self.bind = bind
        self.port = port
        self.redis_url = redis_url
        self.handshake_timeout_s = handshake_timeout_s
        self.max_connections = max_connections
        self.max_option_length = max_option_length
        self.spin_us = spin_us
        self.stale_after_s = stale_after_s
        self.drain_timeout_s = drain_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._redis: Any = None  # made on first use, kept: the watchdog asks twice a second
        self._started_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "appliance.engine.runner", "--node", self.node,
                "--bind", self.bind, "--port", str(self.port), "--redis-url", self.redis_url,
                "--handshake-timeout", str(self.handshake_timeout_s),
                "--max-connections", str(self.max_connections),
                "--max-option-length", str(self.max_option_length),
                "--spin-us", str(self.spin_us)]

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="engine-supervisor",
                                        daemon=True)
        self._thread.start()

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(self.command())
        self._started_at = time.monotonic()
        log.info("engine for node %s started (pid %d)", self.node, self.proc.pid)

    def _watch(self) -> None:
        backoff = 0.5
        while not self._stop.wait(0.5):
            assert self.proc is not None
            code = self.proc.poll()
            if code is None and not self._beat_is_stale():
                backoff = 0.5
                continue
            if code is None:
                log.error("engine pid %d stopped beating; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
            else:
                log.error("engine pid %d exited with %s; restarting", self.proc.pid, code)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, 10.0)
            self.restarts += 1
            self._spawn()

    def _beat_is_stale(self) -> bool:
        """True when the engine has run long enough to beat but its heartbeat is old."""
        if time.monotonic() - self._started_at < self.stale_after_s:
            return False
        from . import mailbox

        try:
            if self._redis is None:
                self._redis = mailbox.connect(self.redis_url)
            beat = mailbox.read_heartbeat(self._redis, self.node)
        except Exception:
            return False  # Redis away: that is not the engine's fault
        if beat is None or self.proc is None:
            return beat is None
        if beat.get("pid") != self.proc.pid:
            return time.monotonic() - self._started_at > 2 * self.stale_after_s
        return time.time() - float(beat.get("at", 0)) > self.stale_after_s

    def stop(self) -> None:
        """Drain: SIGTERM lets in-flight requests finish; SIGKILL only past the timeout."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.drain_timeout_s)
        except subprocess.TimeoutExpired:
            log.error("engine pid %d did not drain in %ss; killing it", self.proc.pid,
                      self.drain_timeout_s)
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid


def _register_node() -> None:
    from appliance.nodes.services import node_register

    node_register()


def _beat_node() -> None:
    from appliance.nodes.services import node_heartbeat

    node_heartbeat()


class NodeHeartbeat:
    """Registers this host's node, then beats every ``every_s`` seconds, in a thread of its
    own: the database may be away or slow, which must never stall or stop the engine's
    watchdog. Failures are logged; a registration that failed is tried again at each beat.
    """

    def __init__(self, *, every_s: float = 5.0,
                 register: Callable[[], None] = _register_node,
                 beat: Callable[[], None] = _beat_node) -> None:
        self.every_s = every_s
        self._register = register
        self._beat = beat
        self.registered = False
        self.beats = 0
        self.failures = 0
        self._first = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, *, wait_s: float = 5.0) -> None:
        """Start beating; wait up to ``wait_s`` for the registration (the engine starts
        after it, unless the database does not answer in time)."""
        self._thread = threading.Thread(target=self._run, name="node-heartbeat", daemon=True)
        self._thread.start()
        self._first.wait(wait_s)

    def _run(self) -> None:
        try:
            self._tick()
            self._first.set()
            while not self._stop.wait(self.every_s):
                self._tick()
        finally:
            self._first.set()
            self._close_db()

    def _tick(self) -> None:
        self._fresh_db()
        try:
            if self.registered:
                self._beat()
                self.beats += 1
            else:
                self._register()
                self.registered = True
        except Exception as exc:
            self.failures += 1
            log.warning("node %s failed (%s: %s); trying again in %gs",
                        "heartbeat" if self.registered else "registration",
                        type(exc).__name__, exc, self.every_s)
            self._close_db()

    @staticmethod
    def _fresh_db() -> None:
        try:
            from django.db import close_old_connections

            close_old_connections()
        except Exception:  # a broken connection is replaced on next use
            pass

    @staticmethod
    def _close_db() -> None:
        try:
            from django.db import connections

            connections.close_all()
        except Exception:  # closing a dead connection may fail too
            pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)


def install_worker_step(app: Any) -> None:
    """Register ``--engine`` on ``celery worker`` and the bootstep that honours it."""
    from celery import bootsteps
    from click import Option

    app.user_options["worker"].add(Option(
        ["--engine"], is_flag=True, default=False,
        help="run this node's NBD engine process inside the worker"))

    class EngineStep(bootsteps.StartStopStep):
        """Owns the node's engine process for the life of the worker."""

        def __init__(self, worker: Any, engine: bool = False, **options: Any) -> None:
            super().__init__(worker, **options)
            self.supervisor: EngineSupervisor | None = None
            self.heartbeat: NodeHeartbeat | None = None
            if engine:
                self.heartbeat = NodeHeartbeat()
                from django.conf import settings

                self.supervisor = EngineSupervisor(
                    node=settings.APPLIANCE_NODE_NAME,
                    bind=settings.NBD_BIND,
                    port=settings.NBD_PORT,
                    redis_url=settings.REDIS_URL,
                    handshake_timeout_s=float(getattr(settings, "NBD_HANDSHAKE_TIMEOUT", 10.0)),
                    max_connections=int(getattr(settings, "NBD_MAX_CONNECTIONS", 1024)),
                    max_option_length=int(getattr(settings, "NBD_MAX_OPTION_LENGTH", 65536)),
                    spin_us=int(getattr(settings, "NBD_SPIN_US", 50)),
                )

        def start(self, worker: Any) -> None:
            if self.heartbeat is not None:
                self.heartbeat.start()  # registers the node before the engine starts
            if self.supervisor is not None:
                self.supervisor.start()
                os.environ["APPLIANCE_ENGINE_PID"] = str(self.supervisor.pid)

        def stop(self, worker: Any) -> None:
            if self.supervisor is not None:
                self.supervisor.stop()
            if self.heartbeat is not None:
                self.heartbeat.stop()

    app.steps["worker"].add(EngineStep)
