"""An idle connection polls its socket for ``spin_us`` before sleeping in recv.

Whatever the timing, requests must be answered: one that arrives while the connection
polls, one that arrives after it went to sleep, a close seen while polling, and many
connections at once (where nobody polls). After a WRITE whose payload was spliced (a client
streaming large writes) it does not poll: that client is bound by its own pushing.
"""

from __future__ import annotations

import time

import pytest
from conftest import wait_until
from nbdclient import NbdClient, pattern

from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry
from nbdcore.server import RECV_SIZE, SPIN_MAX_CONNECTIONS, _Connection

MiB = 1 << 20


@pytest.fixture
def serve_polling(tmp_path, inprocess_server):
    path = tmp_path / "disk.raw"
    path.write_bytes(pattern(0, MiB))

    def start(spin_us: int):
        registry = ExportRegistry([Export("disk", SparseFile(path))])
        return inprocess_server(registry, spin_us=spin_us)

    return start


@pytest.mark.parametrize("spin_us", [0, 50, 200_000], ids=["never", "default", "long"])
@pytest.mark.parametrize("pause_s", [0.0, 0.05], ids=["at-once", "after-a-pause"])
def test_requests_are_answered_whatever_the_pause(serve_polling, spin_us, pause_s):
    server = serve_polling(spin_us)
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk", structured=True)
        for offset in (0, 4096, 300_000):
            time.sleep(pause_s)
            assert client.read(offset, 4096).data() == pattern(offset, 4096)
        assert client.write(8192, b"x" * 512).ok
        time.sleep(pause_s)
        assert client.read(8192, 512).data() == b"x" * 512


def test_a_close_seen_while_polling_ends_the_connection(serve_polling):
    server = serve_polling(2_000_000)  # polls for 2 s after each reply
    client = NbdClient.connect(int(server.port))
    client.handshake("disk", structured=True)
    assert client.read(0, 4096).ok
    client.close()  # arrives while the connection polls
    assert wait_until(lambda: not server.connections(), timeout=1.5)


def test_many_connections_are_served_while_none_polls(serve_polling):
    server = serve_polling(200_000)
    clients = [NbdClient.connect(int(server.port)) for _ in range(SPIN_MAX_CONNECTIONS + 3)]
    try:
        for client in clients:
            client.handshake("disk", structured=True)
        for round_ in range(3):
            for index, client in enumerate(clients):
                offset = (index * 8 + round_) * 4096
                assert client.read(offset, 4096).data() == pattern(offset, 4096)
    finally:
        for client in clients:
            client.close()


def test_no_polling_after_a_spliced_write(tmp_path, inprocess_server, monkeypatch):
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(8 * MiB))
    polls: list[int] = []
    poll = _Connection._recv_spinning

    def counted(self, target):
        polls.append(len(target))
        return poll(self, target)

    monkeypatch.setattr(_Connection, "_recv_spinning", counted)
    server = inprocess_server(ExportRegistry([Export("disk", SparseFile(path))]),
                              spin_us=200_000)
    with NbdClient.connect(int(server.port)) as client:
        client.handshake("disk", structured=True)
        assert wait_until(lambda: len(polls) == 1)  # idle after the handshake: it polls
        payload = pattern(0, 4 * RECV_SIZE)  # larger than the buffer: the rest is spliced
        assert client.write(0, payload).ok
        time.sleep(0.3)  # longer than a poll: the connection waits for the next header
        assert len(polls) == 1
        assert client.read(0, MiB).data() == payload[:MiB]
        assert wait_until(lambda: len(polls) == 2)  # after a READ it polls again
