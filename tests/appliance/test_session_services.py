"""Recording engine connections as ClientSessions; fingerprints; feature statistics."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from appliance_testing import client_records, engine_snapshot
from django.db import connection
from django.test.utils import CaptureQueriesContext

from appliance.errors import InvalidEngineSnapshot
from appliance.sessions.fingerprint import guess_fingerprint
from appliance.sessions.models import FEATURES, ClientSession, Fingerprint
from appliance.sessions.selectors import session_feature_stats
from appliance.sessions.services import (
    MULTI_CONN_REASON,
    parse_peer,
    session_record_from_engine,
)

pytestmark = pytest.mark.django_db

RECORDS = client_records()
T0 = 1_790_000_000.0  # a fixed UNIX time for the snapshots


def record(name: str, index: int = 0) -> dict:
    return copy.deepcopy(RECORDS[name][index])


def nbd_client_record(*, go: bool = True, tls: bool = False, infos: tuple[int, ...] = ()) -> dict:
    """What the kernel's nbd-client negotiates (see appliance/sessions/fingerprint.py)."""
    options = []
    if tls:
        options.append({"option": 5, "name": "STARTTLS", "length": 0, "reply": "ACK"})
    if go:
        length = 4 + 3 + 2 + 2 * len(infos)
        options.append({"option": 7, "name": "GO", "length": length, "reply": "ACK",
                        "export": "vm1"})
    else:
        options.append({"option": 1, "name": "EXPORT_NAME", "length": 3, "reply": "",
                        "export": "vm1"})
    return {
        "peer": "192.0.2.10:40000", "client_flags": 3, "fixed_newstyle": True,
        "no_zeroes": True, "options": options, "structured_replies": False,
        "extended_headers": False, "meta_contexts": [], "export_name": "vm1",
        "info_requests": list(infos), "block_size_requested": 3 in infos,
        "block_size": [1, 4096, 33554432], "transmission_flags": 3565, "tls": tls,
        "via": "GO" if go else "EXPORT_NAME",
    }


# ------------------------------------------------------------------ fingerprints


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("qemu-img map", "qemu"),
        ("qemu-img info", "qemu"),
        ("qemu-io", "qemu"),
        ("nbdinfo", "libnbd"),
        ("nbdinfo --list", "libnbd"),
        ("nbdsh", "libnbd"),
        ("nbdsh full", "libnbd"),
        # Byte for byte qemu's negotiation: one connection alone cannot tell them apart.
        ("nbdinfo --map", "qemu"),
    ],
)
def test_fingerprint_of_real_client_records(client: str, expected: str) -> None:
    assert guess_fingerprint(record(client))[0] == expected


@pytest.mark.parametrize(
    ("negotiated", "expected"),
    [
        (nbd_client_record(), "nbd-client"),
        (nbd_client_record(infos=(3,)), "nbd-client"),
        (nbd_client_record(go=False), "nbd-client"),
        (nbd_client_record(tls=True), "nbd-client"),
        (nbd_client_record(infos=(1, 2, 3)), "libnbd"),
        ({"options": []}, "unknown"),
        ({"options": [{"name": "LIST"}, {"name": "ABORT"}]}, "nbd-client"),
        ({"options": [{"name": "STRUCTURED_REPLY"}, {"name": "EXPORT_NAME"}]}, "unknown"),
        ({"options": [{"name": "ABORT"}]}, "unknown"),
    ],
)
def test_fingerprint_rules(negotiated: dict, expected: str) -> None:
    fingerprint, reason = guess_fingerprint(negotiated)
    assert fingerprint == expected
    assert reason


def test_several_meta_queries_are_not_qemu() -> None:
    negotiated = record("qemu-img map")
    negotiated["options"][1]["length"] += 4 + len("qemu:allocation-depth")
    assert guess_fingerprint(negotiated)[0] == "libnbd"


# ------------------------------------------------------------------ recording


