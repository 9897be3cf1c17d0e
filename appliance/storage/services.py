"""Image services: every change to an image or its file goes through here.

Files live directly under ``settings.STORAGE_ROOT`` as ``<32 hex digits>.raw``; the name is
chosen here, never by a client, so no input can point outside the root. Database rows and
files change together: a file is created inside the transaction that inserts its row (and
removed if that fails); a deleted image's file is unlinked once the deletion commits.

Long copies (imports) stream into a temporary file outside any transaction, so an upload
never holds a database lock; the short transaction at the end re-checks the rules and
renames the file into place.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError, Sum

from appliance.engine.control import sync_on_commit
from appliance.errors import (
    ImageFileMissing,
    ImageInUse,
    ImageNameTaken,
    ImageTooLarge,
    ImportIntoRemoteImage,
    InsufficientSpace,
    QuotaExceeded,
    ShrinkNotForced,
    UploadIncomplete,
    human_size,
)
from appliance.nodes.services import node_choose

from .models import Image
from .remote import is_local, run_on_node
from .validators import validate_image_size

__all__ = [
    "clone_file",
    "data_extents",
    "image_check_create",
    "image_check_grow",
    "image_clone",
    "image_create",
    "image_create_from_upload",
    "image_create_here",
    "image_delete",
    "image_grow",
    "image_import",
    "image_path",
    "image_update",
    "sparse_copy",
    "storage_root",
    "write_sparse",
]

log = logging.getLogger(__name__)

FICLONE = 0x40049409  # _IOW(0x94, 9, int) from linux/fs.h
# ioctl(FICLONE) errors that mean "this filesystem (pair) cannot share extents".
_NO_REFLINK = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS}
)
_NO_COPY_FILE_RANGE = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}
)

READ_CHUNK = 1 << 20  # bytes read from an upload at a time: the most held in memory
ZERO_BLOCK = 4096  # granularity of hole detection in uploads
COPY_CHUNK = 1 << 20
SPACE_CHECK_EVERY = 64 << 20  # re-check free space after this many data bytes written
_ZEROS = bytes(READ_CHUNK)
_FILENAME = re.compile(r"[0-9a-f]{32}\.raw")
_OPEN_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


# ------------------------------------------------------------------ paths and checks


def storage_root() -> Path:
    """The storage root, created on first use."""
    root = Path(settings.STORAGE_ROOT)
    root.mkdir(mode=0o750, parents=True, exist_ok=True)
    return root.resolve()


def image_path(image: Image) -> Path:
    if not _FILENAME.fullmatch(image.filename or ""):
        raise ValueError(f"image {image.pk} has a file name the appliance did not choose")
    return Path(settings.STORAGE_ROOT).resolve() / image.filename


def _new_filename() -> str:
    return f"{uuid.uuid4().hex}.raw"


def _validate(image: Image, *, exclude: tuple[str, ...] = ()) -> None:
    """Field rules (names, sizes); uniqueness is the database's job (see ``_insert``)."""
    image.full_clean(exclude=list(exclude), validate_unique=False, validate_constraints=False)


def _name_taken(name: str) -> ImageNameTaken:
    other = Image.objects.filter(name=name).values_list("pk", flat=True).first()
    return ImageNameTaken(
        f"an image named {name!r} already exists (id {other}); choose another name"
    )


def _insert(image: Image) -> None:
    try:
        with transaction.atomic():
            image.save(force_insert=True)
    except IntegrityError as exc:
        if Image.objects.filter(name=image.name).exists():
            raise _name_taken(image.name) from exc
        raise


def _check_quota(*, size: int, exclude: Image | None = None) -> None:
    others = Image.objects.all() if exclude is None else Image.objects.exclude(pk=exclude.pk)
    used = others.aggregate(total=Sum("size"))["total"] or 0
    quota = settings.APPLIANCE_PROVISION_QUOTA
    if used + size > quota:
        left = max(quota - used, 0)
        raise QuotaExceeded(
            f"the provisioning quota is {human_size(quota)} and {human_size(used)} is already "
            f"provisioned, so an image of {human_size(size)} ({size} bytes) does not fit; "
            f"at most {left} bytes are left"
        )


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _check_free_space(*, needed: int, action: str) -> None:
    free = _free_bytes(storage_root())
    reserve = settings.APPLIANCE_STORAGE_RESERVE
    if free - needed < reserve:
        raise InsufficientSpace(
            f"{action} needs {human_size(needed)} and the storage has {human_size(free)} "
            f"free, of which {human_size(reserve)} is kept in reserve"
        )


