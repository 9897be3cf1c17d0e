"""``--workers N``: several engine processes on one port behave as one server."""

from __future__ import annotations

import filecmp
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, make_sparse_image, nbdsh_json, require, wait_until

pytestmark = pytest.mark.interop
MiB = 1 << 20


def test_workers_share_the_port_and_the_data(serve, tmp_path: Path) -> None:
    require("nbdcopy")
    image = make_sparse_image(tmp_path / "disk.raw", 64 * MiB,
                              {0: os.urandom(MiB), 40 * MiB: os.urandom(3 * MiB)})
    server = serve(image, "--workers", "2")
    copy = tmp_path / "copy.raw"
    # nbdcopy opens several connections (multi-conn): they land in both processes
    subprocess.run(["nbdcopy", "--connections=4", server.uri(), str(copy)], check=True,
                   timeout=60)
    assert filecmp.cmp(image, copy, shallow=False)
    # a write and flush on one connection is seen by the next ones, whichever process
    for round_no in range(6):
        value = round_no + 1
        nbdsh_json(server.uri(), f"h.pwrite(bytes([{value}]) * 4096, 8192); h.flush(); print(1)")
        seen = nbdsh_json(server.uri(), "print(json.dumps(h.pread(4096, 8192)[0]))")
        assert seen == value
    assert image.read_bytes()[8192:8192 + 4096] == bytes([6]) * 4096


def test_sigterm_stops_every_worker(tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.raw", MiB)
    proc = subprocess.Popen([sys.executable, "-m", "nbdcore", "serve", str(image),
                             "--port", "0", "--workers", "3"], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("listening on ")
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                              text=True).stdout.split()
    assert len(children) == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children))
