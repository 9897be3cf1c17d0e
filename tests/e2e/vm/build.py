"""Build a small bootable raw disk image for the VM boot test, from Debian packages.

No root, no loop devices, no mounts:

* partition 1 (FAT16, active): syslinux (installed with the mtools-based ``syslinux``),
  ``syslinux.cfg``, Debian's kernel (``linux-image-amd64``) and an initramfs with
  ``busybox-static``, the kernel modules the guest needs (virtio_pci, virtio_blk, ext4 and
  their dependencies, from ``modules.dep``) and the ``/init`` below. The cpio archive is
  written here, so ``/dev/console`` is a real device node without ``mknod``.
* partition 2 (ext4, ``mkfs.ext4 -d``): ``payload.bin`` (random, seeded) and its
  ``payload.sha256``. Each boot checks the checksum, prints what earlier boots wrote to
  ``boots.log``, appends its own line and reads it back.
* the MBR: syslinux's ``mbr.bin`` and a partition table written here.

The guest talks on the serial console (ttyS0). It prints ``VMTEST-WAITING`` and waits for a
line (a label for this boot) so a test can look at the running VM before the guest reads
its payload; then ``VMTEST-PAYLOAD-OK``, ``VMTEST-SEEN <line>`` for every earlier boot,
``VMTEST-WROTE <label> <uuid>`` and ``VMTEST-DONE``, and powers off. If the answer was
``<label> hold`` it first prints ``VMTEST-HOLDING`` and waits for one more line, so a test can
look at the VM's session after the payload was read. On any failure it prints
``VMTEST-FAIL <why>`` and powers off.

    python3 tests/e2e/vm/build.py OUT.img     # or build_image(path) / cached_image(dir)

Packages: linux-image-amd64 busybox-static syslinux syslinux-common mtools dosfstools
e2fsprogs.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

MiB = 1 << 20
SECTOR = 512
DISK_SIZE = 64 * MiB
BOOT_START = 1 * MiB
BOOT_SIZE = 32 * MiB
DATA_START = BOOT_START + BOOT_SIZE
DATA_SIZE = DISK_SIZE - DATA_START
PAYLOAD_SIZE = 2 * MiB
KERNEL_CMDLINE = "console=ttyS0,115200 quiet rdinit=/init panic=-1"
# What the guest's kernel must load, in any order: dependencies come from modules.dep.
MODULES = ["virtio_pci", "virtio_blk", "ext4", "crc32c_generic"]
BUILD_TOOLS = ["syslinux", "mcopy", "mkfs.fat", "mkfs.ext4"]
SYSLINUX_MBR = Path("/usr/lib/syslinux/mbr/mbr.bin")
BUSYBOX = Path("/bin/busybox")

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
fail() {
    echo "VMTEST-FAIL $*"
    sync
    poweroff -f
}
echo "VMTEST-BOOTED kernel $(uname -r)"
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
i=0
while [ ! -b /dev/vda2 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/vda2 ] || fail "no /dev/vda2"
mount -t ext4 /dev/vda2 /mnt || fail "mount /dev/vda2"
echo "VMTEST-WAITING"
label=unlabelled
mode=
read -t 120 label mode || echo "VMTEST-NO-ANSWER"
label=$(echo "$label" | tr -cd 'A-Za-z0-9_.-')
cd /mnt || fail "cd /mnt"
sha256sum -c payload.sha256 >/dev/null || fail "payload checksum"
echo "VMTEST-PAYLOAD-OK"
if [ -f boots.log ]; then
    while read -r line; do echo "VMTEST-SEEN $line"; done < boots.log
fi
id=$(cat /proc/sys/kernel/random/uuid)
echo "$label $id" >> boots.log || fail "write boots.log"
sync
cd /
umount /mnt || fail "umount"
mount -t ext4 -o ro /dev/vda2 /mnt || fail "mount ro"
grep -q "^$label $id\$" /mnt/boots.log || fail "boots.log lost the line just written"
umount /mnt
sync
echo "VMTEST-WROTE $label $id"
echo "VMTEST-DONE"
if [ "$mode" = hold ]; then
    echo "VMTEST-HOLDING"
    read -t 120 mode || echo "VMTEST-NO-ANSWER"
fi
poweroff -f
"""

