"""/api/v1/refusals/: the clients the engine turned away, newest first, filterable."""

from __future__ import annotations

import pytest

from appliance.sessions.services import refusal_record_from_engine
from nbdcore.stats import ConnectionInfo

pytestmark = pytest.mark.django_db
T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z


def refusal(connection_id: int, kind: str, export: str | None, offset: float,
            peer: str = "192.0.2.1:5000", reason: str = "") -> None:
    info = ConnectionInfo(peer=peer, id=connection_id)
    info.closed_at = T0 + offset
    info.refusal_kind = kind
    info.refusal = reason or f"{kind} for {export}"
    info.requested_export = export
    refusal_record_from_engine(snapshot=info.snapshot(), node="n1", engine_run="r")


@pytest.fixture
def refusals() -> None:
    refusal(1, "tls_required", "vm1", 0, reason="export 'vm1' requires TLS")
    refusal(2, "client_not_allowed", "vm1", 10, peer="192.0.2.2:5001")
    refusal(3, "timeout", None, 20, peer="[2001:db8::7]:5002")
    refusal(4, "limit", "vm2", 30)


def test_newest_first_with_reasons(api, refusals) -> None:
    body = api.get("/api/v1/refusals/").json()
    assert body["count"] == 4
    rows = body["results"]
    assert [r["connection_id"] for r in rows] == [4, 3, 2, 1]
    oldest = rows[-1]
    assert oldest["kind"] == "tls_required"
    assert oldest["kind_label"] == "TLS required"
    assert oldest["reason"] == "export 'vm1' requires TLS"
    assert oldest["export_name"] == "vm1"
    assert oldest["at"] == "2026-09-21T14:13:20Z"
    assert rows[1]["export_name"] == ""
    assert api.get(f"/api/v1/refusals/{rows[0]['id']}/").json()["kind"] == "limit"


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("export_name=vm1", [2, 1]),
        ("kind=timeout", [3]),
        ("kind=timeout&kind=limit", [4, 3]),
        ("since=2026-09-21T14:13:30Z", [4, 3, 2]),
        ("until=2026-09-21T14:13:30Z", [1]),
        ("peer=192.0.2.2", [2]),
        ("peer=2001:db8::7", [3]),
        ("node=n1&page_size=2", [4, 3]),
        ("ordering=at", [1, 2, 3, 4]),
    ],
)
def test_filters(api, refusals, query, expected) -> None:
    response = api.get(f"/api/v1/refusals/?{query}")
    assert response.status_code == 200, response.json()
    assert [r["connection_id"] for r in response.json()["results"]] == expected


def test_bad_filters_name_the_parameter(api, refusals) -> None:
    bad_kind = api.get("/api/v1/refusals/?kind=bored")
    assert bad_kind.status_code == 400
    assert "kind" in bad_kind.json()
    bad_since = api.get("/api/v1/refusals/?since=yesterday")
    assert bad_since.status_code == 400
    assert "since" in bad_since.json()


def test_read_only_and_authenticated(api, anon, refusals) -> None:
    assert anon.get("/api/v1/refusals/").status_code == 401
    assert api.post("/api/v1/refusals/", {}, format="json").status_code == 405