def test_record_a_qemu_session_from_its_snapshot(make_export) -> None:
    export = make_export("vm1")
    snapshot = engine_snapshot(
        record("qemu-img map"), connection_id=7, peer="192.0.2.10:40000", opened_at=T0,
        ops={"BLOCK_STATUS": 3, "READ": 2, "DISC": 1}, bytes_read=8192, hole_bytes=4096,
    )
    session = session_record_from_engine(snapshot=snapshot, engine_run="run-1")

    assert session.export == export
    assert session.export_name == "vm1"
    assert (session.node, session.engine_run, session.connection_id) == ("node1", "run-1", 7)
    assert (session.peer_address, session.peer_port) == ("192.0.2.10", 40000)
    assert session.connected_at == datetime.fromtimestamp(T0, tz=UTC)
    assert session.disconnected_at is None
    assert session.active
    assert session.fingerprint == Fingerprint.QEMU
    assert "qemu" in session.fingerprint_reason
    assert session.via == "GO"
    features = {name: getattr(session, name) for name in FEATURES}
    assert features == {
        "fixed_newstyle": True, "no_zeroes": True, "structured_replies": True,
        "extended_headers": False, "meta_context": True, "base_allocation": True,
        "block_size_requested": True, "tls": False, "opt_go": True, "opt_export_name": False,
        "opt_info": False, "opt_list": False, "opt_list_meta_context": False,
        "opt_starttls": False,
    }
    assert (session.ops_total, session.reads, session.writes) == (6, 2, 0)
    assert (session.bytes_read, session.hole_bytes) == (8192, 4096)
    # The whole record is kept, options in the order the client sent them.
    assert [o["name"] for o in session.negotiated["options"]] == [
        "STRUCTURED_REPLY", "SET_META_CONTEXT", "GO"
    ]
    assert session.negotiated["block_size"] == [1, 4096, 33554432]
    assert session.stats["ops"] == {"READ": 2, "DISC": 1, "BLOCK_STATUS": 3}


def test_later_snapshots_update_the_same_row() -> None:
    opened = engine_snapshot(record("nbdsh"), connection_id=3, opened_at=T0)
    first = session_record_from_engine(snapshot=opened)
    busy = engine_snapshot(record("nbdsh"), connection_id=3, opened_at=T0,
                           ops={"WRITE": 10}, bytes_written=40960)
    session_record_from_engine(snapshot=busy)
    closed = engine_snapshot(
        record("nbdsh"), connection_id=3, opened_at=T0, closed_at=T0 + 5,
        close_reason="client sent NBD_CMD_DISC", ops={"WRITE": 10, "DISC": 1},
        bytes_written=40960, errors={"EINVAL": 2},
    )
    last = session_record_from_engine(snapshot=closed)

    assert ClientSession.objects.count() == 1
    assert last.pk == first.pk
    last.refresh_from_db()
    assert last.disconnected_at == datetime.fromtimestamp(T0 + 5, tz=UTC)
    assert last.close_reason == "client sent NBD_CMD_DISC"
    assert (last.writes, last.bytes_written, last.errors_total) == (10, 40960, 2)
    # A stale snapshot of the open connection arriving late changes nothing.
    session_record_from_engine(snapshot=busy)
    last.refresh_from_db()
    assert last.disconnected_at is not None
    assert last.ops_total == 11


def test_same_connection_id_in_another_engine_run_is_another_session() -> None:
    snap = engine_snapshot(record("nbdsh"), connection_id=1, opened_at=T0)
    session_record_from_engine(snapshot=snap, engine_run="a")
    session_record_from_engine(snapshot=snap, engine_run="b")
    session_record_from_engine(snapshot=snap, engine_run="a", node="node2")
    assert ClientSession.objects.count() == 3


def test_unknown_or_missing_export_keeps_the_name() -> None:
    session = session_record_from_engine(
        snapshot=engine_snapshot(record("nbdsh"), opened_at=T0)
    )
    assert session.export is None
    assert session.export_name == "vm1"
    unfinished = engine_snapshot(None, connection_id=2, opened_at=T0, closed_at=T0 + 1,
                                 close_reason="handshake timed out")
    early = session_record_from_engine(snapshot=unfinished)
    assert early.export_name == ""
    assert early.fingerprint == "unknown"
    assert early.via == ""
    assert not early.fixed_newstyle


def test_nbdcopy_multi_conn_is_told_apart_from_qemu() -> None:
    first, second = record("nbdcopy", 0), record("nbdcopy", 1)
    a = session_record_from_engine(snapshot=engine_snapshot(
        first, connection_id=1, peer="192.0.2.10:40001", opened_at=T0))
    assert a.fingerprint == Fingerprint.QEMU  # alone, it looks like qemu
    b = session_record_from_engine(snapshot=engine_snapshot(
        second, connection_id=2, peer="192.0.2.10:40002", opened_at=T0 + 0.01))
    a.refresh_from_db()
    assert a.fingerprint == b.fingerprint == Fingerprint.LIBNBD
    assert a.fingerprint_reason == MULTI_CONN_REASON
    # The close of the first connection keeps what was learnt.
    session_record_from_engine(snapshot=engine_snapshot(
        first, connection_id=1, peer="192.0.2.10:40001", opened_at=T0, closed_at=T0 + 2))
    a.refresh_from_db()
    assert a.fingerprint == Fingerprint.LIBNBD


