"""The I/O layer: listener, one thread per connection, and the zero-copy data path.

Theory of operation
-------------------
Each connection thread runs the sans-IO handshake, then a batch loop: one large
``recv_into`` into a reused buffer, every complete request in it parsed and executed in
place, and all their replies sent with one ``sendmsg`` before the next receive. Reads of
``LARGE_READ`` or more of a file are queued as views of a read-only mapping of it, so the
kernel copies page cache into the socket once (a read into a buffer and a send from it
copy twice). A page that cannot be read turns up as EFAULT from ``sendmsg``; the rest of
that chunk is sent as zeroes and an error chunk follows. While a connection is the
server's only one, resident large reads go out with ``os.sendfile`` instead, which copies
nothing here: copying through the mapping is slow enough that a lone client keeps
catching up with the engine and sleeping, while with several connections the receivers
pay more for sendfile's pages than the engine saves (see ``NbdServer``). Other backends,
and TLS, read into a reused buffer with ``preadv``. WRITE payloads are written straight
from the receive buffer.

Operations that wait on the disk (FLUSH, the sync of a FUA write, and reads of data the
page cache does not hold) go to a small shared pool so they do not stall the other
requests of their connection; their replies come back through a per-connection queue and
an eventfd, and only the connection thread ever writes to its socket. Replies therefore
go out as requests complete, which is not always the order they came in. Whether a read
would wait is asked without waiting: small reads use ``RWF_NOWAIT``, single-extent reads
from the mapping ``cachestat`` (Linux 6.5+; older kernels read them inline).

TLS: after STARTTLS the connection reads and writes through a ``TlsStream`` (memory BIOs
over the same socket) and the same loop runs over it: one receive takes every TLS record
that has arrived, and a batch's replies are encrypted together and leave in one send.
Never ``sendfile``.

Bounded memory: a connection holds its receive buffer, at most ``MAX_QUEUED_OUT`` bytes of
replies before they are sent, and at most ``MAX_OFFLOADED`` pool jobs; beyond that it
stops reading requests, which pushes back on the client through TCP.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import fcntl
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable

from .backends.base import Backend
from .exports import Export, ExportRegistry
from .protocol import wire
from .protocol.constants import Cmd, CmdFlag, NbdErrno
from .protocol.errors import BackendFailure, CommandError, RemoteProtocolError
from .protocol.exports import ExportUnknown
from .protocol.handshake import (
    MAX_OPTION_LENGTH,
    NEED_DATA,
    TLS_MODES,
    Closed,
    ExportChosen,
    Handshake,
    StartTls,
)
from .protocol.transmission import (
    MAX_EXTENTS,
    Extent,
    Transmission,
    command_name,
    nbd_errno,
)
from .stats import ConnectionInfo, NullObserver, Observer, notify
from .tls import TlsStream, forget_psk_identity, peer_identity

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 20  # receive buffer per connection
LARGE_READ = 64 * 1024  # from here file reads skip the bytes objects of os.pread
LARGE_WRITE = 64 * 1024  # from here plain WRITEs stream in (spliced), not whole in the buffer
READ_PIECE = 1 << 20  # the per-connection read buffer; larger reads are streamed through it
COPY_PIECE = 256 * 1024  # reads without a file descriptor go out in chunks of this size
OFFLOAD_READ_MIN = 512 * 1024  # single-piece reads from here are read in the pool
READ_BUFFERS = 4  # per connection, for reads done in the pool
MAX_QUEUED_OUT = 1 << 20  # reply bytes queued before they are sent
MAX_OFFLOADED = 64  # pool jobs in flight per connection
COLD_BYTES = 4 << 20  # per connection, reads of uncached data in flight in the pool
IOV_MAX = 1024
ERROR_PROBE = 4096  # granularity of the search for the first failing byte of a read
TLS_JOIN = 16 * 1024  # replies smaller than a TLS record are joined before encryption
SPIN_US = 50  # default: how long an idle connection polls before it sleeps in recv
SPIN_MAX_CONNECTIONS = 2  # beyond this many connections nobody polls: the CPU is shared
SPLICE_MIN = 64 * 1024  # WRITE payload bytes still in the socket from which they are spliced
DEFER_REPLIES = 8  # replies of spliced WRITEs that may wait to be sent together
PIPE_SIZE = 1 << 20  # asked for the splice pipe; the kernel may give less (pipe-max-size)
PIPE_MIN = 256 * 1024  # a smaller pipe (a user over the pipe quota) costs more than it saves
# Plain ints for the hot path: IntEnum/IntFlag arithmetic costs microseconds per request.
_READ, _WRITE, _DISC, _FLUSH = int(Cmd.READ), int(Cmd.WRITE), int(Cmd.DISC), int(Cmd.FLUSH)
_TRIM, _CACHE, _WRITE_ZEROES = int(Cmd.TRIM), int(Cmd.CACHE), int(Cmd.WRITE_ZEROES)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_PLAIN_HEADER = wire.REQUEST_SIZE  # plain requests are never in extended form
_FUA, _NO_HOLE, _DF = int(CmdFlag.FUA), int(CmdFlag.NO_HOLE), int(CmdFlag.DF)
_REQ_ONE, _FAST_ZERO = int(CmdFlag.REQ_ONE), int(CmdFlag.FAST_ZERO)
# sendfile errors that mean the client went away, not the disk
_SOCKET_ERRNOS = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ETIMEDOUT,
                            errno.ESHUTDOWN})


class _Disconnect(Exception):
    """Stop serving this connection (the reason is logged, nothing is sent)."""


class _Refused(_Disconnect):
    """Stop serving a client we turned away; ``kind`` is one word for statistics."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


class _ReadFailed(Exception):
    """Reading the backend failed at ``at`` while streaming a chunk already announced."""

    def __init__(self, at: int) -> None:
        super().__init__(f"read failed at {at}")
        self.at = at


