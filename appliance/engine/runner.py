"""The engine process of one node: ``python -m appliance.engine.runner --node NAME``.

It serves NBD with nbdcore, applies the exports the control tasks put in Redis (polled
every ``--poll`` seconds; a change shows within a fraction of a second), writes a
heartbeat the reconcile task and the supervisor read, and reports metrics. It is started
and restarted by the engine worker's bootstep (``supervisor.py``), never as a Celery task.
SIGTERM stops accepting, lets in-flight requests finish, records the last sessions and
exits 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any

log = logging.getLogger("appliance.engine.runner")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m appliance.engine.runner")
    parser.add_argument("--node", required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10809)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--poll", type=float, default=0.25, metavar="SECONDS")
    parser.add_argument("--handshake-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="time a client has to finish negotiating")
    parser.add_argument("--max-connections", type=int, default=1024,
                        help="connections accepted at once; more are closed at once")
    parser.add_argument("--max-option-length", type=int, default=65536, metavar="BYTES",
                        help="largest option payload a client may send")
    parser.add_argument("--spin-us", type=int, default=50, metavar="US",
                        help="how long an idle connection polls before sleeping (0: never)")
    parser.add_argument("--no-database", action="store_true",
                        help="do not record sessions and samples (Redis live values only)")
    return parser.parse_args(argv)


def _database_recorders(node: str, run: str) -> tuple[Any, Any, Any]:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "appliance.settings")
    django.setup()
    from django.db import close_old_connections

    from appliance.sessions.services import (
        export_sample_record,
        refusal_record_from_engine,
        session_record_from_engine,
    )

    def record_session(snapshot: dict[str, Any]) -> None:
        close_old_connections()
        session_record_from_engine(snapshot=snapshot, node=node, engine_run=run)

    def record_sample(export: str, totals: dict[str, Any], at: float) -> None:
        close_old_connections()
        export_sample_record(export_name=export, node=node, totals=totals, at=at)

    def record_refusal(snapshot: dict[str, Any]) -> None:
        close_old_connections()
        refusal_record_from_engine(snapshot=snapshot, node=node, engine_run=run)

    return record_session, record_sample, record_refusal


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from nbdcore.exports import ExportRegistry
    from nbdcore.server import NbdServer
    from nbdcore.tls import PSK_SUPPORTED

    from . import mailbox
    from .applier import SpecApplier
    from .metrics import EngineMetrics
    from .spec import EngineSpec

    run = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    record_session = record_sample = record_refusal = None
    if not args.no_database:
        record_session, record_sample, record_refusal = _database_recorders(args.node, run)

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())

    registry = ExportRegistry()
    metrics = EngineMetrics(
        node=args.node, run=run, redis_factory=lambda: mailbox.connect(args.redis_url),
        record_session=record_session, record_sample=record_sample,
        record_refusal=record_refusal,
    )
    # TLS starts off; the first spec applied sets the context and mode (set_tls).
    server = NbdServer(registry, host=args.bind, port=args.port, observer=metrics,
                       handshake_timeout_s=args.handshake_timeout,
                       max_connections=args.max_connections,
                       max_option_length=args.max_option_length, spin_us=args.spin_us)
    try:
        server.start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", args.bind, args.port, exc.strerror)
        return 1
    metrics.connections = server.connections
    metrics.start()
    applier = SpecApplier(server, registry)
    redis_client = mailbox.connect(args.redis_url)
    log.info("engine %s for node %s listening on %s:%d", run, args.node, args.bind, server.port)
    last_beat = last_retry = 0.0
    while not stop.is_set():
        try:
            raw = redis_client.get(mailbox.desired_key(args.node))
            if raw is not None:
                spec = EngineSpec.from_json(raw)
                if spec.digest != applier.digest:
                    applier.apply(spec)
            now = time.time()
            if applier.failed and now - last_retry >= 10.0:
                last_retry = now  # an image file that could not be opened: try again
                applier.digest = ""
            if now - last_beat >= 1.0:
                last_beat = now
                beat = {
                    "node": args.node, "run": run, "pid": os.getpid(), "bind": args.bind,
                    "port": server.port, "digest": applier.digest, "at": now,
                    "exports": sorted(applier.current), "failed": applier.failed,
                    "connections": len(server.connections()),
                    "metrics_dropped": metrics.dropped,
                    "metrics_failures": dict(metrics.failures),
                    "refusals": dict(metrics.refusals),
                    "tls": {"mode": applier.tls_mode, "version": applier.tls_version,
                            "warning": applier.tls_warning, "psk_supported": PSK_SUPPORTED},
                }
                redis_client.set(mailbox.heartbeat_key(args.node), json.dumps(beat),
                                 ex=mailbox.HEARTBEAT_TTL_S)
        except Exception as exc:  # Redis away: keep serving what we have
            metrics.complain("reading the desired exports from Redis", exc)
        applier.close_retired()
        stop.wait(args.poll)
    log.info("engine %s stopping: draining clients", run)
    server.shutdown()
    metrics.stop()
    applier.close_all()
    try:
        redis_client.delete(mailbox.heartbeat_key(args.node))
    except Exception:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
