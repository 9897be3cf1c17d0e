"""/api/v1/sessions/ (read-only, filterable) and /api/v1/stats/features."""

from __future__ import annotations

import copy

import pytest
from appliance_testing import client_records, engine_snapshot

from appliance.sessions.models import FEATURES, ClientSession
from appliance.sessions.services import session_record_from_engine

pytestmark = pytest.mark.django_db

RECORDS = client_records()
T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z


def iso(offset: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(T0 + offset, tz=UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
def sessions(make_export):
    """qemu (closed) and nbdinfo (open) on vm1; nbdsh on vm2 (open); one failed handshake."""
    vm1 = make_export("vm1")
    make_export("vm2")
    made = {}
    for key, client, export, peer, offset, closed in [
        ("qemu", "qemu-img map", "vm1", "192.0.2.1:5001", 0, 30),
        ("nbdinfo", "nbdinfo", "vm1", "192.0.2.2:5002", 60, None),
        ("nbdsh", "nbdsh", "vm2", "[2001:db8::7]:5003", 120, None),
    ]:
        negotiated = copy.deepcopy(RECORDS[client][0])
        negotiated["export_name"] = export
        made[key] = session_record_from_engine(snapshot=engine_snapshot(
            negotiated, connection_id=len(made) + 1, peer=peer, opened_at=T0 + offset,
            closed_at=None if closed is None else T0 + closed, ops={"READ": 4},
            bytes_read=16384,
        ))
    made["failed"] = session_record_from_engine(snapshot=engine_snapshot(
        None, connection_id=9, peer="192.0.2.1:5009", opened_at=T0 + 180, closed_at=T0 + 190,
        close_reason="handshake timed out",
    ))
    made["vm1"] = vm1
    return made


def ids(response) -> list[int]:
    assert response.status_code == 200, response.json()
    return [s["id"] for s in response.json()["results"]]


def test_list_is_newest_first_with_the_record(api, sessions) -> None:
    body = api.get("/api/v1/sessions/").json()
    assert body["count"] == 4
    assert [s["id"] for s in body["results"]] == [
        sessions[k].pk for k in ("failed", "nbdsh", "nbdinfo", "qemu")
    ]
    qemu = api.get(f"/api/v1/sessions/{sessions['qemu'].pk}").json()
    assert qemu["fingerprint"] == "qemu"
    assert qemu["export"] == sessions["vm1"].pk
    assert qemu["peer_address"] == "192.0.2.1"
    assert qemu["peer_port"] == 5001
    assert qemu["connected_at"] == iso(0)
    assert qemu["disconnected_at"] == iso(30)
    assert qemu["active"] is False
    assert set(qemu["features"]) == set(FEATURES)
    assert qemu["features"]["base_allocation"]
    assert [o["name"] for o in qemu["negotiated"]["options"]] == [
        "STRUCTURED_REPLY", "SET_META_CONTEXT", "GO"
    ]
    assert qemu["reads"] == 4
    assert qemu["bytes_read"] == 16384
    assert qemu["stats"]["ops"] == {"READ": 4}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("export={vm1}", ["nbdinfo", "qemu"]),
        ("export_name=vm2", ["nbdsh"]),
        ("peer=192.0.2.1", ["failed", "qemu"]),
        ("peer=192.0.2.1:5009", ["failed"]),
        ("peer=2001:db8::7", ["nbdsh"]),
        ("peer=[2001:db8::7]:5003", ["nbdsh"]),
        ("fingerprint=libnbd", ["nbdsh", "nbdinfo"]),
        ("fingerprint=qemu&fingerprint=unknown", ["failed", "qemu"]),
        ("since={t60}", ["failed", "nbdsh", "nbdinfo"]),
        ("since={t60}&until={t120}", ["nbdinfo"]),
        ("active=true", ["nbdsh", "nbdinfo"]),
        ("active=false", ["failed", "qemu"]),
        ("feature=structured_replies", ["nbdsh", "nbdinfo", "qemu"]),
        ("feature=structured_replies&feature=base_allocation", ["qemu"]),
        ("feature=opt_info", ["nbdinfo"]),
        ("structured_replies=false", ["failed"]),
        ("via=GO&ordering=connected_at", ["qemu", "nbdinfo", "nbdsh"]),
        ("node=node1&page_size=1", ["failed"]),
        ("node=elsewhere", []),
    ],
)
def test_filters(api, sessions, query, expected) -> None:
    query = query.format(vm1=sessions["vm1"].pk, t60=iso(60), t120=iso(120))
    assert ids(api.get(f"/api/v1/sessions/?{query}")) == [sessions[k].pk for k in expected]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("since=yesterday", "since"),
        ("fingerprint=curl", "fingerprint"),
        ("feature=teleport", "feature"),
        ("active=perhaps", "active"),
        ("structured_replies=perhaps", "structured_replies"),
        ("export=999999", "export"),
    ],
)
def test_bad_filters_are_400_naming_the_field(api, sessions, query, field) -> None:
    response = api.get(f"/api/v1/sessions/?{query}")
    assert response.status_code == 400
    assert field in response.json()


def test_sessions_are_read_only(api, sessions) -> None:
    url = f"/api/v1/sessions/{sessions['qemu'].pk}/"
    assert api.post("/api/v1/sessions/", {}, format="json").status_code == 405
    assert api.patch(url, {"peer": "x"}, format="json").status_code == 405
    assert api.delete(url).status_code == 405
    assert ClientSession.objects.count() == 4


# ------------------------------------------------------------------ statistics


def test_feature_stats(api, sessions) -> None:
    response = api.get("/api/v1/stats/features")
    assert response.status_code == 200
    stats = response.json()
    assert stats["sessions"] == 4
    assert stats["since"] is None
    assert stats["features"]["structured_replies"] == {"sessions": 3, "share": 0.75}
    assert stats["features"]["base_allocation"] == {"sessions": 1, "share": 0.25}
    by = stats["by_fingerprint"]
    assert {k: v["sessions"] for k, v in by.items()} == {"libnbd": 2, "qemu": 1, "unknown": 1}
    assert by["libnbd"]["features"]["opt_info"] == {"sessions": 1, "share": 0.5}
    assert by["unknown"]["features"]["structured_replies"]["share"] == 0.0


def test_feature_stats_since_until_and_export(api, sessions) -> None:
    ranged = api.get(f"/api/v1/stats/features/?since={iso(60)}&until={iso(180)}").json()
    assert ranged["sessions"] == 2
    assert set(ranged["by_fingerprint"]) == {"libnbd"}
    assert ranged["since"] == iso(60)
    assert ranged["until"] == iso(180)
    vm1 = api.get("/api/v1/stats/features?export=vm1").json()
    assert vm1["sessions"] == 2
    assert set(vm1["by_fingerprint"]) == {"qemu", "libnbd"}
    empty = api.get(f"/api/v1/stats/features?since={iso(10_000)}").json()
    assert empty["sessions"] == 0
    assert empty["features"]["tls"] == {"sessions": 0, "share": None}


@pytest.mark.parametrize(
    ("query", "field", "fragment"),
    [
        ("since=last-tuesday", "since", "Datetime has wrong format"),
        ("until=2026-13-01", "until", "Datetime has wrong format"),
        (f"since={iso(100)}&until={iso(50)}", "until", "later than since"),
    ],
)
def test_feature_stats_refuse_bad_ranges(api, query, field, fragment) -> None:
    response = api.get(f"/api/v1/stats/features?{query}")
    assert response.status_code == 400
    assert fragment in response.json()[field][0]