SYSLINUX_CFG = f"""SERIAL 0 115200
DEFAULT vm
PROMPT 0
TIMEOUT 0
LABEL vm
  LINUX /vmlinuz
  INITRD /initrd.img
  APPEND {KERNEL_CMDLINE}
"""


class BuildError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    """What is not installed among the tools and files the build needs."""
    missing = [t for t in BUILD_TOOLS if shutil.which(t) is None]
    missing += [str(p) for p in (SYSLINUX_MBR, BUSYBOX) if not p.exists()]
    try:
        find_kernel()
    except BuildError as exc:
        missing.append(str(exc))
    return missing


def find_kernel() -> tuple[Path, Path]:
    """The newest ``/boot/vmlinuz-*`` that has its modules installed, and its modules dir."""
    for vmlinuz in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        modules = Path("/lib/modules") / vmlinuz.name.removeprefix("vmlinuz-")
        if (modules / "modules.dep").exists() and os.access(vmlinuz, os.R_OK):
            return vmlinuz, modules
    raise BuildError("no readable /boot/vmlinuz-* with /lib/modules (linux-image-amd64)")


def module_files(modules_dir: Path, names: list[str]) -> list[tuple[str, Path]]:
    """(name, .ko path) for ``names`` and their dependencies, dependencies first.

    Modules built into the kernel (``modules.builtin``) are skipped.
    """
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
        by_name[_module_name(target)] = target
    builtin_file = modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {_module_name(p) for p in builtin_file.read_text().split()}
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        for dep in deps.get(path, []):
            visit(dep)
        ordered.append(path)

    for name in names:
        name = name.replace("-", "_")
        if name in builtin:
            continue
        if name not in by_name:
            raise BuildError(f"kernel module {name} not found in {modules_dir}")
        visit(by_name[name])
    out = []
    for path in ordered:
        if path.endswith((".xz", ".zst", ".gz")):
            raise BuildError(f"compressed module {path}: decompress support not implemented")
        out.append((_module_name(path), modules_dir / path))
    return out


def _module_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


