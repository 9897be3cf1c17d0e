"""Sans-IO NBD protocol core: bytes in, events and reply bytes out. No sockets, no files."""

from .constants import BASE_ALLOCATION, Cmd, CmdFlag, NbdErrno, Opt, Rep, TransmissionFlag
from .errors import CommandError, LocalProtocolError, ProtocolError, RemoteProtocolError
from .exports import (
    Client,
    ExportCatalog,
    ExportInfo,
    ExportNeedsTls,
    ExportRefused,
    ExportUnknown,
)
from .handshake import (
    NEED_DATA,
    Closed,
    ExportChosen,
    Handshake,
    HandshakeState,
    Negotiated,
    NegotiationRecord,
    Refusal,
    StartTls,
)
from .transmission import Extent, Transmission, command_name, nbd_errno
from .wire import Request

__all__ = [
    "BASE_ALLOCATION",
    "NEED_DATA",
    "Client",
    "Closed",
    "Cmd",
    "CmdFlag",
    "CommandError",
    "ExportCatalog",
    "ExportChosen",
    "ExportInfo",
    "ExportNeedsTls",
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
    "Refusal",
    "RemoteProtocolError",
    "Rep",
    "Request",
    "StartTls",
    "Transmission",
    "TransmissionFlag",
    "command_name",
    "nbd_errno",
]
