"""The transmission phase, sans-IO: request headers in, reply bytes out.

Theory of operation
-------------------
After the handshake the I/O layer builds ``Transmission(negotiated)`` and, for every
request header it has buffered (``header_size`` bytes), calls ``decode`` (framing only:
a bad magic raises ``RemoteProtocolError`` and the connection must close), then
``payload_length`` (the bytes that follow the header and must be consumed whatever
happens), then ``validate`` (policy: flags, ranges, read-only; raises a ``CommandError``
whose errno is the answer). Replies are built here as bytes; bulk data (READ payloads)
travels separately so the I/O layer can use ``sendfile``.

Reply forms follow what every client on this machine accepts (qemu's server pattern):
simple replies when nothing was negotiated; with structured replies a simple reply for
non-READ successes and an ``ERROR`` chunk with a message for failures; with extended
headers only extended chunks.
"""

from __future__ import annotations

import errno as host_errno
from collections.abc import Iterable
from typing import NamedTuple

from . import wire
from .constants import Cmd, CmdFlag, NbdErrno, ReplyType, TransmissionFlag
from .errors import (
    CommandError,
    InvalidRequest,
    OutOfSpace,
    ReadOnlyExport,
    RemoteProtocolError,
    TooLarge,
)
from .handshake import Negotiated

# A WRITE payload we refuse is still read and thrown away to keep the stream in sync,
# up to this size; past it the client is treated as hostile and disconnected.
MAX_DRAIN = 128 * 1024 * 1024
# Cap on descriptors in one BLOCK_STATUS chunk (the standard allows 2^20).
MAX_EXTENTS = 64 * 1024
U32_MAX = 0xFFFFFFFF

_COMPACT_FLAGS = CmdFlag.FUA | CmdFlag.NO_HOLE | CmdFlag.DF | CmdFlag.REQ_ONE | CmdFlag.FAST_ZERO
_EXTENDED_FLAGS = _COMPACT_FLAGS | CmdFlag.PAYLOAD_LEN
_READ, _WRITE, _FLUSH, _BLOCK_STATUS = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.FLUSH), int(
    Cmd.BLOCK_STATUS
)
_DISC = int(Cmd.DISC)
_OFFSET_DATA = int(ReplyType.OFFSET_DATA)
# For plain_request and whole_read_header, which every small request goes through.
_unpack_request = wire.REQUEST.unpack_from
_pack_data_chunk = wire.DATA_CHUNK.pack
_pack_simple_reply = wire.SIMPLE_REPLY.pack
_pack_one_status = wire.ONE_STATUS.pack
_REQUEST_MAGIC = wire.REQUEST_MAGIC
_STRUCTURED_MAGIC = wire.STRUCTURED_REPLY_MAGIC
_SIMPLE_MAGIC = wire.SIMPLE_REPLY_MAGIC
_DF, _PAYLOAD_LEN, _REQ_ONE = int(CmdFlag.DF), int(CmdFlag.PAYLOAD_LEN), int(CmdFlag.REQ_ONE)
_BLOCK_STATUS_REPLY = int(ReplyType.BLOCK_STATUS)
_BLOCK_STATUS_EXT_REPLY = int(ReplyType.BLOCK_STATUS_EXT)
_WRITE_COMMANDS = frozenset({Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES})
_KNOWN_COMMANDS = frozenset(int(c) for c in Cmd if c is not Cmd.RESIZE)
_ONLY_ON: dict[CmdFlag, frozenset[int]] = {
    CmdFlag.NO_HOLE: frozenset({Cmd.WRITE_ZEROES}),
    CmdFlag.FAST_ZERO: frozenset({Cmd.WRITE_ZEROES}),
    CmdFlag.DF: frozenset({Cmd.READ}),
    CmdFlag.REQ_ONE: frozenset({Cmd.BLOCK_STATUS}),
    CmdFlag.PAYLOAD_LEN: frozenset({Cmd.WRITE, Cmd.BLOCK_STATUS}),
}
_NEEDS_ADVERTISED: dict[int, TransmissionFlag] = {
    Cmd.FLUSH: TransmissionFlag.SEND_FLUSH,
    Cmd.TRIM: TransmissionFlag.SEND_TRIM,
    Cmd.WRITE_ZEROES: TransmissionFlag.SEND_WRITE_ZEROES,
    Cmd.CACHE: TransmissionFlag.SEND_CACHE,
}
_FLAG_NEEDS: dict[CmdFlag, TransmissionFlag] = {
    CmdFlag.FUA: TransmissionFlag.SEND_FUA,
    CmdFlag.DF: TransmissionFlag.SEND_DF,
    CmdFlag.FAST_ZERO: TransmissionFlag.SEND_FAST_ZERO,
}


