"""The appliance as ``make run`` starts it: real Redis, a real Celery engine worker with its
engine process, beat and gunicorn; real NBD clients; every check through the API."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from conftest import SYSTEM_PYTHON, require, require_libnbd_python, wait_until
from nbdclient import NbdClient, pattern

from .stack import Stack, start_stack

pytestmark = [pytest.mark.slow, pytest.mark.interop]
MiB = 1 << 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    require("redis-server", "nbdinfo", "qemu-io")
    running = start_stack(tmp_path_factory.mktemp("appliance"))
    yield running
    assert running.stop() == 0, running.log("worker")[-2000:]


def nbd_port(stack: Stack) -> int:
    return int(stack.demo_uri.rsplit(":", 1)[1].split("/")[0])


def uri(stack: Stack, export: str) -> str:
    return f"nbd://127.0.0.1:{nbd_port(stack)}/{export}"


def create_export(stack: Stack, name: str, size: int = 64 * MiB, **policy: object) -> dict:
    status, image = stack.request("POST", "/images/", {"name": name, "size": size})
    assert status == 201, image
    status, export = stack.request("POST", "/exports/", {"name": name, "image": image["id"],
                                                          **policy})
    assert status == 201, export
    return export


def listed(stack: Stack) -> set[str]:
    result = subprocess.run(["nbdinfo", "--list", "--json", uri(stack, "")],
                            capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        return set()
    import json

    return {e["export-name"] for e in json.loads(result.stdout)["exports"]}


def served(stack: Stack, export: str) -> bool:
    result = subprocess.run(["nbdinfo", "--size", uri(stack, export)], capture_output=True,
                            text=True, timeout=30)
    return result.returncode == 0


def refusal(stack: Stack, export: str) -> str:
    """What libnbd says when it tries to use ``export`` ("connected" if it could)."""
    require_libnbd_python()
    script = (
        "import nbd\n"
        "h = nbd.NBD()\n"
        "try:\n"
        f"    h.connect_uri({uri(stack, export)!r})\n"
        "    print('connected')\n"
        "except nbd.Error as e:\n"
        "    print(e)\n"
    )
    return subprocess.run([SYSTEM_PYTHON, "-c", script], capture_output=True, text=True,
                          timeout=30, check=True).stdout


def test_run_command_prints_a_working_api_token_and_demo_export(stack: Stack) -> None:
    status, body = stack.request("GET", "/exports/")
    assert status == 200
    assert [e["name"] for e in body["results"]] == ["demo"]
    assert body["results"][0]["uri"] == stack.demo_uri
    assert stack.request("GET", "/exports/", token=None)[0] == 401
    info = subprocess.run(["nbdinfo", "--json", stack.demo_uri], capture_output=True,
                          text=True, timeout=30, check=True)
    assert '"export-size": 1073741824' in info.stdout


def test_new_export_is_served_and_sessions_are_recorded(stack: Stack) -> None:
    export = create_export(stack, "vm-disk")
    started = time.monotonic()
    assert wait_until(lambda: "vm-disk" in listed(stack), timeout=15)
    took = time.monotonic() - started
    assert took < 15
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 2M", "-c", "read -P 0x5a 1M 2M",
         uri(stack, "vm-disk")], check=True, capture_output=True, timeout=60)

    def finished_qemu_session() -> dict | None:
        status, body = stack.request("GET", f"/sessions/?export={export['id']}&active=false")
        assert status == 200
        sessions = [s for s in body["results"] if s["bytes_written"]]
        return sessions[0] if sessions else None

    assert wait_until(lambda: finished_qemu_session() is not None, timeout=15)
    session = finished_qemu_session()
    assert session is not None
    assert session["fingerprint"] == "qemu"
    assert session["features"]["structured_replies"] is True
    assert session["features"]["base_allocation"] is True
    assert session["bytes_written"] == 2 * MiB
    assert session["bytes_read"] == 2 * MiB
    assert session["negotiated"]["export_name"] == "vm-disk"


def test_live_counters_and_active_sessions_while_a_client_is_connected(stack: Stack) -> None:
    export = create_export(stack, "live-disk")
    assert wait_until(lambda: served(stack, "live-disk"), timeout=15)
    with NbdClient.connect(nbd_port(stack)) as client:
        client.handshake("live-disk")
        client.write(0, pattern(0, MiB))
        for _ in range(4):
            assert client.read(0, MiB).ok

        def live() -> dict:
            status, body = stack.request("GET", f"/exports/{export['id']}/live")
            assert status == 200
            return body

        assert wait_until(lambda: live().get("clients") == 1 and
                          live().get("bytes_read") == 4 * MiB, timeout=10)
        body = live()
        assert body["bytes_written"] == MiB
        assert body["ops"]["READ"] == 4
        assert body["engine"]["state"] == "up"
        status, sessions = stack.request("GET", f"/sessions/?export={export['id']}&active=true")
        assert status == 200
        (session,) = sessions["results"]
        assert session["active"] is True
        assert wait_until(lambda: stack.request(
            "GET", f"/sessions/?export={export['id']}&active=true")[1]["results"][0]["live"]
            is not None, timeout=10)
        _, sessions = stack.request("GET", f"/sessions/?export={export['id']}&active=true")
        assert sessions["results"][0]["live"]["stats"]["bytes_read"] == 4 * MiB
    status, metrics = stack.request("GET", f"{stack.web}/metrics")
    assert status == 200
    assert 'nbd_export_bytes_written_total{export="live-disk"} 1.048576e+06' in metrics
    assert 'nbd_engine_up{node="e2e-node"} 1.0' in metrics
    assert stack.request("GET", f"{stack.web}/metrics", token=None)[0] == 401


def test_disabled_export_is_refused_while_another_exports_client_goes_on(stack: Stack) -> None:
    first = create_export(stack, "first")
    create_export(stack, "second")
    assert wait_until(lambda: {"first", "second"} <= listed(stack), timeout=15)
    with NbdClient.connect(nbd_port(stack)) as other:
        other.handshake("second")
        other.write(0, pattern(0, 65536))
        status, body = stack.request("PATCH", f"/exports/{first['id']}/", {"enabled": False})
        assert status == 200, body
        assert wait_until(lambda: "first" not in listed(stack), timeout=15)
        assert "policy" in refusal(stack, "first").lower()
        # the other export's client was not dropped and still works
        assert other.read(0, 65536).data() == pattern(0, 65536)
    stack.request("PATCH", f"/exports/{first['id']}/", {"enabled": True})
    assert wait_until(lambda: served(stack, "first"), timeout=15)


def test_client_outside_allowed_networks_gets_policy_refusal(stack: Stack) -> None:
    create_export(stack, "lab-only", allowed_networks=["10.1.0.0/16"])
    create_export(stack, "loopback-ok", allowed_networks=["127.0.0.0/8"])
    assert wait_until(lambda: "loopback-ok" in listed(stack), timeout=15)
    assert "lab-only" not in listed(stack)
    result = refusal(stack, "lab-only")
    assert "policy" in str(result).lower() or "not allowed" in str(result).lower(), result


def test_killed_engine_is_restarted_and_serves_again(stack: Stack) -> None:
    beat = stack.heartbeat()
    assert beat is not None
    old_pid = beat["pid"]
    os.kill(old_pid, signal.SIGKILL)  # the engine process the run command started
    assert wait_until(lambda: (stack.heartbeat() or {}).get("pid") not in (None, old_pid),
                      timeout=30)
    assert wait_until(lambda: served(stack, "demo"), timeout=15)
    assert "exited with" in stack.log("worker")


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:  # gone meanwhile
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children = [int(child) for child in f.read().split()]
        except FileNotFoundError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_repeated_stop_signal_still_stops_every_component(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """``kill -TERM -- -PGID`` on ``make run`` reaches run.sh twice (make passes SIGTERM
    on to its child): the second signal must not cut the stop short and leave Redis, the
    engine worker, beat and the web running without anyone to stop them."""
    require("redis-server")
    var_dir = tmp_path_factory.mktemp("stopped-twice")
    running = start_stack(var_dir)
    components = _descendants(running.proc.pid)  # the engine process and web workers too
    try:
        assert len(components) >= 5, components  # Redis, engine worker, engine, beat, web
        os.killpg(running.proc.pid, signal.SIGTERM)
        time.sleep(0.3)  # make's own SIGTERM arrives while the stop is under way
        os.killpg(running.proc.pid, signal.SIGTERM)
        running.proc.wait(120)
        assert wait_until(lambda: not any(map(_running, components)), timeout=30), [
            pid for pid in components if _running(pid)]
        assert "stopped" in (var_dir / "run-command.log").read_text()
    finally:
        for pid in filter(_running, components):
            os.kill(pid, signal.SIGKILL)
