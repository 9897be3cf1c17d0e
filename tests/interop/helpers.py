"""Helpers shared by the interop tests: test images, extent maps, running client tools."""

from __future__ import annotations

import json
import os
import random
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

from conftest import file_extents, make_sparse_image

KiB = 1 << 10
MiB = 1 << 20

IMAGE_SIZE = 64 * MiB
# A byte value filling a whole island, so qemu-io "read -P" and fio can check it.
CONST_A = 0x5A
CONST_B = 0xA5
# Offset/length of the islands of the standard test image. Everything is 64 KiB aligned so
# that SEEK_DATA/SEEK_HOLE report exactly these ranges on any common file system.
ISLAND_START = (0, 64 * KiB)  # data at the very start
ISLAND_CONST_A = (1 * MiB, 256 * KiB)
ISLAND_NEAR = (1 * MiB + 512 * KiB, 128 * KiB)  # separated from the previous by a 256 KiB hole
ISLAND_BIG = (8 * MiB, 1 * MiB)
ISLAND_CONST_B = (20 * MiB, 2 * MiB)
ISLAND_END = (IMAGE_SIZE - 128 * KiB, 128 * KiB)  # data up to the very end
ISLANDS = (ISLAND_START, ISLAND_CONST_A, ISLAND_NEAR, ISLAND_BIG, ISLAND_CONST_B, ISLAND_END)

Run = tuple[int, int, bool]  # (offset, length, is_data)


def random_bytes(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def island_contents(seed: int = 1) -> dict[int, bytes]:
    contents: dict[int, bytes] = {}
    for index, (offset, length) in enumerate(ISLANDS):
        if (offset, length) == ISLAND_CONST_A:
            contents[offset] = bytes([CONST_A]) * length
        elif (offset, length) == ISLAND_CONST_B:
            contents[offset] = bytes([CONST_B]) * length
        else:
            contents[offset] = random_bytes(length, seed * 100 + index)
    return contents


def make_islands_image(path: Path, seed: int = 1) -> Path:
    """The standard sparse test image: IMAGE_SIZE bytes with data only in ISLANDS."""
    make_sparse_image(path, IMAGE_SIZE, island_contents(seed))
    assert merge(file_extents(path)) == expected_runs(), "file system does not keep holes"
    return path


def expected_runs() -> list[Run]:
    """The extent map of an image made by make_islands_image."""
    runs: list[Run] = []
    pos = 0
    for offset, length in ISLANDS:
        if offset > pos:
            runs.append((pos, offset - pos, False))
        runs.append((offset, length, True))
        pos = offset + length
    if pos < IMAGE_SIZE:
        runs.append((pos, IMAGE_SIZE - pos, False))
    return merge(runs)


def make_junk_image(path: Path, size: int = IMAGE_SIZE, byte: int = 0xEE) -> Path:
    """A fully allocated image of one non-zero byte (a target copies must overwrite)."""
    chunk = bytes([byte]) * MiB
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(chunk)
    return path


def merge(runs: Iterable[Run]) -> list[Run]:
    """Merge adjacent runs with the same is_data (and drop empty ones)."""
    out: list[Run] = []
    for offset, length, is_data in runs:
        if length == 0:
            continue
        if out and out[-1][2] == is_data and out[-1][0] + out[-1][1] == offset:
            prev = out[-1]
            out[-1] = (prev[0], prev[1] + length, is_data)
        else:
            out.append((offset, length, bool(is_data)))
    return out


def clip(runs: Iterable[Run], offset: int, length: int) -> list[Run]:
    """The part of an extent map inside [offset, offset + length)."""
    end = offset + length
    out: list[Run] = []
    for start, size, is_data in runs:
        lo, hi = max(start, offset), min(start + size, end)
        if lo < hi:
            out.append((lo, hi - lo, is_data))
    return merge(out)


def assert_tiles(runs: Sequence[Run], offset: int, length: int) -> None:
    """The runs cover [offset, offset + length) exactly once, in order, without gaps."""
    pos = offset
    for start, size, _ in sorted(runs):
        assert start == pos, f"gap or overlap at {pos}: next run starts at {start}"
        assert size > 0
        pos += size
    assert pos == offset + length, f"runs end at {pos}, expected {offset + length}"


def data_bytes(path: Path) -> int:
    return sum(length for _, length, is_data in file_extents(path) if is_data)


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def assert_sparse_copy(source: Path, copy: Path, slack: int = 1 * MiB) -> None:
    """``copy`` did not allocate the source's holes (a little slack for first-block tricks)."""
    allocated = allocated_bytes(copy)
    assert allocated <= data_bytes(source) + slack, (
        f"{copy.name} allocates {allocated} bytes; the source has only {data_bytes(source)} "
        f"bytes of data: holes were written as zeroes"
    )


def read_range(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def write_range(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def run(cmd: Sequence[str | os.PathLike[str]], *, timeout: float = 60,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def run_ok(cmd: Sequence[str | os.PathLike[str]], **kwargs: object) -> str:
    result = run(cmd, **kwargs)  # type: ignore[arg-type]
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}\n"
        f"stdout: {result.stdout}\nstderr: {result.stderr}"
    )
    return result.stdout


def run_json(cmd: Sequence[str | os.PathLike[str]], **kwargs: object) -> object:
    return json.loads(run_ok(cmd, **kwargs))


def libnbd_handle(name: str, uri: str, *, meta: bool = False) -> str:
    """Script lines opening one more libnbd handle ``name`` (optionally with base:allocation).

    The ``h`` handle of nbdsh() is already connected when the script starts, so a handle
    that needs a metadata context must be a new one.
    """
    lines = [f"{name} = nbd.NBD()"]
    if meta:
        lines.append(f"{name}.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)")
    lines.append(f"{name}.connect_uri({uri!r})")
    return "\n".join(lines) + "\n"