def _refuse_if_exported(image: Image, *, action: str) -> None:
    names = list(image.exports.order_by("name").values_list("name", flat=True)[:10])
    if names:
        listed = ", ".join(repr(n) for n in names)
        raise ImageInUse(
            f"cannot {action} image {image.name!r} while exports use it ({listed}); "
            f"delete those exports or point them at another image first"
        )


def _os_error(exc: OSError, *, size: int, action: str) -> Exception:
    """Turn the OSErrors a client can cause into clean refusals; others stay errors."""
    if exc.errno == errno.EFBIG:
        return ImageTooLarge(
            f"the filesystem under the storage root cannot hold a file of {human_size(size)} "
            f"({size} bytes); choose a smaller size"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpace(f"{action} ran out of space on the storage root: {exc.strerror}")
    return exc


def _stat(image: Image) -> os.stat_result:
    try:
        return os.stat(image_path(image))
    except FileNotFoundError as exc:
        raise ImageFileMissing(
            f"the file of image {image.name!r} is missing from the storage root"
        ) from exc


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock(image: Image) -> Image:
    return Image.objects.select_for_update().get(pk=image.pk)


# ------------------------------------------------------------------ create, update, grow


def image_check_create(*, name: str, size: int, node: str | None = None) -> None:
    """The rules ``image_create`` enforces beyond field validation: the quota, and free
    space on ``node`` (read there; without a node, this host's when it has storage)."""
    _check_quota(size=size)
    if node is None and getattr(settings, "APPLIANCE_ROLE", "all") == "central":
        return  # no node chosen yet: placement checks the nodes' free space
    node = node or settings.APPLIANCE_NODE_NAME
    action = f"creating image {name!r}"
    if is_local(node):
        _check_free_space(needed=0, action=action)
    else:
        run_on_node(node, "check_free_space", node=node, needed=0, action=action)


def image_check_grow(*, image: Image, size: int, force: bool) -> int:
    """The rules ``image_grow`` enforces; returns the current size of the file (read on
    the image's node)."""
    if not is_local(image.node):
        return int(run_on_node(image.node, "check_grow", image=image.pk, size=size,
                               force=force))
    current = _stat(image).st_size
    if size < current:
        if not force:
            raise ShrinkNotForced(
                f"size {size} is smaller than the current {current} bytes of image "
                f"{image.name!r}; shrinking discards the data past the new end: "
                f"send force=true to confirm"
            )
        _refuse_if_exported(image, action="shrink")
    if size > image.size:
        _check_quota(size=size, exclude=image)
    return current


def image_create(*, name: str, size: int, description: str = "", node: str | None = None,
                 labels: Iterable[str] = ()) -> Image:
    """A new sparse image of ``size`` bytes: instant, whatever the size, no data written.
    It is placed on ``node``, else on the node ``node_choose`` picks for ``labels``."""
    image = Image(name=name, size=size, description=description, filename=_new_filename())
    _validate(image, exclude=("node",))
    image.node = node_choose(size=size, labels=labels, node=node)
    if not is_local(image.node):
        # The node runs the rest (checks, row and file in one transaction) against the
        # same database; the row it inserted is read back here.
        created = run_on_node(image.node, "create", node=image.node, name=name, size=size,
                              description=description)
        return Image.objects.get(pk=created["id"])
    return _create_here(image)


def image_create_here(*, name: str, size: int, description: str, node: str) -> Image:
    """``image_create`` on the node that will hold the file (``storage.run`` "create")."""
    image = Image(name=name, size=size, description=description, filename=_new_filename(),
                  node=node)
    _validate(image)
    return _create_here(image)


def _create_here(image: Image) -> Image:
    name, size = image.name, image.size
    image_check_create(name=name, size=size, node=image.node)
    path = storage_root() / image.filename
    try:
        with transaction.atomic():
            _insert(image)
            _create_sparse(path, size)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info("created image %s (%d bytes) at %s", name, size, path)
    return image


def _create_sparse(path: Path, size: int) -> None:
    fd = os.open(path, _OPEN_NEW, 0o640)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError as exc:
        raise _os_error(exc, size=size, action="creating the image") from exc
    finally:
        os.close(fd)
    _fsync_dir(path.parent)


def image_update(*, image: Image, name: str | None = None, description: str | None = None) -> Image:
    """Rename or re-describe an image; its file stays where it is."""
    if name is not None:
        image.name = name
    if description is not None:
        image.description = description
    _validate(image)
    try:
        with transaction.atomic():
            image.save(update_fields=["name", "description", "updated_at"])
    except IntegrityError as exc:
        raise _name_taken(image.name) from exc
    return image


def image_grow(*, image: Image, size: int, force: bool = False) -> Image:
    """Set the virtual size. Growing adds a hole at the end; shrinking discards data past
    the new end, so it needs ``force=True`` and no export may use the image."""
    try:
        validate_image_size(size)
    except ValidationError as exc:
        raise ValidationError({"size": exc.messages}) from exc
    if not is_local(image.node):
        run_on_node(image.node, "grow", image=image.pk, size=size, force=force)
        grown = Image.objects.get(pk=image.pk)
        image.size, image.updated_at = grown.size, grown.updated_at
        return grown
    with transaction.atomic():
        locked = _lock(image)
        current = image_check_grow(image=locked, size=size, force=force)
        try:
            os.truncate(image_path(locked), size)
        except OSError as exc:
            raise _os_error(exc, size=size, action="resizing the image") from exc
        locked.size = size
        locked.save(update_fields=["size", "updated_at"])
        # Engines serving it re-open the file to advertise the new size.
        sync_on_commit(*locked.exports.values_list("node", flat=True))
    log.info("resized image %s from %d to %d bytes", locked.name, current, size)
    image.size, image.updated_at = locked.size, locked.updated_at
    return locked


# ------------------------------------------------------------------ delete


def image_delete(*, image: Image) -> None:
    """Delete an image no export uses; its file goes once the deletion commits (on the
    image's node, which deletes the row too)."""
    if not is_local(image.node):
        run_on_node(image.node, "delete", image=image.pk)
        return
    with transaction.atomic():
        locked = _lock(image)
        _refuse_if_exported(locked, action="delete")
        path = image_path(locked)
        try:
            locked.delete()
        except ProtectedError as exc:  # an export appeared since the check
            raise ImageInUse(f"cannot delete image {locked.name!r}: an export uses it") from exc
        transaction.on_commit(lambda: _unlink(path))
    log.info("deleted image %s", locked.name)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        log.warning("image file %s was already gone", path)


# ------------------------------------------------------------------ clone


def image_clone(*, source: Image, name: str, description: str = "") -> Image:
    """A new image with the contents of ``source``: a reflink (shared extents, instant)
    where the filesystem supports ``FICLONE``, else a copy of the data extents only, so
    holes stay holes. A source that is being written meanwhile gives a torn copy: clone
    images whose writable exports are idle. The clone is made on the source's node."""
    if not is_local(source.node):
        cloned = run_on_node(source.node, "clone", source=source.pk, name=name,
                             description=description)
        return Image.objects.get(pk=cloned["id"])
    st = _stat(source)
    clone = Image(
        name=name,
        size=st.st_size,
        description=description,
        filename=_new_filename(),
        cloned_from=source,
        node=source.node,  # a clone lives beside its source
    )
    _validate(clone, exclude=("size",))
    _check_quota(size=st.st_size)
    _check_free_space(needed=st.st_blocks * 512, action=f"cloning image {source.name!r}")
    path = storage_root() / clone.filename
    try:
        with transaction.atomic():
            # Hold the source as image_delete would: a concurrent delete of the source
            # then waits for the clone (and refuses), instead of the clone's commit failing
            # on its cloned_from reference.
            if not Image.objects.select_for_update(no_key=True).filter(pk=source.pk).exists():
                raise Image.DoesNotExist(f"image {source.name!r} was deleted meanwhile")
            _insert(clone)
            try:
                method = clone_file(image_path(source), path)
            except OSError as exc:
                raise _os_error(exc, size=st.st_size, action="cloning the image") from exc
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    log.info("cloned image %s to %s (%s)", source.name, name, method)
    return clone


def clone_file(src: Path, dst: Path) -> str:
    """Copy ``src`` to the new file ``dst``; returns ``"reflink"`` or ``"sparse-copy"``."""
    src_fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst_fd = os.open(dst, _OPEN_NEW, 0o640)
        try:
            try:
                fcntl.ioctl(dst_fd, FICLONE, src_fd)
                method = "reflink"
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
                method = "sparse-copy"
                sparse_copy(src_fd, dst_fd, os.fstat(src_fd).st_size)
            os.fsync(dst_fd)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)
    _fsync_dir(dst.parent)
    return method


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each data extent, from ``SEEK_DATA``/``SEEK_HOLE``."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past pos
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        pos = end


