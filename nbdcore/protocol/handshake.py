"""The fixed-newstyle handshake as a sans-IO state machine.

Theory of operation
-------------------
The server speaks first: ``Handshake(...)`` queues the 18-byte greeting. The I/O layer
then loops::

    hs.receive_data(bytes_from_socket)     # b"" means the peer closed
    event = hs.next_event()                # NEED_DATA, ExportChosen or Closed
    socket.sendall(hs.data_to_send())

States: CLIENT_FLAGS (waiting for the u32 client flags) -> OPTIONS (one option at a time,
each answered completely before the next is read, as the standard lets a server do) ->
TRANSMISSION (after NBD_OPT_GO's ACK or NBD_OPT_EXPORT_NAME's reply) or CLOSED (ABORT, EOF,
or an EXPORT_NAME refused).

TLS: ``tls_mode`` is the server's mode for this connection: "off" (STARTTLS is refused),
"optional" (the standard's SELECTIVETLS: options in clear text, TLS-only exports answer
NBD_REP_ERR_TLS_REQD) or "required" (FORCEDTLS: everything but STARTTLS and ABORT answers
NBD_REP_ERR_TLS_REQD until TLS is up). A STARTTLS the machine accepts queues its ACK and
returns ``StartTls``: the I/O layer sends the ACK, runs the TLS handshake on the socket and
calls ``tls_started(names)`` (or drops the connection); everything negotiated before is
forgotten, as the standard requires. Breaking a MUST of the framing (unknown client flag, wrong
option magic, an option longer than the cap) raises ``RemoteProtocolError`` and leaves the
machine in ERROR: the only answer is a hard disconnect.

Every option is appended to ``record`` with the reply it earned; that record is the
per-client negotiated-feature statistic.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from . import wire
from .constants import (
    BASE_ALLOCATION,
    IHAVEOPT,
    MAX_STRING,
    ClientFlag,
    HandshakeFlag,
    Info,
    Opt,
    Rep,
)
from .errors import RemoteProtocolError
from .exports import (
    Client,
    ExportCatalog,
    ExportInfo,
    ExportNeedsTls,
    ExportRefused,
    ExportUnknown,
)

SERVER_FLAGS = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
MAX_OPTION_LENGTH = 64 * 1024  # no legal option needs more than a few KiB
MAX_OPTIONS = 1024  # per connection; the handshake deadline bounds the time anyway
BASE_ALLOCATION_ID = 1
TLS_MODES = ("off", "optional", "required")


class HandshakeState(enum.Enum):
    CLIENT_FLAGS = "client_flags"
    OPTIONS = "options"
    STARTING_TLS = "starting_tls"  # STARTTLS acknowledged; the I/O layer runs TLS
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What transmission must honour, fixed when the export was chosen."""

    export: ExportInfo
    flags: int
    structured: bool
    extended: bool
    contexts: dict[int, str]
    no_zeroes: bool


@dataclass(frozen=True, slots=True)
class ExportChosen:
    negotiated: Negotiated


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


@dataclass(frozen=True, slots=True)
class StartTls:
    """Send the queued ACK, then run the TLS handshake and call ``tls_started``."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why this client did not get the export it asked for (the last such answer).

    ``kind`` is one word for statistics: unknown_export, not_allowed, client_not_allowed,
    disabled, limit, tls_required.
    """

    kind: str
    reason: str
    export: str | None = None


@dataclass(slots=True)
class OptionSeen:
    option: int
    name: str
    length: int
    reply: str
    export: str | None = None


@dataclass(slots=True)
class NegotiationRecord:
    """Everything a client negotiated, in the order it did it."""

    peer: str = ""
    client_flags: int | None = None
    fixed_newstyle: bool = False
    no_zeroes: bool = False
    options: list[OptionSeen] = field(default_factory=list)
    structured_replies: bool = False
    extended_headers: bool = False
    meta_contexts: list[str] = field(default_factory=list)
    export_name: str | None = None
    info_requests: list[int] = field(default_factory=list)
    block_size_requested: bool = False
    block_size: tuple[int, int, int] | None = None
    transmission_flags: int = 0
    tls: bool = False
    tls_names: list[str] = field(default_factory=list)  # identities TLS verified
    via: str | None = None  # "GO" or "EXPORT_NAME"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _option_name(option: int) -> str:
    try:
        return Opt(option).name
    except ValueError:
        return f"UNKNOWN_{option}"


