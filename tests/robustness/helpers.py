"""Helpers shared by the robustness tests: exports, an observer that records, fd counting."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Any

from nbdclient import NbdClient, pattern

from nbdcore.backends import MemoryBackend
from nbdcore.exports import Export, ExportRegistry
from nbdcore.stats import ConnectionInfo

MiB = 1024 * 1024


def filled_memory(size: int, data_bytes: int | None = None) -> MemoryBackend:
    """A memory disk holding ``pattern`` in its first ``data_bytes`` (all of it by default);
    the rest is a hole."""
    backend = MemoryBackend(size)
    backend.pwrite(pattern(0, size if data_bytes is None else data_bytes), 0)
    return backend


def registry_of(**exports: Any) -> ExportRegistry:
    """``registry_of(disk=backend, ro=(backend, {"read_only": True}))``."""
    registry = ExportRegistry()
    for name, spec in exports.items():
        backend, options = spec if isinstance(spec, tuple) else (spec, {})
        registry.add(Export(name, backend, **options))
    return registry


class Recorder:
    """An Observer that keeps every callback as (event, ConnectionInfo)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.events: list[tuple[str, ConnectionInfo]] = []

    def _add(self, event: str, conn: ConnectionInfo) -> None:
        with self._lock:
            self.events.append((event, conn))

    def connection_opened(self, conn: ConnectionInfo) -> None:
        self._add("opened", conn)

    def handshake_finished(self, conn: ConnectionInfo) -> None:
        self._add("handshake", conn)

    def connection_closed(self, conn: ConnectionInfo) -> None:
        self._add("closed", conn)

    def connection_refused(self, conn: ConnectionInfo) -> None:
        self._add("refused", conn)

    def of(self, event: str) -> list[ConnectionInfo]:
        with self._lock:
            return [conn for name, conn in self.events if name == event]

    def close_reasons(self) -> list[str]:
        return [conn.close_reason for conn in self.of("closed")]

    def for_connection(self, conn_id: int) -> list[str]:
        with self._lock:
            return [name for name, conn in self.events if conn.id == conn_id]


class SlowSync:
    """Wraps a backend so that ``sync`` (FLUSH, FUA) takes ``delay`` seconds."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.size = inner.size
        self.caps = inner.caps
        self.delay = delay
        self.syncs = 0

    def sync(self) -> None:
        time.sleep(self.delay)
        self.inner.sync()
        self.syncs += 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def connected(port: int, export: str = "disk", **handshake: Any) -> NbdClient:
    client = NbdClient.connect(port)
    client.handshake(export, **handshake)
    return client


def reset_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER 0), as a crashing client would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def check_serves(port: int, export: str = "disk", length: int = 65536) -> None:
    """A fresh client can still negotiate and read the pattern."""
    with connected(port, export) as client:
        reply = client.read(0, length)
        assert reply.ok, reply.chunks
        assert reply.data() == pattern(0, length)
        client.disconnect()
        assert client.server_closed()
