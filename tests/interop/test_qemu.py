"""qemu-img and qemu-io (qemu 7.2) against the engine."""

from __future__ import annotations

import filecmp
import re
import shutil
from pathlib import Path

import pytest
from conftest import file_extents, make_sparse_image, require

from .helpers import (
    CONST_A,
    CONST_B,
    IMAGE_SIZE,
    ISLAND_CONST_A,
    ISLAND_CONST_B,
    KiB,
    MiB,
    allocated_bytes,
    assert_sparse_copy,
    clip,
    expected_runs,
    make_islands_image,
    make_junk_image,
    merge,
    read_range,
    run,
    run_json,
    run_ok,
    write_range,
)

pytestmark = pytest.mark.interop


@pytest.fixture(autouse=True)
def _qemu() -> None:
    require("qemu-img", "qemu-io")


def qemu_io(uri: str, *commands: str, read_only: bool = False):  # type: ignore[no-untyped-def]
    cmd = ["qemu-io", "-f", "raw"]
    if read_only:
        cmd.append("-r")
    for command in commands:
        cmd += ["-c", command]
    return run([*cmd, uri])


def assert_qemu_io_ok(result) -> None:  # type: ignore[no-untyped-def]
    assert result.returncode == 0, f"stdout: {result.stdout}\nstderr: {result.stderr}"
    assert "fail" not in result.stdout.lower(), result.stdout
    assert "error" not in result.stderr.lower(), result.stderr


def test_qemu_img_info_size(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    server = serve(image, "--export", "disk")
    info = run_json(["qemu-img", "info", "--output=json", "-f", "raw", server.uri("disk")])
    assert info["virtual-size"] == IMAGE_SIZE
    assert info["format"] == "raw"


def test_qemu_img_map_matches_the_file_extents(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    server = serve(image)
    entries = run_json(["qemu-img", "map", "--output=json", "-f", "raw", server.uri()])
    assert isinstance(entries, list)
    for entry in entries:
        assert entry["zero"] is (not entry["data"]), entry  # holes read as zeroes, data not
    runs = merge((e["start"], e["length"], e["data"]) for e in entries)
    assert runs == merge(file_extents(image))
    assert runs == expected_runs()


def test_qemu_img_convert_from_the_export(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    server = serve(image, "--read-only")
    out = tmp_path / "out.raw"
    run_ok(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), out])
    assert out.stat().st_size == IMAGE_SIZE
    assert filecmp.cmp(image, out, shallow=False)
    assert_sparse_copy(image, out)
    # The big holes of the source are holes of the copy too.
    for offset, length, is_data in expected_runs():
        if not is_data and length >= 4 * MiB:
            assert clip(file_extents(out), offset + 64 * KiB, length - 64 * KiB) == [
                (offset + 64 * KiB, length - 64 * KiB, False)]


def test_qemu_img_compare(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    server = serve(image, "--read-only")
    same = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(), image])
    assert same.returncode == 0, same.stderr
    assert "Images are identical" in same.stdout

    changed = tmp_path / "changed.raw"
    shutil.copyfile(image, changed)
    where = 9 * MiB - 3000  # inside the big island, changed to a different byte
    old = read_range(image, where, 1)
    write_range(changed, where, bytes([old[0] ^ 0xFF]))
    differ = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(), changed])
    assert differ.returncode == 1, differ.stdout + differ.stderr
    match = re.search(r"Content mismatch at offset (\d+)", differ.stdout)
    assert match, differ.stdout
    assert where - 511 <= int(match.group(1)) <= where

    hole_changed = tmp_path / "hole-changed.raw"
    shutil.copyfile(image, hole_changed)
    write_range(hole_changed, 40 * MiB, b"\x01")  # a byte in what the export has as a hole
    differ = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", server.uri(), hole_changed])
    assert differ.returncode == 1, differ.stdout + differ.stderr
    assert f"Content mismatch at offset {40 * MiB}" in differ.stdout


