"""A tiny test-side NBD client for the handshake: builds option bytes, parses replies.

It never trusts the server: ``parse_option_replies`` checks every framing rule the real
clients check (qemu ``nbd_receive_option_reply``, libnbd ``prepare_for_reply_payload``)
and raises ``MalformedReply`` on the first violation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nbdcore.protocol.constants import (
    IHAVEOPT,
    MAX_STRING,
    NBDMAGIC,
    REP_MAGIC,
    Info,
    Rep,
)
from nbdcore.protocol.handshake import NEED_DATA, Closed, ExportChosen, Handshake, StartTls

OPTION_HEADER = struct.Struct(">QII")
REPLY_HEADER = struct.Struct(">QIII")
ERROR_BIT = 0x80000000


class MalformedReply(AssertionError):
    """The server sent something a strict client (libnbd 1.14, qemu 7.2) would die on."""


@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & ERROR_BIT)

    @property
    def is_final(self) -> bool:
        return self.type == Rep.ACK or self.is_error


# ------------------------------------------------------------------ request builders


def option(opt: int, data: bytes = b"", *, magic: int = IHAVEOPT) -> bytes:
    return OPTION_HEADER.pack(magic, opt, len(data)) + data


def info_request(name: str | bytes, infos: tuple[int, ...] | list[int] = ()) -> bytes:
    """Payload of NBD_OPT_INFO / NBD_OPT_GO."""
    raw = name.encode() if isinstance(name, str) else name
    return (
        struct.pack(">I", len(raw))
        + raw
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


def meta_request(name: str, queries: list[str] | tuple[str, ...] = ()) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for query in queries:
        q = query.encode()
        out += struct.pack(">I", len(q)) + q
    return out


# ------------------------------------------------------------------ reply parsing


def split_greeting(data: bytes) -> tuple[int, bytes]:
    """Check the 18-byte greeting and return (handshake flags, rest)."""
    if len(data) < 18:
        raise MalformedReply(f"greeting is {len(data)} bytes")
    magic, opt_magic, flags = struct.unpack_from(">QQH", data)
    if magic != NBDMAGIC or opt_magic != IHAVEOPT:
        raise MalformedReply(f"bad greeting {data[:18].hex()}")
    return flags, data[18:]


def _check_text(raw: bytes, what: str) -> str:
    if len(raw) > MAX_STRING:
        raise MalformedReply(f"{what} of {len(raw)} bytes exceeds {MAX_STRING}")
    if b"\0" in raw:
        raise MalformedReply(f"{what} contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedReply(f"{what} is not UTF-8: {raw[-8:]!r}") from exc


def _check_payload(reply: OptionReply) -> None:
    kind, payload = reply.type, reply.payload
    if kind == Rep.ACK:
        if payload:
            raise MalformedReply("ACK with a payload")
    elif kind == Rep.SERVER:
        if len(payload) < 4:
            raise MalformedReply("REP_SERVER shorter than 4 bytes")
        (name_len,) = struct.unpack_from(">I", payload)
        if name_len > len(payload) - 4:
            raise MalformedReply("REP_SERVER name runs past the payload")
        _check_text(payload[4 : 4 + name_len], "export name")
        _check_text(payload[4 + name_len :], "export description")
    elif kind == Rep.INFO:
        if len(payload) < 2:
            raise MalformedReply("REP_INFO shorter than 2 bytes")
        (info,) = struct.unpack_from(">H", payload)
        if info == Info.EXPORT and len(payload) != 12:
            raise MalformedReply(f"INFO_EXPORT of {len(payload)} bytes")
        if info == Info.BLOCK_SIZE and len(payload) != 14:
            raise MalformedReply(f"INFO_BLOCK_SIZE of {len(payload)} bytes")
        if info in (Info.NAME, Info.DESCRIPTION):
            _check_text(payload[2:], "info text")
    elif kind == Rep.META_CONTEXT:
        if len(payload) <= 4:
            raise MalformedReply("META_CONTEXT without a name")
        _check_text(payload[4:], "context name")
    elif reply.is_error:
        try:
            Rep(kind)
        except ValueError as exc:
            raise MalformedReply(f"unknown error reply {kind:#x}") from exc
        _check_text(payload, "error message")
    else:
        raise MalformedReply(f"unknown reply type {kind:#x}")


def parse_option_replies(data: bytes) -> list[OptionReply]:
    """Every option reply in ``data``; the stream must end exactly on a reply boundary."""
    replies = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < REPLY_HEADER.size:
            raise MalformedReply(f"truncated reply header at {pos}")
        magic, opt, kind, length = REPLY_HEADER.unpack_from(data, pos)
        if magic != REP_MAGIC:
            raise MalformedReply(f"bad option reply magic {magic:#x} at {pos}")
        pos += REPLY_HEADER.size
        if length > len(data) - pos:
            raise MalformedReply(f"reply payload of {length} bytes runs past the stream")
        reply = OptionReply(opt, kind, data[pos : pos + length])
        _check_payload(reply)
        replies.append(reply)
        pos += length
    return replies


def group_replies(replies: list[OptionReply]) -> list[list[OptionReply]]:
    """Cut the reply stream after every final reply (ACK or error): one group per option."""
    groups: list[list[OptionReply]] = []
    current: list[OptionReply] = []
    for reply in replies:
        if current and reply.option != current[0].option:
            raise MalformedReply(f"reply for option {reply.option} inside {current[0].option}")
        current.append(reply)
        if reply.is_final:
            groups.append(current)
            current = []
    if current:
        raise MalformedReply(f"option {current[0].option} has no final reply")
    return groups


# ------------------------------------------------------------------ driving


def drive(hs: Handshake, data: bytes, *, eof: bool = False) -> list[object]:
    """Feed ``data`` (and EOF if asked), pull events until NEED_DATA or the end."""
    hs.receive_data(data)
    if eof:
        hs.receive_data(b"")
    events: list[object] = []
    while True:
        event = hs.next_event()
        events.append(event)
        if event is NEED_DATA or isinstance(event, ExportChosen | Closed | StartTls):
            return events
