"""fio 3.33 with its nbd engine (libnbd 1.14): queued random I/O with data verification."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_sparse_image, require

from .helpers import MiB, read_range, run

pytestmark = pytest.mark.interop

FILL = 0x5A


@pytest.fixture(autouse=True)
def _fio() -> None:
    require("fio")


def fio(uri: str, tmp_path: Path, *options: str) -> dict:
    """Run one fio job against ``uri``; its JSON job report (fio must exit 0)."""
    report = tmp_path / "fio.json"
    result = run(["fio", "--name=nbdcore", "--ioengine=nbd", f"--uri={uri}",
                  "--output-format=json", f"--output={report}", "--verify_state_save=0",
                  *options], timeout=120, cwd=tmp_path)
    text = report.read_text() if report.exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{text}"
    jobs = json.loads(text[text.index("{"):])["jobs"]
    assert len(jobs) == 1
    return jobs[0]


def test_randwrite_with_crc32c_verify(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.raw", 32 * MiB)
    server = serve(image)
    job = fio(server.uri(), tmp_path, "--rw=randwrite", "--bs=4k", "--size=16m",
              "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--runtime=20")
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB  # every block was read back and verified
    # fio's verify headers really landed in the file, and past --size nothing was touched.
    assert read_range(image, 0, 16 * MiB).count(0) < 16 * MiB // 2
    assert read_range(image, 16 * MiB, 16 * MiB) == bytes(16 * MiB)


def test_randrw_with_verify(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.raw", 16 * MiB)
    server = serve(image, "--export", "rw")
    job = fio(server.uri("rw"), tmp_path, "--rw=randrw", "--bs=4k", "--size=8m",
              "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--runtime=20")
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0
    assert job["read"]["io_bytes"] >= job["write"]["io_bytes"]


def test_four_jobs_four_connections_with_verify(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.raw", 32 * MiB)
    server = serve(image)
    job = fio(server.uri(), tmp_path, "--rw=randwrite", "--bs=4k", "--size=4m",
              "--offset_increment=4m", "--numjobs=4", "--iodepth=8", "--group_reporting",
              "--verify=crc32c", "--do_verify=1", "--runtime=20")
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 16 * MiB
    assert job["read"]["io_bytes"] == 16 * MiB
    assert read_range(image, 16 * MiB, 16 * MiB) == bytes(16 * MiB)


def test_sequential_1m_read_with_pattern_verify(serve, tmp_path: Path) -> None:
    image = tmp_path / "filled.raw"
    image.write_bytes(bytes([FILL]) * (32 * MiB))
    server = serve(image, "--read-only")
    job = fio(server.uri(), tmp_path, "--rw=read", "--bs=1m", "--size=32m", "--iodepth=4",
              "--verify=pattern", f"--verify_pattern={FILL:#x}", "--runtime=20")
    assert job["error"] == 0
    assert job["read"]["io_bytes"] == 32 * MiB
    assert job["write"]["io_bytes"] == 0


def test_sequential_read_notices_a_corrupt_block(serve, tmp_path: Path) -> None:
    """The verification above is real: one wrong byte in the file makes fio fail."""
    image = tmp_path / "filled.raw"
    image.write_bytes(bytes([FILL]) * (8 * MiB))
    with open(image, "r+b") as f:
        f.seek(5 * MiB + 77)
        f.write(bytes([FILL ^ 1]))
    server = serve(image, "--read-only")
    report = tmp_path / "bad.json"
    result = run(["fio", "--name=bad", "--ioengine=nbd", f"--uri={server.uri()}",
                  "--rw=read", "--bs=1m", "--size=8m", "--verify=pattern",
                  f"--verify_pattern={FILL:#x}", "--output-format=json", f"--output={report}",
                  "--verify_state_save=0"], cwd=tmp_path)
    assert result.returncode != 0
    assert "verify failed" in result.stderr
    assert str(5 * MiB) in result.stderr  # the block fio complains about
