"""Refused connections: from nbdcore's observer event, through the engine's metrics queue,
into ConnectionRefusal rows; pruning; the engine process's limits from the settings."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import wait_until
from nbdclient import NbdClient

from appliance.engine import metrics as engine_metrics
from appliance.engine.metrics import EngineMetrics
from appliance.engine.supervisor import EngineSupervisor
from appliance.errors import InvalidEngineSnapshot
from appliance.sessions.models import ConnectionRefusal
from appliance.sessions.services import refusal_prune, refusal_record_from_engine
from nbdcore.backends import MemoryBackend
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import Opt, Rep
from nbdcore.stats import ConnectionInfo

MiB = 1 << 20


def refused_info(kind: str = "tls_required", *, connection_id: int = 7,
                 export: str | None = "vm1", at: float | None = None) -> ConnectionInfo:
    info = ConnectionInfo(peer="[::ffff:192.0.2.5]:40001", id=connection_id)
    info.closed_at = time.time() if at is None else at
    info.refusal_kind = kind
    info.refusal = f"export {export!r} requires TLS"
    info.close_reason = "client went away"
    info.requested_export = export
    return info


# ---------------------------------------------------------------- the service


@pytest.mark.django_db
def test_a_refusal_is_recorded_once_with_its_reason() -> None:
    snapshot = refused_info().snapshot()
    row = refusal_record_from_engine(snapshot=snapshot, node="n1", engine_run="r1")
    again = refusal_record_from_engine(snapshot=snapshot, node="n1", engine_run="r1")
    assert again.pk == row.pk
    assert ConnectionRefusal.objects.count() == 1
    assert (row.node, row.engine_run, row.connection_id) == ("n1", "r1", 7)
    assert row.at == datetime.fromtimestamp(snapshot["closed_at"], tz=UTC)
    assert (row.export_name, row.kind, row.get_kind_display()) == (
        "vm1", "tls_required", "TLS required")
    assert row.reason == "export 'vm1' requires TLS"
    assert (row.peer, row.peer_address) == ("[::ffff:192.0.2.5]:40001", "192.0.2.5")
    assert not row.tls
    # the same connection id in another engine run is another connection
    refusal_record_from_engine(snapshot=snapshot, node="n1", engine_run="r2")
    assert ConnectionRefusal.objects.count() == 2


@pytest.mark.django_db
def test_a_refusal_at_accept_has_no_export_and_keeps_the_close_reason() -> None:
    info = ConnectionInfo(peer="192.0.2.9:1000", id=3)
    info.closed_at = time.time()
    info.refusal_kind = "too_many_connections"
    info.close_reason = "the server has its limit of 8 connections"
    row = refusal_record_from_engine(snapshot=info.snapshot(), node="n1")
    assert (row.export_name, row.kind) == ("", "too_many_connections")
    assert row.reason == "the server has its limit of 8 connections"


@pytest.mark.django_db
@pytest.mark.parametrize("broken", [{"id": "7"}, {"peer": None}, {"closed_at": "soon"},
                                    {"requested_export": 5}, {"tls_names": "alice"}])
def test_a_broken_snapshot_is_refused(broken) -> None:
    snapshot = {**refused_info().snapshot(), **broken}
    with pytest.raises(InvalidEngineSnapshot):
        refusal_record_from_engine(snapshot=snapshot, node="n1")
    assert not ConnectionRefusal.objects.exists()


@pytest.mark.django_db
def test_prune_keeps_the_history_retention() -> None:
    now = time.time()
    refusal_record_from_engine(snapshot=refused_info(connection_id=1, at=now - 10_000)
                               .snapshot(), node="n1")
    refusal_record_from_engine(snapshot=refused_info(connection_id=2, at=now - 10).snapshot(),
                               node="n1")
    assert refusal_prune(older_than_s=3600) == 1
    assert list(ConnectionRefusal.objects.values_list("connection_id", flat=True)) == [2]


@pytest.mark.django_db
def test_reconcile_prunes_refusals(settings, monkeypatch) -> None:
    from appliance.engine import tasks

    settings.APPLIANCE_HISTORY_RETENTION_S = 60
    old = refused_info(at=time.time() - 3600).snapshot()
    refusal_record_from_engine(snapshot=old, node="n1")
    monkeypatch.setattr(tasks, "_redis", lambda: _NoRedis())
    monkeypatch.setattr(tasks, "_publish_desired",
                        lambda client, node: type("S", (), {"digest": "x", "exports": ()})())
    tasks.engine_reconcile()
    assert not ConnectionRefusal.objects.exists()


class _NoRedis:
    def get(self, key: str) -> None:
        return None


# ---------------------------------------------------------------- the engine's metrics


def test_refusals_queue_apart_and_reach_the_recorder_in_order() -> None:
    recorded: list[dict] = []
    metrics = EngineMetrics(node="n", run="r", redis_factory=None,
                            record_session=lambda s: None, record_refusal=recorded.append)
    for i, kind in enumerate(["timeout", "tls_required", "timeout"]):
        metrics.connection_refused(refused_info(kind, connection_id=i))
    assert metrics.refusals == {"timeout": 2, "tls_required": 1}
    metrics.flush()
    assert [(s["id"], s["refusal_kind"]) for s in recorded] == [
        (0, "timeout"), (1, "tls_required"), (2, "timeout")]
    metrics.flush()
    assert len(recorded) == 3


def test_a_failing_recorder_keeps_refusals_queued_and_the_queue_is_bounded(monkeypatch) -> None:
    monkeypatch.setattr(engine_metrics, "MAX_EVENTS", 5)
    attempts: list[int] = []
    stored: list[int] = []

    def flaky(snapshot: dict) -> None:
        attempts.append(snapshot["id"])
        if len(attempts) == 1:
            raise ConnectionError("database away")
        stored.append(snapshot["id"])

    metrics = EngineMetrics(node="n", run="r", redis_factory=None, record_refusal=flaky)
    for i in range(8):
        metrics.connection_refused(refused_info(connection_id=i))
    assert metrics.dropped == 3  # the oldest went
    metrics.flush()
    assert stored == []
    assert metrics.failures["recording a refused connection"] == 1
    metrics.flush()
    assert stored == [3, 4, 5, 6, 7]
    assert metrics.refusals == {"tls_required": 8}  # counted even when not stored


def test_without_a_database_refusals_are_counted_not_kept() -> None:
    metrics = EngineMetrics(node="n", run="r", redis_factory=None)
    metrics.connection_refused(refused_info())
    metrics.flush()
    assert metrics.refusals == {"tls_required": 1}
    assert metrics.dropped == 0


@pytest.mark.django_db(transaction=True)
def test_a_real_refusal_becomes_a_row(inprocess_server) -> None:
    """nbdcore refuses a client; the engine's observer queues it; the flush stores it."""
    metrics = EngineMetrics(
        node="n1", run="r1", redis_factory=None, record_session=lambda s: None,
        record_refusal=lambda s: refusal_record_from_engine(snapshot=s, node="n1",
                                                            engine_run="r1"))
    registry = ExportRegistry([Export("only", MemoryBackend(MiB), max_connections=1)])
    server = inprocess_server(registry, observer=metrics)
    with NbdClient.connect(server.port) as first:
        first.handshake("only")
        with NbdClient.connect(server.port) as second:
            second.read_greeting()
            second.send_client_flags(0x3)
            assert second.opt_go("nope")[0].type == Rep.ERR_UNKNOWN
            assert second.opt_go("only")[0].type == Rep.ERR_POLICY  # the last answer counts
            second.option(Opt.ABORT)
        assert wait_until(lambda: metrics.refusals.total() == 1)
    metrics.flush()
    (row,) = ConnectionRefusal.objects.all()
    assert (row.kind, row.export_name, row.node) == ("limit", "only", "n1")
    assert "limit of 1" in row.reason
    assert row.peer_address == "127.0.0.1"


def test_the_supervisor_passes_the_engine_limits() -> None:
    supervisor = EngineSupervisor(node="n", bind="127.0.0.1", port=1, redis_url="redis://x",
                                  handshake_timeout_s=2.5, max_connections=64,
                                  max_option_length=8192, spin_us=0)
    command = supervisor.command()
    for option, value in [("--handshake-timeout", "2.5"), ("--max-connections", "64"),
                          ("--max-option-length", "8192"), ("--spin-us", "0")]:
        assert command[command.index(option) + 1] == value


def test_the_runner_accepts_the_limits(tmp_path: Path) -> None:
    from appliance.engine.runner import _parse

    args = _parse(["--node", "n", "--redis-url", "redis://x", "--handshake-timeout", "1.5",
                   "--max-connections", "9", "--max-option-length", "4096",
                   "--spin-us", "0"])
    assert (args.handshake_timeout, args.max_connections, args.max_option_length,
            args.spin_us) == (1.5, 9, 4096, 0)
