"""What the protocol core needs to know about an export, and how it finds one.

The catalog is supplied by the I/O layer (the standalone server or the appliance); the
handshake asks it, never a backend, so this package stays free of files and sockets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .constants import TransmissionFlag

MAX_PAYLOAD_DEFAULT = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """An export as the handshake advertises it; capabilities come from its backend."""

    name: str
    size: int
    description: str = ""
    read_only: bool = False
    multi_conn: bool = True
    can_flush: bool = True
    can_fua: bool = True
    can_trim: bool = True
    can_zero: bool = True
    can_fast_zero: bool = True
    can_cache: bool = True
    block_min: int = 1
    block_preferred: int = 4096
    block_max: int = MAX_PAYLOAD_DEFAULT

    def transmission_flags(self, *, structured: bool, extended: bool, contexts: bool) -> int:
        """Flags for one connection: DF and block-status payload depend on negotiation."""
        flags = TransmissionFlag.HAS_FLAGS
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        else:
            if self.can_trim:
                flags |= TransmissionFlag.SEND_TRIM
            if self.can_zero:
                flags |= TransmissionFlag.SEND_WRITE_ZEROES
                if self.can_fast_zero:
                    flags |= TransmissionFlag.SEND_FAST_ZERO
        if self.can_flush:
            flags |= TransmissionFlag.SEND_FLUSH
        if self.can_fua:
            flags |= TransmissionFlag.SEND_FUA
        if self.can_cache:
            flags |= TransmissionFlag.SEND_CACHE
        if self.multi_conn or self.read_only:
            flags |= TransmissionFlag.CAN_MULTI_CONN
        if structured or extended:
            flags |= TransmissionFlag.SEND_DF
        if extended and contexts:
            flags |= TransmissionFlag.BLOCK_STATUS_PAYLOAD
        return int(flags)


@dataclass(frozen=True, slots=True)
class Client:
    """Who is asking: the peer's address and what TLS proved about it.

    ``names`` are the identities TLS verified: the client certificate's subject CN and DNS
    names, or the PSK identity. Without TLS a client has no names, only an address.
    """

    peer: str
    tls: bool = False
    names: tuple[str, ...] = ()


class ExportUnknown(Exception):
    """No export by that name (NBD_REP_ERR_UNKNOWN)."""

    kind = "unknown_export"


class ExportRefused(Exception):
    """The export exists but this client may not use it (NBD_REP_ERR_POLICY).

    ``kind`` says why in one word for refusal statistics: "not_allowed" (address),
    "client_not_allowed" (TLS identity), "disabled", "limit" (connection limit).
    """

    def __init__(self, message: str, kind: str = "not_allowed") -> None:
        super().__init__(message)
        self.kind = kind


class ExportNeedsTls(ExportRefused):
    """The export is served only over TLS and this client has not started it
    (NBD_REP_ERR_TLS_REQD)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, kind="tls_required")


class ExportCatalog(Protocol):
    def list_exports(self, client: Client) -> list[tuple[str, str]]:
        """(name, description) of every export this client may see."""
        ...

    def lookup(self, name: str, client: Client) -> ExportInfo:
        """The export called ``name`` ("" = default); raises ExportUnknown, ExportRefused
        or ExportNeedsTls."""
        ...
