"""bench/nbdbench.py itself: one quick round against the real servers writes its table.

The figures are not checked (the benchmark is the check of speed, not the test suite);
what is checked is that the script runs the servers side by side, interleaved run by run,
and reports every server's median and nbdcore's ratios (and, for the many-clients row,
each server's slowest client)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = pytest.mark.interop


def test_a_quick_round_writes_the_side_by_side_table(tmp_path: Path) -> None:
    table = tmp_path / "latest.md"
    done = subprocess.run(
        [sys.executable, "bench/nbdbench.py", "--quick", "--rounds", "1",
         "--only", "sparse_nbdcopy,memory_flood,many_clients",
         "--servers", "nbdcore,nbdkit,qemu-nbd",
         "--output", str(table)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "BENCH_DIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    text = table.read_text()
    assert "| workload | unit | nbdcore | nbdkit | qemu-nbd |" in text
    sparse = next(line for line in text.splitlines() if line.startswith("| sparse 8 GiB"))
    cells = [c.strip() for c in sparse.strip("|").split("|")]
    seconds = [float(c) for c in cells[2:5]]
    assert all(0 < s < 60 for s in seconds)
    assert re.fullmatch(r"\d+\.\d\dx", cells[5])  # vs nbdkit
    assert re.fullmatch(r"\d+\.\d\dx", cells[6])  # vs qemu-nbd
    # One sample per server and round, whether interleaved (sparse) or alone (memory).
    assert done.stdout.count("round 1 sparse_nbdcopy") == 3
    assert done.stdout.count("round 1 memory_flood") == 3
    assert "Peak resident memory (VmHWM, KiB): nbdcore" in text
    # Whether one of the 8 clients was starved: each server's slowest client's share.
    shares = re.search(r"lowest of all runs: nbdcore (\S+), nbdkit (\S+), qemu-nbd (\S+)\.",
                       text)
    assert shares is not None
    assert all(0 < float(share) <= 1 for share in shares.groups())
