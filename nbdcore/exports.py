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
from .protocol.exports import Client, ExportInfo, ExportNeedsTls, ExportRefused, ExportUnknown

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
TLS_POLICIES = ("off", "optional", "required")


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
    # "off" and "optional" admit clear-text clients (they differ only in what the appliance
    # advertises); "required" answers NBD_REP_ERR_TLS_REQD until the client starts TLS.
    tls: str = "off"
    # Identities TLS must have verified (certificate CN/DNS names or PSK identity); empty
    # means any client. Listing names implies TLS: a clear-text client cannot prove one.
    allowed_clients: list[str] = field(default_factory=list)
    max_connections: int = 0  # clients at once; 0 = no limit
    # Left out of NBD_OPT_LIST: an export whose name is its secret (the appliance's
    # internal export for moving an image to another node).
    hidden: bool = False

    def __post_init__(self) -> None:
        if self.tls not in TLS_POLICIES:
            raise ValueError(f"tls must be one of {TLS_POLICIES}, not {self.tls!r}")

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

    def needs_tls(self) -> bool:
        return self.tls == "required" or bool(self.allowed_clients)

    def admits(self, client: Client) -> bool:
        """Whether the address and TLS identity of ``client`` meet this export's policy
        (the connection limit aside). Used to drop clients after a policy change."""
        try:
            self.check(client)
        except ExportRefused:
            return False
        return True

    def check(self, client: Client) -> None:
        """Raise ExportRefused (or ExportNeedsTls) if ``client`` may not use this export."""
        host = peer_host(client.peer)
        if not self.enabled:
            raise ExportRefused(f"export {self.name!r} is disabled", kind="disabled")
        if not self.allows(host):
            raise ExportRefused(f"export {self.name!r} is not allowed from {host}")
        if self.needs_tls() and not client.tls:
            raise ExportNeedsTls(f"export {self.name!r} requires TLS")
        if self.allowed_clients and not set(client.names) & set(self.allowed_clients):
            who = ", ".join(client.names) or "a client without a name"
            raise ExportRefused(f"export {self.name!r} is not allowed for {who}",
                                kind="client_not_allowed")


def peer_host(peer: str) -> str:
    """'127.0.0.1:5000' -> '127.0.0.1', '[::1]:5000' -> '::1'."""
    host, _, _ = peer.rpartition(":")
    return host.strip("[]") if host else peer


class ExportRegistry:
    """Thread-safe name -> Export map implementing the handshake's ExportCatalog.

    It also counts the clients attached to each export name, for per-export limits.
    """

    def __init__(self, exports: Iterable[Export] = ()) -> None:
        self._lock = threading.Lock()
        self._exports: dict[str, Export] = {}
        self._attached: dict[str, int] = {}
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

    def resolve(self, name: str, client: Client) -> Export:
        export = self.get(name)
        export.check(client)
        if export.max_connections and self.attached(name) >= export.max_connections:
            raise ExportRefused(f"export {name!r} already has its limit of "
                                f"{export.max_connections} clients", kind="limit")
        return export

    def attach(self, export: Export) -> bool:
        """Count one more client of ``export``; False (and nothing counted) at its limit.

        The lookup during GO already refused clients at the limit with a message; this is
        the atomic check for two clients racing for the last place.
        """
        with self._lock:
            count = self._attached.get(export.name, 0)
            if export.max_connections and count >= export.max_connections:
                return False
            self._attached[export.name] = count + 1
            return True

    def detach(self, export: Export) -> None:
        with self._lock:
            count = self._attached.get(export.name, 0) - 1
            if count > 0:
                self._attached[export.name] = count
            else:
                self._attached.pop(export.name, None)

    def attached(self, name: str) -> int:
        with self._lock:
            return self._attached.get(name, 0)

    # ExportCatalog
    def list_exports(self, client: Client) -> list[tuple[str, str]]:
        with self._lock:
            exports = list(self._exports.values())
        # LIST shows what this client could use: a TLS-only export only once TLS is up.
        return [(e.name, e.description) for e in exports if not e.hidden and e.admits(client)]

    def lookup(self, name: str, client: Client) -> ExportInfo:
        return self.resolve(name, client).info()