class Extent(NamedTuple):
    """A run of bytes with one base:allocation status (0 = data, HOLE|ZERO = hole)."""

    offset: int
    length: int
    flags: int

    @property
    def is_hole(self) -> bool:
        return bool(self.flags & 1)


def _status_runs(offset: int, length: int, req_one: bool,
                 extents: Iterable[Extent]) -> list[tuple[int, int]]:
    """(length, flags) of the descriptors answering a BLOCK_STATUS of ``offset``,
    ``length``: consecutive extents from ``offset`` on, clipped to the request, equal
    neighbours merged, at most MAX_EXTENTS (one with ``req_one``). A lookup that said
    nothing usable gives one "data" descriptor, which is always a safe answer."""
    end = offset + length
    runs: list[tuple[int, int]] = []
    expected = offset
    for extent in extents:
        if extent.offset != expected or extent.length <= 0 or expected >= end:
            break
        run = min(extent.length, end - expected)
        if req_one:
            return [(run, extent.flags)]
        if runs and runs[-1][1] == extent.flags:
            runs[-1] = (runs[-1][0] + run, extent.flags)
        else:
            if len(runs) >= MAX_EXTENTS:
                break
            runs.append((run, extent.flags))
        expected += run
    return runs or [(length, 0)]


def command_name(cmd: int) -> str:
    try:
        return Cmd(cmd).name
    except ValueError:
        return f"UNKNOWN_{cmd}"


def nbd_errno(exc: OSError, flags: int = 0) -> NbdErrno:
    """Map a backend's host errno to the NBD errno a client understands (nbdkit's rule)."""
    code = exc.errno
    if code in (host_errno.EROFS, host_errno.EPERM, host_errno.EACCES):
        return NbdErrno.EPERM
    if code in (host_errno.ENOSPC, host_errno.EDQUOT, host_errno.EFBIG):
        return NbdErrno.ENOSPC
    if code == host_errno.EINVAL:
        return NbdErrno.EINVAL
    if code == host_errno.ENOMEM:
        return NbdErrno.ENOMEM
    if code == host_errno.EOVERFLOW:
        return NbdErrno.EOVERFLOW if flags & CmdFlag.DF else NbdErrno.EINVAL
    if code in (host_errno.ENOTSUP, host_errno.EOPNOTSUPP):
        return NbdErrno.ENOTSUP if flags & CmdFlag.FAST_ZERO else NbdErrno.EINVAL
    if code == host_errno.ESHUTDOWN:
        return NbdErrno.ESHUTDOWN
    return NbdErrno.EIO