def sparse_copy(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy only the data extents of ``src_fd`` into the empty ``dst_fd``; returns the data
    bytes copied. The holes between them are left as holes."""
    os.ftruncate(dst_fd, size)
    try:
        extents = list(data_extents(src_fd, size))
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # No SEEK_DATA on this filesystem: find the zeroes by reading instead.
        return _copy_skipping_zeroes(src_fd, dst_fd, 0, size)
    return sum(_copy_range(src_fd, dst_fd, offset, length) for offset, length in extents)


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    pos, end = offset, offset + length
    while pos < end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, min(end - pos, 1 << 30), pos, pos)
        except OSError as exc:
            if exc.errno not in _NO_COPY_FILE_RANGE:
                raise
            return pos - offset + _copy_skipping_zeroes(src_fd, dst_fd, pos, end - pos)
        if n == 0:  # the source shrank under us
            break
        pos += n
    return pos - offset


def _copy_skipping_zeroes(src_fd: int, dst_fd: int, offset: int, length: int) -> int:
    pos, end, written = offset, offset + length, 0
    while pos < end:
        chunk = os.pread(src_fd, min(COPY_CHUNK, end - pos), pos)
        if not chunk:
            break
        written += _write_data_runs(
            lambda data, at: _pwrite_all(dst_fd, data, at), chunk, pos)
        pos += len(chunk)
    return written


# ------------------------------------------------------------------ import


def image_import(*, image: Image, stream: Readable, length: int) -> Image:
    """Replace the contents of ``image`` with ``length`` bytes read from ``stream`` (a raw
    image). All-zero blocks become holes; at most ``READ_CHUNK`` bytes are held at once.
    Refused while an export uses the image; the new size is ``length``."""
    _check_upload_length(length)
    if not is_local(image.node):
        # The local path swaps a finished file in atomically; over NBD the old contents
        # would be half overwritten if the upload broke off.
        raise ImportIntoRemoteImage(
            f"image {image.name!r} is on node {image.node!r}: replacing its contents from "
            f"this host is not supported; upload a new image there with "
            f"POST /api/v1/images/import?name=...&node={image.node}")
    _refuse_if_exported(image, action="import into")
    _check_quota(size=length, exclude=image)
    _check_free_space(needed=0, action=f"importing into image {image.name!r}")
    tmp = storage_root() / f".{uuid.uuid4().hex}.part"
    try:
        data = _receive(tmp, stream, length)
        with transaction.atomic():
            locked = _lock(image)
            _refuse_if_exported(locked, action="import into")
            _check_quota(size=length, exclude=locked)
            os.replace(tmp, image_path(locked))
            locked.size = length
            locked.save(update_fields=["size", "updated_at"])
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(tmp.parent)
    log.info("imported %d bytes (%d of data) into image %s", length, data, locked.name)
    return locked


def image_create_from_upload(
    *, name: str, stream: Readable, length: int, description: str = "",
    node: str | None = None, labels: Iterable[str] = (),
) -> Image:
    """A new image holding the ``length``-byte raw image read from ``stream``, placed as
    ``image_create`` places one."""
    image = Image(name=name, size=length, description=description, filename=_new_filename())
    try:
        _validate(image, exclude=("node",))
    except ValidationError as exc:
        raise _as_upload_size_error(exc) from exc
    if Image.objects.filter(name=name).exists():
        raise _name_taken(name)  # before reading the body, not after
    image.node = node_choose(size=length, labels=labels, node=node)
    if not is_local(image.node):
        from .move import image_import_over_nbd

        return image_import_over_nbd(image=image, stream=stream, length=length)
    _check_quota(size=length)
    _check_free_space(needed=0, action=f"importing image {name!r}")
    root = storage_root()
    tmp, path = root / f".{uuid.uuid4().hex}.part", root / image.filename
    try:
        data = _receive(tmp, stream, length)
        with transaction.atomic():
            _check_quota(size=length)
            _insert(image)
            os.rename(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(root)
    log.info("imported image %s: %d bytes, %d of data", name, length, data)
    return image


def _check_upload_length(length: int) -> None:
    try:
        validate_image_size(length)
    except ValidationError as exc:
        raise _as_upload_size_error(ValidationError({"size": exc.messages})) from exc


def _as_upload_size_error(exc: ValidationError) -> ValidationError:
    """Size errors of an upload name the body, whose length is the size."""
    errors = exc.message_dict
    if "size" in errors:
        errors["size"] = [f"the uploaded image (its Content-Length): {m}" for m in errors["size"]]
    return ValidationError(errors)


def _receive(path: Path, stream: Readable, length: int) -> int:
    fd = os.open(path, _OPEN_NEW, 0o640)
    try:
        try:
            data = write_sparse(fd, stream, length)
            os.ftruncate(fd, length)
            os.fsync(fd)
        except OSError as exc:
            raise _os_error(exc, size=length, action="importing the image") from exc
    finally:
        os.close(fd)
    return data


def write_sparse(fd: int, stream: Readable, length: int) -> int:
    """Write ``length`` bytes from ``stream`` at offset 0 of ``fd``, leaving every all-zero
    ``ZERO_BLOCK`` unwritten (a hole); returns the data bytes written. Reads at most
    ``READ_CHUNK`` bytes at a time; a stream that ends early raises ``UploadIncomplete``."""
    return write_sparse_with(lambda data, offset: _pwrite_all(fd, data, offset), stream,
                             length, check_space=True)


def write_sparse_with(write: Callable[[memoryview, int], object], stream: Readable,
                      length: int, *, check_space: bool = False) -> int:
    """``write_sparse`` through ``write(data, offset)``: a file here, or an NBD export on
    another node (then its free space is the node's business)."""
    pos = written = checked_at = 0
    while pos < length:
        want = min(READ_CHUNK, length - pos)
        chunk = _read_exactly(stream, want)
        if len(chunk) < want:
            raise UploadIncomplete(
                f"the request body ended after {pos + len(chunk)} of the {length} bytes its "
                f"Content-Length announced"
            )
        if chunk != (_ZEROS if want == READ_CHUNK else bytes(want)):
            written += _write_data_runs(write, chunk, pos)
        pos += want
        if check_space and written - checked_at >= SPACE_CHECK_EVERY:
            checked_at = written
            _check_free_space(needed=0, action="the import")
    return written


def _read_exactly(stream: Readable, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < n:
        piece = stream.read(n - got)
        if not piece:
            break
        parts.append(piece)
        got += len(piece)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_data_runs(write: Callable[[memoryview, int], object], chunk: bytes,
                     offset: int) -> int:
    """Write the non-zero ``ZERO_BLOCK``s of ``chunk`` (merged into runs) at ``offset``."""
    view = memoryview(chunk)
    zero_block = _ZEROS[:ZERO_BLOCK]
    written = 0
    run_start: int | None = None
    for start in range(0, len(chunk), ZERO_BLOCK):
        block = chunk[start : start + ZERO_BLOCK]
        is_zero = block == zero_block if len(block) == ZERO_BLOCK else not any(block)
        if not is_zero and run_start is None:
            run_start = start
        elif is_zero and run_start is not None:
            write(view[run_start:start], offset + run_start)
            written += start - run_start
            run_start = None
    if run_start is not None:
        write(view[run_start:], offset + run_start)
        written += len(chunk) - run_start
    return written


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    total = len(data)
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
    return total
