"""The whole appliance started by the README's run command, for end-to-end tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conftest import ROOT, free_port


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    var_dir: Path
    lines: dict[str, str] = field(default_factory=dict)
    output: list[str] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.lines["api"].split()[0].rstrip("/")

    @property
    def token(self) -> str:
        return self.lines["token"]

    @property
    def demo_uri(self) -> str:
        return self.lines["nbd"]

    @property
    def web(self) -> str:
        return self.lines["dashboard"].rstrip("/")

    def request(self, method: str, path: str, body: Any = None,
                token: str | None = "") -> tuple[int, Any]:
        url = path if path.startswith("http") else f"{self.api}{path}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        token = self.token if token == "" else token
        if token:
            req.add_header("Authorization", f"Token {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                raw = response.read()
                status = response.status
                kind = response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
        if "json" in kind:
            return status, json.loads(raw or b"null")
        return status, raw.decode()

    def log(self, name: str) -> str:
        path = self.var_dir / "run" / f"{name}.log"
        return path.read_text() if path.exists() else ""

    def heartbeat(self) -> dict[str, Any] | None:
        import redis

        client = redis.Redis.from_url(self.lines["redis"], socket_timeout=2)
        raw = client.get(f"nbd:engine:{self.lines['node']}:heartbeat")
        return None if raw is None else json.loads(raw)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return int(self.proc.returncode)


def start_stack(tmp: Path, *, env: dict[str, str] | None = None, timeout: float = 240,
                args: tuple[str, ...] = ()) -> Stack:
    """Run ``scripts/run.sh ARGS`` on free ports with its own var dir; wait for "ready".
    DATABASE_URL and REDIS_URL are the run command's own unless ``env`` gives them."""
    stack = launch_stack(tmp, env=env, args=args)
    return wait_ready(stack, timeout=timeout)


def launch_stack(tmp: Path, *, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> Stack:
    """Start ``scripts/run.sh ARGS`` (in a process group of its own) without waiting."""
    environment = {
        **os.environ,
        "APPLIANCE_VAR_DIR": str(tmp),
        "WEB_PORT": str(free_port()),
        "NBD_PORT": str(free_port()),
        "APPLIANCE_NODE_NAME": "e2e-node",
        **(env or {}),
    }
    for name in ("DATABASE_URL", "REDIS_URL"):
        if not env or name not in env:
            environment.pop(name, None)
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "run-command.log", "wb") as stderr:  # what run.sh says on stderr
        proc = subprocess.Popen(
            ["bash", "scripts/run.sh", *args], cwd=ROOT, env=environment,
            stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True,
        )
    return Stack(proc=proc, var_dir=tmp)


def wait_ready(stack: Stack, *, timeout: float = 240) -> Stack:
    """Read the run command's lines until "ready"; stop it and raise if it never comes."""
    proc = stack.proc
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        stack.output.append(line.rstrip("\n"))
        match = re.match(r"^(\w+):\s+(.*)$", line.strip())
        if match:
            stack.lines[match.group(1)] = match.group(2)
        if line.startswith("ready"):
            return stack
    stack.stop()
    said = stack.var_dir / "run-command.log"
    raise RuntimeError("the run command did not become ready:\n" + "\n".join(stack.output)
                       + "\n--- its stderr ---\n"
                       + (said.read_text(errors="replace")[-3000:] if said.exists() else "")
                       + "\n--- worker log ---\n" + stack.log("worker")[-3000:])
