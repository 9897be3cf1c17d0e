"""Several hosts on one machine for end-to-end tests: a fresh PostgreSQL database, one
Redis, a central host (``run.sh --role central``) and storage nodes (``--role node``), each
node with its own storage root, node name and loopback address."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import free_port

from .stack import Stack, launch_stack, wait_ready

PG_HOST, PG_PORT = "127.0.0.1", int(os.environ.get("PGPORT") or 5432)


def _pg_connect(dbname: str = "postgres") -> object:
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user="postgres", password="postgres",
                           dbname=dbname, connect_timeout=3, autocommit=True)


@contextmanager
def fresh_database() -> Iterator[str]:
    """A new PostgreSQL database on 127.0.0.1:5432 (the server scripts/ensure-postgres.sh
    finds or starts), dropped afterwards; skips when no PostgreSQL answers."""
    try:
        admin = _pg_connect()
    except Exception as exc:
        pytest.skip(f"no PostgreSQL reachable on {PG_HOST}:{PG_PORT} as user postgres "
                    f"(scripts/ensure-postgres.sh starts one): {exc}")
    name = f"nbd_cluster_{uuid.uuid4().hex[:12]}"
    with admin:  # type: ignore[attr-defined]
        admin.execute(f'CREATE DATABASE "{name}"')  # type: ignore[attr-defined]
    try:
        yield f"postgresql://postgres:postgres@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with suppress(Exception), _pg_connect() as admin:  # type: ignore[attr-defined]
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """A redis-server of the test's own on a free port of 127.0.0.1."""
    import redis

    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--logfile",
         str(directory / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class StorageNode:
    name: str
    address: str  # the loopback address its engine listens on and clients dial
    port: int
    storage_root: Path
    stack: Stack

    def uri(self, export: str) -> str:
        return f"nbd://{self.address}:{self.port}/{export}"

    def files(self) -> set[str]:
        """The image files in its storage root."""
        if not self.storage_root.exists():
            return set()
        return {p.name for p in self.storage_root.iterdir() if p.suffix == ".raw"}

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM to the run command's process group: it drains its engine worker."""
        proc = self.stack.proc
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return int(proc.returncode)


@dataclass
class Cluster:
    central: Stack
    nodes: dict[str, StorageNode] = field(default_factory=dict)

    def stop(self) -> dict[str, int]:
        codes = {name: node.terminate() for name, node in self.nodes.items()}
        codes["central"] = self.central.stop()
        return codes


NODE_ADDRESSES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}


@contextmanager
def run_cluster(tmp: Path, *, down_after: float = 6,
                nodes: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A central host and storage nodes (name -> loopback address) sharing a fresh
    PostgreSQL database and one Redis; everything stopped and dropped afterwards."""
    nodes = nodes or NODE_ADDRESSES
    with fresh_database() as database_url, redis_server(tmp / "redis") as redis_url:
        shared = {"DATABASE_URL": database_url, "REDIS_URL": redis_url,
                  "APPLIANCE_NODE_DOWN_AFTER": str(down_after),
                  "APPLIANCE_STORAGE_RESERVE": "0"}
        central = wait_ready(launch_stack(
            tmp / "central", args=("--role", "central"),
            env={**shared, "APPLIANCE_NODE_NAME": "central",
                 "STORAGE_ROOT": str(tmp / "central" / "images")}))
        cluster = Cluster(central=central)
        try:
            for name, address in nodes.items():
                port = free_port(address)
                root = tmp / name / "images"
                stack = launch_stack(tmp / name, args=("--role", "node"), env={
                    **shared, "APPLIANCE_NODE_NAME": name, "STORAGE_ROOT": str(root),
                    "NBD_BIND": address, "NBD_PUBLIC_HOST": address, "NBD_PORT": str(port)})
                cluster.nodes[name] = StorageNode(name, address, port, root, stack)
            for node in cluster.nodes.values():  # started together, waited in turn
                wait_ready(node.stack, timeout=120)
            yield cluster
        finally:
            cluster.stop()
