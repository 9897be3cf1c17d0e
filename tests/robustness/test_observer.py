"""The observer interface (nbdcore.stats): lifecycle callbacks, the negotiation record and
per-connection counters, checked against what the client actually did."""

from __future__ import annotations

import errno
import json
import re

import pytest
from conftest import wait_until
from nbdclient import NbdClient, pattern, run_libnbd

from nbdcore.backends import Fault, FaultInjection
from nbdcore.protocol.constants import (
    BASE_ALLOCATION,
    CmdFlag,
    Info,
    NbdErrno,
    Opt,
    Rep,
    TransmissionFlag,
)
from nbdcore.stats import ConnectionInfo

from .helpers import MiB, Recorder, connected, filled_memory, registry_of

SIZE = 4 * MiB
MAX_PAYLOAD = 32 * MiB


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def server(inprocess_server, recorder):
    faulty = FaultInjection(
        filled_memory(SIZE), [Fault("read", MiB + 5000, 100), Fault("sync", errno=errno.EIO)]
    )
    registry = registry_of(
        disk=filled_memory(SIZE, data_bytes=0),
        ro=(filled_memory(SIZE), {"read_only": True}),
        faulty=faulty,
    )
    return inprocess_server(registry, observer=recorder)


def closed_info(recorder: Recorder, count: int = 1) -> list[ConnectionInfo]:
    assert wait_until(lambda: len(recorder.of("closed")) >= count)
    return recorder.of("closed")


def latency_count(info: ConnectionInfo) -> int:
    return sum(info.stats.latency)


# A libnbd session and what it moves (the export starts empty: every page is a hole).
LIBNBD_SESSION = f"""
h.pwrite(b"\\x01" * 65536, 0)                       # WRITE   64 KiB
h.pwrite(b"\\x02" * 4096, {MiB}, nbd.CMD_FLAG_FUA)  # WRITE   4 KiB (FUA)
assert h.pread(65536, 0) == b"\\x01" * 65536        # READ    64 KiB of data
assert h.pread(8192, 61440) == b"\\x01" * 4096 + bytes(4096)  # 4 KiB data, 4 KiB hole
assert h.pread(131072, {2 * MiB}) == bytes(131072)  # READ    128 KiB of hole
h.flush()                                            # FLUSH
extents = []
h.block_status({SIZE}, 0, lambda ctx, off, ents, err: extents.extend(ents))
h.set_strict_mode(0)
try:
    h.pread(4096, {SIZE} - 100)                      # READ past the end: EINVAL
    raise SystemExit("out-of-range read succeeded")
except nbd.Error as exc:
    assert exc.errno == "EINVAL", exc.errno
h.zero(8192, {3 * MiB})                              # WRITE_ZEROES 8 KiB
h.trim(4096, 0)                                      # TRIM 4 KiB
print(json.dumps(extents))
"""


def test_libnbd_session_is_recorded(server, recorder):
    out = run_libnbd(
        f"nbd://127.0.0.1:{server.port}/disk",
        LIBNBD_SESSION,
        before_connect=f"h.add_meta_context({BASE_ALLOCATION!r})",
    )
    extents = json.loads(out)
    assert extents[:2] == [65536, 0]  # the client saw the data it wrote

    (info,) = closed_info(recorder)
    # Lifecycle: three callbacks, in order, all for the same ConnectionInfo object.
    assert recorder.for_connection(info.id) == ["opened", "handshake", "closed"]
    assert recorder.of("opened")[0] is info
    assert info.close_reason == "client sent NBD_CMD_DISC"
    assert info.closed_at is not None
    assert info.closed_at >= info.opened_at

    record = info.record
    assert [(o.name, o.reply) for o in record.options] == [
        ("STRUCTURED_REPLY", "ACK"),
        ("SET_META_CONTEXT", "ACK"),
        ("GO", "ACK"),
    ]
    assert [o.export for o in record.options[1:]] == ["disk", "disk"]
    assert record.structured_replies is True
    assert record.extended_headers is False
    assert record.meta_contexts == [BASE_ALLOCATION]
    assert record.export_name == "disk"
    assert info.export_name == "disk"
    assert record.via == "GO"
    assert record.block_size == (1, 4096, MAX_PAYLOAD)
    assert record.block_size_requested is True
    assert Info.BLOCK_SIZE in record.info_requests
    assert record.client_flags == 3
    assert record.fixed_newstyle
    assert record.no_zeroes
    flags = record.transmission_flags
    assert flags & TransmissionFlag.HAS_FLAGS
    assert flags & TransmissionFlag.SEND_DF
    assert not flags & TransmissionFlag.READ_ONLY
    assert re.fullmatch(r"127\.0\.0\.1:\d+", info.peer)
    assert record.peer == info.peer

    stats = info.stats
    snapshot = stats.snapshot()
    assert snapshot["ops"] == {
        "READ": 4,
        "WRITE": 2,
        "FLUSH": 1,
        "BLOCK_STATUS": 1,
        "WRITE_ZEROES": 1,
        "TRIM": 1,
    }
    assert stats.bytes_written == 65536 + 4096
    assert stats.bytes_read == 65536 + 4096  # data only
    assert stats.hole_bytes == 4096 + 131072  # sent as OFFSET_HOLE, not as zeroes
    assert stats.zero_bytes == 8192 + 4096
    assert snapshot["errors"] == {"EINVAL": 1}
    assert latency_count(info) == sum(snapshot["ops"].values()) == 10
    assert len(snapshot["latency_counts"]) == len(snapshot["latency_bounds_us"]) + 1
    json.dumps(info.snapshot())  # the whole record is plain data


