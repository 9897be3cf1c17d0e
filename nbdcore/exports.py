"""Exports as the server holds them: a backend plus the policy it is published with.

``ExportRegistry`` is the catalog the handshake consults. It can be changed while the
server runs (the appliance adds, removes and re-publishes exports); connections that
already chose an export keep the ``Export`` object they got.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from .backends.base import Backend
from .protocol.exports import ExportInfo, ExportRefused, ExportUnknown

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(eq=False)
class Export:
    name: str
    backend: Backend
    description: str = ""
    read_only: bool = False
    multi_conn: bool = True
    enabled: bool = True
    # Empty means every client may connect.
    allowed_networks: list[IpNetwork] = field(default_factory=list)

    def info(self) -> ExportInfo:
        caps = self.backend.caps
        read_only = self.read_only or not caps.can_write
        return ExportInfo(
            name=self.name,
            size=self.backend.size,
            description=self.description,
            read_only=read_only,
            multi_conn=self.multi_conn and caps.can_multi_conn,
            can_flush=caps.can_flush,
            can_fua=caps.can_fua,
            can_trim=caps.can_trim,
            can_zero=caps.can_zero,
            can_fast_zero=caps.can_fast_zero,
            can_cache=caps.can_cache,
        )

    def allows(self, host: str) -> bool:
        if not self.allowed_networks:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False  # a Unix socket or unknown peer cannot prove its address
        return any(address in network for network in self.allowed_networks)


def peer_host(peer: str) -> str:
    """'127.0.0.1:5000' -> '127.0.0.1', '[::1]:5000' -> '::1'."""
    host, _, _ = peer.rpartition(":")
    return host.strip("[]") if host else peer


class ExportRegistry:
    """Thread-safe name -> Export map implementing the handshake's ExportCatalog."""

    def __init__(self, exports: Iterable[Export] = ()) -> None:
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}
        for export in exports:
            self.add(export)

    def add(self, export: Export) -> None:
        with self._lock:
            self._exports[export.name] = export

    def remove(self, name: str) -> Export | None:
        with self._lock:
            return self._exports.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._exports)

    def get(self, name: str) -> Export:
        with self._lock:
            export = self._exports.get(name)
        if export is None:
            raise ExportUnknown(f"no export named {name!r}")
        return export

    def resolve(self, name: str, peer: str) -> Export:
        export = self.get(name)
        if not export.enabled:
            raise ExportRefused(f"export {name!r} is disabled")
        if not export.allows(peer_host(peer)):
            raise ExportRefused(f"export {name!r} is not allowed from {peer_host(peer)}")
        return export

    # ExportCatalog
    def list_exports(self, peer: str) -> list[tuple[str, str]]:
        host = peer_host(peer)
        with self._lock:
            exports = list(self._exports.values())
        return [(e.name, e.description) for e in exports if e.enabled and e.allows(host)]

    def lookup(self, name: str, peer: str) -> ExportInfo:
        return self.resolve(name, peer).info()
