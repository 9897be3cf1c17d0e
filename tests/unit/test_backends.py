"""Backends: MemoryBackend, SparseFile (on tmp_path files) and FaultInjection."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_sparse_image
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from nbdcore.backends import Backend, Fault, FaultInjection, MemoryBackend, SparseFile, sparse_file
from nbdcore.protocol.constants import CmdFlag, NbdErrno
from nbdcore.protocol.transmission import Extent, nbd_errno

PAGE = 4096
HOLE = 3  # HOLE | ZERO
DATA = 0
KIB = 1024
MIB = 1024 * 1024


def seek_extents(path: Path | str, offset: int, length: int) -> list[tuple[int, int, int]]:
    """(offset, length, flags) from SEEK_DATA / SEEK_HOLE: the oracle for SparseFile."""
    end = offset + length
    out: list[tuple[int, int, int]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = offset
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = end
            if data > pos:
                stop = min(data, end)
                out.append((pos, stop - pos, HOLE))
                pos = stop
                continue
            stop = min(os.lseek(fd, pos, os.SEEK_HOLE), end)
            out.append((pos, stop - pos, DATA))
            pos = stop
    finally:
        os.close(fd)
    return out


def as_tuples(extents: list[Extent]) -> list[tuple[int, int, int]]:
    return [(e.offset, e.length, e.flags) for e in extents]


def assert_consecutive(extents: list[Extent], offset: int, length: int) -> None:
    """Extents start at ``offset``, follow each other without gap, cover exactly the range."""
    pos = offset
    for extent in extents:
        assert extent.offset == pos, extents
        assert extent.length > 0, extents
        assert extent.flags in (DATA, HOLE), extents
        pos += extent.length
    assert pos == offset + length, extents


def blocks(path: Path) -> int:
    return os.stat(path).st_blocks


@pytest.fixture
def image(tmp_path: Path) -> Iterator[tuple[Path, SparseFile]]:
    """A 1 MiB image, fully written with a pattern and flushed to disk."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (MIB // 256))
    backend = SparseFile(path)
    yield path, backend
    backend.close()


# ------------------------------------------------------------------ MemoryBackend


def test_memory_backend_implements_the_backend_protocol() -> None:
    assert isinstance(MemoryBackend(PAGE), Backend)


def test_memory_backend_starts_as_one_hole_reading_zeroes() -> None:
    backend = MemoryBackend(64 * KIB)
    assert backend.pread(0, 64 * KIB) == bytes(64 * KIB)
    assert backend.extents(0, 64 * KIB) == [Extent(0, 64 * KIB, HOLE)]
    assert backend.read_fd() is None


def test_memory_backend_write_then_read_across_pages() -> None:
    backend = MemoryBackend(64 * KIB)
    data = os.urandom(3 * PAGE)
    backend.pwrite(data, PAGE - 100)
    assert backend.pread(PAGE - 100, len(data)) == data
    assert backend.pread(0, PAGE - 100) == bytes(PAGE - 100)
    backend.pwrite(memoryview(b"xyz"), 1)
    assert backend.pread(0, 5) == b"\0xyz\0"


def test_memory_backend_extents_follow_written_pages_and_merge() -> None:
    backend = MemoryBackend(64 * KIB)
    backend.pwrite(b"a", PAGE + 5)
    backend.pwrite(b"b" * PAGE, 2 * PAGE)
    assert backend.extents(0, 64 * KIB) == [
        Extent(0, PAGE, HOLE),
        Extent(PAGE, 2 * PAGE, DATA),
        Extent(3 * PAGE, 13 * PAGE, HOLE),
    ]
    assert backend.extents(100, 2 * PAGE) == [
        Extent(100, PAGE - 100, HOLE),
        Extent(PAGE, PAGE + 100, DATA),
    ]


def test_memory_backend_extents_of_an_empty_range_is_empty() -> None:
    backend = MemoryBackend(64 * KIB)
    backend.pwrite(b"x", 0)
    assert backend.extents(0, 0) == []
    assert backend.extents(PAGE, 0) == []