class _BadOption(Exception):
    """An option whose payload is malformed: answered with NBD_REP_ERR_INVALID."""


class _Reader:
    """Bounds-checked cursor over one option's payload."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise _BadOption("length field points past the end of the option")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def string(self, n: int) -> str:
        if n > MAX_STRING:
            raise _BadOption(f"string of {n} bytes exceeds {MAX_STRING}")
        return _decode_string(self.take(n))

    @property
    def remaining(self) -> int:
        return len(self.data) - self.pos


def _decode_string(raw: bytes) -> str:
    if b"\0" in raw:
        raise _BadOption("string contains NUL")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _BadOption("string is not UTF-8") from exc


class Handshake:
    """Server side of the NBD handshake for one connection."""

    def __init__(
        self,
        catalog: ExportCatalog,
        peer: str = "",
        *,
        tls_mode: str = "off",
        max_option_length: int = MAX_OPTION_LENGTH,
        max_options: int = MAX_OPTIONS,
    ) -> None:
        if tls_mode not in TLS_MODES:
            raise ValueError(f"tls_mode must be one of {TLS_MODES}, not {tls_mode!r}")
        self.catalog = catalog
        self.peer = peer
        self.client = Client(peer)
        self.tls_mode = tls_mode
        self.refusal: Refusal | None = None
        self.max_option_length = max_option_length
        self.max_options = max_options
        self.state = HandshakeState.CLIENT_FLAGS
        self.record = NegotiationRecord(peer=peer)
        self.shutting_down = False
        self._in = bytearray()
        self._out = bytearray(wire.greeting(SERVER_FLAGS))
        self._eof = False
        self._reset_negotiation()

    def _reset_negotiation(self) -> None:
        self._structured = False
        self._extended = False
        self._meta_export: str | None = None  # canonical name the last SET named
        self._contexts: dict[int, str] = {}

    # ------------------------------------------------------------ I/O interface

    def receive_data(self, data: bytes) -> None:
        if data:
            self._in += data
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def take_buffered(self) -> bytes:
        """Bytes received past the end of the handshake: they belong to transmission."""
        rest = bytes(self._in)
        self._in.clear()
        return rest

    def tls_started(self, names: tuple[str, ...] = ()) -> None:
        """The TLS handshake succeeded; ``names`` are the identities it verified.

        Bytes that arrived in clear text after STARTTLS could only have been injected by a
        man in the middle (a client must wait for the ACK): refuse them.
        """
        if self.state is not HandshakeState.STARTING_TLS:
            raise RemoteProtocolError("tls_started() without an accepted STARTTLS")
        if self._in:
            self.state = HandshakeState.ERROR
            raise RemoteProtocolError("clear-text bytes after NBD_OPT_STARTTLS")
        self._reset_negotiation()
        self.client = Client(self.peer, tls=True, names=tuple(names))
        self.record.tls = True
        self.record.tls_names = list(names)
        self.state = HandshakeState.OPTIONS

    def next_event(self) -> object:
        try:
            return self._next_event()
        except RemoteProtocolError:
            self.state = HandshakeState.ERROR
            raise

    def _next_event(self) -> object:
        while True:
            if self.state is HandshakeState.ERROR:
                raise RemoteProtocolError("handshake already failed")
            if self.state in (HandshakeState.TRANSMISSION, HandshakeState.CLOSED):
                raise RemoteProtocolError(f"handshake is over ({self.state.value})")
            if self.state is HandshakeState.STARTING_TLS:
                raise RemoteProtocolError("waiting for the TLS handshake (call tls_started)")
            if self.state is HandshakeState.CLIENT_FLAGS:
                if len(self._in) < 4:
                    return self._need_data()
                self._client_flags(self._take(4))
                continue
            event = self._one_option()
            if event is not None:
                return event

    def _need_data(self) -> object:
        if self._eof:
            self.state = HandshakeState.CLOSED
            return Closed("client closed during the handshake")
        return NEED_DATA

    def _take(self, n: int) -> bytes:
        chunk = bytes(self._in[:n])
        del self._in[:n]
        return chunk

    # ------------------------------------------------------------ client flags

    def _client_flags(self, raw: bytes) -> None:
        flags = int.from_bytes(raw, "big")
        self.record.client_flags = flags
        if flags & ~int(SERVER_FLAGS):
            raise RemoteProtocolError(f"client flags {flags:#x} include bits we did not offer")
        self.record.fixed_newstyle = bool(flags & ClientFlag.FIXED_NEWSTYLE)
        self.record.no_zeroes = bool(flags & ClientFlag.NO_ZEROES)
        self.state = HandshakeState.OPTIONS

    # ------------------------------------------------------------ options

    def _one_option(self) -> object | None:
        if len(self._in) < wire.OPTION_HEADER.size:
            return self._need_data()
        magic, option, length = wire.OPTION_HEADER.unpack_from(self._in)
        if magic != IHAVEOPT:
            raise RemoteProtocolError(f"bad option magic {magic:#018x}")
        if length > self.max_option_length:
            raise RemoteProtocolError(f"option {option} claims {length} bytes of data")
        if len(self.record.options) >= self.max_options:
            raise RemoteProtocolError(f"more than {self.max_options} options")
        if len(self._in) < wire.OPTION_HEADER.size + length:
            return self._need_data()
        del self._in[: wire.OPTION_HEADER.size]
        data = self._take(length)
        seen = OptionSeen(option=option, name=_option_name(option), length=length, reply="")
        self.record.options.append(seen)
        return self._dispatch(option, data, seen)

    def _reply(self, seen: OptionSeen, reply_type: int, payload: bytes = b"") -> None:
        self._out += wire.option_reply(seen.option, reply_type, payload)
        if reply_type == Rep.ACK or reply_type & 0x80000000:
            seen.reply = Rep(reply_type).name

    def _error(self, seen: OptionSeen, rep: Rep, message: str = "") -> None:
        self._reply(seen, rep, wire.utf8_prefix(message, MAX_STRING))

    def _dispatch(self, option: int, data: bytes, seen: OptionSeen) -> object | None:
        if option == Opt.EXPORT_NAME:
            return self._opt_export_name(data, seen)
        if option == Opt.ABORT:
            self._reply(seen, Rep.ACK)
            self.state = HandshakeState.CLOSED
            return Closed("client sent NBD_OPT_ABORT")
        if not self.record.fixed_newstyle:
            self._error(seen, Rep.ERR_INVALID, "only NBD_OPT_EXPORT_NAME without fixed newstyle")
            return None
        if self.shutting_down:
            self._error(seen, Rep.ERR_SHUTDOWN, "server is shutting down")
            return None
        if self._tls_missing() and option != Opt.STARTTLS:
            self._error(seen, Rep.ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS")
            if option in (Opt.INFO, Opt.GO):
                self._refuse("tls_required", "the server requires TLS", None)
            return None
        handler = self._handlers.get(option)
        if handler is None:
            self._error(seen, Rep.ERR_UNSUP, f"option {option} is not supported")
            return None
        try:
            return handler(self, data, seen)
        except _BadOption as exc:
            self._error(seen, Rep.ERR_INVALID, str(exc))
            return None

    def _tls_missing(self) -> bool:
        """FORCEDTLS and no TLS yet."""
        return self.tls_mode == "required" and not self.client.tls

    def _refuse(self, kind: str, reason: str, export: str | None) -> None:
        self.refusal = Refusal(kind=kind, reason=reason, export=export)

    def _opt_export_name(self, data: bytes, seen: OptionSeen) -> object:
        self.record.via = "EXPORT_NAME"
        if self._tls_missing():
            self.state = HandshakeState.CLOSED
            seen.reply = "CLOSED"
            self._refuse("tls_required", "NBD_OPT_EXPORT_NAME without TLS", None)
            return Closed("NBD_OPT_EXPORT_NAME before TLS on a server that requires it")
        if self._extended:
            self.state = HandshakeState.CLOSED
            seen.reply = "CLOSED"
            return Closed("NBD_OPT_EXPORT_NAME after extended headers")
        try:
            name = _decode_string(data) if len(data) <= MAX_STRING else None
        except _BadOption:
            name = None
        seen.export = name
        if name is None or self.shutting_down:
            self.state = HandshakeState.CLOSED
            seen.reply = "CLOSED"
            return Closed("NBD_OPT_EXPORT_NAME refused (bad name or shutting down)")
        try:
            export = self.catalog.lookup(name, self.client)
        except (ExportUnknown, ExportRefused) as exc:
            self.state = HandshakeState.CLOSED
            seen.reply = "CLOSED"
            self._refuse(exc.kind, self._refusal_text(exc), name)
            return Closed(f"NBD_OPT_EXPORT_NAME {name!r} refused: {exc}")
        negotiated = self._choose(export)
        self._out += wire.EXPORT_NAME_REPLY.pack(export.size, negotiated.flags)
        if not self.record.no_zeroes:
            self._out += wire.EXPORT_NAME_PADDING
        seen.reply = "EXPORT"
        return ExportChosen(negotiated)

    def _opt_list(self, data: bytes, seen: OptionSeen) -> None:
        if data:
            raise _BadOption("NBD_OPT_LIST takes no data")
        for name, description in self.catalog.list_exports(self.client):
            self._reply(seen, Rep.SERVER, wire.rep_server(name, description))
        self._reply(seen, Rep.ACK)

    def _opt_starttls(self, data: bytes, seen: OptionSeen) -> object | None:
        if data:
            raise _BadOption("NBD_OPT_STARTTLS takes no data")
        if self.tls_mode == "off":
            self._error(seen, Rep.ERR_POLICY, "TLS is not enabled on this server")
            return None
        if self.client.tls:
            self._error(seen, Rep.ERR_INVALID, "TLS is already active")
            return None
        self._reply(seen, Rep.ACK)
        self.state = HandshakeState.STARTING_TLS
        return StartTls()

    def _opt_structured_reply(self, data: bytes, seen: OptionSeen) -> None:
        if data:
            raise _BadOption("NBD_OPT_STRUCTURED_REPLY takes no data")
        if self._extended:
            self._error(seen, Rep.ERR_EXT_HEADER_REQD, "extended headers already negotiated")
            return
        self._structured = True
        self._reply(seen, Rep.ACK)

    def _opt_extended_headers(self, data: bytes, seen: OptionSeen) -> None:
        if data:
            raise _BadOption("NBD_OPT_EXTENDED_HEADERS takes no data")
        self._extended = True
        self._reply(seen, Rep.ACK)

    def _opt_info_or_go(self, data: bytes, seen: OptionSeen) -> object | None:
        reader = _Reader(data)
        name = reader.string(reader.u32())
        count = reader.u16()
        if reader.remaining != 2 * count:
            raise _BadOption("information request list does not match the option length")
        requests = [reader.u16() for _ in range(count)]
        seen.export = name
        go = seen.option == Opt.GO
        try:
            export = self.catalog.lookup(name, self.client)
        except (ExportUnknown, ExportRefused) as exc:
            reason = self._refusal_text(exc)
            self._refuse(exc.kind, reason, name)
            self._error(seen, self._refusal_reply(exc), reason)
            return None
        contexts = self._contexts if self._meta_export == export.name else {}
        flags = export.transmission_flags(
            structured=self._structured, extended=self._extended, contexts=bool(contexts)
        )
        # Block sizes go first so qemu can check the size against the minimum.
        self._reply(
            seen,
            Rep.INFO,
            wire.info_block_size(export.block_min, export.block_preferred, export.block_max),
        )
        self._reply(seen, Rep.INFO, wire.info_export(export.size, flags))
        if Info.NAME in requests:
            self._reply(seen, Rep.INFO, wire.info_text(Info.NAME, export.name))
        if Info.DESCRIPTION in requests:
            self._reply(seen, Rep.INFO, wire.info_text(Info.DESCRIPTION, export.description))
        self._reply(seen, Rep.ACK)
        self.refusal = None  # the last export asked for was granted
        if not go:
            return None
        self.record.via = "GO"
        self.record.info_requests = requests
        self.record.block_size_requested = Info.BLOCK_SIZE in requests
        return ExportChosen(self._choose(export))

    def _choose(self, export: ExportInfo) -> Negotiated:
        contexts = dict(self._contexts) if self._meta_export == export.name else {}
        flags = export.transmission_flags(
            structured=self._structured, extended=self._extended, contexts=bool(contexts)
        )
        self.state = HandshakeState.TRANSMISSION
        record = self.record
        record.export_name = export.name
        record.structured_replies = self._structured or self._extended
        record.extended_headers = self._extended
        record.meta_contexts = list(contexts.values())
        record.block_size = (export.block_min, export.block_preferred, export.block_max)
        record.transmission_flags = flags
        return Negotiated(
            export=export,
            flags=flags,
            structured=self._structured or self._extended,
            extended=self._extended,
            contexts=contexts,
            no_zeroes=record.no_zeroes,
        )

    def _parse_meta_request(self, data: bytes) -> tuple[str, list[str]]:
        reader = _Reader(data)
        name = reader.string(reader.u32())
        count = reader.u32()
        queries = []
        for _ in range(count):
            query = reader.string(reader.u32())
            if ":" not in query:
                raise _BadOption(f"meta context query {query!r} has no namespace")
            queries.append(query)
        if reader.remaining:
            raise _BadOption("trailing bytes after the meta context queries")
        return name, queries

    def _opt_list_meta_context(self, data: bytes, seen: OptionSeen) -> None:
        name, queries = self._parse_meta_request(data)
        seen.export = name
        if not self._lookup_for_meta(name, seen):
            return
        if not queries or any(_matches_base_allocation(q, listing=True) for q in queries):
            self._reply(seen, Rep.META_CONTEXT, wire.meta_context(0, BASE_ALLOCATION))
        self._reply(seen, Rep.ACK)

    def _opt_set_meta_context(self, data: bytes, seen: OptionSeen) -> None:
        # SET replaces the selection every time, even when it fails.
        self._meta_export = None
        self._contexts = {}
        if not (self._structured or self._extended):
            self._error(seen, Rep.ERR_INVALID, "negotiate structured replies first")
            return
        name, queries = self._parse_meta_request(data)
        seen.export = name
        export = self._lookup_for_meta(name, seen)
        if export is None:
            return
        self._meta_export = export.name
        if any(_matches_base_allocation(q, listing=False) for q in queries):
            self._contexts = {BASE_ALLOCATION_ID: BASE_ALLOCATION}
            self._reply(
                seen, Rep.META_CONTEXT, wire.meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION)
            )
        self._reply(seen, Rep.ACK)

    def _lookup_for_meta(self, name: str, seen: OptionSeen) -> ExportInfo | None:
        try:
            return self.catalog.lookup(name, self.client)
        except ExportUnknown:
            self._error(seen, Rep.ERR_UNKNOWN, f"no export named {name!r}")
        except ExportRefused as exc:
            # The standard allows ERR_TLS_REQD only on INFO/GO/EXPORT_NAME in SELECTIVETLS;
            # clients carry on to GO after a meta-context error and learn it there.
            self._error(seen, Rep.ERR_POLICY, self._refusal_text(exc))
        return None

    def _refusal_reply(self, exc: Exception) -> Rep:
        if isinstance(exc, ExportUnknown):
            return Rep.ERR_UNKNOWN
        # ERR_TLS_REQD is never sent in NOTLS mode (there is no STARTTLS to offer).
        if isinstance(exc, ExportNeedsTls) and self.tls_mode != "off":
            return Rep.ERR_TLS_REQD
        return Rep.ERR_POLICY

    def _refusal_text(self, exc: Exception) -> str:
        if isinstance(exc, ExportNeedsTls) and self.tls_mode == "off":
            return f"{exc}, which this server does not offer"
        return str(exc)

    _handlers: dict[int, Any] = {
        Opt.LIST: _opt_list,
        Opt.STARTTLS: _opt_starttls,
        Opt.INFO: _opt_info_or_go,
        Opt.GO: _opt_info_or_go,
        Opt.STRUCTURED_REPLY: _opt_structured_reply,
        Opt.LIST_META_CONTEXT: _opt_list_meta_context,
        Opt.SET_META_CONTEXT: _opt_set_meta_context,
        Opt.EXTENDED_HEADERS: _opt_extended_headers,
    }


def _matches_base_allocation(query: str, *, listing: bool) -> bool:
    """``base:allocation`` always; a bare ``base:`` only when listing (SET ignores it)."""
    return query == BASE_ALLOCATION or (listing and query == "base:")
