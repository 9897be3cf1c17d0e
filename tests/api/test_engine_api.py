"""The engine-facing endpoints: /exports/{id}/live, /history, sessions' live field, /metrics.

Redis is deliberately unreachable here (a port nothing listens on): every endpoint must
still answer, saying what it does not know. The running engine is covered by tests/e2e.
"""

from __future__ import annotations

import time

import pytest
from appliance_testing import engine_snapshot
from conftest import free_port

from appliance.sessions.models import ExportSample
from appliance.sessions.services import (
    export_sample_prune,
    export_sample_record,
    session_record_from_engine,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _no_redis(settings) -> None:
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"


@pytest.fixture
def export(make_export):
    return make_export("vm1")


def totals(ops: int, read: int) -> dict:
    return {"ops": {"READ": ops}, "bytes_read": read, "bytes_written": 0, "hole_bytes": 0,
            "zero_bytes": 0, "errors": {}, "latency_counts": [ops], "latency_sum_us": 10 * ops,
            "clients": 1, "sessions": 0}


def test_export_has_its_nbd_uri(api, export, settings) -> None:
    settings.NBD_PUBLIC_HOST, settings.NBD_PORT = "storage1.example.org", 10809
    assert api.get(f"/api/v1/exports/{export.pk}/").json()["uri"] == (
        "nbd://storage1.example.org/vm1")
    settings.NBD_PORT = 20000
    assert api.get(f"/api/v1/exports/{export.pk}/").json()["uri"] == (
        "nbd://storage1.example.org:20000/vm1")


def test_live_says_when_the_metrics_store_is_unreachable(api, export) -> None:
    response = api.get(f"/api/v1/exports/{export.pk}/live")
    assert response.status_code == 200
    body = response.json()
    assert body["available"] is False
    assert body["export"] == "vm1"
    assert body["engine"]["state"] in ("unknown", "down")


def test_history_returns_the_window_oldest_first(api, export) -> None:
    now = time.time()
    export_sample_record(export_name="vm1", node="n1", totals=totals(5, 100), at=now - 7200)
    export_sample_record(export_name="vm1", node="n1", totals=totals(9, 300), at=now - 20)
    export_sample_record(export_name="vm1", node="n1", totals=totals(12, 500), at=now - 10)
    export_sample_record(export_name="other", node="n1", totals=totals(1, 1), at=now - 10)
    response = api.get(f"/api/v1/exports/{export.pk}/history?seconds=3600")
    assert response.status_code == 200
    assert [(s["ops"], s["bytes_read"]) for s in response.json()] == [(9, 300), (12, 500)]
    bad = api.get(f"/api/v1/exports/{export.pk}/history?seconds=-1")
    assert bad.status_code == 400
    assert "seconds" in bad.json()


def test_prune_drops_samples_past_retention(export) -> None:
    now = time.time()
    export_sample_record(export_name="vm1", node="n1", totals=totals(1, 1), at=now - 10_000)
    export_sample_record(export_name="vm1", node="n1", totals=totals(2, 2), at=now - 10)
    assert export_sample_prune(older_than_s=3600) == 1
    assert list(ExportSample.objects.values_list("ops", flat=True)) == [2]


def test_active_sessions_list_without_live_values_when_redis_is_away(api, export) -> None:
    session_record_from_engine(snapshot=engine_snapshot({"export_name": "vm1"}))
    response = api.get("/api/v1/sessions/?active=true")
    assert response.status_code == 200
    (row,) = response.json()["results"]
    assert row["active"] is True
    assert row["live"] is None


def test_metrics_needs_authentication(api, anon, settings) -> None:
    assert anon.get("/metrics").status_code == 401
    response = api.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert "# TYPE nbd_engine_up gauge" in response.content.decode()
    settings.APPLIANCE_METRICS_TOKEN = "scrape-me"
    assert anon.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-me").status_code == 200
    assert anon.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401


def test_metrics_count_refusals_by_kind_from_the_heartbeat(api, monkeypatch) -> None:
    import json

    from appliance.engine import mailbox

    beat = {"at": time.time(), "metrics_dropped": 0,
            "refusals": {"tls_required": 3, "timeout": 1}}

    class FakeRedis:
        def get(self, key: str):
            return json.dumps(beat) if key == mailbox.heartbeat_key("node1") else None

    monkeypatch.setattr(mailbox, "connect", lambda url, timeout_s=1.0: FakeRedis())
    text = api.get("/metrics").content.decode()
    assert 'nbd_engine_refusals_total{kind="tls_required",node="node1"} 3.0' in text
    assert 'nbd_engine_refusals_total{kind="timeout",node="node1"} 1.0' in text
