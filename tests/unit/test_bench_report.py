"""bench/nbdbench.py's ratios: paired round by round, so drift between rounds cannot
flip them. Pure arithmetic on made-up samples; the benchmark itself runs in
tests/interop/test_bench.py."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import nbdbench


def _workload(results: dict[str, list[float]], *, higher_is_better: bool = True):
    w = nbdbench.Workload("w", "w", "IOPS", "full", lambda uri, image: 0.0,
                          higher_is_better=higher_is_better, runs=3)
    w.results = results
    return w


def test_the_ratio_pairs_samples_of_the_same_round() -> None:
    # The samples of 2026-12-07 13:13: the machine slowed down round after round.
    w = _workload({"nbdcore": [100483, 78707, 74996], "nbdkit": [85087, 80751, 65777]})
    ratio = nbdbench.paired_ratio(w, "nbdcore", "nbdkit")
    assert ratio == pytest.approx(74996 / 65777)  # rounds: 1.18, 0.97, 1.14
    # The ratio of the two medians would have said 0.97: 78,707 against 80,751.
    assert ratio > 1 > 78707 / 80751


def test_a_time_is_better_when_lower() -> None:
    w = _workload({"nbdcore": [0.060, 0.080, 0.077], "nbdkit": [0.065, 0.082, 0.077]},
                  higher_is_better=False)
    assert nbdbench.paired_ratio(w, "nbdcore", "nbdkit") == pytest.approx(0.082 / 0.080)


def test_a_server_without_samples_has_no_ratio() -> None:
    w = _workload({"nbdcore": [1.0, 2.0, 3.0]})
    assert nbdbench.paired_ratio(w, "nbdcore", "nbdkit") is None
    assert nbdbench.fmt_ratio(None) == "-"
    assert nbdbench.fmt_ratio(1.234) == "1.23x"


def test_the_table_prints_the_paired_ratio() -> None:
    w = _workload({"nbdcore": [100483, 78707, 74996], "nbdkit": [85087, 80751, 65777],
                   "qemu-nbd": [36575, 34810, 27321], "appliance": [101170, 89853, 72115]})
    servers = nbdbench.SERVERS[:]
    try:
        nbdbench.SERVERS[:] = [s for s in servers
                               if s.name in ("nbdcore", "appliance", "nbdkit", "qemu-nbd")]
        table = nbdbench.report([w], 3, {})
    finally:
        nbdbench.SERVERS[:] = servers
    row = next(line for line in table.splitlines() if line.startswith("| w |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:6] == ["78,707", "89,853", "80,751", "34,810"]  # medians, as before
    assert cells[6:] == ["1.14x", "2.74x", "1.01x"]  # vs nbdkit, vs qemu-nbd, appliance
