"""``python -m nbdcore serve``: several exports, usage errors, signals."""

from __future__ import annotations

import concurrent.futures
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, SYSTEM_PYTHON, make_sparse_image, nbdsh_json, require_libnbd_python

from .helpers import MiB, read_range, run, run_json

pytestmark = pytest.mark.interop


def serve_cli(*args: str | Path, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    """Run the server where it is expected to exit by itself (usage or start-up errors)."""
    cmd = [sys.executable, "-m", "nbdcore", "serve", *map(str, args),
           "--bind", "127.0.0.1", "--port", "0"]
    return run(cmd, timeout=timeout, cwd=ROOT)


def filled(path: Path, size: int, byte: int) -> Path:
    path.write_bytes(bytes([byte]) * size)
    return path


def test_several_images_each_with_its_own_export(serve, tmp_path: Path) -> None:
    require_libnbd_python()
    alpha = filled(tmp_path / "alpha.raw", 1 * MiB, 0xA1)
    beta = filled(tmp_path / "beta.raw", 2 * MiB, 0xB2)
    default = filled(tmp_path / "default.raw", 3 * MiB, 0xD3)
    server = serve(alpha, "--export", "alpha", "--description", "A",
                   beta, "--export", "beta", "--read-only",
                   default)
    listing = run_json(["nbdinfo", "--list", "--json", server.uri()])
    exports = {e["export-name"]: e for e in listing["exports"]}  # type: ignore[index]
    assert {n: (e["export-size"], e["is_read_only"]) for n, e in exports.items()} == {
        "alpha": (1 * MiB, False), "beta": (2 * MiB, True), "": (3 * MiB, False)}
    assert exports["alpha"]["description"] == "A"
    # Each name serves its own file.
    script = """
print(json.dumps([h.get_size(), h.is_read_only(), h.pread(4, 0).hex()]))
"""
    assert nbdsh_json(server.uri("alpha"), script) == [1 * MiB, False, "a1a1a1a1"]
    assert nbdsh_json(server.uri("beta"), script) == [2 * MiB, True, "b2b2b2b2"]
    assert nbdsh_json(server.uri(""), script) == [3 * MiB, False, "d3d3d3d3"]
    nbdsh_json(server.uri("alpha"), "h.pwrite(b'\\x01' * 512, 0); h.flush(); print(1)")
    assert read_range(alpha, 0, 513) == b"\x01" * 512 + b"\xa1"
    assert read_range(default, 0, 1) == b"\xd3"


@pytest.mark.parametrize("names", [("same", "same"), (None, None)], ids=["named", "default"])
def test_duplicate_export_name_is_a_usage_error(tmp_path: Path, names) -> None:  # type: ignore[no-untyped-def]
    args: list[str | Path] = []
    for index, name in enumerate(names):
        args.append(make_sparse_image(tmp_path / f"d{index}.raw", MiB))
        if name is not None:
            args += ["--export", name]
    result = serve_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "listening" not in result.stdout
    assert "usage:" in result.stderr
    assert "own export name" in result.stderr, result.stderr


def test_export_option_before_any_image_is_a_usage_error(tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "d.raw", MiB)
    result = serve_cli("--export", "x", image)
    assert result.returncode == 2
    assert "must follow the IMAGE" in result.stderr


def test_missing_image_file(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist.raw"
    result = serve_cli(missing)
    assert result.returncode == 1
    assert "listening" not in result.stdout
    assert str(missing) in result.stderr
    assert "No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert not missing.exists()  # and it was not created either


def test_port_already_in_use(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "d.raw", MiB)
    first = serve(image)
    cmd = [sys.executable, "-m", "nbdcore", "serve", str(image),
           "--bind", "127.0.0.1", "--port", str(first.port)]
    result = run(cmd, timeout=15, cwd=ROOT)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first.port}" in result.stderr
    assert "Traceback" not in result.stderr


def greeting(server) -> bytes:  # type: ignore[no-untyped-def]
    """The first 8 bytes a new connection receives (the server is up and serving)."""
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        data = b""
        while len(data) < 8:
            chunk = sock.recv(8 - len(data))
            if not chunk:
                break
            data += chunk
        return data


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_the_server_with_exit_0(serve, tmp_path: Path, signum: int) -> None:
    image = make_sparse_image(tmp_path / "d.raw", MiB)
    server = serve(image)
    assert greeting(server) == b"NBDMAGIC"
    time.sleep(0.5)  # steady state; the start-up window is the next test's business
    server.proc.send_signal(signum)
    assert server.proc.wait(10) == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=2).close()


def test_sigterm_right_after_the_listening_line(serve, tmp_path: Path) -> None:
    """Once it printed "listening on" the server is ready, and that includes its signals.

    A supervisor may stop the server as soon as it reported readiness; the window this
    checks for is short, so the test repeats it.
    """
    image = make_sparse_image(tmp_path / "d.raw", MiB)

    def start_and_stop(_: int) -> int:
        server = serve(image)
        server.proc.send_signal(signal.SIGTERM)
        # Generous: eight servers start and stop at once on two cores, and the rest of
        # the suite may still be loading them; what is checked is how they end.
        return server.proc.wait(30)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(start_and_stop, range(24)))
    assert codes == [0] * len(codes), f"exit codes {codes} (negative = killed by the signal)"


def test_sigterm_with_a_connected_client(serve, tmp_path: Path) -> None:
    """A client in the middle of its session does not keep the server from exiting cleanly."""
    require_libnbd_python()
    image = make_sparse_image(tmp_path / "d.raw", 4 * MiB)
    server = serve(image)
    client = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", (
            "import nbd, sys, time\n"
            "h = nbd.NBD()\n"
            f"h.connect_uri({server.uri()!r})\n"
            "h.pwrite(b'\\x42' * 4096, 8192)\n"
            "print('ready', flush=True)\n"
            "time.sleep(30)\n"
        )],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "ready"
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        assert time.monotonic() - started < 12
    finally:
        client.kill()
        client.wait()
    assert read_range(image, 8192, 4096) == b"\x42" * 4096
