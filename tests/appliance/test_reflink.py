"""Cloning on a filesystem with reflinks: a loop-mounted XFS made for the test.

The storage root of the other tests is on whatever /tmp is (ext4 here: no FICLONE, so
they exercise the sparse copy). This one needs root, mkfs.xfs (xfsprogs, which
``make test`` installs) and loop devices; without them it is skipped and says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from appliance_testing import MiB, allocated, data_ranges

from appliance.storage.services import clone_file, image_clone, image_create, image_path

pytestmark = pytest.mark.django_db


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def xfs_root(tmp_path: Path, settings) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a loop XFS needs root")
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("not installed: mkfs.xfs (Debian xfsprogs)")
    backing = tmp_path / "xfs.img"
    with open(backing, "wb") as f:
        f.truncate(320 * MiB)  # mkfs.xfs wants at least 300 MiB
    made = _run("mkfs.xfs", "-q", "-m", "reflink=1", str(backing))
    assert made.returncode == 0, made.stderr
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    mounted = _run("mount", "-o", "loop", str(backing), str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount here: {mounted.stderr.strip()}")
    try:
        settings.STORAGE_ROOT = mountpoint / "images"
        yield mountpoint
    finally:
        if _run("umount", str(mountpoint)).returncode != 0:
            _run("umount", "-l", str(mountpoint))


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_clone_shares_extents_with_ficlone(xfs_root: Path) -> None:
    source = image_create(name="golden", size=256 * MiB)
    src = image_path(source)
    with open(src, "r+b") as f:
        f.seek(16 * MiB)
        f.write(os.urandom(64 * MiB))
        f.flush()
        os.fsync(f.fileno())
    free_before = _free(xfs_root)

    clone = image_clone(source=source, name="copy")
    dst = image_path(clone)

    # 64 MiB of data cloned for (next to) nothing: the extents are shared, not copied.
    assert free_before - _free(xfs_root) < 4 * MiB
    assert allocated(dst) >= 64 * MiB  # st_blocks counts the shared blocks too
    assert data_ranges(dst) == data_ranges(src)
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()
    # Copy-on-write: writing the clone leaves the source alone.
    with open(dst, "r+b") as f:
        f.seek(16 * MiB)
        f.write(b"changed")
    with open(src, "rb") as f:
        f.seek(16 * MiB)
        assert f.read(7) != b"changed"


def test_clone_file_reports_reflink_on_xfs(xfs_root: Path) -> None:
    root = xfs_root / "files"
    root.mkdir()
    src = root / "src.raw"
    with open(src, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(MiB)
        f.write(b"x" * 5000)
    assert clone_file(src, root / "dst.raw") == "reflink"
    assert (root / "dst.raw").read_bytes() == src.read_bytes()
