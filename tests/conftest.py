"""Shared fixtures: sparse images, the engine as a subprocess or in-process, real clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Fixtures of the appliance's tests (tests/appliance, tests/api). Those directories have no
# conftest.py of their own: a second module named "conftest" would shadow this one for the
# engine's tests, which import helpers from it.
pytest_plugins = ["appliance_testing"]

ROOT = Path(__file__).resolve().parent.parent
# Debian's python3-libnbd binds only Debian's own interpreter.
SYSTEM_PYTHON = "/usr/bin/python3"


def require(*tools: str) -> None:
    """Skip unless every tool is installed (``make test`` installs them all)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def require_libnbd_python() -> None:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("python3-libnbd is not installed")


@dataclass
class ServerProcess:
    """``python -m nbdcore serve`` running in a subprocess."""

    proc: subprocess.Popen[str]
    host: str
    port: int

    def uri(self, export: str = "") -> str:
        return f"nbd://{self.host}:{self.port}/{export}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()


def start_server(*args: str, host: str = "127.0.0.1", port: int = 0) -> ServerProcess:
    """Start ``python -m nbdcore serve ARGS`` and wait for its ``listening on`` line."""
    cmd = [sys.executable, "-m", "nbdcore", "serve", *args, "--bind", host, "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    bound_port = int(line.rsplit(":", 1)[1])
    return ServerProcess(proc, host, bound_port)


@pytest.fixture
def serve() -> Iterator[Callable[..., ServerProcess]]:
    """Factory: ``serve(IMAGE, "--export", "x", ...)``; every server is stopped afterwards."""
    started: list[ServerProcess] = []

    def factory(*args: str, **kwargs: object) -> ServerProcess:
        server = start_server(*(str(a) for a in args), **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


def make_sparse_image(path: Path, size: int, islands: dict[int, bytes] | None = None) -> Path:
    """A sparse file of ``size`` bytes with data only at the given offsets."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in (islands or {}).items():
            f.seek(offset)
            f.write(data)
    return path


def file_extents(path: Path) -> list[tuple[int, int, bool]]:
    """(offset, length, is_data) from SEEK_DATA/SEEK_HOLE, merged: the oracle for maps."""
    size = path.stat().st_size
    out: list[tuple[int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                data = size
            if data > pos:
                out.append((pos, data - pos, False))
                pos = data
                continue
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            out.append((pos, hole - pos, True))
            pos = hole
    finally:
        os.close(fd)
    return out


def nbdsh(uri: str, script: str, *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a python3-libnbd script with ``h`` connected to ``uri`` (Debian's python).

    The script may print JSON for the test to parse. Strict mode stays at libnbd's
    default unless the script changes it.
    """
    require_libnbd_python()
    program = (
        "import nbd, json, sys\n"
        "h = nbd.NBD()\n"
        f"h.connect_uri({uri!r})\n"
        + script
        + "\ntry:\n    h.shutdown()\nexcept nbd.Error:\n    pass\n"
    )
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", program], capture_output=True, text=True, timeout=timeout
    )


def nbdsh_json(uri: str, script: str, **kwargs: float) -> object:
    result = nbdsh(uri, script, **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@pytest.fixture
def inprocess_server() -> Iterator[Callable[..., object]]:
    """Factory: ``inprocess_server(registry, **kwargs)`` -> running NbdServer, shut down after."""
    from nbdcore.server import NbdServer

    servers: list[NbdServer] = []

    def factory(registry: object, **kwargs: object) -> NbdServer:
        server = NbdServer(registry, host="127.0.0.1", port=0, **kwargs)  # type: ignore[arg-type]
        server.start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.shutdown(timeout_s=5)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("nbd-")]
