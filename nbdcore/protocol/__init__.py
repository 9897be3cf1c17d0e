"""Sans-IO NBD protocol core: bytes in, events and reply bytes out. No sockets, no files."""

from .constants import BASE_ALLOCATION, Cmd, CmdFlag, NbdErrno, Opt, Rep, TransmissionFlag
from .errors import CommandError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .exports import ExportCatalog, ExportInfo, ExportRefused, ExportUnknown
from .handshake import (
    NEED_DATA,
    Closed,
    ExportChosen,
    Handshake,
    HandshakeState,
    Negotiated,
    NegotiationRecord,
)
from .transmission import Extent, Transmission, command_name, nbd_errno
from .wire import Request

__all__ = [
    "BASE_ALLOCATION",
    "NEED_DATA",
    "Closed",
    "Cmd",
    "CmdFlag",
    "CommandError",
    "ExportCatalog",
    "ExportChosen",
    "ExportInfo",
    "ExportRefused",
    "ExportUnknown",
    "Extent",
    "Handshake",
    "HandshakeState",
    "LocalProtocolError",
    "NbdErrno",
    "Negotiated",
    "NegotiationRecord",
    "Opt",
    "ProtocolError",
    "RemoteProtocolError",
    "Rep",
    "Request",
    "Transmission",
    "TransmissionFlag",
    "command_name",
    "nbd_errno",
]
