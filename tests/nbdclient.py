"""A small synchronous NBD client for tests: handshake, raw requests, parsed replies.

No installed client speaks extended headers, and none will send malformed bytes on
purpose, so the tests use this one. It checks framing only (magics, lengths) and keeps
every reply chunk as it came, so a test can look at each one. Typical use::

    with NbdClient.connect(port) as c:
        c.handshake("disk", structured=True, meta_contexts=[BASE_ALLOCATION])
        reply = c.read(0, 4096)
        assert reply.ok and reply.data() == expected

Lower levels are public too: ``send_option``/``recv_option_reply`` during the handshake,
``send``/``recv_chunk``/``wait`` during transmission, ``send_raw`` for arbitrary bytes.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from nbdcore.protocol import wire
from nbdcore.protocol.constants import (
    BASE_ALLOCATION,
    EXTENDED_REPLY_MAGIC,
    IHAVEOPT,
    NBDMAGIC,
    REP_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    ClientFlag,
    Cmd,
    CmdFlag,
    Info,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
)

# Refuse to buffer anything bigger than this from the server: a test should fail, not swap.
MAX_REPLY_PAYLOAD = 64 * 1024 * 1024 + 64


class ServerClosed(ConnectionError):
    """The server closed the connection (EOF or reset) while we expected bytes."""


class ProtocolViolation(AssertionError):
    """The server sent bytes that break the NBD framing."""


# ---------------------------------------------------------------------- handshake objects


@dataclass
class OptionReply:
    option: int
    type: int
    payload: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & 0x80000000)

    @property
    def is_final(self) -> bool:
        return self.type == Rep.ACK or self.is_error

    def __repr__(self) -> str:
        try:
            name = Rep(self.type).name
        except ValueError:
            name = hex(self.type)
        return f"OptionReply(option={self.option}, {name}, {self.payload[:60]!r})"


@dataclass
class ExportDetails:
    """What GO / EXPORT_NAME told us about the export."""

    size: int
    flags: int
    block_sizes: tuple[int, int, int] | None = None
    contexts: dict[int, str] = field(default_factory=dict)
    infos: list[OptionReply] = field(default_factory=list)


# ---------------------------------------------------------------------- reply objects


@dataclass
class Chunk:
    """One reply unit: a simple reply, or one structured / extended chunk.

    ``offset`` is the extended header's echo of the request offset (0 otherwise).
    Parsed payload fields are filled according to ``type``:
      OFFSET_DATA:  data_offset, data
      OFFSET_HOLE:  data_offset, hole_size
      BLOCK_STATUS, BLOCK_STATUS_EXT: context_id, extents [(length, flags), ...]
      ERROR, ERROR_OFFSET: error, message (+ error_offset for ERROR_OFFSET)
    A simple reply has kind "simple", flags DONE, error set, and data for a READ.
    """

    kind: str  # "simple", "structured" or "extended"
    cookie: int
    flags: int = ReplyFlag.DONE
    type: int = ReplyType.NONE
    offset: int = 0
    payload: bytes = b""
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    data_offset: int | None = None
    data: bytes = b""
    hole_size: int = 0
    context_id: int | None = None
    extents: list[tuple[int, int]] = field(default_factory=list)
    declared_count: int | None = None  # BLOCK_STATUS_EXT's own descriptor count

    @property
    def done(self) -> bool:
        return bool(self.flags & ReplyFlag.DONE)

    @property
    def is_error(self) -> bool:
        if self.kind == "simple":
            return self.error != 0
        return bool(self.type & 0x8000)

    def __repr__(self) -> str:
        try:
            type_name = ReplyType(self.type).name
        except ValueError:
            type_name = hex(self.type)
        extra = ""
        if self.is_error:
            extra = f" error={self.error} at={self.error_offset} {self.message!r}"
        elif self.type == ReplyType.OFFSET_DATA:
            extra = f" data@{self.data_offset}+{len(self.data)}"
        elif self.type == ReplyType.OFFSET_HOLE:
            extra = f" hole@{self.data_offset}+{self.hole_size}"
        elif self.extents:
            extra = f" extents={self.extents[:8]}"
        return (
            f"Chunk({self.kind} cookie={self.cookie:#x} {type_name} flags={self.flags}"
            f" offset={self.offset}{extra})"
        )


@dataclass
class Reply:
    """Every chunk the server sent for one request, the DONE one last."""

    cookie: int
    cmd: int
    offset: int
    length: int
    chunks: list[Chunk]

    @property
    def errors(self) -> list[Chunk]:
        return [c for c in self.chunks if c.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def error(self) -> int:
        """The errno of the first error, 0 on success."""
        errors = self.errors
        return errors[0].error if errors else 0

    def data(self) -> bytes:
        """A READ's bytes reassembled from data and hole chunks (all must be present)."""
        out = bytearray(self.length)
        covered = 0
        for chunk in self.chunks:
            if chunk.kind == "simple":
                out[:] = chunk.data
                covered += len(chunk.data)
            elif chunk.type == ReplyType.OFFSET_DATA:
                assert chunk.data_offset is not None
                at = chunk.data_offset - self.offset
                out[at : at + len(chunk.data)] = chunk.data
                covered += len(chunk.data)
            elif chunk.type == ReplyType.OFFSET_HOLE:
                covered += chunk.hole_size
        if covered != self.length:
            raise AssertionError(f"read chunks cover {covered} of {self.length} bytes")
        return bytes(out)


