"""Re-publishing one export drops its clients and leaves the other exports' clients alone."""

from __future__ import annotations

from conftest import wait_until
from nbdclient import NbdClient, pattern

from nbdcore.backends import MemoryBackend
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import Rep

SIZE = 1 << 20


def _filled(size: int) -> MemoryBackend:
    backend = MemoryBackend(size)
    backend.pwrite(pattern(0, size), 0)
    return backend


def test_close_connections_of_one_export_keeps_the_others(inprocess_server):
    registry = ExportRegistry([Export("a", _filled(SIZE)), Export("b", _filled(SIZE))])
    server = inprocess_server(registry)
    with NbdClient.connect(server.port) as a, NbdClient.connect(server.port) as b:
        a.handshake("a")
        b.handshake("b")
        assert wait_until(lambda: len(server.connections()) == 2)
        registry.get("a").enabled = False
        closed = server.close_connections(lambda info: info.export_name == "a")
        assert closed == 1
        assert a.server_closed()
        assert b.read(0, 4096).data() == pattern(0, 4096)
        assert wait_until(lambda: [c.export_name for c in server.connections()] == ["b"])
    with NbdClient.connect(server.port) as again:
        again.read_greeting()
        again.send_client_flags(3)
        final, details = again.opt_go("a")
        assert final.type == Rep.ERR_POLICY
        assert details is None