def test_memory_backend_extents_limit_stops_after_that_many() -> None:
    backend = MemoryBackend(64 * KIB)
    backend.pwrite(b"x", PAGE)
    backend.pwrite(b"x", 3 * PAGE)
    extents = backend.extents(0, 64 * KIB, limit=2)
    assert extents == [Extent(0, PAGE, HOLE), Extent(PAGE, PAGE, DATA)]


def test_memory_backend_zero_with_may_trim_punches_whole_pages() -> None:
    backend = MemoryBackend(64 * KIB)
    backend.pwrite(b"\xff" * (4 * PAGE), 0)
    backend.zero(100, 3 * PAGE, may_trim=True, fast=False)
    assert backend.pread(0, 4 * PAGE) == b"\xff" * 100 + bytes(3 * PAGE) + b"\xff" * (PAGE - 100)
    assert as_tuples(backend.extents(0, 4 * PAGE)) == [
        (0, PAGE, DATA),
        (PAGE, 2 * PAGE, HOLE),
        (3 * PAGE, PAGE, DATA),
    ]


def test_memory_backend_zero_without_may_trim_keeps_pages_allocated() -> None:
    backend = MemoryBackend(64 * KIB)
    backend.pwrite(b"\xff" * (4 * PAGE), 0)
    backend.zero(0, 4 * PAGE, may_trim=False, fast=True)
    assert backend.pread(0, 4 * PAGE) == bytes(4 * PAGE)
    assert backend.extents(0, 4 * PAGE) == [Extent(0, 4 * PAGE, DATA)]