def test_sequential_qemu_connections_stay_qemu() -> None:
    # qemu-img convert opens the target twice, one after the other.
    qemu = record("qemu-img map")
    session_record_from_engine(snapshot=engine_snapshot(
        qemu, connection_id=1, peer="192.0.2.10:40001", opened_at=T0, closed_at=T0 + 0.2))
    session_record_from_engine(snapshot=engine_snapshot(
        qemu, connection_id=2, peer="192.0.2.10:40002", opened_at=T0 + 0.5))
    # And another host's qemu at the same moment is another client.
    session_record_from_engine(snapshot=engine_snapshot(
        qemu, connection_id=3, peer="192.0.2.99:40003", opened_at=T0 + 0.5))
    assert set(ClientSession.objects.values_list("fingerprint", flat=True)) == {"qemu"}


@pytest.mark.parametrize(
    ("snapshot", "fragment"),
    [
        ("not a dict", "is an object"),
        ({"peer": "x", "opened_at": T0}, "id must be an integer"),
        ({"id": 1, "opened_at": T0}, "peer must be a string"),
        ({"id": 1, "peer": "x"}, "opened_at must be a UNIX time"),
        ({"id": 1, "peer": "x", "opened_at": 1e20}, "out of range"),
        ({"id": 1, "peer": "x", "opened_at": T0, "negotiated": []}, "negotiated must be"),
        ({"id": 1, "peer": "x", "opened_at": T0, "stats": {"bytes_read": -1}}, "a count"),
        ({"id": 1, "peer": "x", "opened_at": T0, "negotiated": {"options": [1]}}, "options"),
    ],
)
def test_malformed_snapshots_are_refused(snapshot: object, fragment: str) -> None:
    with pytest.raises(InvalidEngineSnapshot, match=fragment):
        session_record_from_engine(snapshot=snapshot)  # type: ignore[arg-type]
    assert not ClientSession.objects.exists()


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("192.0.2.1:5000", ("192.0.2.1", 5000)),
        ("[2001:db8::1]:10809", ("2001:db8::1", 10809)),
        ("[::ffff:192.0.2.1]:1", ("192.0.2.1", 1)),
        ("unix", (None, None)),
        ("host:port", (None, None)),
        ("name.example:80", (None, None)),
    ],
)
def test_parse_peer(peer: str, expected: tuple) -> None:
    assert parse_peer(peer) == expected


# ------------------------------------------------------------------ statistics


def _populate() -> None:
    clients = [
        ("qemu-img map", "192.0.2.1", 0),
        ("qemu-io", "192.0.2.2", 60),
        ("nbdinfo", "192.0.2.3", 120),
        ("nbdsh", "192.0.2.4", 180),
    ]
    for i, (name, address, offset) in enumerate(clients, start=1):
        session_record_from_engine(snapshot=engine_snapshot(
            record(name), connection_id=i, peer=f"{address}:4000", opened_at=T0 + offset))
    session_record_from_engine(snapshot=engine_snapshot(
        nbd_client_record(), connection_id=9, peer="192.0.2.5:4000", opened_at=T0 + 240))


def test_feature_stats_overall_and_by_fingerprint() -> None:
    _populate()
    stats = session_feature_stats()
    assert stats["sessions"] == 5
    assert stats["features"]["structured_replies"] == {"sessions": 4, "share": 0.8}
    assert stats["features"]["base_allocation"] == {"sessions": 2, "share": 0.4}
    assert stats["features"]["opt_info"] == {"sessions": 1, "share": 0.2}
    assert stats["features"]["extended_headers"] == {"sessions": 0, "share": 0.0}
    by = stats["by_fingerprint"]
    assert {k: v["sessions"] for k, v in by.items()} == {"libnbd": 2, "nbd-client": 1, "qemu": 2}
    assert by["qemu"]["features"]["base_allocation"] == {"sessions": 2, "share": 1.0}
    assert by["libnbd"]["features"]["base_allocation"]["share"] == 0.0
    assert by["nbd-client"]["features"]["structured_replies"]["share"] == 0.0
    assert set(stats["features"]) == set(FEATURES)


def test_feature_stats_time_range_and_empty_range() -> None:
    _populate()
    since = datetime.fromtimestamp(T0 + 60, tz=UTC)
    until = datetime.fromtimestamp(T0 + 180, tz=UTC)
    stats = session_feature_stats(since=since, until=until)
    assert stats["sessions"] == 2  # qemu-io and nbdinfo; until is exclusive
    assert set(stats["by_fingerprint"]) == {"qemu", "libnbd"}
    empty = session_feature_stats(since=until + timedelta(days=1))
    assert empty["sessions"] == 0
    assert empty["by_fingerprint"] == {}
    assert empty["features"]["tls"] == {"sessions": 0, "share": None}


def test_feature_stats_are_one_query_however_many_fingerprints() -> None:
    _populate()
    with CaptureQueriesContext(connection) as queries:
        session_feature_stats(export_name="vm1", node="node1")
    assert len(queries) == 1
    sql = queries[0]["sql"].upper()
    assert "GROUP BY" in sql
