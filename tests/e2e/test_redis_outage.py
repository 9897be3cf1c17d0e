"""Losing Redis for a while must not stop the engine from serving; metrics catch up."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, require, wait_until
from nbdclient import NbdClient, pattern

from .stack import Stack, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.interop]
MiB = 1 << 20


def start_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    assert wait_until(lambda: _pings(redis.Redis(port=port, socket_timeout=0.5)), timeout=10)
    return proc


def _pings(client: object) -> bool:
    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except Exception:
        return False


@pytest.fixture
def stack_with_own_redis(tmp_path: Path) -> Iterator[tuple[Stack, int, list]]:
    require("redis-server", "qemu-io")
    port = free_port()
    redis_procs = [start_redis(port, tmp_path)]
    stack = start_stack(tmp_path / "var", env={"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    yield stack, port, redis_procs
    stack.stop()
    for proc in redis_procs:
        proc.terminate()
        proc.wait(10)


def test_engine_keeps_serving_without_redis_and_catches_up(stack_with_own_redis) -> None:
    stack, redis_port, redis_procs = stack_with_own_redis
    nbd_port = int(stack.demo_uri.rsplit(":", 1)[1].split("/")[0])
    with NbdClient.connect(nbd_port) as client:
        client.handshake("demo")
        client.write(0, pattern(0, MiB))
        redis_procs[0].terminate()  # the Redis this test started
        redis_procs[0].wait(10)
        started = time.monotonic()
        while time.monotonic() - started < 3:  # serving goes on while Redis is away
            assert client.read(0, MiB).data() == pattern(0, MiB)
        # a new client can connect and work too: exports stay as they were
        subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0 2M 1M", stack.demo_uri],
                       check=True, capture_output=True, timeout=30)
        redis_procs.append(start_redis(redis_port, stack.var_dir))
        # metrics come back: the engine beats again and the live counters reappear
        assert wait_until(lambda: stack.heartbeat() is not None, timeout=20)
        status, exports = stack.request("GET", "/exports/")
        assert status == 200
        demo_id = exports["results"][0]["id"]
        assert wait_until(lambda: stack.request("GET", f"/exports/{demo_id}/live")[1]
                          .get("clients") == 1, timeout=20)
        beat = stack.heartbeat()
        assert beat is not None
        assert beat["metrics_failures"], "the outage was not counted"
