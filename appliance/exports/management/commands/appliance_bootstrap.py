"""``manage.py appliance_bootstrap``: the admin account, its API token, the appliance's CA
and server certificate, this host's node (unless it is a central host, with no storage), a
demo export.

Idempotent: run by ``make run`` on every start. Prints one JSON object (credentials are
printed only when this command generated the password).
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from rest_framework.authtoken.models import Token

from appliance.exports.models import Export
from appliance.exports.selectors import export_uri
from appliance.exports.services import export_publish
from appliance.nodes.services import node_register
from appliance.pki.models import CertificateAuthority
from appliance.pki.services import pki_ensure
from appliance.storage.models import Image
from appliance.storage.services import image_create

DEMO_SIZE = 1 << 30


class Command(BaseCommand):
    help = ("Create the admin account, its API token, the CA, register this node and create "
            "a demo export (idempotent).")

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--no-demo", action="store_true", help="skip the demo export")

    def handle(self, *args: Any, **options: Any) -> None:
        username = os.environ.get("APPLIANCE_ADMIN_USER") or "admin"
        password = os.environ.get("APPLIANCE_ADMIN_PASSWORD") or ""
        user_model = get_user_model()
        user = user_model.objects.filter(username=username).first()
        generated = False
        if user is None:
            if not password:
                password = secrets.token_urlsafe(12)
                generated = True
            user = user_model.objects.create_superuser(username, "", password)
        elif password and not user.check_password(password):
            user.set_password(password)
            user.save(update_fields=["password"])
        token, _ = Token.objects.get_or_create(user=user)
        result: dict[str, Any] = {"username": username, "token": token.key}
        if generated:
            result["password"] = password
        pki_ensure()
        result["tls_ca_fingerprint"] = CertificateAuthority.objects.get().fingerprint
        has_storage = settings.APPLIANCE_ROLE != "central"
        if has_storage:
            result["node"] = node_register().name
        if not options["no_demo"]:
            export = Export.objects.filter(name="demo").first()
            if export is None:
                image = Image.objects.filter(name="demo").first() or image_create(
                    name="demo", size=DEMO_SIZE, description="created by make run",
                    node=settings.APPLIANCE_NODE_NAME if has_storage else None)
                export = export_publish(image=image, name="demo",
                                        description="demo disk created by make run")
            result["demo_uri"] = export_uri(export)
        self.stdout.write(json.dumps(result))
