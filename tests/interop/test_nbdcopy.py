"""nbdcopy (libnbd 1.14): block status, multi-conn, many requests in flight, zeroing."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
from conftest import file_extents, make_sparse_image, require

from .helpers import (
    IMAGE_SIZE,
    KiB,
    MiB,
    assert_sparse_copy,
    expected_runs,
    make_islands_image,
    make_junk_image,
    merge,
    run,
    run_ok,
)

pytestmark = pytest.mark.interop


@pytest.fixture(autouse=True)
def _nbdcopy() -> None:
    require("nbdcopy")


@pytest.mark.parametrize("connections", [1, 4])
def test_copy_export_to_file(serve, tmp_path: Path, connections: int) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    server = serve(image, "--read-only", "--export", "src")
    out = tmp_path / "out.raw"
    run_ok(["nbdcopy", f"--connections={connections}", server.uri("src"), out])
    assert out.stat().st_size == IMAGE_SIZE
    assert filecmp.cmp(image, out, shallow=False)
    assert_sparse_copy(image, out)
    # nbdcopy skips what block status calls holes, so the copy has the same map.
    assert merge(file_extents(out)) == expected_runs()


def test_copy_file_to_export(serve, tmp_path: Path) -> None:
    source = make_islands_image(tmp_path / "src.raw", seed=3)
    target = make_junk_image(tmp_path / "target.raw")
    server = serve(target)
    run_ok(["nbdcopy", source, server.uri()])
    assert target.stat().st_size == IMAGE_SIZE
    assert filecmp.cmp(source, target, shallow=False)


@pytest.mark.parametrize("extra", [[], ["--requests=64", "--request-size=65536"]],
                         ids=["default", "small-requests"])
def test_copy_file_to_export_over_four_connections(serve, tmp_path: Path,
                                                    extra: list[str]) -> None:
    source = make_islands_image(tmp_path / "src.raw", seed=4)
    target = make_junk_image(tmp_path / "target.raw")
    server = serve(target)
    run_ok(["nbdcopy", "--connections=4", "--flush", *extra, source, server.uri()])
    assert filecmp.cmp(source, target, shallow=False)


def test_destination_is_zero_and_flush(serve, tmp_path: Path) -> None:
    source = make_islands_image(tmp_path / "src.raw", seed=5)
    target = make_sparse_image(tmp_path / "target.raw", IMAGE_SIZE)  # really all zero
    server = serve(target, "--export", "blank")
    run_ok(["nbdcopy", "--destination-is-zero", "--flush", source, server.uri("blank")])
    assert filecmp.cmp(source, target, shallow=False)
    # Nothing was written where the source has holes.
    assert_sparse_copy(source, target, slack=64 * KiB)  # file system metadata only
    assert merge(file_extents(target)) == expected_runs()


def test_copy_between_two_servers(serve, tmp_path: Path) -> None:
    source = make_islands_image(tmp_path / "src.raw", seed=6)
    target = make_junk_image(tmp_path / "target.raw")
    src_server = serve(source, "--read-only")
    dst_server = serve(target)
    run_ok(["nbdcopy", "--connections=4", src_server.uri(), dst_server.uri()])
    assert filecmp.cmp(source, target, shallow=False)


def test_copy_to_a_smaller_export_fails(serve, tmp_path: Path) -> None:
    source = make_islands_image(tmp_path / "src.raw")
    target = make_sparse_image(tmp_path / "small.raw", 8 * MiB)
    server = serve(target)
    failed = run(["nbdcopy", source, server.uri()])
    assert failed.returncode != 0
    assert "size" in failed.stderr.lower()
    assert merge(file_extents(target)) == [(0, 8 * MiB, False)]  # nothing was written
