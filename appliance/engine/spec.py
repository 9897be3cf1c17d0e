"""What an engine should serve: plain data, computed from the database, read by the engine.

The spec crosses process boundaries as JSON (through Redis), so it holds no model objects:
just what nbdcore needs to publish an export. Its digest tells the engine and the
reconcile task whether what runs is what the database says.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ExportSpec:
    name: str
    path: str
    size: int = 0  # the image's virtual size: a change re-opens the file
    read_only: bool = False
    description: str = ""
    multi_conn: bool = True
    allowed_networks: tuple[str, ...] = ()
    # A disabled export stays known to the engine so that clients get NBD_REP_ERR_POLICY
    # (not "unknown") and it stays out of NBD_OPT_LIST.
    enabled: bool = True
    tls: str = "off"  # the export's TLS policy: off, optional or required
    allowed_clients: tuple[str, ...] = ()  # TLS identities that may connect; empty = any
    max_connections: int = 0  # clients at once; 0 = no limit
    # Served but never listed: the hidden export an image is copied through when it moves
    # to another node (its name carries the secret token).
    hidden: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExportSpec:
        return cls(
            name=str(data["name"]),
            path=str(data["path"]),
            size=int(data.get("size", 0)),
            read_only=bool(data.get("read_only", False)),
            description=str(data.get("description", "")),
            multi_conn=bool(data.get("multi_conn", True)),
            allowed_networks=tuple(str(n) for n in data.get("allowed_networks", ())),
            enabled=bool(data.get("enabled", True)),
            tls=str(data.get("tls", "off")),
            allowed_clients=tuple(str(n) for n in data.get("allowed_clients", ())),
            max_connections=int(data.get("max_connections", 0)),
            hidden=bool(data.get("hidden", False)),
        )


@dataclass(frozen=True)
class TlsSpec:
    """The engine's TLS: its mode and the files nbdcore loads (written by appliance.pki).

    ``version`` changes whenever the content of any file changes (a rotated server
    certificate, a new CRL, PSK keys): the engine then builds a new context for new
    connections. ``revoked_serials`` are client certificates whose live connections the
    engine closes (the CRL only stops new handshakes).
    """

    mode: str = "off"  # off, optional or required
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    crl_file: str | None = None
    psk_file: str | None = None
    version: str = ""
    revoked_serials: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TlsSpec:
        def path(name: str) -> str | None:
            value = data.get(name)
            return None if value is None else str(value)

        return cls(
            mode=str(data.get("mode", "off")),
            cert_file=path("cert_file"),
            key_file=path("key_file"),
            ca_file=path("ca_file"),
            crl_file=path("crl_file"),
            psk_file=path("psk_file"),
            version=str(data.get("version", "")),
            revoked_serials=tuple(sorted(int(n) for n in data.get("revoked_serials", ()))),
        )


@dataclass(frozen=True)
class EngineSpec:
    node: str
    exports: tuple[ExportSpec, ...] = field(default_factory=tuple)
    tls: TlsSpec | None = None

    @property
    def digest(self) -> str:
        body = json.dumps({
            "exports": [asdict(e) for e in sorted(self.exports, key=lambda e: e.name)],
            "tls": None if self.tls is None else asdict(self.tls),
        }, sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "digest": self.digest,
                           "exports": [asdict(e) for e in self.exports],
                           "tls": None if self.tls is None else asdict(self.tls)})

    @classmethod
    def from_json(cls, raw: str | bytes) -> EngineSpec:
        data = json.loads(raw)
        exports = tuple(ExportSpec.from_dict(e) for e in data.get("exports", []))
        tls = data.get("tls")
        return cls(node=str(data["node"]), exports=exports,
                   tls=None if tls is None else TlsSpec.from_dict(tls))


def desired_spec(node: str) -> EngineSpec:
    """The exports placed on ``node``, from the database (disabled ones marked so), and
    the engine's TLS materials."""
    from appliance.exports.selectors import export_list_on_node
    from appliance.storage.services import image_path

    exports = tuple(
        ExportSpec(
            name=export.name,
            path=str(image_path(export.image)),
            size=export.image.size,
            # while the image moves its data is being copied: no writes may slip past
            read_only=export.read_only or bool(export.image.moving_to),
            description=export.description,
            multi_conn=export.multi_conn,
            allowed_networks=tuple(export.allowed_networks or ()),
            enabled=export.enabled,
            tls=export.tls_policy,
            allowed_clients=tuple(export.allowed_clients or ()),
            max_connections=export.max_connections,
        )
        for export in export_list_on_node(node=node)
    )
    return EngineSpec(node=node, exports=exports + _move_exports(node), tls=_tls_spec())


def _move_exports(node: str) -> tuple[ExportSpec, ...]:
    """Hidden exports for transfers between hosts: read-only for each image leaving
    ``node`` (the target copies it), writable for each upload being written into one."""
    from django.db.models import Q

    from appliance.storage.models import Image
    from appliance.storage.move import import_export_name, move_export_name
    from appliance.storage.services import image_path

    specs = []
    transfers = Image.objects.filter(node=node).filter(~Q(moving_to="") | ~Q(import_token=""))
    for image in transfers:
        if image.moving_to:
            specs.append(ExportSpec(
                name=move_export_name(image), path=str(image_path(image)), size=image.size,
                read_only=True, description=f"move of {image.name} to {image.moving_to}",
                hidden=True))
        if image.import_token:
            specs.append(ExportSpec(
                name=import_export_name(image), path=str(image_path(image)), size=image.size,
                description=f"upload into {image.name}", multi_conn=False, hidden=True))
    return tuple(specs)


def _tls_spec() -> TlsSpec:
    from appliance.pki.services import engine_tls_spec

    return TlsSpec.from_dict(engine_tls_spec())
