"""Byte layouts of every NBD message: one ``struct.Struct`` each, encoders and decoders.

Decoders check magic and shape only; policy (ranges, flags, read-only) lives in
``transmission.validate_request``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .constants import (
    EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_MAGIC,
    IHAVEOPT,
    MAX_ERROR_MESSAGE,
    MAX_STRING,
    NBDMAGIC,
    REP_MAGIC,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Info,
    ReplyType,
)
from .errors import RemoteProtocolError

GREETING = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")  # REP_MAGIC, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
DATA_CHUNK = struct.Struct(">IHHQIQ")  # CHUNK + the u64 offset of an OFFSET_DATA chunk
EXTENDED_CHUNK = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
HOLE = struct.Struct(">QI")
ERROR_HEAD = struct.Struct(">IH")
EXTENT = struct.Struct(">II")
# CHUNK, context id and one EXTENT: a whole BLOCK_STATUS reply of one descriptor.
ONE_STATUS = struct.Struct(">IHHQIIII")
EXTENT_EXT = struct.Struct(">QQ")

REQUEST_SIZE = REQUEST.size  # 28
EXTENDED_REQUEST_SIZE = EXTENDED_REQUEST.size  # 32
EXPORT_NAME_PADDING = b"\0" * 124


@dataclass(slots=True)
class Request:
    """One transmission request. ``cmd`` stays a raw int: unknown commands earn EINVAL."""

    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    extended: bool = False


def utf8_prefix(text: str, limit: int) -> bytes:
    """``text`` encoded, cut to at most ``limit`` bytes without splitting a character."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()


def greeting(flags: int) -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def decode_request(header: bytes | bytearray | memoryview, offset: int = 0) -> Request:
    magic, flags, cmd, cookie, start, length = REQUEST.unpack_from(header, offset)
    if magic != REQUEST_MAGIC:
        raise RemoteProtocolError(f"bad request magic {magic:#010x}")
    return Request(cmd, flags, cookie, start, length)


def decode_extended_request(header: bytes | bytearray | memoryview, offset: int = 0) -> Request:
    magic, flags, cmd, cookie, start, length = EXTENDED_REQUEST.unpack_from(header, offset)
    if magic != EXTENDED_REQUEST_MAGIC:
        raise RemoteProtocolError(f"bad extended request magic {magic:#010x}")
    return Request(cmd, flags, cookie, start, length, extended=True)


def encode_request(req: Request) -> bytes:
    """Client side, for tests and tools."""
    if req.extended:
        return EXTENDED_REQUEST.pack(
            EXTENDED_REQUEST_MAGIC, req.flags, req.cmd, req.cookie, req.offset, req.length
        )
    return REQUEST.pack(REQUEST_MAGIC, req.flags, req.cmd, req.cookie, req.offset, req.length)


# ---------------------------------------------------------------- option replies


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(REP_MAGIC, option, reply_type, len(payload)) + payload


def rep_server(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + utf8_prefix(description, MAX_STRING)


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def info_text(kind: Info, text: str) -> bytes:
    return U16.pack(kind) + utf8_prefix(text, MAX_STRING)


def meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


# ---------------------------------------------------------------- transmission replies


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(
    cookie: int,
    reply_type: int,
    length: int,
    *,
    done: bool,
    extended: bool = False,
    request_offset: int = 0,
) -> bytes:
    """Header of one structured (or extended) reply chunk; ``length`` is the payload size."""
    flags = 1 if done else 0  # NBD_REPLY_FLAG_DONE, as a plain int (IntFlag is slow)
    if extended:
        return EXTENDED_CHUNK.pack(
            EXTENDED_REPLY_MAGIC, flags, reply_type, cookie, request_offset, length
        )
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, reply_type, cookie, length)


def error_payload(errno: int, message: str, offset: int | None = None) -> bytes:
    raw = utf8_prefix(message, MAX_ERROR_MESSAGE)
    head = ERROR_HEAD.pack(errno, len(raw)) + raw
    return head if offset is None else head + U64.pack(offset)


def error_type(offset: int | None) -> ReplyType:
    return ReplyType.ERROR if offset is None else ReplyType.ERROR_OFFSET