@dataclass
class _InFlight:
    cmd: int
    offset: int
    length: int


# ---------------------------------------------------------------------- the client


class NbdClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.handshake_flags: int | None = None
        self.client_flags: int | None = None
        self.structured = False
        self.extended = False
        self.export: ExportDetails | None = None
        self._cookies = itertools.count(0xC0DE_0000_0000_0001)
        self._inflight: dict[int, _InFlight] = {}
        self._stash: dict[int, list[Chunk]] = {}  # chunks of replies not yet waited for
        self._rx = bytearray()

    @classmethod
    def connect(cls, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> NbdClient:
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock)

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # ------------------------------------------------------------ raw bytes

    def send_raw(self, data: bytes | bytearray | memoryview) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        while len(self._rx) < n:
            try:
                data = self.sock.recv(max(65536, n - len(self._rx)))
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise ServerClosed(f"connection reset after {len(self._rx)} of {n} bytes") from exc
            if not data:
                raise ServerClosed(f"EOF after {len(self._rx)} of {n} bytes")
            self._rx += data
        out = bytes(self._rx[:n])
        del self._rx[:n]
        return out

    def read_until_closed(self, timeout: float = 5.0) -> bytes:
        """Everything the server sends until it closes; TimeoutError if it does not."""
        deadline = time.monotonic() + timeout
        received = bytes(self._rx)
        self._rx.clear()
        old_timeout = self.sock.gettimeout()
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"server did not close; received {len(received)} bytes")
                self.sock.settimeout(remaining)
                try:
                    data = self.sock.recv(65536)
                except (ConnectionResetError, BrokenPipeError):
                    return received
                except TimeoutError:
                    continue
                if not data:
                    return received
                received += data
        finally:
            self.sock.settimeout(old_timeout)

    def server_closed(self, timeout: float = 5.0) -> bool:
        """True if the server closes within ``timeout`` (any bytes it sends are dropped)."""
        try:
            self.read_until_closed(timeout)
        except TimeoutError:
            return False
        return True

    # ------------------------------------------------------------ handshake

    def read_greeting(self) -> int:
        magic, opt_magic, flags = wire.GREETING.unpack(self.recv_exact(wire.GREETING.size))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise ProtocolViolation(f"bad greeting {magic:#x} {opt_magic:#x}")
        self.handshake_flags = flags
        return flags

    def send_client_flags(self, flags: int | None = None) -> None:
        if flags is None:
            flags = ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES
        self.client_flags = flags
        self.send_raw(wire.CLIENT_FLAGS.pack(flags))

    def send_option(self, option: int, data: bytes = b"", *, length: int | None = None) -> None:
        """An option header (``length`` may lie about the data) followed by ``data``."""
        size = len(data) if length is None else length
        self.send_raw(wire.OPTION_HEADER.pack(IHAVEOPT, option, size) + data)

    def recv_option_reply(self) -> OptionReply:
        magic, option, reply_type, length = wire.OPTION_REPLY.unpack(
            self.recv_exact(wire.OPTION_REPLY.size)
        )
        if magic != REP_MAGIC:
            raise ProtocolViolation(f"bad option reply magic {magic:#x}")
        if length > MAX_REPLY_PAYLOAD:
            raise ProtocolViolation(f"option reply of {length} bytes")
        return OptionReply(option, reply_type, self.recv_exact(length))

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send one option and collect its replies up to the final ACK or error."""
        self.send_option(option, data)
        replies = []
        while True:
            reply = self.recv_option_reply()
            if reply.option != option:
                raise ProtocolViolation(f"reply to option {reply.option}, expected {option}")
            replies.append(reply)
            if reply.is_final:
                return replies

    def opt_structured_reply(self) -> OptionReply:
        reply = self.option(Opt.STRUCTURED_REPLY)[-1]
        if reply.type == Rep.ACK:
            self.structured = True
        return reply

    def opt_extended_headers(self) -> OptionReply:
        reply = self.option(Opt.EXTENDED_HEADERS)[-1]
        if reply.type == Rep.ACK:
            self.extended = True
            self.structured = True
        return reply

    @staticmethod
    def meta_context_request(export: str, queries: Iterable[str]) -> bytes:
        queries = list(queries)
        raw = export.encode()
        data = wire.U32.pack(len(raw)) + raw + wire.U32.pack(len(queries))
        for query in queries:
            q = query.encode()
            data += wire.U32.pack(len(q)) + q
        return data

    def opt_set_meta_context(self, export: str, queries: Iterable[str]) -> dict[int, str]:
        """SET_META_CONTEXT; the selected contexts (id -> name), {} on error."""
        replies = self.option(Opt.SET_META_CONTEXT, self.meta_context_request(export, queries))
        if replies[-1].is_error:
            return {}
        contexts = {}
        for reply in replies[:-1]:
            assert reply.type == Rep.META_CONTEXT, reply
            contexts[wire.U32.unpack_from(reply.payload)[0]] = reply.payload[4:].decode()
        return contexts

    @staticmethod
    def info_request(export: str, infos: Iterable[int] = (Info.BLOCK_SIZE,)) -> bytes:
        infos = list(infos)
        raw = export.encode()
        data = wire.U32.pack(len(raw)) + raw + wire.U16.pack(len(infos))
        return data + b"".join(wire.U16.pack(i) for i in infos)

    def opt_go(
        self, export: str, infos: Iterable[int] = (Info.BLOCK_SIZE,), *, option: int = Opt.GO
    ) -> tuple[OptionReply, ExportDetails | None]:
        """GO (or INFO); the final reply and, on success, what the INFO replies said."""
        replies = self.option(option, self.info_request(export, infos))
        final = replies[-1]
        if final.is_error:
            return final, None
        details = ExportDetails(size=-1, flags=0, infos=replies[:-1])
        for reply in replies[:-1]:
            assert reply.type == Rep.INFO, reply
            kind = wire.U16.unpack_from(reply.payload)[0]
            if kind == Info.EXPORT:
                _, details.size, details.flags = wire.INFO_EXPORT.unpack(reply.payload)
            elif kind == Info.BLOCK_SIZE:
                _, *sizes = wire.INFO_BLOCK_SIZE.unpack(reply.payload)
                details.block_sizes = (sizes[0], sizes[1], sizes[2])
        if option == Opt.GO:
            self.export = details
        return final, details

    def opt_export_name(self, export: str) -> ExportDetails:
        """EXPORT_NAME: no option reply; the server answers with size and flags or closes."""
        self.send_option(Opt.EXPORT_NAME, export.encode())
        size, flags = wire.EXPORT_NAME_REPLY.unpack(self.recv_exact(wire.EXPORT_NAME_REPLY.size))
        if not (self.client_flags or 0) & ClientFlag.NO_ZEROES:
            self.recv_exact(len(wire.EXPORT_NAME_PADDING))
        self.export = ExportDetails(size=size, flags=flags)
        return self.export

    def handshake(
        self,
        export: str = "",
        *,
        structured: bool = True,
        extended: bool = False,
        meta_contexts: Iterable[str] = (BASE_ALLOCATION,),
        export_name: bool = False,
    ) -> ExportDetails:
        """The whole fixed-newstyle negotiation, ending in transmission."""
        self.read_greeting()
        self.send_client_flags(self.handshake_flags & 0x3)
        if extended:
            assert self.opt_extended_headers().type == Rep.ACK
        if structured and not extended:
            assert self.opt_structured_reply().type == Rep.ACK
        contexts: dict[int, str] = {}
        queries = list(meta_contexts)
        if (structured or extended) and queries:
            contexts = self.opt_set_meta_context(export, queries)
        if export_name:
            details = self.opt_export_name(export)
        else:
            final, maybe = self.opt_go(export)
            if maybe is None:
                raise AssertionError(f"GO {export!r} failed: {final}")
            details = maybe
        details.contexts = contexts
        return details

    # ------------------------------------------------------------ transmission

    def next_cookie(self) -> int:
        return next(self._cookies)

    def send(
        self,
        cmd: int,
        offset: int = 0,
        length: int | None = None,
        *,
        flags: int = 0,
        payload: bytes | bytearray | memoryview = b"",
        cookie: int | None = None,
        extended: bool | None = None,
    ) -> int:
        """Send one request header (+ payload) verbatim; returns its cookie.

        ``length`` defaults to the payload length. Nothing is validated: the header says
        what the caller asked for, even if it lies about the payload.
        """
        if cookie is None:
            cookie = self.next_cookie()
        if length is None:
            length = len(payload)
        if extended is None:
            extended = self.extended
        header = wire.encode_request(
            wire.Request(cmd, flags, cookie, offset, length, extended=extended)
        )
        self._inflight[cookie] = _InFlight(cmd, offset, length)
        if payload and len(payload) < 1 << 20:
            self.send_raw(header + bytes(payload))
        else:
            self.send_raw(header)
            if payload:
                self.send_raw(payload)
        return cookie

    def track(self, cookie: int, cmd: int, offset: int, length: int) -> None:
        """Register a request that went out through ``send_raw`` so its reply is matched."""
        self._inflight[cookie] = _InFlight(cmd, offset, length)

    def recv_chunk(self) -> Chunk:
        """The next reply chunk from the wire, whatever its cookie."""
        magic = wire.U32.unpack(self.recv_exact(4))[0]
        if magic == SIMPLE_REPLY_MAGIC:
            error, cookie = wire.U32.unpack(self.recv_exact(4))[0], self._recv_u64()
            chunk = Chunk("simple", cookie, error=error)
            request = self._inflight.get(cookie)
            if request is not None and request.cmd == Cmd.READ and error == 0:
                chunk.data = self.recv_exact(request.length)
                chunk.data_offset = request.offset
            return chunk
        if magic == STRUCTURED_REPLY_MAGIC:
            rest = self.recv_exact(wire.CHUNK.size - 4)
            _, flags, rtype, cookie, length = wire.CHUNK.unpack(b"\0" * 4 + rest)
            chunk = Chunk("structured", cookie, flags=flags, type=rtype)
        elif magic == EXTENDED_REPLY_MAGIC:
            rest = self.recv_exact(wire.EXTENDED_CHUNK.size - 4)
            _, flags, rtype, cookie, offset, length = wire.EXTENDED_CHUNK.unpack(b"\0" * 4 + rest)
            chunk = Chunk("extended", cookie, flags=flags, type=rtype, offset=offset)
        else:
            raise ProtocolViolation(f"bad reply magic {magic:#010x}")
        if length > MAX_REPLY_PAYLOAD:
            raise ProtocolViolation(f"chunk payload of {length} bytes")
        chunk.payload = self.recv_exact(length)
        _parse_chunk_payload(chunk)
        return chunk

    def _recv_u64(self) -> int:
        return int(wire.U64.unpack(self.recv_exact(8))[0])

    def wait(self, cookie: int) -> Reply:
        """All chunks of the reply to ``cookie`` (others are kept for their own wait)."""
        chunks = self._stash.pop(cookie, [])
        while not (chunks and chunks[-1].done):
            chunk = self.recv_chunk()
            if chunk.cookie == cookie:
                chunks.append(chunk)
            elif chunk.cookie in self._inflight:
                self._stash.setdefault(chunk.cookie, []).append(chunk)
            else:
                raise ProtocolViolation(f"reply for a cookie never sent: {chunk}")
        request = self._inflight.pop(cookie)
        return Reply(cookie, request.cmd, request.offset, request.length, chunks)

    def recv_replies(self) -> list[Reply]:
        """Complete replies in the order their DONE chunk arrived, until none is in flight."""
        done: list[Reply] = []
        while self._inflight:
            chunk = self.recv_chunk()
            if chunk.cookie not in self._inflight:
                raise ProtocolViolation(f"reply for a cookie not in flight: {chunk}")
            self._stash.setdefault(chunk.cookie, []).append(chunk)
            if chunk.done:
                chunks = self._stash.pop(chunk.cookie)
                req = self._inflight.pop(chunk.cookie)
                done.append(Reply(chunk.cookie, req.cmd, req.offset, req.length, chunks))
        return done

    def request(self, cmd: int, offset: int = 0, length: int | None = None, **kw: object) -> Reply:
        return self.wait(self.send(cmd, offset, length, **kw))

    # Convenience commands. In extended mode WRITE carries PAYLOAD_LEN as it must.

    def read(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(Cmd.READ, offset, length, flags=flags)

    def write(self, offset: int, data: bytes, flags: int = 0) -> Reply:
        if self.extended:
            flags |= CmdFlag.PAYLOAD_LEN
        return self.request(Cmd.WRITE, offset, flags=flags, payload=data)

    def flush(self, flags: int = 0) -> Reply:
        return self.request(Cmd.FLUSH, 0, 0, flags=flags)

    def trim(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(Cmd.TRIM, offset, length, flags=flags)

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(Cmd.WRITE_ZEROES, offset, length, flags=flags)

    def block_status(self, offset: int, length: int, flags: int = 0) -> Reply:
        return self.request(Cmd.BLOCK_STATUS, offset, length, flags=flags)

    def disconnect(self) -> None:
        """NBD_CMD_DISC: no reply; the server finishes what it has and closes."""
        header = wire.encode_request(
            wire.Request(Cmd.DISC, 0, self.next_cookie(), 0, 0, extended=self.extended)
        )
        self.send_raw(header)


def _parse_chunk_payload(chunk: Chunk) -> None:
    """Fill the typed fields of a structured / extended chunk from its payload."""
    p = chunk.payload
    t = chunk.type
    if t == ReplyType.NONE:
        if p:
            raise ProtocolViolation(f"NONE chunk with {len(p)} payload bytes")
    elif t == ReplyType.OFFSET_DATA:
        if len(p) < 9:
            raise ProtocolViolation("OFFSET_DATA shorter than 9 bytes")
        chunk.data_offset = wire.U64.unpack_from(p)[0]
        chunk.data = p[8:]
    elif t == ReplyType.OFFSET_HOLE:
        if len(p) != wire.HOLE.size:
            raise ProtocolViolation(f"OFFSET_HOLE of {len(p)} bytes")
        chunk.data_offset, chunk.hole_size = wire.HOLE.unpack(p)
    elif t == ReplyType.BLOCK_STATUS:
        if len(p) < 12 or (len(p) - 4) % 8:
            raise ProtocolViolation(f"BLOCK_STATUS of {len(p)} bytes")
        chunk.context_id = wire.U32.unpack_from(p)[0]
        chunk.extents = [wire.EXTENT.unpack_from(p, at) for at in range(4, len(p), 8)]
    elif t == ReplyType.BLOCK_STATUS_EXT:
        if len(p) < 24 or (len(p) - 8) % 16:
            raise ProtocolViolation(f"BLOCK_STATUS_EXT of {len(p)} bytes")
        chunk.context_id, chunk.declared_count = wire.EXTENT.unpack_from(p)
        chunk.extents = [wire.EXTENT_EXT.unpack_from(p, at) for at in range(8, len(p), 16)]
    elif t in (ReplyType.ERROR, ReplyType.ERROR_OFFSET):
        if len(p) < wire.ERROR_HEAD.size:
            raise ProtocolViolation(f"error chunk of {len(p)} bytes")
        chunk.error, msg_len = wire.ERROR_HEAD.unpack_from(p)
        tail = 0 if t == ReplyType.ERROR else 8
        if len(p) != wire.ERROR_HEAD.size + msg_len + tail:
            raise ProtocolViolation(f"error chunk length {len(p)} vs message {msg_len}")
        chunk.message = p[6 : 6 + msg_len].decode("utf-8")
        if tail:
            chunk.error_offset = wire.U64.unpack_from(p, 6 + msg_len)[0]
    elif t & 0x8000:
        chunk.error = wire.U32.unpack_from(p)[0] if len(p) >= 4 else -1
    else:
        raise ProtocolViolation(f"unknown non-error chunk type {t}")


# ---------------------------------------------------------------------- shared test helpers


def pattern(offset: int, length: int) -> bytes:
    """Deterministic bytes that differ at every offset of a 251-byte cycle.

    ``pattern(o, n)[i]`` depends only on ``o + i``, so any slice of an image filled with
    ``pattern(0, size)`` can be checked on its own.
    """
    start = offset % 251
    cycle = bytes(range(251))
    repeats = (start + length) // 251 + 1
    return (cycle * repeats)[start : start + length]


LIBNBD_PYTHON = "/usr/bin/python3"  # Debian's python3-libnbd binds only this interpreter


def run_libnbd(uri: str, script: str, *, before_connect: str = "", timeout: float = 60) -> str:
    """Run a python3-libnbd ``script`` with ``h`` connected to ``uri``; return its stdout.

    ``before_connect`` runs on the fresh handle first (add_meta_context, strict mode...).
    The script may use ``nbd``, ``json``, ``sys``; a non-zero exit fails the test.
    """
    import subprocess
    import textwrap

    from conftest import require_libnbd_python

    require_libnbd_python()
    program = "\n".join(
        [
            "import nbd, json, sys",
            "h = nbd.NBD()",
            textwrap.dedent(before_connect),
            f"h.connect_uri({uri!r})",
            textwrap.dedent(script),
            "try:\n    h.shutdown()\nexcept nbd.Error:\n    pass",
        ]
    )
    result = subprocess.run(
        [LIBNBD_PYTHON, "-c", program], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"libnbd script failed:\n{result.stderr}"
    return result.stdout
