"""Run the test VM under qemu-system-x86_64 (TCG, no network) and talk to its serial console."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

QEMU = "qemu-system-x86_64"


def qemu_command(drive: str, firmware_log: Path | None = None) -> list[str]:
    """The command line: the disk (a file or an ``nbd://`` URI) as the only, virtio, disk.

    ``firmware_log`` gets SeaBIOS's debug output ("No bootable device." and the like).
    """
    command = [
        QEMU, "-m", "256", "-nic", "none", "-display", "none", "-monitor", "none",
        "-serial", "stdio", "-no-reboot", "-accel", "tcg",
        "-drive", f"file={drive},format=raw,if=virtio",
    ]
    if firmware_log is not None:
        command += ["-chardev", f"file,id=firmware,path={firmware_log}",
                    "-device", "isa-debugcon,iobase=0x402,chardev=firmware"]
    return command


class Vm:
    """One qemu process; its serial console is its stdin/stdout, kept in :attr:`log`."""

    def __init__(self, drive: str, log_path: Path | None = None) -> None:
        self.log_path = log_path
        self.firmware_log = None if log_path is None else log_path.with_suffix(".firmware.log")
        self.command = qemu_command(drive, self.firmware_log)
        self._chunks: list[str] = []
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        self._reader = threading.Thread(target=self._read, name="vm-serial", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        sink = open(self.log_path, "w") if self.log_path else None  # noqa: SIM115
        try:
            while chunk := self.proc.stdout.read1(4096):  # type: ignore[attr-defined]
                text = chunk.decode(errors="replace").replace("\r", "")
                with self._lock:
                    self._chunks.append(text)
                if sink:
                    sink.write(text)
                    sink.flush()
        finally:
            if sink:
                sink.close()

    @property
    def log(self) -> str:
        with self._lock:
            return "".join(self._chunks)

    def lines(self, prefix: str) -> list[str]:
        """The rest of every console line that starts with ``prefix``."""
        return [m.group(1).strip() for m in
                re.finditer(rf"^{re.escape(prefix)}(.*)$", self.log, re.MULTILINE)]

    def wait_for(self, marker: str, timeout: float) -> bool:
        """True once ``marker`` starts a console line; False on timeout or qemu exit."""
        deadline = time.monotonic() + timeout
        pattern = re.compile(rf"^{re.escape(marker)}", re.MULTILINE)
        while time.monotonic() < deadline:
            if pattern.search(self.log):
                return True
            if self.proc.poll() is not None:
                self._reader.join(2)
                return bool(pattern.search(self.log))
            time.sleep(0.05)
        return bool(pattern.search(self.log))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float) -> int | None:
        """qemu's exit status, or None if it is still running after ``timeout``."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """Stop this qemu (only the process this object started)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdin:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def report(self) -> str:
        """For assertion messages: the command, the exit status and the serial log."""
        firmware = ""
        if self.firmware_log is not None and self.firmware_log.exists():
            tail = self.firmware_log.read_text(errors="replace")[-1500:]
            firmware = f"\n--- firmware (SeaBIOS) log, tail ---\n{tail}"
        return (f"qemu: {' '.join(self.command)}\nexit: {self.proc.poll()}, "
                f"{time.monotonic() - self.started:.1f}s\n--- serial log ---\n{self.log}"
                f"{firmware}")
