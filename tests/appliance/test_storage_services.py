"""Image services on real sparse files under a per-test storage root."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import time
from pathlib import Path

import pytest
from appliance_testing import GiB, MiB, allocated, data_ranges
from conftest import make_sparse_image
from django.core.exceptions import ValidationError

from appliance.errors import (
    ImageInUse,
    ImageNameTaken,
    ImageTooLarge,
    InsufficientSpace,
    QuotaExceeded,
    ShrinkNotForced,
    UploadIncomplete,
)
from appliance.exports.services import export_publish
from appliance.storage import services
from appliance.storage.models import Image
from appliance.storage.selectors import ImageUsage, image_usage, storage_usage
from appliance.storage.services import (
    READ_CHUNK,
    clone_file,
    image_clone,
    image_create,
    image_create_from_upload,
    image_delete,
    image_grow,
    image_import,
    image_path,
    image_update,
)

pytestmark = pytest.mark.django_db

ISLANDS = {0: b"\xeb\x3c\x90" + b"boot" * 100, 5 * MiB: b"\x5a" * 70_000, 60 * MiB + 123: b"end"}


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def files_in(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def write_islands(image: Image, islands: dict[int, bytes] = ISLANDS) -> Path:
    path = image_path(image)
    with open(path, "r+b") as f:
        for offset, data in islands.items():
            f.seek(offset)
            f.write(data)
    return path


class RecordingStream:
    """A request body: ``read(n)`` answers from ``source`` and remembers every ``n``."""

    def __init__(self, source: io.BufferedIOBase | io.BytesIO, short_reads: bool = False):
        self.source = source
        self.sizes: list[int | None] = []
        self.short_reads = short_reads

    def read(self, size: int | None = None) -> bytes:
        self.sizes.append(size)
        if size is None or size < 0:
            raise AssertionError("the whole body was asked for")
        if self.short_reads:
            size = min(size, 12_345)  # like a socket: fewer bytes than asked
        return self.source.read(size)


class ZeroStream:
    """``length`` bytes of zeroes, except ``islands``; generated on demand, never held."""

    def __init__(self, length: int, islands: dict[int, bytes] | None = None):
        self.length, self.pos, self.islands = length, 0, islands or {}
        self.largest_read = 0

    def read(self, size: int = -1) -> bytes:
        assert size is not None
        assert size > 0
        self.largest_read = max(self.largest_read, size)
        n = min(size, self.length - self.pos)
        chunk = bytearray(n)
        for offset, data in self.islands.items():
            lo, hi = max(offset, self.pos), min(offset + len(data), self.pos + n)
            if lo < hi:
                chunk[lo - self.pos : hi - self.pos] = data[lo - offset : hi - offset]
        self.pos += n
        return bytes(chunk)


# ------------------------------------------------------------------ create


def test_create_10_gib_image_is_instant_and_takes_almost_no_space(storage_root: Path) -> None:
    started = time.monotonic()
    image = image_create(name="big", size=10 * GiB, description="ten gigs")
    elapsed = time.monotonic() - started

    path = image_path(image)
    st = path.stat()
    assert path.parent == storage_root.resolve()
    assert st.st_size == 10 * GiB
    assert st.st_blocks * 512 <= 64 * 1024  # nothing but metadata
    assert elapsed < 5
    assert image_usage(image) == ImageUsage(10 * GiB, st.st_blocks * 512)
    assert Image.objects.get(name="big").size == 10 * GiB


def test_the_appliance_chooses_the_file_name(storage_root: Path) -> None:
    image = image_create(name="disk.img", size=MiB)
    assert len(image.filename) == 36
    assert image.filename.endswith(".raw")
    assert files_in(storage_root) == [image.filename]
    image.filename = "../../etc/passwd"
    with pytest.raises(ValueError, match="did not choose"):
        image_path(image)


@pytest.mark.parametrize(
    "name",
    ["../etc/passwd", "/etc/passwd", "a/b", "..", ".hidden", "-rf", "", "a b", "dísk",
     "disk\x00", "x" * 129],
)
def test_path_like_and_malformed_names_are_refused(name: str, storage_root: Path) -> None:
    with pytest.raises(ValidationError) as caught:
        image_create(name=name, size=MiB)
    assert "name" in caught.value.message_dict
    messages = " ".join(caught.value.message_dict["name"])
    assert "not a path" in messages or (name == "" and "blank" in messages)
    assert files_in(storage_root) == []
    assert not Image.objects.exists()


@pytest.mark.parametrize("size", [-MiB, -1, 0, 512, 1000, MiB + 1, 17 << 40, 2**63, 10**30])
def test_negative_tiny_unaligned_and_absurd_sizes_are_refused(size: int, storage_root: Path):
    with pytest.raises(ValidationError) as caught:
        image_create(name="disk", size=size)
    messages = " ".join(caught.value.message_dict["size"])
    assert "multiple of 512 bytes between 1 MiB and 16 TiB" in messages
    assert f"got {size}" in messages
    assert files_in(storage_root) == []


def test_a_taken_name_is_refused_and_leaves_no_file(storage_root: Path) -> None:
    first = image_create(name="disk", size=MiB)
    with pytest.raises(ImageNameTaken) as caught:
        image_create(name="disk", size=2 * MiB)
    assert caught.value.status == 409
    assert caught.value.field == "name"
    assert f"(id {first.pk})" in caught.value.message
    assert files_in(storage_root) == [first.filename]


def test_provisioning_quota_counts_virtual_sizes(settings, storage_root: Path) -> None:
    settings.APPLIANCE_PROVISION_QUOTA = 100 * MiB
    image_create(name="a", size=64 * MiB)
    with pytest.raises(QuotaExceeded) as caught:
        image_create(name="b", size=64 * MiB)
    assert caught.value.status == 409
    assert "quota is 100 MiB and 64 MiB is already provisioned" in caught.value.message
    image_create(name="c", size=36 * MiB)  # exactly fills it
    assert Image.objects.count() == 2
    assert len(files_in(storage_root)) == 2


def test_free_space_below_the_reserve_refuses_cleanly(settings, storage_root: Path) -> None:
    settings.APPLIANCE_STORAGE_RESERVE = 1 << 60  # more than any disk here has free
    with pytest.raises(InsufficientSpace) as caught:
        image_create(name="disk", size=MiB)
    assert caught.value.status == 409
    assert "kept in reserve" in caught.value.message
    assert not Image.objects.exists()


def test_a_size_the_filesystem_cannot_hold_is_refused_and_cleaned_up(
    monkeypatch, storage_root: Path
) -> None:
    def too_big(fd: int, size: int) -> None:
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(services.os, "ftruncate", too_big)
    with pytest.raises(ImageTooLarge) as caught:
        image_create(name="huge", size=16 << 40)
    assert caught.value.field == "size"
    assert files_in(storage_root) == []
    assert not Image.objects.exists()


def test_rename_keeps_the_file_and_refuses_taken_names(storage_root: Path) -> None:
    a = image_create(name="a", size=MiB)
    image_create(name="b", size=MiB)
    renamed = image_update(image=a, name="a2", description="renamed")
    assert Image.objects.get(pk=a.pk).name == "a2"
    assert image_path(renamed).exists()
    with pytest.raises(ImageNameTaken):
        image_update(image=Image.objects.get(pk=a.pk), name="b")
    assert Image.objects.get(pk=a.pk).name == "a2"


# ------------------------------------------------------------------ grow / shrink


def test_grow_adds_a_hole_and_keeps_the_data() -> None:
    image = image_create(name="disk", size=64 * MiB)
    path = write_islands(image)
    before = allocated(path)
    grown = image_grow(image=image, size=10 * GiB)
    assert grown.size == 10 * GiB == path.stat().st_size
    assert allocated(path) == before
    with open(path, "rb") as f:
        f.seek(5 * MiB)
        assert f.read(70_000) == ISLANDS[5 * MiB]
    assert data_ranges(path)[-1][0] < 64 * MiB


def test_shrink_without_force_is_refused() -> None:
    image = image_create(name="disk", size=64 * MiB)
    with pytest.raises(ShrinkNotForced) as caught:
        image_grow(image=image, size=32 * MiB)
    assert caught.value.field == "size"
    assert "force=true" in caught.value.message
    assert image_path(image).stat().st_size == 64 * MiB
    assert Image.objects.get(pk=image.pk).size == 64 * MiB


def test_forced_shrink_discards_the_tail() -> None:
    image = image_create(name="disk", size=64 * MiB)
    path = write_islands(image)
    image_grow(image=image, size=32 * MiB, force=True)
    assert path.stat().st_size == 32 * MiB
    assert all(off + length <= 32 * MiB for off, length in data_ranges(path))


def test_forced_shrink_is_refused_while_exported(make_export) -> None:
    export = make_export("vm1")
    with pytest.raises(ImageInUse) as caught:
        image_grow(image=export.image, size=32 * MiB, force=True)
    assert "'vm1'" in caught.value.message
    assert image_path(export.image).stat().st_size == 64 * MiB
    image_grow(image=export.image, size=128 * MiB)  # growing an exported image is fine


def test_grow_respects_the_quota_and_size_rules(settings) -> None:
    settings.APPLIANCE_PROVISION_QUOTA = 100 * MiB
    image = image_create(name="disk", size=64 * MiB)
    with pytest.raises(QuotaExceeded):
        image_grow(image=image, size=128 * MiB)
    with pytest.raises(ValidationError) as caught:
        image_grow(image=image, size=64 * MiB + 1)
    assert "size" in caught.value.message_dict
    image_grow(image=image, size=100 * MiB)
    assert image_path(image).stat().st_size == 100 * MiB


# ------------------------------------------------------------------ clone


def test_clone_has_the_same_contents_and_skips_the_holes() -> None:
    source = image_create(name="golden", size=64 * MiB)
    src = write_islands(source)
    clone = image_clone(source=source, name="copy", description="from golden")
    dst = image_path(clone)

    assert clone.cloned_from == source
    assert clone.size == 64 * MiB
    assert dst != src
    assert dst.stat().st_size == src.stat().st_size
    assert digest(dst) == digest(src)
    # Either the extents are shared (reflink) or only the data extents were copied:
    # the clone's own map has no data where the source has holes.
    assert data_ranges(dst) == data_ranges(src)
    assert allocated(dst) <= allocated(src)


def test_clone_falls_back_to_a_sparse_copy_without_ficlone(monkeypatch, tmp_path: Path) -> None:
    src = make_sparse_image(tmp_path / "src.raw", 64 * MiB, ISLANDS)
    calls: list[int] = []

    def no_reflink(fd: int, request: int, arg: int = 0) -> int:
        calls.append(request)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(services.fcntl, "ioctl", no_reflink)
    assert clone_file(src, tmp_path / "dst.raw") == "sparse-copy"
    assert calls == [services.FICLONE]
    assert digest(tmp_path / "dst.raw") == digest(src)
    assert data_ranges(tmp_path / "dst.raw") == data_ranges(src)


def test_sparse_copy_without_copy_file_range_still_skips_zeroes(
    monkeypatch, tmp_path: Path
) -> None:
    # Data extents that are mostly zeroes: the read/write fallback drops those too.
    islands = {0: b"a" * 4096 + bytes(1 * MiB) + b"b" * 4096}
    src = make_sparse_image(tmp_path / "src.raw", 16 * MiB, islands)
    monkeypatch.setattr(services.fcntl, "ioctl", _raise(errno.EOPNOTSUPP))
    monkeypatch.setattr(services.os, "copy_file_range", _raise(errno.EXDEV))
    assert clone_file(src, tmp_path / "dst.raw") == "sparse-copy"
    assert digest(tmp_path / "dst.raw") == digest(src)
    assert allocated(tmp_path / "dst.raw") <= 64 * 1024
    assert allocated(src) > MiB


def _raise(code: int):
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code))

    return fail


def test_clone_on_this_filesystem_uses_reflink_or_reports_the_copy(tmp_path: Path) -> None:
    src = make_sparse_image(tmp_path / "src.raw", 8 * MiB, {MiB: b"x" * 5000})
    method = clone_file(src, tmp_path / "dst.raw")
    fd = os.open(src, os.O_RDONLY)
    try:
        import fcntl

        probe = os.open(tmp_path / "probe.raw", os.O_WRONLY | os.O_CREAT)
        try:
            fcntl.ioctl(probe, services.FICLONE, fd)
            supported = True
        except OSError:
            supported = False
        finally:
            os.close(probe)
    finally:
        os.close(fd)
    assert method == ("reflink" if supported else "sparse-copy")
    assert digest(tmp_path / "dst.raw") == digest(src)


def test_clone_refusals_leave_no_file(settings, storage_root: Path) -> None:
    source = image_create(name="golden", size=64 * MiB)
    write_islands(source)
    image_create(name="taken", size=MiB)
    with pytest.raises(ImageNameTaken):
        image_clone(source=source, name="taken")
    with pytest.raises(ValidationError) as caught:
        image_clone(source=source, name="../escape")
    assert "name" in caught.value.message_dict
    settings.APPLIANCE_PROVISION_QUOTA = 100 * MiB
    with pytest.raises(QuotaExceeded):
        image_clone(source=source, name="copy")
    settings.APPLIANCE_PROVISION_QUOTA = 1 << 50
    settings.APPLIANCE_STORAGE_RESERVE = 1 << 60
    with pytest.raises(InsufficientSpace):
        image_clone(source=source, name="copy")
    assert len(files_in(storage_root)) == 2
    assert Image.objects.count() == 2


# ------------------------------------------------------------------ import


def test_import_of_a_mostly_zero_image_stays_sparse(storage_root: Path) -> None:
    length = 256 * MiB
    stream = ZeroStream(length, ISLANDS)
    image = image_create_from_upload(name="imported", stream=stream, length=length)
    path = image_path(image)

    assert image.size == length == path.stat().st_size
    assert stream.largest_read <= READ_CHUNK
    assert allocated(path) <= 256 * 1024  # ~75 KB of data in 4 KiB blocks, not 256 MiB
    expected = make_sparse_image(storage_root.parent / "expected.raw", length, ISLANDS)
    assert digest(path) == digest(expected)
    assert data_ranges(path) == data_ranges(expected)
    assert [p for p in files_in(storage_root) if p.endswith(".part")] == []


def test_import_reads_the_body_in_bounded_pieces() -> None:
    body = b"".join(os.urandom(4096) if i % 3 == 0 else bytes(4096) for i in range(1024))
    stream = RecordingStream(io.BytesIO(body), short_reads=True)
    image = image_create(name="disk", size=MiB)
    image_import(image=image, stream=stream, length=len(body))
    path = image_path(image)
    assert path.read_bytes() == body
    assert max(s for s in stream.sizes if s is not None) <= READ_CHUNK
    assert len(stream.sizes) > len(body) // 12_345  # many small reads, never one big one
    # Only the blocks holding data were written (one in three).
    assert allocated(path) <= (len(body) // 3) + 64 * 1024


def test_import_replaces_contents_and_size() -> None:
    image = image_create(name="disk", size=64 * MiB)
    write_islands(image)
    body = b"new" * 1000 + bytes(2 * MiB - 3000)
    imported = image_import(image=image, stream=io.BytesIO(body), length=len(body))
    assert imported.size == 2 * MiB == image_path(image).stat().st_size
    assert image_path(image).read_bytes() == body
    assert Image.objects.get(pk=image.pk).size == 2 * MiB


def test_a_short_body_is_refused_and_leaves_the_image_alone(storage_root: Path) -> None:
    image = image_create(name="disk", size=64 * MiB)
    write_islands(image)
    before = digest(image_path(image))
    with pytest.raises(UploadIncomplete) as caught:
        image_import(image=image, stream=io.BytesIO(b"x" * 5000), length=4 * MiB)
    assert "ended after 5000 of the 4194304 bytes" in caught.value.message
    assert digest(image_path(image)) == before
    assert files_in(storage_root) == [image.filename]


def test_import_is_refused_while_exported(make_export) -> None:
    export = make_export("vm1")
    stream = RecordingStream(io.BytesIO(bytes(MiB)))
    with pytest.raises(ImageInUse):
        image_import(image=export.image, stream=stream, length=MiB)
    assert stream.sizes == []  # refused before reading the body


def test_upload_rules_are_checked_before_the_body_is_read(settings, storage_root: Path) -> None:
    image_create(name="taken", size=MiB)
    for kwargs, error in [
        ({"name": "taken", "length": MiB}, ImageNameTaken),
        ({"name": "a/b", "length": MiB}, ValidationError),
        ({"name": "new", "length": 1000}, ValidationError),
    ]:
        stream = RecordingStream(io.BytesIO(bytes(MiB)))
        with pytest.raises(error):
            image_create_from_upload(stream=stream, **kwargs)
        assert stream.sizes == []
    with pytest.raises(ValidationError) as caught:
        image_create_from_upload(name="new", stream=io.BytesIO(), length=1000)
    (message,) = caught.value.message_dict["size"]
    assert message.startswith("the uploaded image (its Content-Length)")
    settings.APPLIANCE_PROVISION_QUOTA = 2 * MiB
    with pytest.raises(QuotaExceeded):
        image_create_from_upload(name="new", stream=io.BytesIO(bytes(2 * MiB)), length=2 * MiB)
    assert len(files_in(storage_root)) == 1


def test_running_out_of_space_mid_import_cleans_up(monkeypatch, storage_root: Path) -> None:
    monkeypatch.setattr(services.os, "pwrite", _raise(errno.ENOSPC))
    with pytest.raises(InsufficientSpace):
        image_create_from_upload(name="new", stream=io.BytesIO(b"x" * MiB), length=MiB)
    assert files_in(storage_root) == []
    assert not Image.objects.exists()


# ------------------------------------------------------------------ delete


def test_delete_removes_the_row_and_then_the_file(django_capture_on_commit_callbacks) -> None:
    image = image_create(name="disk", size=MiB)
    clone = image_clone(source=image, name="copy")
    path = image_path(image)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        image_delete(image=image)
    assert len(callbacks) == 1
    assert not path.exists()
    assert not Image.objects.filter(pk=image.pk).exists()
    clone.refresh_from_db()
    assert clone.cloned_from is None
    assert image_path(clone).exists()


def test_delete_is_refused_while_an_export_uses_the_image(
    make_export, django_capture_on_commit_callbacks
) -> None:
    export = make_export("vm1")
    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(ImageInUse) as caught,
    ):
        image_delete(image=export.image)
    assert callbacks == []
    assert caught.value.status == 409
    assert "'vm1'" in caught.value.message
    assert image_path(export.image).exists()
    assert Image.objects.filter(pk=export.image.pk).exists()


def test_storage_usage_sums_what_is_provisioned() -> None:
    image_create(name="a", size=10 * GiB)
    image_create(name="b", size=64 * MiB)
    usage = storage_usage()
    assert usage.images == 2
    assert usage.provisioned == 10 * GiB + 64 * MiB
    assert usage.quota == 64 << 40
    assert usage.free > 0


def test_usage_of_a_missing_file_is_unknown() -> None:
    image = image_create(name="disk", size=MiB)
    image_path(image).unlink()
    assert image_usage(image) == ImageUsage(None, None)


def test_publishing_uses_the_same_image_row() -> None:
    image = image_create(name="disk", size=MiB)
    export = export_publish(image=image, name="vm1")
    assert list(image.exports.all()) == [export]