class Transmission:
    """Per-connection transmission rules fixed by what the handshake negotiated."""

    def __init__(self, negotiated: Negotiated) -> None:
        export = negotiated.export
        self.negotiated = negotiated
        self.size = export.size
        self.flags = negotiated.flags
        self.structured = negotiated.structured
        self.extended = negotiated.extended
        self.contexts = negotiated.contexts
        self.max_payload = export.block_max
        self.read_only = bool(self.flags & TransmissionFlag.READ_ONLY)
        self.header_size = wire.EXTENDED_REQUEST_SIZE if self.extended else wire.REQUEST_SIZE
        self._known_flags = int(_EXTENDED_FLAGS if self.extended else _COMPACT_FLAGS)
        self._fast_flags = self._fast_path_masks()

    def _fast_path_masks(self) -> dict[int, int]:
        """Command -> the flags it may carry, for commands this connection may execute.

        ``validate`` checks a request against this table first; anything not in it (an
        unknown command, a flag out of place, a write on a read-only export ...) takes the
        slow path, which finds the precise error. Plain ints: IntFlag arithmetic is slow.
        """
        masks: dict[int, int] = {}
        for cmd in _KNOWN_COMMANDS - {Cmd.DISC}:
            probe_flags = int(CmdFlag.PAYLOAD_LEN) if self.extended and cmd == Cmd.WRITE else 0
            try:
                self._validate_slow(wire.Request(cmd, probe_flags, 0, 0, 0, self.extended))
            except CommandError:
                continue  # never executable on this connection
            allowed = self._known_flags
            for flag, commands in _ONLY_ON.items():
                if cmd not in commands:
                    allowed &= ~int(flag)
            for flag, needed in _FLAG_NEEDS.items():
                if not self.flags & needed:
                    allowed &= ~int(flag)
            masks[int(cmd)] = allowed
        return masks

    # ------------------------------------------------------------ requests

    def decode(self, buf: bytes | bytearray | memoryview, pos: int = 0) -> wire.Request:
        if self.extended:
            return wire.decode_extended_request(buf, pos)
        return wire.decode_request(buf, pos)

    def plain_request(
        self, buf: bytes | bytearray | memoryview, pos: int
    ) -> tuple[int, int, int, int] | None:
        """(cmd, cookie, offset, length) if the request at ``pos`` is a READ, or a WRITE
        to a writable export, of 1 byte up to the maximum payload, without flags, inside
        the export: valid as it stands, so it needs neither ``decode`` nor ``validate``.
        None for any other request (or header form), which then goes the general way and
        earns its precise error there. Which of these the server answers on its short
        path (a WRITE whose payload has not all arrived, say) is the server's choice."""
        if self.extended:
            return None
        magic, flags, cmd, cookie, offset, length = _unpack_request(buf, pos)
        # cmd > _WRITE: anything but READ (0) and WRITE (1).
        if (cmd > _WRITE or flags or magic != _REQUEST_MAGIC or not length
                or length > self.max_payload or offset + length > self.size
                or (cmd == _WRITE and self.read_only)):
            return None
        return cmd, cookie, offset, length

    def plain_status_request(
        self, buf: bytes | bytearray | memoryview, pos: int
    ) -> tuple[int, int, int, bool] | None:
        """(cookie, offset, length, req_one) if the request at ``pos`` is a BLOCK_STATUS
        without flags but REQ_ONE, of 1 byte or more inside the export, on a connection
        with a metadata context and compact headers: valid as it stands, like the requests
        of ``plain_request``. These are what qemu-img sends, one extent at a time, twice
        over an image it converts. None for any other request."""
        if not self.contexts or self.extended:
            return None
        magic, flags, cmd, cookie, offset, length = _unpack_request(buf, pos)
        if (cmd != _BLOCK_STATUS or flags & ~_REQ_ONE or magic != _REQUEST_MAGIC
                or not length or offset + length > self.size):
            return None
        return cookie, offset, length, flags == _REQ_ONE

    def whole_read_header(self, cookie: int, offset: int, length: int) -> bytes:
        """The header of a reply to a plain READ that carries all of its ``length``
        bytes in one piece: a simple reply, or one OFFSET_DATA chunk with DONE."""
        if self.structured:
            return _pack_data_chunk(_STRUCTURED_MAGIC, 1, _OFFSET_DATA, cookie, 8 + length, offset)
        return _pack_simple_reply(_SIMPLE_MAGIC, 0, cookie)

    @staticmethod
    def plain_write_reply(cookie: int) -> bytes:
        """Success of a plain WRITE (never in extended mode): a simple reply."""
        return _pack_simple_reply(_SIMPLE_MAGIC, 0, cookie)

    def payload_length(self, req: wire.Request) -> int:
        """Bytes following this header that belong to it; must be consumed in every case."""
        if self.extended:
            length = req.length if req.flags & CmdFlag.PAYLOAD_LEN else 0
        else:
            length = req.length if req.cmd == Cmd.WRITE else 0
        if length > MAX_DRAIN:
            raise RemoteProtocolError(f"request payload of {length} bytes is beyond any limit")
        return length

    def validate(self, req: wire.Request) -> None:
        """Raise the CommandError this request earns; return if it may be executed."""
        cmd, flags = req.cmd, req.flags
        if cmd == _DISC:  # no reply, no checks: the client is leaving
            return
        allowed = self._fast_flags.get(cmd)
        if allowed is None or flags & ~allowed or (
            self.extended and cmd == _WRITE and not flags & _PAYLOAD_LEN
        ):
            self._validate_slow(req)
        if cmd in (_READ, _WRITE):
            if req.length > self.max_payload:
                if flags & _DF:
                    raise TooLarge(f"read of {req.length} bytes cannot be sent unfragmented")
                raise InvalidRequest(
                    f"length {req.length} exceeds the maximum {self.max_payload}"
                )
        elif cmd == _FLUSH:
            if req.offset or req.length:
                raise InvalidRequest("FLUSH needs offset and length 0")
            return
        elif cmd == _BLOCK_STATUS and req.length == 0:
            raise InvalidRequest("BLOCK_STATUS of length 0")
        if req.offset > self.size or req.length > self.size - req.offset:
            self._check_range(req)

    def _validate_slow(self, req: wire.Request) -> None:
        """The precise error for a request the fast path did not accept."""
        cmd, flags = req.cmd, req.flags
        if cmd in _WRITE_COMMANDS and self.flags & TransmissionFlag.READ_ONLY:
            raise ReadOnlyExport("export is read-only")
        if cmd not in _KNOWN_COMMANDS:
            raise InvalidRequest(f"unknown command {cmd}")
        if flags & ~self._known_flags:
            raise InvalidRequest(f"unknown command flags {flags:#x}")
        for flag, commands in _ONLY_ON.items():
            if flags & flag and cmd not in commands:
                raise InvalidRequest(f"flag {flag.name} is not valid on {command_name(cmd)}")
        for flag, needed in _FLAG_NEEDS.items():
            if flags & flag and not self.flags & needed:
                raise InvalidRequest(f"flag {flag.name} was not advertised")
        needed_cmd = _NEEDS_ADVERTISED.get(cmd)
        if needed_cmd is not None and not self.flags & needed_cmd:
            raise InvalidRequest(f"{command_name(cmd)} was not advertised")
        if self.extended and cmd == Cmd.WRITE and not flags & CmdFlag.PAYLOAD_LEN:
            raise InvalidRequest("extended WRITE without NBD_CMD_FLAG_PAYLOAD_LEN")
        if cmd == Cmd.BLOCK_STATUS and not self.contexts:
            raise InvalidRequest("no metadata context was negotiated")

    def _check_range(self, req: wire.Request) -> None:
        if req.offset > self.size or req.length > self.size - req.offset:
            message = (
                f"range {req.offset}+{req.length} is beyond the end of the export ({self.size})"
            )
            if req.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES):
                raise OutOfSpace(message)
            raise InvalidRequest(message)

    def block_status_payload(self, req: wire.Request, payload: bytes) -> wire.Request:
        """Extended BLOCK_STATUS with a payload: effect length + context ids to report."""
        if not self.flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD:
            raise InvalidRequest("BLOCK_STATUS payload was not advertised")
        if len(payload) < 8 or (len(payload) - 8) % 4:
            raise InvalidRequest("BLOCK_STATUS payload has a bad length")
        effect = wire.U64.unpack_from(payload)[0]
        ids = [wire.U32.unpack_from(payload, 8 + 4 * i)[0] for i in range((len(payload) - 8) // 4)]
        if len(set(ids)) != len(ids) or any(i not in self.contexts for i in ids):
            raise InvalidRequest("BLOCK_STATUS payload names unknown or repeated contexts")
        return wire.Request(req.cmd, req.flags, req.cookie, req.offset, effect, req.extended)

    # ------------------------------------------------------------ replies

    def _chunk(self, req: wire.Request, reply_type: int, length: int, done: bool) -> bytes:
        return wire.chunk_header(
            req.cookie,
            reply_type,
            length,
            done=done,
            extended=self.extended,
            request_offset=req.offset,
        )

    def reply_ok(self, req: wire.Request) -> bytes:
        """Success of a command without reply payload."""
        if self.extended:
            return self._chunk(req, ReplyType.NONE, 0, True)
        return wire.simple_reply(req.cookie)

    def reply_error(self, req: wire.Request, error: CommandError) -> bytes:
        """A failed command (READ included, before any of its data went out)."""
        if not self.structured:
            return wire.simple_reply(req.cookie, int(error.errno))
        return self.error_chunk(req, int(error.errno), error.message, error.offset, done=True)

    def error_chunk(
        self, req: wire.Request, errno: int, message: str, offset: int | None, *, done: bool
    ) -> bytes:
        if offset is not None and req.cmd in (Cmd.FLUSH, Cmd.DISC):
            offset = None
        payload = wire.error_payload(errno, message, offset)
        return self._chunk(req, wire.error_type(offset), len(payload), done) + payload

    def read_simple_header(self, req: wire.Request) -> bytes:
        return wire.simple_reply(req.cookie)

    def data_chunk_header(
        self, req: wire.Request, offset: int, length: int, *, done: bool
    ) -> bytes:
        """OFFSET_DATA header and its u64 offset; ``length`` data bytes must follow."""
        if not self.extended:
            return wire.DATA_CHUNK.pack(wire.STRUCTURED_REPLY_MAGIC, 1 if done else 0,
                                        _OFFSET_DATA, req.cookie, 8 + length, offset)
        return self._chunk(req, ReplyType.OFFSET_DATA, 8 + length, done) + wire.U64.pack(offset)

    def hole_chunk(self, req: wire.Request, offset: int, length: int, *, done: bool) -> bytes:
        return self._chunk(req, ReplyType.OFFSET_HOLE, 12, done) + wire.HOLE.pack(offset, length)

    def done_chunk(self, req: wire.Request) -> bytes:
        return self._chunk(req, ReplyType.NONE, 0, True)

    def block_status_reply(self, req: wire.Request, extents: Iterable[Extent]) -> bytes:
        """One status chunk (with DONE) for base:allocation, trimmed to the rules of §6."""
        runs = _status_runs(req.offset, req.length, bool(req.flags & _REQ_ONE), extents)
        if not self.extended:
            return self._compact_status_reply(req.cookie, runs)
        body = wire.U32.pack(next(iter(self.contexts))) + wire.U32.pack(len(runs))
        body += b"".join(wire.EXTENT_EXT.pack(length, flags) for length, flags in runs)
        return self._chunk(req, _BLOCK_STATUS_EXT_REPLY, len(body), True) + body

    def plain_status_reply(self, cookie: int, offset: int, length: int, req_one: bool,
                           extents: Iterable[Extent]) -> bytes:
        """``block_status_reply`` for a request ``plain_status_request`` took."""
        return self._compact_status_reply(cookie, _status_runs(offset, length, req_one, extents))

    def _compact_status_reply(self, cookie: int, runs: list[tuple[int, int]]) -> bytes:
        context_id = next(iter(self.contexts))
        if len(runs) == 1:
            length, flags = runs[0]
            return _pack_one_status(_STRUCTURED_MAGIC, 1, _BLOCK_STATUS_REPLY, cookie, 12,
                                    context_id, min(length, U32_MAX), flags)
        body = wire.U32.pack(context_id)
        body += b"".join(wire.EXTENT.pack(min(length, U32_MAX), flags) for length, flags in runs)
        return wire.CHUNK.pack(_STRUCTURED_MAGIC, 1, _BLOCK_STATUS_REPLY, cookie,
                               len(body)) + body
