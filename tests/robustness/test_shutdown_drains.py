"""Stopping the server drains: requests already received are answered, then it closes."""

from __future__ import annotations

import threading
import time

from nbdclient import NbdClient, pattern

from nbdcore.backends import MemoryBackend
from nbdcore.exports import Export, ExportRegistry
from nbdcore.protocol.constants import Cmd
from nbdcore.server import NbdServer

SIZE = 1 << 20


class SlowSync(MemoryBackend):
    """A disk whose flush takes a while, so the shutdown arrives while it runs."""

    def sync(self) -> None:
        time.sleep(1.0)


def test_shutdown_answers_in_flight_requests_before_closing() -> None:
    backend = SlowSync(SIZE)
    backend.pwrite(pattern(0, SIZE), 0)
    server = NbdServer(ExportRegistry([Export("disk", backend)]), host="127.0.0.1", port=0)
    server.start()
    try:
        with NbdClient.connect(server.port) as client:
            client.handshake("disk")
            flush = client.send(Cmd.FLUSH, 0, 0)
            read = client.send(Cmd.READ, 0, 65536)
            time.sleep(0.2)  # both are in the server now; the flush is in the pool
            stopper = threading.Thread(target=server.shutdown)
            stopper.start()
            assert client.wait(read).data() == pattern(0, 65536)
            assert client.wait(flush).ok  # answered although shutdown had begun
            assert client.server_closed()
            stopper.join(10)
            assert not stopper.is_alive()
    finally:
        server.shutdown(timeout_s=1)
    assert server.connections() == []
