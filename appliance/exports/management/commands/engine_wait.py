"""``manage.py engine_wait --export NAME``: wait until this node's engine serves it."""

from __future__ import annotations

import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from appliance.engine import mailbox


class Command(BaseCommand):
    help = "Wait until the node's engine heartbeat lists the given exports."

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--export", action="append", default=[])
        parser.add_argument("--timeout", type=float, default=60.0)

    def handle(self, *args: Any, **options: Any) -> None:
        wanted = set(options["export"])
        deadline = time.monotonic() + options["timeout"]
        node = settings.APPLIANCE_NODE_NAME
        while time.monotonic() < deadline:
            try:
                beat = mailbox.read_heartbeat(mailbox.connect(settings.REDIS_URL), node)
            except Exception:
                beat = None
            if beat and wanted <= set(beat.get("exports", [])):
                self.stdout.write(f"engine on {node} serves {', '.join(sorted(wanted)) or '-'}")
                return
            time.sleep(0.2)
        raise CommandError(f"the engine on {node} did not serve {sorted(wanted)} in time")