def test_qemu_io_write_and_read_pattern(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    server = serve(image)
    result = qemu_io(server.uri(), "write -P 0xab 0 1M", "read -P 0xab 0 1M",
                     f"read -P {CONST_A:#x} {ISLAND_CONST_A[0]} {ISLAND_CONST_A[1]}",
                     "read -P 0 30M 1M")
    assert_qemu_io_ok(result)
    assert "wrote 1048576/1048576 bytes at offset 0" in result.stdout
    assert "read 1048576/1048576 bytes at offset 0" in result.stdout
    assert read_range(image, 0, MiB) == b"\xab" * MiB
    assert read_range(image, MiB, 64 * KiB) == bytes([CONST_A]) * 64 * KiB  # untouched

    # A wrong pattern is noticed: the data really comes from the export.
    wrong = qemu_io(server.uri(), "read -P 0xac 0 4k")
    assert wrong.returncode != 0
    assert "Pattern verification failed" in wrong.stdout


def test_qemu_io_unaligned_write(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    before = read_range(image, 12000, 2000)  # random data of the first island
    server = serve(image)
    result = qemu_io(server.uri(), "write -P 0x3c 12345 1000", "read -P 0x3c 12345 1000")
    assert_qemu_io_ok(result)
    after = read_range(image, 12000, 2000)
    assert after[345:1345] == b"\x3c" * 1000
    assert after[:345] == before[:345]  # neighbours untouched (no read-modify-write damage)
    assert after[1345:] == before[1345:]


def test_qemu_io_write_zeroes_and_discard(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    server = serve(image)
    base = ISLAND_CONST_B[0]  # 2 MiB of CONST_B
    before = allocated_bytes(image)
    result = qemu_io(
        server.uri(),
        f"write -z -u {base} 512k",  # WRITE_ZEROES, holes allowed
        f"discard {base + 512 * KiB} 512k",  # TRIM
        f"write -z {base + MiB} 512k",  # WRITE_ZEROES with NO_HOLE
        f"read -P 0 {base} 1536k",
        f"read -P {CONST_B:#x} {base + 1536 * KiB} 512k",
    )
    assert_qemu_io_ok(result)
    assert read_range(image, base, 1536 * KiB) == bytes(1536 * KiB)
    assert read_range(image, base + 1536 * KiB, 512 * KiB) == bytes([CONST_B]) * 512 * KiB
    # The zeroed-with-unmap and discarded MiB became a hole in the file...
    assert clip(file_extents(image), base, MiB) == [(base, MiB, False)]
    after = allocated_bytes(image)
    # ...and its blocks were freed, while the NO_HOLE half MiB stayed allocated.
    assert before - MiB - 64 * KiB <= after <= before - MiB + 64 * KiB, (before, after)


def test_qemu_io_write_and_flush(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.raw", 4 * MiB)
    server = serve(image)
    result = qemu_io(server.uri(), "write -P 1 0 64k", "flush", "read -P 1 0 64k")
    assert_qemu_io_ok(result)
    assert "wrote 65536/65536 bytes at offset 0" in result.stdout
    assert read_range(image, 0, 64 * KiB) == b"\x01" * 64 * KiB
    assert read_range(image, 64 * KiB, 64 * KiB) == bytes(64 * KiB)


def test_qemu_writes_to_a_read_only_export_fail(serve, tmp_path: Path) -> None:
    image = make_islands_image(tmp_path / "disk.raw")
    original = read_range(image, 0, 64 * KiB)
    server = serve(image, "--read-only")
    refused = qemu_io(server.uri(), "write -P 0xcd 0 4k")
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr or "read-only" in refused.stderr
    refused_ro = qemu_io(server.uri(), "write -P 0xcd 0 4k", read_only=True)
    assert refused_ro.returncode != 0
    assert "read-only" in refused_ro.stderr
    source = make_sparse_image(tmp_path / "src.raw", IMAGE_SIZE, {0: b"\xcd" * 4096})
    convert = run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, server.uri()])
    assert convert.returncode != 0
    assert read_range(image, 0, 64 * KiB) == original
    # Reading still works.
    assert_qemu_io_ok(qemu_io(server.uri(), f"read -P {CONST_B:#x} 20M 2M", read_only=True))


def test_qemu_img_convert_into_the_export(serve, tmp_path: Path) -> None:
    source = make_islands_image(tmp_path / "src.raw", seed=7)
    target = make_junk_image(tmp_path / "target.raw")
    server = serve(target, "--export", "target")
    run_ok(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", source, server.uri("target")])
    assert target.stat().st_size == IMAGE_SIZE
    assert filecmp.cmp(source, target, shallow=False)
    same = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", source, server.uri("target")])
    assert same.returncode == 0, same.stdout + same.stderr
    # qemu zeroed the junk with WRITE_ZEROES (holes allowed): the target became sparse.
    assert_sparse_copy(source, target)


def test_qemu_img_bench_many_writes_in_flight(serve, tmp_path: Path) -> None:
    image = make_sparse_image(tmp_path / "disk.raw", 32 * MiB)
    server = serve(image)
    run_ok(["qemu-img", "bench", "-w", "-c", "3000", "-d", "16", "-s", "4k", "-S", "8k",
            "--flush-interval=100", "--pattern=107", "-f", "raw", server.uri()])
    data = read_range(image, 0, 3000 * 8 * KiB)
    for i in range(3000):
        block = data[i * 8 * KiB: (i + 1) * 8 * KiB]
        assert block == b"\x6b" * 4 * KiB + bytes(4 * KiB), i


def test_qemu_img_convert_into_the_export_out_of_order(serve, tmp_path: Path) -> None:
    source = make_islands_image(tmp_path / "src.raw", seed=8)
    target = make_junk_image(tmp_path / "target.raw")
    server = serve(target)
    run_ok(["qemu-img", "convert", "-n", "-m", "16", "-W", "-f", "raw", "-O", "raw",
            source, server.uri()])
    assert filecmp.cmp(source, target, shallow=False)


def test_export_size_not_a_multiple_of_512(serve, tmp_path: Path) -> None:
    size = 5 * MiB + 1000
    image = make_sparse_image(tmp_path / "odd.raw", size, {2 * MiB: b"\x12" * 4096})
    server = serve(image)
    info = run_json(["qemu-img", "info", "--output=json", "-f", "raw", server.uri()])
    # qemu 7.2 counts whole sectors (same against nbdkit); libnbd sees the exact size.
    assert info["virtual-size"] == (size + 511) // 512 * 512
    assert nbdinfo_size(server.uri()) == size
    tail = size - 700
    result = qemu_io(server.uri(), f"write -P 0x7e {tail} 700", f"read -P 0x7e {tail} 700",
                     f"read -P 0 {size - 1000} 300")
    assert_qemu_io_ok(result)
    assert read_range(image, tail, 700) == b"\x7e" * 700
    assert image.stat().st_size == size  # a write at the very end did not grow the file
    entries = run_json(["qemu-img", "map", "--output=json", "-f", "raw", server.uri()])
    runs = merge((e["start"], e["length"], e["data"]) for e in entries)
    assert clip(runs, 0, size) == merge(file_extents(image))
    out = tmp_path / "out.raw"
    run_ok(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri(), out])
    copy = out.read_bytes()
    assert copy[:size] == image.read_bytes()
    assert copy[size:] == bytes(len(copy) - size)  # qemu's sector padding reads as zeroes


def nbdinfo_size(uri: str) -> int:
    require("nbdinfo")
    return int(run_ok(["nbdinfo", "--size", uri]).strip())