def test_counters_match_our_client(server, recorder):
    with connected(server.port, "faulty") as client:
        local_port = client.sock.getsockname()[1]
        partial = client.read(MiB, 65536)  # fails at MiB + 5000 after some good data
        assert partial.error == NbdErrno.EIO
        good_bytes = sum(len(c.data) for c in partial.chunks)
        assert client.read(0, 100_000).ok
        assert client.write(0, b"w" * 3000).ok
        assert client.flush().error == NbdErrno.EIO  # the sync fault
        assert client.write(SIZE - 10, b"x" * 100).error == NbdErrno.ENOSPC
        assert client.request(77, 0, 0).error == NbdErrno.EINVAL
        assert client.read(0, 512, flags=0x100).error == NbdErrno.EINVAL
        # Live view: the server lists the connection with its counters as they are now.
        (live,) = server.connections()
        assert live.export_name == "faulty"
        assert live.stats.bytes_written == 3000
        client.disconnect()
        assert client.server_closed()
    (info,) = closed_info(recorder)
    assert info is live
    assert info.peer == f"127.0.0.1:{local_port}"
    snapshot = info.stats.snapshot()
    assert snapshot["ops"] == {"READ": 3, "WRITE": 2, "FLUSH": 1, "UNKNOWN": 1}
    assert snapshot["errors"] == {"EIO": 2, "ENOSPC": 1, "EINVAL": 2}
    assert info.stats.bytes_read == good_bytes + 100_000
    assert info.stats.bytes_written == 3000  # the refused write moved nothing
    assert latency_count(info) == 7
    assert not server.connections()


def test_extended_headers_are_recorded(server, recorder):
    with connected(server.port, extended=True) as client:
        assert client.read(0, 4096).ok
        client.disconnect()
        assert client.server_closed()
    (info,) = closed_info(recorder)
    assert [o.name for o in info.record.options] == ["EXTENDED_HEADERS", "SET_META_CONTEXT", "GO"]
    assert info.record.extended_headers is True
    assert info.record.structured_replies is True
    assert info.record.transmission_flags & TransmissionFlag.BLOCK_STATUS_PAYLOAD
    assert info.stats.snapshot()["ops"] == {"READ": 1}
    assert info.stats.hole_bytes == 4096


def test_export_name_session_is_recorded(server, recorder):
    with NbdClient.connect(server.port) as client:
        client.handshake("ro", structured=False, export_name=True)
        assert client.read(0, 4096).data() == pattern(0, 4096)
        assert client.write(0, b"no").error == NbdErrno.EPERM
    (info,) = closed_info(recorder)
    assert info.record.via == "EXPORT_NAME"
    assert [(o.name, o.reply) for o in info.record.options] == [("EXPORT_NAME", "EXPORT")]
    assert info.record.structured_replies is False
    assert info.record.transmission_flags & TransmissionFlag.READ_ONLY
    assert info.stats.snapshot()["errors"] == {"EPERM": 1}
    assert info.stats.bytes_read == 4096
    assert info.close_reason == "client closed the connection"


def test_failed_handshake_is_recorded_without_handshake_event(server, recorder):
    with NbdClient.connect(server.port) as client:
        client.read_greeting()
        client.send_client_flags()
        assert client.opt_structured_reply().type == Rep.ACK
        final, _ = client.opt_go("no-such-export")
        assert final.type == Rep.ERR_UNKNOWN
        assert client.option(Opt.ABORT)[-1].type == Rep.ACK
        assert client.server_closed()
    (info,) = closed_info(recorder)
    assert recorder.for_connection(info.id) == ["opened", "closed", "refused"]
    assert info.refusal_kind == "unknown_export"
    assert [(o.name, o.reply) for o in info.record.options] == [
        ("STRUCTURED_REPLY", "ACK"),
        ("GO", "ERR_UNKNOWN"),
        ("ABORT", "ACK"),
    ]
    assert info.record.export_name is None
    assert info.close_reason == "client sent NBD_OPT_ABORT"
    assert info.stats.snapshot()["ops"] == {}
    assert latency_count(info) == 0


def test_failing_observer_does_not_break_serving(inprocess_server, caplog):
    class Broken:
        calls = 0

        def _fail(self, conn: ConnectionInfo) -> None:
            Broken.calls += 1
            raise RuntimeError("observer bug")

        connection_opened = handshake_finished = connection_closed = _fail

    server = inprocess_server(registry_of(disk=filled_memory(MiB)), observer=Broken())
    with connected(server.port) as client:
        assert client.read(0, 4096).data() == pattern(0, 4096)
        assert client.write(0, b"ok", flags=CmdFlag.FUA).ok
        client.disconnect()
        assert client.server_closed()
    assert wait_until(lambda: Broken.calls == 3)
    assert wait_until(lambda: not server.connections())
    assert "observer bug" in caplog.text  # logged, not raised