class Cpio:
    """A ``newc`` cpio archive (what the kernel unpacks as initramfs), written in memory."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.inode = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0),
               nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = [self.inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(encoded), 0]
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.inode += 1
        self.parts.append(header + encoded + b"\0" * (-(len(header) + len(encoded)) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, nlink=2)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self.inode = 0
        self._entry("TRAILER!!!", 0, nlink=1)
        return b"".join(self.parts)


def build_initramfs(modules_dir: Path) -> bytes:
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "mnt", "lib", "lib/modules"):
        archive.directory(directory)
    archive.chardev("dev/console", 5, 1)
    archive.chardev("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", BUSYBOX.read_bytes(), 0o755)
    archive.symlink("bin/sh", "busybox")
    archive.file("init", INIT.encode(), 0o755)
    order = []
    for name, path in module_files(modules_dir, MODULES):
        archive.file(f"lib/modules/{name}.ko", path.read_bytes())
        order.append(name)
    archive.file("lib/modules/order", ("\n".join(order) + "\n").encode())
    return gzip.compress(archive.finish(), compresslevel=6, mtime=0)


def _run(*cmd: str | Path, cwd: Path | None = None) -> None:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd,
                            timeout=120, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    if result.returncode != 0:
        raise BuildError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
                         f"{result.stdout}{result.stderr}")


def build_boot_partition(path: Path, work: Path, vmlinuz: Path, initrd: bytes) -> None:
    with open(path, "wb") as f:
        f.truncate(BOOT_SIZE)
    _run("mkfs.fat", "-F", "16", "-n", "VMBOOT", "-h", str(BOOT_START // SECTOR), path)
    (work / "initrd.img").write_bytes(initrd)
    (work / "syslinux.cfg").write_text(SYSLINUX_CFG)
    _run("mcopy", "-i", path, vmlinuz, "::vmlinuz")
    _run("mcopy", "-i", path, work / "initrd.img", "::initrd.img")
    _run("mcopy", "-i", path, work / "syslinux.cfg", "::syslinux.cfg")
    _run("syslinux", "--install", path)


def payload() -> bytes:
    return random.Random(20240606).randbytes(PAYLOAD_SIZE)


def build_data_partition(path: Path, work: Path) -> None:
    tree = work / "data"
    tree.mkdir()
    data = payload()
    (tree / "payload.bin").write_bytes(data)
    (tree / "payload.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  payload.bin\n")
    with open(path, "wb") as f:
        f.truncate(DATA_SIZE)
    _run("mkfs.ext4", "-q", "-F", "-L", "vmdata", "-E", "root_owner=0:0", "-d", tree, path)


def mbr(boot_code: bytes) -> bytes:
    def entry(active: bool, kind: int, start: int, size: int) -> bytes:
        # CHS fields set to "use LBA" (0xfe 0xff 0xff), as partitioning tools do past 8 GiB.
        chs = b"\xfe\xff\xff"
        return struct.pack("<B3sB3sII", 0x80 if active else 0, chs, kind, chs,
                           start // SECTOR, size // SECTOR)

    table = entry(True, 0x0E, BOOT_START, BOOT_SIZE) + entry(False, 0x83, DATA_START, DATA_SIZE)
    sector = boot_code[:440].ljust(440, b"\0") + b"\0" * 6 + table.ljust(64, b"\0") + b"\x55\xaa"
    assert len(sector) == SECTOR
    return sector


def _copy_sparse(src: Path, dst, offset: int) -> None:
    """Copy ``src`` into the open file ``dst`` at ``offset``, leaving zero blocks as holes."""
    block = 64 * 1024
    zero = bytes(block)
    with open(src, "rb") as f:
        pos = 0
        while chunk := f.read(block):
            if chunk != zero[: len(chunk)]:
                dst.seek(offset + pos)
                dst.write(chunk)
            pos += len(chunk)


def build_image(out: Path) -> Path:
    """Write the bootable disk image to ``out`` (sparse, ``DISK_SIZE`` bytes)."""
    missing = missing_tools()
    if missing:
        raise BuildError("missing: " + ", ".join(missing))
    vmlinuz, modules_dir = find_kernel()
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="vm-build-") as tmp:
        work = Path(tmp)
        boot, data = work / "boot.fat", work / "data.ext4"
        build_boot_partition(boot, work, vmlinuz, build_initramfs(modules_dir))
        build_data_partition(data, work)
        partial = out.with_name(out.name + ".partial")
        with open(partial, "wb") as f:
            f.truncate(DISK_SIZE)
            f.write(mbr(SYSLINUX_MBR.read_bytes()))
            _copy_sparse(boot, f, BOOT_START)
            _copy_sparse(data, f, DATA_START)
        partial.replace(out)
    return out


def cache_key() -> str:
    """Changes when this builder or what it packs changes."""
    vmlinuz, modules_dir = find_kernel()
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for path in (vmlinuz, BUSYBOX, SYSLINUX_MBR, modules_dir / "modules.dep"):
        stat = path.stat()
        digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def cached_image(cache_dir: Path) -> Path:
    """The image for the current inputs, built into ``cache_dir`` once."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"test-vm-{cache_key()}.img"
    if not path.exists():
        for stale in cache_dir.glob("test-vm-*.img"):
            stale.unlink()
        build_image(path)
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.img")
    print(build_image(Path(sys.argv[1])))