def _format_peer(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "unix"


class NbdServer:
    """Serves the exports of a registry on one listening socket."""

    def __init__(
        self,
        registry: ExportRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 10809,
        observer: Observer | None = None,
        handshake_timeout_s: float = 10.0,
        max_connections: int = 1024,
        pool_workers: int = 4,
        use_sendfile: bool = False,
        sendfile_alone: bool = True,
        use_splice: bool = True,
        spin_us: int = SPIN_US,
        reuse_port: bool = False,
        tls_context: ssl.SSLContext | None = None,
        tls_mode: str | None = None,
        max_option_length: int = MAX_OPTION_LENGTH,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.observer: Observer = observer or NullObserver()
        self.handshake_timeout_s = handshake_timeout_s
        self.max_connections = max_connections
        # Large reads always with sendfile (use_sendfile), or with sendfile only while a
        # connection is the server's only one (sendfile_alone) and otherwise from the
        # file's mapping. sendfile spares the server its copy and the receiver copies
        # from the page cache instead: on one connection that paid (fio's 1 MiB reads
        # 1.39x faster on 2026-12-07), on two or more it cost the receivers far more
        # than it saved (two fio connections: 2.3x the client CPU, 0.64x as fast).
        self.use_sendfile = use_sendfile
        self.sendfile_alone = sendfile_alone and not use_sendfile
        # Large WRITE payloads go from the socket to the file through a pipe (splice):
        # one kernel copy per byte instead of two. Off only to measure the difference.
        self.use_splice = use_splice
        # Waking a thread asleep in recv costs more than a client that sends one request
        # at a time takes to send the next: poll for that long first (0: never). Only
        # while few connections are open, so that polling never takes a busy CPU.
        self.spin_ns = spin_us * 1000
        # Several processes may listen on one port (SO_REUSEPORT): see --workers.
        self.reuse_port = reuse_port
        self.max_option_length = max_option_length
        self._tls: tuple[ssl.SSLContext | None, str] = (None, "off")
        self.set_tls(tls_context, tls_mode)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=pool_workers, thread_name_prefix="nbd-sync"
        )
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[int, _Connection] = {}
        self._stopping = threading.Event()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> tuple[str, int]:
        """Bind, listen and start accepting in a background thread; returns the address."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.reuse_port:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((self.host, self.port))
        listener.listen(128)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="nbd-accept", daemon=True
        )
        self._accept_thread.start()
        log.info("serving %s on %s:%d", ", ".join(map(repr, self.registry.names())),
                 self.host, self.port)
        return self.host, self.port

    def set_tls(self, context: ssl.SSLContext | None, mode: str | None = None) -> None:
        """Use ``context`` for STARTTLS from now on; ``mode`` is "off", "optional" or
        "required" (default: "optional" with a context, "off" without).

        Connections already open keep the context they started with, so rotating the
        server certificate does not disturb connected clients.
        """
        if mode is None:
            mode = "optional" if context is not None else "off"
        if mode not in TLS_MODES:
            raise ValueError(f"TLS mode must be one of {TLS_MODES}, not {mode!r}")
        if mode != "off" and context is None:
            raise ValueError(f"TLS mode {mode!r} needs a TLS context")
        self._tls = (context if mode != "off" else None, mode)

    @property
    def tls_mode(self) -> str:
        return self._tls[1]

    def connections(self) -> list[ConnectionInfo]:
        with self._lock:
            return [c.info for c in self._connections.values()]

    def exports_in_use(self) -> list[Export]:
        """The Export objects that connected clients are using (a retired export's backend
        may be closed only once it is no longer among them)."""
        with self._lock:
            return [c.export for c in self._connections.values() if c.export is not None]

    def close_connections(self, predicate: Callable[[ConnectionInfo], bool]) -> int:
        """Hard-disconnect every client for which ``predicate(info)`` is true.

        For an export that was removed, disabled or re-published with another policy:
        its clients reconnect and negotiate again; other exports' clients are untouched.
        """
        with self._lock:
            doomed = [c for c in self._connections.values() if predicate(c.info)]
        for conn in doomed:
            conn.abort()
        return len(doomed)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop accepting, let connections finish the requests they received, then close."""
        self._stopping.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout_s)
        with self._lock:
            conns = list(self._connections.values())
        for conn in conns:
            conn.stop_reading()
        deadline = time.monotonic() + timeout_s
        for conn in conns:
            conn.thread.join(max(0.0, deadline - time.monotonic()))
        for conn in conns:
            conn.abort()
        self.pool.shutdown(wait=True)

    # ------------------------------------------------------------ accepting

    def _accept_loop(self) -> None:
        assert self._listener is not None
        last_complaint = 0.0
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError as exc:
                if self._stopping.is_set():
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    now = time.monotonic()
                    if now - last_complaint > 10:  # once per episode, not every retry
                        log.error("accept failed: %s; retrying", exc)
                        last_complaint = now
                    time.sleep(0.1)
                continue
            with self._lock:
                too_many = len(self._connections) >= self.max_connections
            if too_many:
                self._refuse_at_accept(sock, _format_peer(address))
                continue
            self._spawn(sock, _format_peer(address))

    def _refuse_at_accept(self, sock: socket.socket, peer: str) -> None:
        log.warning("refusing %s: %d connections already", peer, self.max_connections)
        sock.close()
        info = ConnectionInfo(peer=peer, closed_at=time.time(), refusal_kind="too_many_connections",
                              refusal=f"the server has its limit of {self.max_connections} "
                                      "connections")
        info.close_reason = info.refusal or ""
        notify(self.observer, "connection_refused", info)

    def _spawn(self, sock: socket.socket, peer: str) -> None:
        conn = _Connection(self, sock, peer)
        with self._lock:
            self._connections[conn.info.id] = conn
        conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._connections.pop(conn.info.id, None)


