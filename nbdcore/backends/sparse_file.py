"""A raw image file served sparsely: holes found with SEEK_DATA/SEEK_HOLE, made with fallocate."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import threading

from ..protocol.constants import State
from ..protocol.transmission import Extent
from .base import Capabilities

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
HOLE_FLAGS = int(State.HOLE | State.ZERO)
ZERO_WRITE_CHUNK = 1 << 20
# Mapped pages count in the engine's resident size although they are page cache (shared,
# reclaimable): once views of more than this many distinct bytes of an image have been
# handed out, the mapping's page table entries are dropped. Dropping them every 16 MiB
# handed out cost fio's 1 MiB sequential reads a fifth of their throughput in page faults
# and unmapping; within the bound a hot working set is read without either.
MAP_RESIDENT_BYTES = 1 << 30
MAP_CHUNK_SHIFT = 21  # the distinct bytes are counted in 2 MiB chunks
# Runs of data remembered, so that reads inside them need no lseek: one per client of a
# sparse image read island by island (nbdcopy: a connection per thread, each on its own island).
KNOWN_RUNS = 8

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


# cachestat is asked before every large read and answers in about a microsecond: called
# through PyDLL it keeps the GIL, where a CDLL call would hand it to another connection's
# thread and wait to get it back (a futex wake-up and a context switch per read).
_cachestat_call = ctypes.PyDLL(ctypes.util.find_library("c") or "libc.so.6",
                               use_errno=True).syscall
_cachestat_call.restype = ctypes.c_long
_cachestat_call.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_uint]
SYS_CACHESTAT = 451  # the same number on every architecture; Linux 6.5 and later
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# struct cachestat_range {u64 off, len} followed by struct cachestat {u64 nr_cache, ...}
_CacheStatArgs = ctypes.c_uint64 * 7
_NR_CACHE = 2


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


class SparseFile:
    """Backend over one raw file; all connections share this object (and so its fd)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        read_only: bool = False,
        cache_allocation: bool = True,
        map_reads: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.path, flags)
        self.size = os.fstat(self.fd).st_size
        self._can_punch = True
        self._can_zero_range = True
        # Runs of bytes known to be allocated (start, end), the latest learned first;
        # replaced whole, never changed in place, so readers need no lock. Writes only
        # ever turn holes into data; whatever punches holes forgets them all.
        self._known_runs: tuple[tuple[int, int], ...] = ()
        # Off when other processes write the same file: their punches would go unseen here.
        self._cache_allocation = cache_allocation
        self._known_lock = threading.Lock()
        self._punches = 0  # bumped before every punch, so a lookup racing one is not cached
        self._map: _FileMap | None = None
        self._map_lock = threading.Lock()
        self._mappable = map_reads  # off: large reads go through a buffer (see server.py)
        self._can_cachestat = True
        self._can_nowait = True
        writable = not read_only
        self.caps = Capabilities(
            can_write=writable,
            can_flush=writable,
            can_fua=writable,
            can_trim=writable,
            can_zero=writable,
            can_fast_zero=writable,
            can_cache=True,
        )

    def read_fd(self) -> int:
        return self.fd

    def mapped_view(self, offset: int, length: int) -> memoryview | None:
        """The file's bytes [offset, offset+length) as a view of a read-only mapping, or
        None when the file is shorter or cannot be mapped.

        Only for the kernel to copy from (``sendmsg``): a page that cannot be read makes
        the send fail with EFAULT, whereas touching it from Python would kill the process
        with SIGBUS. Writes, punches and truncation through any fd show up in the mapping
        (MAP_SHARED), so it is never stale.
        """
        end = offset + length
        current = self._map
        if current is None or end > current.size:
            current = self._remap(end)
            if current is None:
                return None
        try:
            return current.view(offset, end)
        except ValueError:  # replaced by a larger mapping a moment ago
            return None

    def _remap(self, end: int) -> _FileMap | None:
        with self._map_lock:
            current = self._map
            if current is not None and end <= current.size:
                return current
            if not self._mappable or self.fd < 0:
                return None
            size = os.fstat(self.fd).st_size
            if size < end:
                return None  # the buffered path reads what exists and reports the rest
            try:
                self._map = _FileMap(self.fd, size)
            except (OSError, ValueError):  # not a regular file or block device, say
                self._mappable = False
                return None
            if current is not None:
                current.close()  # views still in flight keep the old pages mapped
            return self._map

    def cached(self, offset: int, length: int) -> bool | None:
        """Whether every page of the range is in the page cache, so reading it will not
        wait for the disk; None when the kernel cannot tell (cachestat needs Linux 6.5)."""
        if not self._can_cachestat:
            return None
        first = offset // PAGE_SIZE
        pages = -(-(offset + length) // PAGE_SIZE) - first
        args = _CacheStatArgs(first * PAGE_SIZE, pages * PAGE_SIZE)
        at = ctypes.addressof(args)
        if _cachestat_call(SYS_CACHESTAT, self.fd, at, at + 16, 0) != 0:
            self._can_cachestat = False  # ENOSYS, or a file system without a page cache
            return None
        return args[_NR_CACHE] >= pages

    def pread_nowait(self, offset: int, length: int) -> bytes | bytearray | None:
        """``pread`` if the page cache holds the whole range, else None (the caller reads
        it where waiting for the disk stalls nobody)."""
        if not self._can_nowait:
            return self.pread(offset, length)
        data = bytearray(length)
        try:
            got = os.preadv(self.fd, [data], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self._can_nowait = False  # this file system cannot promise not to wait
            return self.pread(offset, length)
        return data if got == length else None  # partly cached, or a short file

    def read_resident(self, offset: int, length: int) -> bytearray | None:
        """The bytes of a range inside the run known to hold data, if the page cache has
        all of them; None when that is not known or they would have to come from the
        disk. The caller then takes its general path, which looks for holes, reports
        errors where they are and reads cold data where waiting stalls nobody.

        The read is ``pread_nowait``'s and the run test ``known_data``'s, both written
        out rather than called: every small read of a VM or fio comes here, and a call
        cost 1k of its 21.5k instructions (``bench/instructions.py``)."""
        end = offset + length
        for known_start, known_end in self._known_runs:
            if known_start <= offset and end <= known_end:
                break
        else:
            return None
        if not self._can_nowait:
            return None
        data = bytearray(length)
        try:
            got = os.preadv(self.fd, [data], offset, os.RWF_NOWAIT)
        except OSError:
            return None
        return data if got == length else None

    def resident(self, offset: int, length: int) -> bool:
        """Whether a range lies inside a run known to hold data and every page of it is
        in the page cache: then sending it cannot fail (short of the file being cut
        under us), so a reply may carry DONE with its data."""
        return self.known_data(offset, length) and bool(self.cached(offset, length))

    def resident_view(self, offset: int, length: int) -> memoryview | None:
        """A ``resident`` range as a view of the file's mapping (see ``mapped_view``);
        else None, and the caller takes its general path (holes, cold data, errors where
        they are). The large-read counterpart of ``read_resident``."""
        if not self.resident(offset, length):
            return None
        return self.mapped_view(offset, length)

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise OSError(errno.EIO, f"short read at {offset + len(data)}: image file is short")
        return data

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self.fd, view, offset)
            view = view[written:]
            offset += written

    def splice_in(self, pipe: int, offset: int, count: int) -> None:
        """Move ``count`` bytes waiting in ``pipe`` into the file at ``offset``.

        The server fills the pipe from the client's socket with splice, so a large WRITE
        payload reaches the page cache with one kernel copy instead of two (socket to a
        buffer, buffer to the file): half the CPU per byte. On failure the pipe may still
        hold part of the bytes; the caller empties it."""
        while count:
            moved = os.splice(pipe, self.fd, count, offset_dst=offset)
            if not moved:
                raise OSError(errno.EIO, f"short write at {offset}: the pipe ran dry")
            offset += moved
            count -= moved

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
        if length == 0:
            return
        if may_trim and self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                            offset, length, "_can_punch"):
            return
        if self._try_fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                               offset, length, "_can_zero_range"):
            return
        if fast:
            raise OSError(errno.ENOTSUP, "zeroing this range would be as slow as writing it")
        self._write_zeroes(offset, length)

    def known_data(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) lies inside a run known to be allocated."""
        end = offset + length
        for known_start, known_end in self._known_runs:
            if known_start <= offset and end <= known_end:
                return True
        return False

    def _remember_data(self, start: int, end: int, punches: int) -> None:
        with self._known_lock:
            if self._punches != punches:
                return  # a punch ran during the lookup: what it found may be stale
            kept = [run for run in self._known_runs if not start <= run[0] <= run[1] <= end]
            self._known_runs = ((start, end), *kept[: KNOWN_RUNS - 1])

    def _try_fallocate(self, mode: int, offset: int, length: int, attr: str) -> bool:
        if not getattr(self, attr):
            return False
        with self._known_lock:  # holes are about to appear
            self._punches += 1
            self._known_runs = ()
        try:
            fallocate(self.fd, mode, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                setattr(self, attr, False)
                return False
            raise
        finally:
            with self._known_lock:  # a lookup that ran during the punch must not be cached
                self._punches += 1
                self._known_runs = ()
        return True

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, ZERO_WRITE_CHUNK))
        while length:
            n = min(length, len(zeroes))
            self.pwrite(memoryview(zeroes)[:n], offset)
            offset += n
            length -= n

    def trim(self, offset: int, length: int) -> None:
        # A hint: where holes cannot be punched the data simply stays.
        if length:
            self._try_fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                offset, length, "_can_punch")

    def cache(self, offset: int, length: int) -> None:
        os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)

    def extents(self, offset: int, length: int, limit: int = 0) -> list[Extent]:
        if length and self.known_data(offset, length):
            return [Extent(offset, length, 0)]
        end = offset + length
        punches = self._punches
        remember = self._cache_allocation  # the first data run found
        # SEEK_HOLE first: for the common fully-allocated range it is the only syscall.
        pos = offset
        out: list[Extent] = []
        fd = self.fd
        while pos < end and (not limit or len(out) < limit):
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: pos is at or past the end of the file
                    raise
                out += self._tail_extents(pos, end)
                break
            if hole > pos:
                if remember:
                    self._remember_data(pos, hole, punches)
                    remember = False
                stop = min(hole, end)
                out.append(Extent(pos, stop - pos, 0))
                pos = stop
                continue
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                out += self._tail_extents(pos, end)
                break
            stop = min(data, end)
            out.append(Extent(pos, stop - pos, HOLE_FLAGS))
            pos = stop
        return out

    def _tail_extents(self, pos: int, end: int) -> list[Extent]:
        """No data from ``pos`` on: a trailing hole, unless the file was cut short.

        Bytes past the end of a truncated file are reported as data so that reading them
        fails with EIO instead of passing silently as zeroes.
        """
        file_size = os.fstat(self.fd).st_size
        if file_size >= end:
            return [Extent(pos, end - pos, HOLE_FLAGS)]
        out = []
        if file_size > pos:
            out.append(Extent(pos, file_size - pos, HOLE_FLAGS))
            pos = file_size
        out.append(Extent(pos, end - pos, 0))
        return out

    def close(self) -> None:
        with self._map_lock:
            if self._map is not None:
                self._map.close()
                self._map = None
            self._mappable = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _FileMap:
    """A read-only shared mapping of a whole file whose resident pages are dropped once
    more than MAP_RESIDENT_BYTES of it were handed out (the page cache keeps them), so
    that serving a large image shows as at most that much of it in the engine's memory."""

    def __init__(self, fd: int, size: int) -> None:
        self.size = size
        self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        self._whole = memoryview(self._mmap)
        # Chunks handed out since the last release. Unlocked (set.add is atomic): a chunk
        # missed in a race stays mapped only until the next release, which drops all.
        self._touched: set[int] = set()
        self._max_chunks = max(1, MAP_RESIDENT_BYTES >> MAP_CHUNK_SHIFT)

    def view(self, start: int, end: int) -> memoryview:
        first, last = start >> MAP_CHUNK_SHIFT, (end - 1) >> MAP_CHUNK_SHIFT
        touched = self._touched
        if first == last:
            touched.add(first)
        else:
            touched.update(range(first, last + 1))
        if len(touched) > self._max_chunks:
            touched.clear()
            # Safe while other threads send from the mapping: the kernel faults the
            # pages back in from the page cache.
            self._mmap.madvise(mmap.MADV_DONTNEED)
        return self._whole[start:end]

    def close(self) -> None:
        """Unmap now if no view is in flight, else when the last one is dropped."""
        try:
            self._whole.release()
            self._mmap.close()
        except BufferError:
            pass