def test_memory_backend_trim_drops_whole_pages_only() -> None:
    backend = MemoryBackend(64 * KIB)
    backend.pwrite(b"\xff" * (4 * PAGE), 0)
    backend.trim(PAGE // 2, 2 * PAGE)
    assert backend.extents(0, 4 * PAGE) == [
        Extent(0, PAGE, DATA),
        Extent(PAGE, PAGE, HOLE),
        Extent(2 * PAGE, 2 * PAGE, DATA),
    ]
    assert backend.pread(PAGE, PAGE) == bytes(PAGE)
    assert backend.pread(0, PAGE) == b"\xff" * PAGE


def test_read_only_memory_backend_declares_no_write_capabilities() -> None:
    caps = MemoryBackend(PAGE, read_only=True).caps
    assert not caps.can_write
    assert not caps.can_trim
    assert not caps.can_zero
    assert not caps.can_flush
    assert caps.can_extents


# ------------------------------------------------------------------ SparseFile


def test_sparse_file_size_and_fd(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "a.img", 3 * MIB + 512)
    backend = SparseFile(path)
    try:
        assert backend.size == 3 * MIB + 512
        assert backend.read_fd() == backend.fd >= 0
        assert isinstance(backend, Backend)
    finally:
        backend.close()
    assert backend.fd == -1
    backend.close()  # closing twice is harmless


def test_sparse_file_write_then_read(image: tuple[Path, SparseFile]) -> None:
    path, backend = image
    data = os.urandom(10_000)
    backend.pwrite(memoryview(data), 12345)
    backend.sync()
    assert backend.pread(12345, len(data)) == data
    with open(path, "rb") as f:
        f.seek(12345)
        assert f.read(len(data)) == data


def test_sparse_file_extents_equal_seek_data_seek_hole(tmp_path: Path) -> None:
    islands = {0: b"a" * 100, 256 * KIB: b"b" * (64 * KIB), MIB - 1: b"c"}
    path = make_sparse_image(tmp_path / "sparse.img", MIB, islands)
    backend = SparseFile(path)
    try:
        extents = backend.extents(0, MIB)
        assert_consecutive(extents, 0, MIB)
        assert as_tuples(extents) == seek_extents(path, 0, MIB)
        assert {e.flags for e in extents} == {DATA, HOLE}
        for start, length in [(100, 300 * KIB), (300 * KIB, 5), (MIB - 4096, 4096)]:
            part = backend.extents(start, length)
            assert_consecutive(part, start, length)
            assert as_tuples(part) == seek_extents(path, start, length)
    finally:
        backend.close()


def test_sparse_file_extents_of_empty_image_is_one_hole(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "empty.img", 4 * MIB)
    backend = SparseFile(path)
    try:
        assert backend.extents(0, 4 * MIB) == [Extent(0, 4 * MIB, HOLE)]
        assert backend.pread(MIB, 4096) == bytes(4096)
    finally:
        backend.close()


@pytest.mark.parametrize("offset", [0, 4096, MIB])
def test_sparse_file_extents_of_an_empty_range_is_empty(tmp_path: Path, offset: int) -> None:
    path = make_sparse_image(tmp_path / "sparse.img", MIB, {0: b"a" * 8192})
    backend = SparseFile(path)
    try:
        assert backend.extents(offset, 0) == []
        backend.extents(0, MIB)  # a lookup that fills the allocation cache
        assert backend.extents(offset, 0) == []
    finally:
        backend.close()


def test_sparse_file_extents_limit(tmp_path: Path) -> None:
    islands = {0: b"a", 128 * KIB: b"b", 256 * KIB: b"c"}
    path = make_sparse_image(tmp_path / "sparse.img", MIB, islands)
    backend = SparseFile(path)
    try:
        extents = backend.extents(0, MIB, limit=2)
        assert len(extents) == 2
        assert as_tuples(extents) == seek_extents(path, 0, MIB)[:2]
    finally:
        backend.close()


def test_sparse_file_zero_with_may_trim_punches_a_hole(image: tuple[Path, SparseFile]) -> None:
    path, backend = image
    before = blocks(path)
    backend.zero(256 * KIB, 256 * KIB, may_trim=True, fast=False)
    assert blocks(path) <= before - (256 * KIB) // 512
    assert backend.pread(256 * KIB, 256 * KIB) == bytes(256 * KIB)
    assert backend.pread(0, 256)[:4] == b"\x00\x01\x02\x03"
    assert (256 * KIB, 256 * KIB, HOLE) in as_tuples(backend.extents(0, MIB))
    assert as_tuples(backend.extents(0, MIB)) == seek_extents(path, 0, MIB)


def test_sparse_file_zero_without_may_trim_keeps_blocks_allocated(
    image: tuple[Path, SparseFile],
) -> None:
    path, backend = image
    before = blocks(path)
    backend.zero(256 * KIB, 256 * KIB, may_trim=False, fast=False)
    assert blocks(path) >= before
    assert backend.pread(256 * KIB, 256 * KIB) == bytes(256 * KIB)
    assert backend.pread(512 * KIB, 2) == b"\x00\x01"
    assert as_tuples(backend.extents(0, MIB)) == seek_extents(path, 0, MIB)


def test_sparse_file_unaligned_zero_reads_back_zero(image: tuple[Path, SparseFile]) -> None:
    _, backend = image
    for may_trim in (True, False):
        backend.zero(1000, 5000, may_trim=may_trim, fast=False)
        assert backend.pread(999, 5002) == b"\xe7" + bytes(5000) + bytes([6000 % 256])
        backend.pwrite(bytes(range(256)) * 24, 768)  # restore the pattern over the range


def test_sparse_file_zero_of_length_0_does_nothing(image: tuple[Path, SparseFile]) -> None:
    path, backend = image
    before = blocks(path)
    backend.zero(0, 0, may_trim=True, fast=True)
    assert blocks(path) == before
    assert backend.pread(0, 4) == b"\x00\x01\x02\x03"


def test_sparse_file_without_fallocate_fast_zero_raises_enotsup(
    image: tuple[Path, SparseFile],
) -> None:
    _, backend = image
    # What the probe leaves behind on a filesystem that cannot punch or zero ranges.
    backend._can_punch = False
    backend._can_zero_range = False
    with pytest.raises(OSError, match="slow") as info:
        backend.zero(0, 8192, may_trim=True, fast=True)
    assert info.value.errno == errno.ENOTSUP
    assert nbd_errno(info.value, CmdFlag.FAST_ZERO) == NbdErrno.ENOTSUP
    assert backend.pread(0, 4) == b"\x00\x01\x02\x03"  # nothing changed
    backend.zero(0, 3 * MIB // 4, may_trim=True, fast=False)  # slow path writes zeroes
    assert backend.pread(0, 3 * MIB // 4) == bytes(3 * MIB // 4)


def test_sparse_file_trim_shrinks_st_blocks(image: tuple[Path, SparseFile]) -> None:
    path, backend = image
    before = blocks(path)
    backend.trim(0, 512 * KIB)
    assert blocks(path) <= before - (512 * KIB) // 512
    assert backend.extents(0, 512 * KIB) == [Extent(0, 512 * KIB, HOLE)]
    assert backend.pread(0, 512 * KIB) == bytes(512 * KIB)
    assert backend.pread(512 * KIB, 2) == b"\x00\x01"


def test_sparse_file_cache_and_sync_succeed(image: tuple[Path, SparseFile]) -> None:
    _, backend = image
    backend.cache(0, MIB)
    backend.sync()
    assert backend.pread(MIB - 1, 1) == b"\xff"


def test_read_resident_serves_only_the_run_known_to_hold_data(tmp_path: Path) -> None:
    island = os.urandom(64 * KIB)
    path = make_sparse_image(tmp_path / "r.img", MIB, {256 * KIB: island})
    backend = SparseFile(path)
    try:
        assert backend.read_resident(256 * KIB, 4096) is None  # nothing looked up yet
        backend.extents(256 * KIB, 4096)
        assert backend.read_resident(256 * KIB + 100, 4096) == island[100:4196]
        assert backend.read_resident(256 * KIB, 64 * KIB) == island
        assert backend.read_resident(320 * KIB - 4096, 8192) is None  # runs into the hole
        assert backend.read_resident(0, 4096) is None  # a hole
        backend.trim(0, 4096)  # a punch anywhere forgets what was known
        assert backend.read_resident(256 * KIB, 4096) is None
    finally:
        backend.close()


def test_known_runs_are_the_latest_few_learned(tmp_path: Path) -> None:
    """Each lookup remembers the first data run it finds, the latest KNOWN_RUNS of them
    (nbdcopy reads four islands at once, one per connection); a punch forgets them all."""
    runs = sparse_file.KNOWN_RUNS + 2
    islands = {i * 128 * KIB: os.urandom(64 * KIB) for i in range(runs)}
    path = make_sparse_image(tmp_path / "k.img", runs * 128 * KIB, islands)
    backend = SparseFile(path)
    try:
        for at in islands:
            assert not backend.known_data(at, 4096)
            assert backend.extents(at, 128 * KIB) == [
                Extent(at, 64 * KIB, 0), Extent(at + 64 * KIB, 64 * KIB, HOLE)]
        assert [backend.known_data(at, 64 * KIB) for at in islands] == (
            [False] * 2 + [True] * sparse_file.KNOWN_RUNS)
        assert not backend.known_data(128 * KIB * (runs - 1), 64 * KIB + 1)  # into the hole
        backend.extents(0, 4096)  # learned again: the oldest of the others goes
        assert backend.known_data(0, 4096)
        assert not backend.known_data(2 * 128 * KIB, 4096)
        backend.trim(runs * 128 * KIB - 4096, 4096)  # a punch, even in a hole, forgets all
        assert not any(backend.known_data(at, 4096) for at in islands)
    finally:
        backend.close()


def test_a_run_that_grew_replaces_the_part_known_before(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "g.img", MIB, {0: b"a" * 64 * KIB})
    backend = SparseFile(path)
    try:
        backend.extents(0, 4096)
        assert backend.known_data(0, 64 * KIB)
        backend.pwrite(b"b" * 64 * KIB, 64 * KIB)  # writes only turn holes into data
        assert backend.extents(0, 128 * KIB) == [Extent(0, 128 * KIB, 0)]
        assert backend.known_data(0, 128 * KIB)
        assert backend._known_runs == ((0, 128 * KIB),)
    finally:
        backend.close()


def test_resident_view_maps_only_cached_ranges_of_the_known_run(tmp_path: Path) -> None:
    island = os.urandom(256 * KIB)
    path = make_sparse_image(tmp_path / "v.img", MIB, {256 * KIB: island})
    backend = SparseFile(path)
    try:
        assert backend.resident_view(256 * KIB, 64 * KIB) is None  # nothing looked up yet
        backend.extents(256 * KIB, 4096)
        backend.pread(256 * KIB, 256 * KIB)  # in the page cache now
        view = backend.resident_view(256 * KIB + 100, 128 * KIB)
        assert view is not None
        assert bytes(view) == island[100 : 100 + 128 * KIB]
        assert backend.resident_view(448 * KIB, 128 * KIB) is None  # runs into the hole
        backend._can_cachestat = False  # a kernel before 6.5 cannot tell what is cached
        assert backend.resident_view(256 * KIB, 64 * KIB) is None
        backend._can_cachestat = True
        backend.trim(0, 4096)  # a punch anywhere forgets what was known
        assert backend.resident_view(256 * KIB, 64 * KIB) is None
    finally:
        del view
        backend.close()


def test_read_resident_of_a_file_cut_short_is_none(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "c.img", MIB, {0: b"x" * MIB})
    backend = SparseFile(path)
    try:
        backend.extents(0, 4096)
        os.truncate(path, 100 * KIB)
        assert backend.read_resident(96 * KIB, 8192) is None
        assert backend.read_resident(0, 4) == b"xxxx"
    finally:
        backend.close()


def test_read_resident_without_the_allocation_cache_is_none(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "n.img", MIB, {0: b"x" * MIB})
    backend = SparseFile(path, cache_allocation=False)
    try:
        backend.extents(0, 4096)
        assert backend.read_resident(0, 4096) is None
    finally:
        backend.close()


def test_splice_in_moves_pipe_bytes_to_the_offset_and_fails_when_they_run_out(
        tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "s.img", MIB)
    backend = SparseFile(path)
    read_end, write_end = os.pipe()
    try:
        data = os.urandom(60 * KIB)
        os.write(write_end, data)
        backend.splice_in(read_end, 300 * KIB + 7, len(data))
        assert backend.pread(300 * KIB + 7, len(data)) == data
        assert os.lseek(backend.fd, 0, os.SEEK_CUR) == 0  # positioned writes only
        os.write(write_end, b"tail")
        os.close(write_end)
        write_end = -1
        with pytest.raises(OSError, match="pipe ran dry") as failure:  # 4 there, 10 promised
            backend.splice_in(read_end, 0, 10)
        assert failure.value.errno == errno.EIO
        assert backend.pread(0, 4) == b"tail"
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        backend.close()


def test_fault_injection_offers_splice_in_only_over_a_backend_that_has_it(
        tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "f.img", MIB)
    over_file = FaultInjection(SparseFile(path), [Fault("write", offset=4096, length=1)])
    assert not hasattr(FaultInjection(MemoryBackend(MIB)), "splice_in")
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"z" * 8192)
        over_file.splice_in(read_end, 0, 4096)
        with pytest.raises(OSError, match="injected"):
            over_file.splice_in(read_end, 4000, 4096)  # crosses the faulty byte
    finally:
        os.close(read_end)
        os.close(write_end)
        over_file.close()


def test_truncated_file_read_fails_with_eio(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "t.img", MIB, {0: b"x" * (300 * KIB)})
    backend = SparseFile(path)
    try:
        os.truncate(path, 200 * KIB)
        with pytest.raises(OSError, match="short") as info:
            backend.pread(190 * KIB, 20 * KIB)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError, match="short") as past:
            backend.pread(600 * KIB, 4096)
        assert past.value.errno == errno.EIO
        assert backend.pread(0, 4) == b"xxxx"
    finally:
        backend.close()


def test_truncated_file_tail_is_not_reported_as_a_hole(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "t.img", MIB, {0: b"x" * (64 * KIB)})
    backend = SparseFile(path)
    try:
        os.truncate(path, 512 * KIB)
        extents = backend.extents(0, MIB)
        assert_consecutive(extents, 0, MIB)
        # The bytes the file no longer has must not be promised as zeroes.
        for extent in extents:
            if extent.offset + extent.length > 512 * KIB:
                assert extent.flags == DATA, extents
        # The part that still exists is described as it is on disk.
        assert [e for e in as_tuples(extents) if e[0] < 512 * KIB] == seek_extents(
            path, 0, 512 * KIB
        )
    finally:
        backend.close()


def test_truncated_file_tail_inside_data_is_reported_as_data(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "t.img", MIB, {0: b"x" * MIB})
    backend = SparseFile(path)
    try:
        os.truncate(path, 300 * KIB)
        extents = backend.extents(0, MIB)
        assert_consecutive(extents, 0, MIB)
        assert {e.flags for e in extents} == {DATA}
    finally:
        backend.close()


def test_read_only_sparse_file_refuses_writes(tmp_path: Path) -> None:
    path = make_sparse_image(tmp_path / "ro.img", MIB, {0: b"abc"})
    backend = SparseFile(path, read_only=True)
    try:
        assert not backend.caps.can_write
        assert not backend.caps.can_trim
        assert backend.pread(0, 3) == b"abc"
        with pytest.raises(OSError, match="Bad file descriptor") as info:
            backend.pwrite(b"x", 0)
        assert info.value.errno == errno.EBADF
    finally:
        backend.close()
    assert path.read_bytes()[:3] == b"abc"


# ------------------------------------------------------------------ FaultInjection


def test_fault_injection_raises_the_configured_errno_inside_the_range() -> None:
    inner = MemoryBackend(64 * KIB)
    inner.pwrite(b"ok", 0)
    backend = FaultInjection(inner, [Fault("read", offset=8192, length=4096, errno=errno.EIO)])
    assert backend.pread(0, 8192)[:2] == b"ok"
    assert backend.pread(12288, 4096) == bytes(4096)
    with pytest.raises(OSError, match="at 8192") as info:
        backend.pread(4096, 8192)
    assert info.value.errno == errno.EIO
    with pytest.raises(OSError, match="at 9000"):
        backend.pread(9000, 1)


@pytest.mark.parametrize(
    ("op", "call", "code", "expected"),
    [
        ("write", lambda b: b.pwrite(b"x", 100), errno.ENOSPC, NbdErrno.ENOSPC),
        ("zero", lambda b: b.zero(0, 512, may_trim=False, fast=False), errno.EIO, NbdErrno.EIO),
        ("trim", lambda b: b.trim(0, 4096), errno.EROFS, NbdErrno.EPERM),
        ("sync", lambda b: b.sync(), errno.EIO, NbdErrno.EIO),
        ("extents", lambda b: b.extents(0, 4096), errno.EINVAL, NbdErrno.EINVAL),
        ("read", lambda b: b.pread(0, 1), errno.EDQUOT, NbdErrno.ENOSPC),
    ],
)
def test_fault_injection_fails_each_operation(
    op: str, call: object, code: int, expected: NbdErrno
) -> None:
    backend = FaultInjection(MemoryBackend(64 * KIB), [Fault(op, errno=code)])
    with pytest.raises(OSError, match="injected") as info:
        call(backend)  # type: ignore[operator]
    assert info.value.errno == code
    assert nbd_errno(info.value) == expected


def test_fault_injection_passes_other_operations_through() -> None:
    inner = MemoryBackend(64 * KIB)
    backend = FaultInjection(inner, [Fault("write", offset=0, length=4096)])
    assert backend.size == inner.size
    assert backend.caps == inner.caps
    assert backend.read_fd() is None
    backend.pwrite(b"fine", 4096)
    assert backend.pread(4096, 4) == b"fine"
    backend.zero(0, 4096, may_trim=True, fast=False)
    backend.trim(0, 4096)
    backend.cache(0, 4096)
    backend.sync()
    assert backend.extents(0, 8192) == [Extent(0, 4096, HOLE), Extent(4096, 4096, DATA)]
    with pytest.raises(OSError, match="injected"):
        backend.pwrite(b"x", 4095)


def test_fault_with_zero_length_request_hits_at_its_offset() -> None:
    fault = Fault("read", offset=100, length=10)
    assert fault.hits("read", 100, 0)
    assert not fault.hits("read", 110, 0)
    assert not fault.hits("write", 100, 10)
    assert fault.hits("read", 0, 101)
    assert not fault.hits("read", 0, 100)


# ------------------------------------------------------------------ model-based checks


class BackendMachine(RuleBasedStateMachine):
    """A backend must behave like a bytearray (trim: contents undefined, reads succeed)."""

    SIZE = 64 * KIB

    def make_backend(self) -> Backend:
        raise NotImplementedError

    @initialize()
    def setup(self) -> None:
        self.backend = self.make_backend()
        self.model = bytearray(self.SIZE)

    def teardown(self) -> None:
        if hasattr(self, "backend"):
            self.backend.close()

    ranges = st.integers(0, SIZE).flatmap(
        lambda offset: st.tuples(st.just(offset), st.integers(0, BackendMachine.SIZE - offset))
    )
    # Non-empty ranges: an empty extents() query has its own tests.
    nonempty = st.integers(0, SIZE - 1).flatmap(
        lambda offset: st.tuples(st.just(offset), st.integers(1, BackendMachine.SIZE - offset))
    )

    @rule(at=st.integers(0, SIZE - 1), data=st.binary(min_size=1, max_size=3 * PAGE))
    def write(self, at: int, data: bytes) -> None:
        data = data[: self.SIZE - at]
        self.backend.pwrite(data, at)
        self.model[at : at + len(data)] = data

    @rule(at=st.integers(0, SIZE - 1), length=st.integers(1, 3 * PAGE), fill=st.integers(1, 255))
    def write_pattern(self, at: int, length: int, fill: int) -> None:
        length = min(length, self.SIZE - at)
        self.backend.pwrite(bytes([fill]) * length, at)
        self.model[at : at + length] = bytes([fill]) * length

    @rule(span=ranges, may_trim=st.booleans())
    def zero(self, span: tuple[int, int], may_trim: bool) -> None:
        offset, length = span
        self.backend.zero(offset, length, may_trim=may_trim, fast=False)
        self.model[offset : offset + length] = bytes(length)

    @rule(span=ranges)
    def trim(self, span: tuple[int, int]) -> None:
        offset, length = span
        self.backend.trim(offset, length)
        # Contents are undefined after a trim: adopt whatever the backend now holds.
        self.model[offset : offset + length] = self.backend.pread(offset, length)

    @rule(span=ranges)
    def read(self, span: tuple[int, int]) -> None:
        offset, length = span
        assert self.backend.pread(offset, length) == self.model[offset : offset + length]

    @rule(span=nonempty)
    def extents(self, span: tuple[int, int]) -> None:
        offset, length = span
        extents = self.backend.extents(offset, length)
        assert_consecutive(extents, offset, length)
        for extent in extents:
            if extent.flags & 2:  # ZERO: must read as zeroes
                stop = extent.offset + extent.length
                assert not any(self.model[extent.offset : stop]), extent

    @rule(span=nonempty, limit=st.integers(1, 4))
    def extents_with_limit(self, span: tuple[int, int], limit: int) -> None:
        offset, length = span
        limited = self.backend.extents(offset, length, limit)
        assert len(limited) <= limit
        full = self.backend.extents(offset, length)
        assert limited
        assert limited == full[: len(limited)]

    @precondition(lambda self: hasattr(self, "backend"))
    @invariant()
    def whole_image_matches_model(self) -> None:
        assert self.backend.pread(0, self.SIZE) == self.model


class MemoryBackendMachine(BackendMachine):
    def make_backend(self) -> Backend:
        return MemoryBackend(self.SIZE)


class SparseFileMachine(BackendMachine):
    def make_backend(self) -> Backend:
        fd, self.path = tempfile.mkstemp(prefix="nbdcore-sm-", suffix=".img")
        os.ftruncate(fd, self.SIZE)
        os.close(fd)
        return SparseFile(self.path)

    @precondition(lambda self: hasattr(self, "backend"))
    @invariant()
    def extents_equal_seek_data_seek_hole(self) -> None:
        extents = as_tuples(self.backend.extents(0, self.SIZE))
        assert extents == seek_extents(self.path, 0, self.SIZE)

    def teardown(self) -> None:
        super().teardown()
        if hasattr(self, "path"):
            os.unlink(self.path)


MACHINE_SETTINGS = settings(max_examples=200, stateful_step_count=25, deadline=None)

TestMemoryBackendModel = MemoryBackendMachine.TestCase
TestMemoryBackendModel.settings = MACHINE_SETTINGS
TestSparseFileModel = SparseFileMachine.TestCase
TestSparseFileModel.settings = MACHINE_SETTINGS