class _Connection:
    """One client: handshake, then the transmission batch loop."""

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock  # the TCP socket: timeouts, shutdown, poll
        self.io: socket.socket | TlsStream = sock  # what requests and replies go through
        self.info = ConnectionInfo(peer=peer)
        self.stats = self.info.stats
        self.thread = threading.Thread(target=self.run, name=f"nbd-{peer}", daemon=True)
        self.export: Export | None = None
        self.attached = False  # counted against the export's connection limit
        self.tx: Transmission | None = None
        self.tls = False
        self.use_sendfile = server.use_sendfile  # never through TLS
        self._pipe: tuple[int, int] | None = None  # for splicing WRITE payloads, made on use
        self._pipe_size = 0
        # After a payload was spliced the next receive takes one header only, so that the
        # next payload is still in the socket to be spliced rather than copied out.
        self._header_only = False
        self._hs: Handshake | None = None
        self._read_buffer: memoryview | None = None
        # What plain large READs are answered from (see _resident_viewer), or None.
        self._resident_view: Callable[[int, int], memoryview | None] | None = None
        self._sendfile_alone = False  # plain large READs may use sendfile (_lone_sender)
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0
        self._mapped: list[_MappedSpan] = []  # where in _out file mappings are sent from
        self._timed: list[int] = []  # start times of requests whose replies are queued
        # Offloaded jobs hand their replies back through this queue and wake us with efd.
        self._done: collections.deque[_Done] = collections.deque()
        # Buffers for reads done in the pool: free, or holding a reply not yet sent.
        self._free_buffers: list[memoryview] = []
        self._lent_buffers: list[memoryview] = []
        self._buffers_made = 0
        self._pending = 0
        self._cold_bytes = 0  # bytes of pool reads of uncached data in flight
        self._efd = -1
        self._closed_lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------ outer frame

    def run(self) -> None:
        notify(self.server.observer, "connection_opened", self.info)
        reason = "closed"
        try:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            leftover = self._handshake()
            if leftover is not None:
                notify(self.server.observer, "handshake_finished", self.info)
                reason = self._transmission(leftover)
        except _Refused as exc:
            reason = str(exc)
            self._note_refusal(exc.kind, reason)
        except _Disconnect as exc:
            reason = str(exc)
        except RemoteProtocolError as exc:
            reason = f"protocol error: {exc}"
            if self.tx is None:
                self._note_refusal("protocol", reason)
            log.warning("closing %s: %s", self.info.peer, exc)
        except (ConnectionError, TimeoutError) as exc:
            reason = f"connection lost: {exc}"
        except OSError as exc:
            reason = f"socket error: {exc}"
        except Exception:
            reason = "internal error"
            log.exception("connection %s failed", self.info.peer)
        finally:
            self._close(reason)

    def _note_refusal(self, kind: str, reason: str) -> None:
        if self.info.refusal is None:
            self.info.refusal_kind = kind
            self.info.refusal = reason

    def _close(self, reason: str) -> None:
        with self._closed_lock:
            self._closed = True
            if self._efd >= 0:
                os.close(self._efd)
                self._efd = -1
            if self._pipe is not None:
                for fd in self._pipe:
                    os.close(fd)
                self._pipe = None
        if self.attached and self.export is not None:
            self.server.registry.detach(self.export)
            self.attached = False
        hs = self._hs
        if hs is not None:
            asked = [o.export for o in hs.record.options if o.export is not None]
            self.info.requested_export = asked[-1] if asked else None
            if self.tx is None and hs.refusal is not None:
                # It went away after being told no (GO refused, then ABORT or EOF).
                self._note_refusal(hs.refusal.kind, hs.refusal.reason)
        if self.tls:
            self._close_tls()
        try:
            self.sock.close()
        except OSError:
            pass
        self.info.closed_at = time.time()
        self.info.close_reason = reason
        log.debug("connection %s closed: %s", self.info.peer, reason)
        self.server._forget(self)
        notify(self.server.observer, "connection_closed", self.info)
        if self.info.refusal is not None:
            log.info("refused %s: %s", self.info.peer, self.info.refusal)
            notify(self.server.observer, "connection_refused", self.info)

    def _close_tls(self) -> None:
        """Best effort close_notify, so clients see a clean TLS end; never wait long."""
        try:
            self.sock.settimeout(0.2)
        except OSError:
            return
        assert isinstance(self.io, TlsStream)
        self.io.close_notify()

    def stop_reading(self) -> None:
        """Server shutdown: the next receive sees EOF; queued requests still complete."""
        self._shutdown(socket.SHUT_RD)

    def abort(self) -> None:
        self._shutdown(socket.SHUT_RDWR)

    def _shutdown(self, how: int) -> None:
        # Shutting the descriptor wakes the connection thread whatever it waits in.
        try:
            self.sock.shutdown(how)
        except OSError:
            pass

    # ------------------------------------------------------------ handshake

    def _handshake(self) -> bytes | None:
        """Run the handshake; the bytes the client sent past it, or None if it ended."""
        tls_context, tls_mode = self.server._tls
        hs = Handshake(self.server.registry, self.info.peer, tls_mode=tls_mode,
                       max_option_length=self.server.max_option_length)
        self._hs = hs
        self.info.record = hs.record
        deadline = time.monotonic() + self.server.handshake_timeout_s
        while True:
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                try:
                    self.io.sendall(out)
                except OSError:
                    if isinstance(event, Closed):  # a client may close before reading ABORT's ACK
                        return None
                    raise
            if isinstance(event, ExportChosen):
                self._attach(event.negotiated.export.name)
                self.tx = Transmission(event.negotiated)
                self.sock.settimeout(None)
                return hs.take_buffered()
            if isinstance(event, StartTls):
                assert tls_context is not None  # the machine refuses STARTTLS without one
                self._start_tls(hs, tls_context, deadline)
                continue
            if isinstance(event, Closed):
                raise _Disconnect(event.reason)
            assert event is NEED_DATA
            hs.receive_data(self._handshake_recv(deadline))

    def _handshake_recv(self, deadline: float) -> bytes:
        if self.server._stopping.is_set():
            raise _Disconnect("server shutting down")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused("timeout", "handshake took too long")
        self.sock.settimeout(remaining)
        try:
            return self.io.recv(65536)
        except TimeoutError as exc:
            raise _Refused("timeout", "handshake took too long") from exc

    def _start_tls(self, hs: Handshake, context: ssl.SSLContext, deadline: float) -> None:
        """STARTTLS was acknowledged: TLS handshake within the same deadline, then the
        options start again over TLS."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Refused("timeout", "handshake took too long")
        self.sock.settimeout(remaining)
        forget_psk_identity()
        try:
            stream = TlsStream(self.sock, context)
            stream.do_handshake(deadline)
        except TimeoutError as exc:
            raise _Refused("timeout", "TLS handshake took too long") from exc
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise _Refused("tls_handshake", f"TLS handshake failed: {_ssl_reason(exc)}") from exc
        self.io = stream
        self.tls = True
        self.use_sendfile = False
        names, serial = peer_identity(stream)
        self.info.tls_names, self.info.tls_serial = names, serial
        hs.tls_started(names)

    def _attach(self, name: str) -> None:
        """Take the export the client chose, within its connection limit."""
        registry = self.server.registry
        try:
            export = registry.get(name)
        except ExportUnknown as exc:  # removed between GO and now
            raise _Disconnect(str(exc)) from exc
        if not registry.attach(export):
            raise _Refused("limit", f"export {name!r} already has its limit of "
                                    f"{export.max_connections} clients")
        self.export = export
        self.attached = True

    # ------------------------------------------------------------ transmission

    def _transmission(self, leftover: bytes) -> str:
        tx = self.tx
        assert tx is not None
        assert self.export is not None
        buf = bytearray(max(RECV_SIZE, len(leftover) + tx.header_size))
        view = memoryview(buf)
        buf[: len(leftover)] = leftover
        start, end = 0, len(leftover)
        header_size = tx.header_size
        handle = self._handle
        read_resident = self._resident_reader()
        self._resident_view = self._resident_viewer()
        self._sendfile_alone = self._lone_sender()
        plain_request = tx.plain_request
        plain_status = tx.plain_status_request
        t0 = time.perf_counter_ns()
        try:
            while True:
                while end - start >= header_size:
                    plain = plain_request(buf, start)
                    if plain is not None:
                        if plain[3] >= LARGE_WRITE and plain[0] == _WRITE:
                            start, end = self._plain_large_write(
                                plain, view, start + _PLAIN_HEADER, end, t0)
                            continue
                        taken = self._plain(plain, read_resident, view, start, end, t0)
                        if taken:
                            start += taken
                            continue
                    else:
                        status = plain_status(buf, start)
                        if status is not None and self._plain_status(status, t0):
                            start += header_size
                            continue
                    try:
                        req = tx.decode(buf, start)
                    except RemoteProtocolError:
                        self._finish_pending()  # answer what came before the bad header
                        raise
                    start += header_size
                    if req.cmd == _DISC:
                        self._finish_pending()
                        return "client sent NBD_CMD_DISC"
                    payload = tx.payload_length(req)
                    if payload:
                        start, end = self._payload_request(req, payload, view, start, end)
                    else:
                        handle(req)
                    if self._out_bytes >= MAX_QUEUED_OUT:
                        self._flush()
                    if self._done:
                        self._collect_done()
                if start == end:
                    start = end = 0
                elif start:
                    buf[: end - start] = buf[start:end]
                    start, end = 0, end - start
                n = self._receive(view, end, header_size)
                if not n:
                    self._finish_pending()
                    return "client closed the connection"
                end += n
                t0 = time.perf_counter_ns()
        finally:
            view.release()

    def _receive(self, view: memoryview, end: int, header_size: int) -> int:
        """Send the replies queued so far, then receive more requests after ``end``.

        After a spliced WRITE only the next header is taken, leaving its payload in the
        socket to be spliced too; if that header is already there, the replies wait for
        the next ones (up to DEFER_REPLIES of them) instead of one send each. Nor does
        it poll for that header (``_may_spin``): a client streaming large WRITEs is bound
        by how fast it pushes them, not by our wake-up, and the polling took CPU from it
        (nbdcopy's 1 GiB write: about 11,000 empty receives, and 3-6% of the engine's CPU)."""
        sock = self.io
        target = view[end:]
        streaming = self._header_only
        if streaming:
            self._header_only = False
            target = view[end:header_size]
            if self._out and len(self._timed) < DEFER_REPLIES:
                try:
                    return self.sock.recv_into(target, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    pass
        if self._out:
            self._flush()
        if self._pending:
            self._wait_readable()
            return sock.recv_into(target)
        if not streaming and self._may_spin():
            return self._recv_spinning(target)
        return sock.recv_into(target)

    def _resident_reader(self) -> Callable[[int, int], bytes | bytearray | None] | None:
        """What small plain READs use to skip the general path: the backend's reader of
        cached data known to be allocated, or with simple replies (where a hole is sent
        as zeroes anyway) of any cached range; None if the backend has no such reader."""
        backend = self.export.backend  # type: ignore[union-attr]
        if self.tx.structured:  # type: ignore[union-attr]
            return getattr(backend, "read_resident", None)
        return getattr(backend, "pread_nowait", None)

    def _resident_viewer(self) -> Callable[[int, int], memoryview | None] | None:
        """What plain large READs use to skip the general path: the backend's view of
        mapped data known to be allocated and cached. Structured replies only (with simple
        ones the general path reads through a buffer, where a failing disk still gets an
        error reply), and only where large reads are sent from the mapping at all."""
        backend = self.export.backend  # type: ignore[union-attr]
        if not self.tx.structured or not self._maps(backend):  # type: ignore[union-attr]
            return None
        return getattr(backend, "resident_view", None)

    def _lone_sender(self) -> bool:
        """Whether plain large READs may go out with sendfile while this connection is
        the server's only one: where they would otherwise be sent from the file
        (``_resident_viewer``), the backend can tell resident ranges and the server was
        not told otherwise (``sendfile_alone``)."""
        backend = self.export.backend  # type: ignore[union-attr]
        return (self.server.sendfile_alone and self._resident_view is not None
                and hasattr(backend, "resident") and backend.read_fd() is not None)

    def _plain(self, plain: tuple[int, int, int, int],
               read_resident: Callable[[int, int], bytes | bytearray | None] | None,
               view: memoryview, start: int, end: int, t0: int) -> int:
        """The short path of the most common requests, READs of cached data known to be
        allocated and small WRITEs whose payload is already in the buffer (a VM's, fio's,
        nbdcopy's; large WRITEs are ``_plain_large_write``'s): the same reply as the
        general path, with a fraction of its work (a 256 KiB read cost the engine 40% less
        user CPU per GiB with fio). Returns the bytes of the buffer it consumed from
        ``start``, or 0 with nothing done when it is not sure (data not known to be there,
        a payload still on its way, a failure); the general path then answers the
        request, errors included."""
        cmd, cookie, offset, length = plain
        if cmd == _READ:
            if length < LARGE_READ:
                if read_resident is None:
                    return 0
                try:
                    data = read_resident(offset, length)
                except OSError:
                    return 0
            else:  # nbdcopy's, fio's or a VM's sequential reads: with sendfile on a lone
                # connection, else sent from the file's mapping
                if self._sendfile_alone and len(self.server._connections) == 1:
                    return self._plain_sendfile(cookie, offset, length, t0)
                resident_view = self._resident_view
                data = resident_view(offset, length) if resident_view is not None else None
            if data is None:
                return 0
            header = self.tx.whole_read_header(cookie, offset, length)  # type: ignore[union-attr]
            self._out += (header, data)
            self._out_bytes += len(header) + length
            if length >= LARGE_READ:  # the chunk says DONE: a failed send ends the connection
                self._mapped.append(
                    _MappedSpan(self._out_bytes - length, self._out_bytes, None, offset, True))
            self._timed.append(t0)
            stats = self.stats
            stats.ops[_READ] += 1
            stats.bytes_read += length
            if self._out_bytes >= MAX_QUEUED_OUT:
                self._flush()
            return _PLAIN_HEADER
        payload_at = start + _PLAIN_HEADER
        if end - payload_at < length:
            return 0  # the payload is still on its way: the general path streams it
        backend = self.export.backend  # type: ignore[union-attr]
        try:
            backend.pwrite(view[payload_at : payload_at + length], offset)
        except Exception:  # the general path writes it again and says why
            return 0
        reply = self.tx.plain_write_reply(cookie)  # type: ignore[union-attr]
        self._out.append(reply)
        self._out_bytes += len(reply)
        self._timed.append(t0)
        stats = self.stats
        stats.ops[_WRITE] += 1
        stats.bytes_written += length
        return _PLAIN_HEADER + length

    def _plain_sendfile(self, cookie: int, offset: int, length: int, t0: int) -> int:
        """``_plain``'s large READ on a lone connection: a DONE chunk header, then the
        data with sendfile. Returns what ``_plain`` does (0: not resident, nothing sent)."""
        backend = self.export.backend  # type: ignore[union-attr]
        if not backend.resident(offset, length):
            return 0
        self._out.append(self.tx.whole_read_header(cookie, offset, length))  # type: ignore[union-attr]
        self._timed.append(t0)
        self._flush(more=True)
        try:
            self._stream_sendfile(backend.read_fd(), offset, offset + length)
        except _ReadFailed as failure:  # the file was cut short after the residency test
            raise _Disconnect(
                f"read failed at {failure.at} after the reply said DONE") from None
        stats = self.stats
        stats.ops[_READ] += 1
        stats.bytes_read += length
        return _PLAIN_HEADER

    def _plain_status(self, status: tuple[int, int, int, bool], t0: int) -> bool:
        """The short path of a BLOCK_STATUS ``plain_status_request`` took: qemu-img's
        lookups, one round trip each, on its critical path. Measured on 2026-12-07 for a
        REQ_ONE lookup in a hole: 13.3 us of Python on the general path, 5.4 here (of
        which 3 us are the two lseeks); libnbd's round trip went from 62-82 us to 47-49
        (nbdkit 48-51). False with nothing done if the lookup failed: the general path
        then answers and logs why."""
        cookie, offset, length, req_one = status
        try:
            extents = self.export.backend.extents(  # type: ignore[union-attr]
                offset, length, 1 if req_one else MAX_EXTENTS)
        except OSError:
            return False
        reply = self.tx.plain_status_reply(  # type: ignore[union-attr]
            cookie, offset, length, req_one, extents)
        self._queue(reply, t0)
        self.stats.ops[_BLOCK_STATUS] += 1
        if self._out_bytes >= MAX_QUEUED_OUT:
            self._flush()
        return True

    def _may_spin(self) -> bool:
        server = self.server
        return (server.spin_ns > 0 and not self.tls
                and len(server._connections) <= SPIN_MAX_CONNECTIONS)

    def _recv_spinning(self, target: memoryview) -> int:
        """Poll the socket for up to ``spin_ns`` before sleeping in recv.

        A client with one request in flight (qemu-img asking block status extent by
        extent, a VM at iodepth 1) sends the next one within tens of microseconds of our
        reply; catching it awake saves the sleep and the wake-up, which on this machine
        took a block status round trip from about 95 to 50 us.
        """
        sock = self.sock
        deadline = time.perf_counter_ns() + self.server.spin_ns
        while time.perf_counter_ns() < deadline:
            try:
                return sock.recv_into(target, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                pass
        return sock.recv_into(target)

    def _wait_readable(self) -> None:
        """With jobs in the pool, wait for either the socket or a finished job."""
        if self.tls and self.io.pending():  # type: ignore[union-attr]
            return  # records already received wait inside TLS: poll would not see them
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._efd, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._efd in ready:
                os.eventfd_read(self._efd)
                self._collect_done()
                self._flush()
            if self.sock.fileno() in ready or not self._pending:
                return

    # ------------------------------------------------------------ requests

    def _payload_request(
        self, req: wire.Request, length: int, view: memoryview, start: int, end: int
    ) -> tuple[int, int]:
        """A request followed by ``length`` payload bytes (WRITE, or BLOCK_STATUS ext)."""
        tx = self.tx
        assert tx is not None
        assert self.export is not None
        t0 = time.perf_counter_ns()
        self.stats.count_op(req.cmd)
        if req.cmd != _WRITE:
            payload, start, end = self._read_payload(length, view, start, end)
            self._payload_command(req, payload, t0)
            return start, end
        error: CommandError | None = None
        try:
            tx.validate(req)
        except CommandError as exc:
            error = exc
        error, start, end = self._take_write_payload(req.offset, length, view, start, end, error)
        if error is not None:
            self._queue_error(req, error, t0)
            return start, end
        self.stats.bytes_written += length
        if req.flags & _FUA:
            self._offload(req, t0, self.export.backend.sync)
        else:
            self._queue(tx.reply_ok(req), t0)
        return start, end

    def _plain_large_write(self, plain: tuple[int, int, int, int], view: memoryview,
                           start: int, end: int, t0: int) -> tuple[int, int]:
        """A flagless WRITE of LARGE_WRITE bytes or more that ``plain_request`` found valid
        (nbdcopy's, fio's, a VM's large writes): its payload taken as the general path
        takes it, spliced where it can be, without building and checking a request
        object for it (a few microseconds of a 256 KiB write's 80). ``start`` is where
        the payload begins in the buffer; returns the buffer's new start and end."""
        _, cookie, offset, length = plain
        self.stats.ops[_WRITE] += 1
        error, start, end = self._take_write_payload(offset, length, view, start, end, None)
        if error is not None:
            self._queue_error(wire.Request(_WRITE, 0, cookie, offset, length), error, t0)
            return start, end
        self.stats.bytes_written += length
        self._queue(self.tx.plain_write_reply(cookie), t0)  # type: ignore[union-attr]
        return start, end

    def _take_write_payload(self, offset: int, length: int, view: memoryview, start: int,
                            end: int, error: CommandError | None
                            ) -> tuple[CommandError | None, int, int]:
        """Write the ``length`` payload bytes of a WRITE at ``offset``: those already in
        the buffer from ``start``, then the rest from the socket, spliced when at least
        SPLICE_MIN remain. Every payload byte is consumed even after a failure (or when
        ``error`` already refuses the WRITE, in which case nothing is written). Returns
        the WRITE's error, if any, and the buffer's new start and end."""
        backend = self.export.backend  # type: ignore[union-attr]
        remaining = length
        while remaining:
            if start == end and error is None and remaining >= SPLICE_MIN:
                splice_in = self._splice_target(backend)
                if splice_in is not None:
                    error, spliced = self._splice_payload(splice_in, offset, remaining)
                    offset += spliced
                    remaining -= spliced
                    self._header_only = error is None
                    continue
            if start == end:
                start = end = 0
                n = self.io.recv_into(view[: min(remaining, len(view))])
                if not n:
                    raise _Disconnect("client closed in the middle of a WRITE payload")
                end = n
            piece = min(remaining, end - start)
            if error is None:
                try:
                    backend.pwrite(view[start : start + piece], offset)
                except Exception as exc:
                    error = self._write_failure(exc, offset)
            start += piece
            offset += piece
            remaining -= piece
        return error, start, end

    def _splice_target(self, backend: Backend) -> Callable[[int, int, int], None] | None:
        """The backend's ``splice_in`` if payloads can be spliced on this connection (not
        through TLS, which must decrypt them), making the pipe on first use."""
        splice_in = getattr(backend, "splice_in", None)
        if splice_in is None or self.tls or not self.server.use_splice:
            return None
        if self._pipe is None:
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            os.set_blocking(read_end, False)  # only ever read when it holds data
            try:
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:  # over pipe-max-size or the user's pipe quota: a smaller pipe
                pass
            self._pipe_size = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
            self._pipe = (read_end, write_end)
        return splice_in if self._pipe_size >= PIPE_MIN else None

    def _splice_payload(self, splice_in: Callable[[int, int, int], None], offset: int,
                        count: int) -> tuple[CommandError | None, int]:
        """Move ``count`` payload bytes from the socket into the backend at ``offset``
        through the pipe. Returns the backend's failure, if any, and how many bytes were
        taken off the socket: after a failure the caller consumes the rest."""
        read_end, write_end = self._pipe  # type: ignore[misc]
        sock_fd = self.sock.fileno()
        taken = 0
        while taken < count:
            moved = os.splice(sock_fd, write_end, min(count - taken, self._pipe_size))
            if not moved:
                raise _Disconnect("client closed in the middle of a WRITE payload")
            try:
                splice_in(read_end, offset + taken, moved)
            except Exception as exc:
                self._empty_pipe(read_end)
                return self._write_failure(exc, offset + taken), taken + moved
            taken += moved
        return None, taken

    def _write_failure(self, exc: Exception, offset: int) -> BackendFailure:
        """A backend write that raised, as the WRITE's error: an OSError keeps its errno,
        anything else is a bug worth a traceback and reaches the client as EIO."""
        if isinstance(exc, OSError):
            return BackendFailure(str(exc), nbd_errno(exc), offset=offset)
        log.exception("backend write failed for %s", self.info.peer)
        return BackendFailure(str(exc), NbdErrno.EIO, offset=offset)

    @staticmethod
    def _empty_pipe(read_end: int) -> None:
        """Drop what a failed splice left in the pipe: those payload bytes are lost with
        the WRITE they belong to, which is answered with the error."""
        while True:
            try:
                if not os.read(read_end, 1 << 16):
                    return
            except BlockingIOError:
                return

    def _read_payload(
        self, length: int, view: memoryview, start: int, end: int
    ) -> tuple[bytes, int, int]:
        """Consume a small non-WRITE payload (kept, up to a sane size) from the stream."""
        kept = bytearray()
        remaining = length
        while remaining:
            if start == end:
                start = end = 0
                n = self.io.recv_into(view[: min(remaining, len(view))])
                if not n:
                    raise _Disconnect("client closed in the middle of a request payload")
                end = n
            piece = min(remaining, end - start)
            if len(kept) < 65536:
                kept += view[start : start + piece]
            start += piece
            remaining -= piece
        return bytes(kept), start, end

    def _payload_command(self, req: wire.Request, payload: bytes, t0: int) -> None:
        """Extended headers only: BLOCK_STATUS may carry a payload naming contexts."""
        tx = self.tx
        assert tx is not None
        try:
            if req.cmd != _BLOCK_STATUS:
                tx.validate(req)
                raise CommandError(f"{command_name(req.cmd)} takes no payload")
            effective = tx.block_status_payload(req, payload)
            tx.validate(effective)
        except CommandError as exc:
            self._queue_error(req, exc, t0)
            return
        self._block_status(effective, t0)

    def _handle(self, req: wire.Request) -> None:
        """Every request without payload: validate, execute, queue the reply."""
        tx = self.tx
        assert tx is not None
        t0 = time.perf_counter_ns()
        self.stats.count_op(req.cmd)
        try:
            tx.validate(req)
            cmd = req.cmd
            if cmd == _READ:
                self._read(req, t0)
            elif cmd == _FLUSH:
                self._offload(req, t0, self.export.backend.sync)  # type: ignore[union-attr]
            elif cmd == _BLOCK_STATUS:
                self._block_status(req, t0)
            elif cmd == _WRITE_ZEROES:
                self._write_zeroes(req, t0)
            elif cmd == _TRIM:
                self._trim(req, t0)
            elif cmd == _CACHE:
                self._cache(req, t0)
            elif cmd == _WRITE:  # only a zero-length WRITE comes without payload
                self._queue(tx.reply_ok(req), t0)
            else:  # validate() lets only the commands above through
                raise CommandError(f"unexpected command {command_name(cmd)}")
        except _Disconnect:
            raise
        except CommandError as exc:
            self._queue_error(req, exc, t0)
        except OSError as exc:  # socket failures arrive as _Disconnect, so this is the disk
            self._queue_error(req, BackendFailure(str(exc), nbd_errno(exc, req.flags)), t0)
        except Exception as exc:
            log.exception("request %s from %s failed", command_name(req.cmd), self.info.peer)
            self._queue_error(req, BackendFailure(str(exc), NbdErrno.EIO), t0)

    def _write_zeroes(self, req: wire.Request, t0: int) -> None:
        backend = self._backend()
        flags = req.flags
        if req.length:
            backend.zero(
                req.offset,
                req.length,
                may_trim=not flags & _NO_HOLE,
                fast=bool(flags & _FAST_ZERO),
            )
            self.stats.zero_bytes += req.length
        self._reply_ok_or_sync(req, t0)

    def _trim(self, req: wire.Request, t0: int) -> None:
        if req.length:
            self._backend().trim(req.offset, req.length)
            self.stats.zero_bytes += req.length
        self._reply_ok_or_sync(req, t0)

    def _cache(self, req: wire.Request, t0: int) -> None:
        if req.length:
            try:
                self._backend().cache(req.offset, req.length)
            except OSError as exc:  # a hint: failing it changes nothing for later I/O
                log.debug("CACHE hint failed for %s: %s", self.info.peer, exc)
        self._queue(self.tx.reply_ok(req), t0)  # type: ignore[union-attr]

    def _reply_ok_or_sync(self, req: wire.Request, t0: int) -> None:
        if req.flags & _FUA:
            self._offload(req, t0, self._backend().sync)
        else:
            self._queue(self.tx.reply_ok(req), t0)  # type: ignore[union-attr]

    def _backend(self):  # type: ignore[no-untyped-def]
        return self.export.backend  # type: ignore[union-attr]

    def _block_status(self, req: wire.Request, t0: int | None = None) -> None:
        tx = self.tx
        assert tx is not None
        if t0 is None:
            t0 = time.perf_counter_ns()
        limit = 1 if req.flags & _REQ_ONE else MAX_EXTENTS
        try:
            extents = self._backend().extents(req.offset, req.length, limit)
        except OSError as exc:  # status 0 ("data") is always a safe answer
            log.debug("extent lookup failed for %s: %s", self.info.peer, exc)
            extents = []
        self._queue(tx.block_status_reply(req, extents), t0)

    # ------------------------------------------------------------ READ

    def _read(self, req: wire.Request, t0: int) -> None:
        tx = self.tx
        assert tx is not None
        backend = self._backend()
        if req.length == 0:
            reply = tx.done_chunk(req) if tx.structured else tx.read_simple_header(req)
            self._queue(reply, t0)
            return
        if not tx.structured:
            self._read_simple(req, t0, backend)
        elif req.flags & _DF:
            self._read_unfragmented(req, t0, backend)
        elif req.length < LARGE_READ and self._read_small(req, t0, backend):
            return
        else:
            self._read_structured(req, t0, backend)

    def _read_small(self, req: wire.Request, t0: int, backend: Backend) -> bool:
        """The common small read of allocated data: one chunk carrying DONE (or, when the
        disk would have to be read, the same reply later from the pool).

        False (nothing queued) when the range has holes or the read fails: the general
        path then answers it chunk by chunk, with the precise error offset.
        """
        offset, length = req.offset, req.length
        try:
            extents = backend.extents(offset, length, 1)
            if len(extents) != 1 or extents[0][2] or extents[0][1] != length:
                return False
            data = self._read_here_or_in_pool(req, t0, backend)
        except OSError:
            return False
        if data is None:
            return True
        header = self.tx.data_chunk_header(req, offset, length, done=True)  # type: ignore[union-attr]
        self._out += (header, data)
        self._out_bytes += len(header) + length
        self._timed.append(t0)
        self.stats.bytes_read += length
        return True

    def _read_simple(self, req: wire.Request, t0: int, backend: Backend) -> None:
        """Simple reply: the header promises all the data, so small reads go in one piece
        and a failure while streaming a large one can only end the connection."""
        tx = self.tx
        assert tx is not None
        fd = backend.read_fd()
        if fd is None or req.length < LARGE_READ:
            data = self._read_here_or_in_pool(req, t0, backend)
            if data is None:
                return
            self._queue(tx.read_simple_header(req), t0)
            self._queue_data(data)
        elif req.length <= READ_PIECE:
            if req.length >= OFFLOAD_READ_MIN and self._offload_read(req, t0, fd):
                return
            view = self._read_view()[: req.length]
            if os.preadv(fd, [view], req.offset) < req.length:
                raise OSError(errno.EIO, "image file is shorter than the export")
            self._queue(tx.read_simple_header(req), t0)
            self._queue(view)
            self._flush()  # the buffer is reused by the next read
        else:
            self._queue(tx.read_simple_header(req), t0)
            self._stream(fd, req.offset, req.length, pad=False)
        self.stats.bytes_read += req.length

    def _read_unfragmented(self, req: wire.Request, t0: int, backend: Backend) -> None:
        """DF: at most one content chunk, holes included as zeroes (lengths are capped)."""
        tx = self.tx
        assert tx is not None
        self._timed.append(t0)
        if backend.read_fd() is not None and req.length >= LARGE_READ:
            self._read_extent(req, req.offset, req.length, backend, last=True, split=False)
            return
        try:
            data = backend.pread(req.offset, req.length)
        except OSError as exc:
            self._queue_read_error(req, exc, req.offset)
            return
        self._queue(tx.data_chunk_header(req, req.offset, req.length, done=True))
        self._queue_data(data)
        self.stats.bytes_read += req.length

    def _read_structured(self, req: wire.Request, t0: int, backend: Backend) -> None:
        tx = self.tx
        assert tx is not None
        try:
            extents = backend.extents(req.offset, req.length)
        except OSError as exc:
            log.debug("extent lookup failed for %s: %s", self.info.peer, exc)
            extents = []
        covered = sum(e.length for e in extents)
        if covered < req.length:  # anything undescribed is read as data
            extents.append(Extent(req.offset + covered, req.length - covered, 0))
        resident = False  # every page of the range is in memory: it cannot fail to read
        if len(extents) == 1 and not extents[0].is_hole and not self.use_sendfile:
            if self._maps(backend):
                cached = getattr(backend, "cached", None)
                resident = cached is not None and cached(req.offset, req.length) is True
                if (cached is not None and not resident
                        and self._offload_cold_read(req, t0, backend)):
                    return
            elif OFFLOAD_READ_MIN <= req.length <= READ_PIECE:
                fd = backend.read_fd()
                if fd is not None and self._offload_read(req, t0, fd):
                    return
        self._timed.append(t0)
        last_index = len(extents) - 1
        for index, extent in enumerate(extents):
            last = index == last_index
            if extent.is_hole:
                self._queue(tx.hole_chunk(req, extent.offset, extent.length, done=last))
                self.stats.hole_bytes += extent.length
            elif not self._read_extent(req, extent.offset, extent.length, backend, last=last,
                                       resident=resident):
                return  # an error chunk ended the reply

    def _read_extent(
        self,
        req: wire.Request,
        offset: int,
        length: int,
        backend: Backend,
        *,
        last: bool,
        split: bool = True,
        resident: bool = False,
    ) -> bool:
        """Send [offset, offset+length) as OFFSET_DATA; False if an error chunk ended the reply.

        ``split`` allows several chunks (not for DF). Large reads of a file are sent from
        its mapping; without one (TLS, a backend that cannot map) they go through the
        connection's reusable buffer, or ``sendfile`` when the server was asked to use it.
        """
        tx = self.tx
        assert tx is not None
        fd = backend.read_fd()
        if fd is not None and length >= LARGE_READ:
            view = backend.mapped_view(offset, length) if self._maps(backend) else None
            if view is not None:
                self._queue_mapped(req, view, offset, last=last, resident=resident)
                return True
            if length <= READ_PIECE and not self.use_sendfile:
                return self._read_buffered(req, fd, offset, length, last=last)
            self._queue(tx.data_chunk_header(req, offset, length, done=False))
            failed_at = self._stream(fd, offset, length)
            if failed_at is not None:
                self._queue_read_error(req, OSError(errno.EIO, "read failed"), failed_at)
                return False
            self.stats.bytes_read += length
            if last:
                self._queue(tx.done_chunk(req))
            return True
        pos, end = offset, offset + length
        piece_size = COPY_PIECE if split else length
        while pos < end:
            piece = min(piece_size, end - pos)
            try:
                data = backend.pread(pos, piece)
            except OSError as exc:
                good = self._readable_prefix(backend, pos, piece) if split else 0
                if good:
                    data = backend.pread(pos, good)
                    self._queue(tx.data_chunk_header(req, pos, good, done=False))
                    self._queue_data(data)
                    self.stats.bytes_read += good
                self._queue_read_error(req, exc, pos + good)
                return False
            done = last and pos + piece == end
            self._queue(tx.data_chunk_header(req, pos, piece, done=done))
            self._queue_data(data)
            self.stats.bytes_read += piece
            pos += piece
        return True

    def _read_buffered(self, req: wire.Request, fd: int, offset: int, length: int, *,
                       last: bool) -> bool:
        """Read into the reusable buffer first, so the chunk can carry DONE when it is last.

        Receivers spend noticeably less CPU on data sent from a plain buffer than on pages
        sent with sendfile over loopback, and the client shares the machine.
        """
        tx = self.tx
        assert tx is not None
        view = self._read_view()[:length]
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as exc:
            self._queue_read_error(req, exc, offset)
            return False
        if got < length:  # a short file: send what exists, then say where it ends
            if got:
                self._queue(tx.data_chunk_header(req, offset, got, done=False))
                self._queue(view[:got])
            self._queue_read_error(
                req, OSError(errno.EIO, "image file is shorter than the export"), offset + got)
            self._flush()
            return False
        self._queue(tx.data_chunk_header(req, offset, length, done=last))
        self._queue(view)
        self._flush()  # the buffer is reused by the next read
        self.stats.bytes_read += length
        return True

    def _read_here_or_in_pool(self, req: wire.Request, t0: int,
                              backend: Backend) -> bytes | bytearray | None:
        """The bytes of a small read, or None when it went to the pool because the disk
        would have to be read (its reply is queued when it completes)."""
        nowait = getattr(backend, "pread_nowait", None)
        if nowait is None:
            return backend.pread(req.offset, req.length)
        data = nowait(req.offset, req.length)
        if data is None and not self._offload_cold_read(req, t0, backend):
            data = backend.pread(req.offset, req.length)  # the pool is full: wait here
        return data

    def _maps(self, backend: Backend) -> bool:
        """Whether large reads go out as views of the file's mapping (never through TLS:
        encrypting them would touch the pages from user space, where a bad one is SIGBUS)."""
        return not self.tls and not self.use_sendfile and hasattr(backend, "mapped_view")

    def _queue_mapped(self, req: wire.Request, view: memoryview, offset: int, *,
                      last: bool, resident: bool) -> None:
        """OFFSET_DATA from the file's mapping.

        Unless its pages are known to be ``resident``, the chunk does not carry DONE:
        whether they can be read is known only while they are sent, and if one cannot,
        the reply must still be able to end with an error chunk (see ``_mapped_fault``).
        A separate DONE chunk costs the client a chunk per read (measured: nbdcopy spent
        10% more CPU), so resident reads carry DONE themselves.
        """
        tx = self.tx
        assert tx is not None
        final = last and resident
        header = tx.data_chunk_header(req, offset, len(view), done=final)
        start = self._out_bytes + len(header)
        self._out += (header, view)
        self._out_bytes = start + len(view)
        self._mapped.append(_MappedSpan(start, self._out_bytes, req, offset, final))
        self.stats.bytes_read += len(view)
        if last and not final:
            self._queue(tx.done_chunk(req))
        if self._out_bytes >= MAX_QUEUED_OUT:
            self._flush()

    def _read_view(self) -> memoryview:
        if self._read_buffer is None:
            self._read_buffer = memoryview(bytearray(READ_PIECE))
        return self._read_buffer

    def _queue_read_error(self, req: wire.Request, exc: OSError, offset: int) -> None:
        errno_ = nbd_errno(exc, req.flags)
        self.stats.count_error(errno_.name)
        self._queue(self.tx.error_chunk(req, errno_, str(exc), offset, done=True))  # type: ignore[union-attr]

    def _readable_prefix(self, backend: Backend, offset: int, length: int) -> int:
        """How many bytes from ``offset`` read without error, to ERROR_PROBE precision."""
        good, bad = 0, length
        while bad - good > ERROR_PROBE:
            mid = (good + bad) // 2
            try:
                backend.pread(offset, mid)
                good = mid
            except OSError:
                bad = mid
        return good

    def _stream(self, fd: int, offset: int, length: int, *, pad: bool = True) -> int | None:
        """Send ``length`` bytes of ``fd`` after the queued output.

        On a read failure, with ``pad`` the rest is sent as zeroes (a structured chunk
        header promised them; an error chunk follows) and the failing offset returned;
        without it (a simple reply, which cannot carry an error any more) the connection ends.
        """
        self._flush(more=True)
        end = offset + length
        send = self._stream_sendfile if self.use_sendfile else self._stream_copy
        try:
            send(fd, offset, end)
        except _ReadFailed as failure:
            log.warning("read for %s failed at %d: %s", self.info.peer, failure.at,
                        failure.__cause__)
            if not pad:
                raise _Disconnect(f"read failed at {failure.at} after the reply header") from None
            self._send_zeroes(end - failure.at)
            return failure.at
        return None

    def _stream_sendfile(self, fd: int, pos: int, end: int) -> None:
        sock_fd = self.sock.fileno()
        while pos < end:
            try:
                sent = os.sendfile(sock_fd, fd, pos, end - pos)
            except OSError as exc:
                if exc.errno in _SOCKET_ERRNOS:
                    raise _Disconnect(f"connection lost: {exc}") from exc
                raise _ReadFailed(pos) from exc
            if sent == 0:
                raise _ReadFailed(pos) from OSError(errno.EIO, "image file is short")
            pos += sent

    def _stream_copy(self, fd: int, pos: int, end: int) -> None:
        buffer = self._read_view()
        while pos < end:
            view = buffer[: min(len(buffer), end - pos)]
            try:
                got = os.preadv(fd, [view], pos)
            except OSError as exc:
                raise _ReadFailed(pos) from exc
            if got == 0:
                raise _ReadFailed(pos) from OSError(errno.EIO, "image file is short")
            try:
                self.io.sendall(view[:got])
            except OSError as exc:
                raise _Disconnect(f"connection lost: {exc}") from exc
            pos += got

    def _send_zeroes(self, count: int) -> None:
        try:
            for piece in _zeroes(count):
                self.io.sendall(piece)
        except OSError as exc:
            raise _Disconnect(f"connection lost: {exc}") from exc

    # ------------------------------------------------------------ replies

    def _queue(self, data: bytes, t0: int | None = None) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if t0 is not None:
            self._timed.append(t0)

    def _queue_data(self, data: bytes) -> None:
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= MAX_QUEUED_OUT:
            self._flush()

    def _queue_error(self, req: wire.Request, error: CommandError, t0: int) -> None:
        self.stats.count_error(error.errno.name)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s: %s", self.info.peer, command_name(req.cmd), error.message)
        self._queue(self.tx.reply_error(req, error), t0)  # type: ignore[union-attr]

    def _flush(self, more: bool = False) -> None:
        out = self._out
        if out and self.tls:
            self._flush_tls(out)
        elif out:
            flags = socket.MSG_MORE if more else 0
            sock = self.sock
            position = 0  # bytes of this flush sent so far
            while out:
                batch = out[:IOV_MAX]
                try:
                    sent = sock.sendmsg(batch, [], flags)
                except OSError as exc:
                    if exc.errno == errno.EFAULT and self._mapped:
                        position += self._mapped_fault(position)
                        continue
                    raise _Disconnect(f"connection lost: {exc}") from exc
                position += sent
                total = sum(map(len, batch))
                if sent == total:
                    del out[: len(batch)]
                    continue
                _take(out, sent)
            self._out_bytes = 0
            self._mapped.clear()
        if self._lent_buffers:
            self._free_buffers += self._lent_buffers
            self._lent_buffers.clear()
        if self._timed:
            self._record_latencies(self._timed)

    def _record_latencies(self, started: list[int]) -> None:
        """Account the requests whose replies just went out. The short path gives every
        request of one receive the same start time, so runs of equal times are counted
        at once."""
        now = time.perf_counter_ns()
        record = self.stats.record_latency
        run_start, run = started[0], 0
        for t0 in started:
            if t0 != run_start:
                record(now - run_start, run)
                run_start, run = t0, 0
            run += 1
        record(now - run_start, run)
        started.clear()

    def _mapped_fault(self, position: int) -> int:
        """``sendmsg`` met a mapped page it could not read (a failing disk, a file cut
        short), at or after ``position`` bytes into this flush. Replace the rest of that
        chunk with zeroes followed by an error chunk, and return how many bytes were sent
        here (those before the mapped data, which the kernel may have refused along with it).
        """
        span = next((s for s in self._mapped if s.end > position), None)
        if span is None:
            raise _Disconnect("EFAULT while sending a reply")
        out = self._out
        if position < span.start:  # send the bytes before the mapping on their own
            head = _take(out, span.start - position)
            self._send_all(head)
            return span.start - position
        failed_at = span.offset + (position - span.start)
        log.warning("read for %s failed at %d: the file's page could not be mapped",
                    self.info.peer, failed_at)
        if span.final:  # the file shrank since its pages were found resident
            raise _Disconnect(f"read failed at {failed_at} after the reply said DONE")
        self.stats.count_error(NbdErrno.EIO.name)
        _take(out, span.end - position)
        error = self.tx.error_chunk(  # type: ignore[union-attr]
            span.req, NbdErrno.EIO, "image file could not be read", failed_at, done=False)
        out[0:0] = [*_zeroes(span.end - position), error]
        self._mapped.remove(span)
        for later in self._mapped:
            later.start += len(error)
            later.end += len(error)
        return 0

    def _send_all(self, pieces: list[bytes | memoryview]) -> None:
        try:
            while pieces:
                _take(pieces, self.sock.sendmsg(pieces[:IOV_MAX]))
        except OSError as exc:
            raise _Disconnect(f"connection lost: {exc}") from exc

    def _flush_tls(self, out: list[bytes | memoryview]) -> None:
        """Encrypt the batch (small replies joined, so they share TLS records), then send
        all of it at once."""
        stream = self.io
        assert isinstance(stream, TlsStream)
        small: list[bytes | memoryview] = []
        small_bytes = 0
        try:
            for piece in out:
                if len(piece) >= TLS_JOIN:
                    if small:
                        stream.write(b"".join(small))
                        small, small_bytes = [], 0
                    stream.write(piece)
                    continue
                small.append(piece)
                small_bytes += len(piece)
                if small_bytes >= TLS_JOIN:
                    stream.write(b"".join(small))
                    small, small_bytes = [], 0
            if small:
                stream.write(b"".join(small))
            stream.send_out()
        except OSError as exc:
            raise _Disconnect(f"connection lost: {exc}") from exc
        out.clear()
        self._out_bytes = 0

    # ------------------------------------------------------------ offloaded jobs

    def _submit(self, job: Callable[[], _Done]) -> None:
        """Run ``job`` in the pool; the reply it returns is sent when it completes."""
        if self._efd < 0:
            self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        while self._pending >= MAX_OFFLOADED:
            self._wait_done()
        self._pending += 1

        def run() -> None:
            self._done.append(job())
            with self._closed_lock:
                if not self._closed:
                    os.eventfd_write(self._efd, 1)

        try:
            self.server.pool.submit(run)
        except RuntimeError:  # pool shut down: run it here rather than lose the reply
            run()

    def _offload(self, req: wire.Request, t0: int, action: Callable[[], None]) -> None:
        """A slow ``action`` (a sync) whose reply is a plain success or error."""
        tx = self.tx
        assert tx is not None

        def job() -> _Done:
            try:
                action()
            except OSError as exc:
                error = BackendFailure(str(exc), nbd_errno(exc, req.flags))
            except Exception as exc:
                log.exception("%s failed for %s", command_name(req.cmd), self.info.peer)
                error = BackendFailure(str(exc), NbdErrno.EIO)
            else:
                return _Done([tx.reply_ok(req)], t0)
            return _Done([tx.reply_error(req, error)], t0, error_name=error.errno.name)

        self._submit(job)

    def _offload_cold_read(self, req: wire.Request, t0: int, backend: Backend) -> bool:
        """Read a range the page cache does not hold in the pool, so that waiting for the
        disk does not hold up the connection's other requests. False (the caller reads
        inline) for reads over READ_PIECE or beyond COLD_BYTES already in flight."""
        length = req.length
        if length > READ_PIECE or self._cold_bytes + length > COLD_BYTES:
            return False
        self._cold_bytes += length
        tx = self.tx
        assert tx is not None

        def job() -> _Done:
            try:
                data = backend.pread(req.offset, length)
            except OSError as exc:  # good bytes before the failure are not worth a probe here
                error = BackendFailure(str(exc), nbd_errno(exc, req.flags), offset=req.offset)
                return _Done([tx.reply_error(req, error)], t0, error_name=error.errno.name,
                             cold_bytes=length)
            return _Done([_whole_read_head(tx, req), data], t0, bytes_read=length,
                         cold_bytes=length)

        self._submit(job)
        return True

    def _offload_read(self, req: wire.Request, t0: int, fd: int) -> bool:
        """Read a large single-piece range in the pool while this thread keeps sending.

        Copying from the page cache and copying into the socket then run on both cores.
        False when every read buffer is busy: the caller reads inline instead.
        """
        if not self._free_buffers:
            if self._buffers_made >= READ_BUFFERS:
                return False
            self._free_buffers.append(memoryview(bytearray(READ_PIECE)))
            self._buffers_made += 1
        buffer = self._free_buffers.pop()
        tx = self.tx
        assert tx is not None
        structured = tx.structured

        def job() -> _Done:
            view = buffer[: req.length]
            parts: list[bytes | memoryview] = []
            try:
                got = os.preadv(fd, [view], req.offset)
                if got < req.length:
                    if got and structured:  # what exists is good data; say where it ends
                        parts += [tx.data_chunk_header(req, req.offset, got, done=False),
                                  view[:got]]
                    raise OSError(errno.EIO, "image file is shorter than the export")
            except OSError as exc:
                at = req.offset + (len(parts[-1]) if parts else 0)
                error = BackendFailure(str(exc), nbd_errno(exc, req.flags), offset=at)
                parts.append(tx.reply_error(req, error))
                return _Done(parts, t0, error_name=error.errno.name, buffer=buffer)
            return _Done([_whole_read_head(tx, req), view], t0, bytes_read=req.length,
                         buffer=buffer)

        self._submit(job)
        return True

    def _collect_done(self) -> None:
        while self._done:
            done = self._done.popleft()
            self._pending -= 1
            if done.error_name:
                self.stats.count_error(done.error_name)
            self.stats.bytes_read += done.bytes_read
            for part in done.parts:
                self._queue(part)
            self._timed.append(done.t0)
            if done.buffer is not None:
                self._lent_buffers.append(done.buffer)  # free again once sent
            self._cold_bytes -= done.cold_bytes

    def _wait_done(self) -> None:
        """Block until at least one offloaded job finished, and queue its reply."""
        poller = select.poll()
        poller.register(self._efd, select.POLLIN)
        while not self._done:
            poller.poll(1000)
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
        self._collect_done()

    def _finish_pending(self) -> None:
        """Before closing: wait for offloaded jobs and send their replies if we still can."""
        while self._pending:
            self._wait_done()
        try:
            self._flush()
        except _Disconnect:
            pass


class _Done:
    """A finished pool job: reply parts to send, and what to account once they are queued."""

    __slots__ = ("buffer", "bytes_read", "cold_bytes", "error_name", "parts", "t0")

    def __init__(
        self,
        parts: list[bytes | memoryview],
        t0: int,
        *,
        error_name: str | None = None,
        bytes_read: int = 0,
        buffer: memoryview | None = None,
        cold_bytes: int = 0,
    ) -> None:
        self.parts = parts
        self.cold_bytes = cold_bytes
        self.t0 = t0
        self.error_name = error_name
        self.bytes_read = bytes_read
        self.buffer = buffer


def _ssl_reason(exc: BaseException) -> str:
    """The part of an ssl error worth showing an operator ("certificate revoked")."""
    if isinstance(exc, ssl.SSLError):
        return getattr(exc, "verify_message", None) or exc.reason or str(exc)
    return str(exc) or type(exc).__name__


def _whole_read_head(tx: Transmission, req: wire.Request) -> bytes:
    """The header of a reply that carries all of ``req``'s data in one piece."""
    if tx.structured:
        return tx.data_chunk_header(req, req.offset, req.length, done=True)
    return tx.read_simple_header(req)


class _MappedSpan:
    """Bytes [start, end) of the queued output come from the file's mapping at ``offset``."""

    __slots__ = ("end", "final", "offset", "req", "start")

    def __init__(self, start: int, end: int, req: wire.Request | None, offset: int,
                 final: bool) -> None:
        self.start, self.end, self.req, self.offset = start, end, req, offset
        # The chunk carries DONE: a failure can only end the connection. A final span of
        # the short path has no request object (``req`` None).
        self.final = final


_ZEROES = memoryview(bytes(READ_PIECE))


def _zeroes(count: int) -> list[memoryview]:
    return [_ZEROES[: min(READ_PIECE, count - at)] for at in range(0, count, READ_PIECE)]


def _take(out: list[bytes | memoryview], count: int) -> list[bytes | memoryview]:
    """Remove ``count`` bytes from the front of a list of buffers and return them."""
    head: list[bytes | memoryview] = []
    while count:
        first = out[0]
        if len(first) <= count:
            head.append(first)
            count -= len(first)
            del out[0]
        else:
            head.append(memoryview(first)[:count])
            out[0] = memoryview(first)[count:]
            count = 0
    return head
