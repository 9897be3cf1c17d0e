"""SpecApplier: the engine converges on a spec and touches only the exports that changed."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import wait_until
from nbdclient import NbdClient, pattern

from appliance.engine.applier import SpecApplier
from appliance.engine.spec import EngineSpec, ExportSpec
from nbdcore.exports import ExportRegistry
from nbdcore.protocol.constants import Rep
from nbdcore.protocol.exports import Client

MiB = 1 << 20


@pytest.fixture
def engine(inprocess_server, tmp_path: Path):
    registry = ExportRegistry()
    server = inprocess_server(registry)
    applier = SpecApplier(server, registry)
    yield server, applier, tmp_path
    applier.close_all()


def image(tmp_path: Path, name: str, size: int = MiB) -> str:
    path = tmp_path / f"{name}.raw"
    path.write_bytes(pattern(0, size))
    return str(path)


def go(port: int, export: str) -> tuple[NbdClient, int]:
    client = NbdClient.connect(port)
    client.read_greeting()
    client.send_client_flags(3)
    final, _ = client.opt_go(export)
    return client, final.type


def test_publish_change_policy_and_withdraw(engine) -> None:
    server, applier, tmp = engine
    a = ExportSpec(name="a", path=image(tmp, "a"), size=MiB)
    b = ExportSpec(name="b", path=image(tmp, "b"), size=MiB)
    applier.apply(EngineSpec(node="n", exports=(a, b)))
    assert sorted(applier.current) == ["a", "b"]
    with NbdClient.connect(server.port) as on_a, NbdClient.connect(server.port) as on_b:
        on_a.handshake("a")
        on_b.handshake("b")
        # a's allowed networks exclude loopback: a's client goes, b's stays
        a2 = ExportSpec(name="a", path=a.path, size=MiB, allowed_networks=("10.0.0.0/8",))
        applier.apply(EngineSpec(node="n", exports=(a2, b)))
        assert on_a.server_closed()
        assert on_b.read(0, 4096).data() == pattern(0, 4096)
        client, reply = go(server.port, "a")
        client.close()
        assert reply == Rep.ERR_POLICY
        # disabled: refused by policy as well, and not listed
        a3 = ExportSpec(name="a", path=a.path, size=MiB, enabled=False)
        applier.apply(EngineSpec(node="n", exports=(a3, b)))
        client, reply = go(server.port, "a")
        client.close()
        assert reply == Rep.ERR_POLICY
        assert [name for name, _ in server.registry.list_exports(Client("127.0.0.1:1"))] == ["b"]
        # withdrawn: unknown
        applier.apply(EngineSpec(node="n", exports=(b,)))
        client, reply = go(server.port, "a")
        client.close()
        assert reply == Rep.ERR_UNKNOWN
        assert on_b.read(4096, 4096).data() == pattern(4096, 4096)


def test_grown_image_is_reopened_and_old_backend_closed_when_unused(engine) -> None:
    server, applier, tmp = engine
    path = image(tmp, "g")
    applier.apply(EngineSpec(node="n", exports=(ExportSpec(name="g", path=path, size=MiB),)))
    old_backend = applier.current["g"][1].backend
    with NbdClient.connect(server.port) as client:
        client.handshake("g")
        Path(path).write_bytes(pattern(0, 2 * MiB))
        applier.apply(EngineSpec(node="n",
                                 exports=(ExportSpec(name="g", path=path, size=2 * MiB),)))
        assert client.server_closed()  # it negotiated the old size
    assert wait_until(lambda: (applier.close_retired() or True) and not applier.retired)
    assert old_backend.fd == -1
    with NbdClient.connect(server.port) as client:
        details = client.handshake("g")
        assert details.size == 2 * MiB


def test_missing_file_is_reported_not_fatal(engine) -> None:
    _, applier, tmp = engine
    spec = EngineSpec(node="n", exports=(
        ExportSpec(name="gone", path=str(tmp / "missing.raw")),
        ExportSpec(name="ok", path=image(tmp, "ok"), size=MiB),
    ))
    applier.apply(spec)
    assert list(applier.current) == ["ok"]
    assert "gone" in applier.failed
    assert applier.digest == spec.digest
