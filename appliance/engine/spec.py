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
        )


@dataclass(frozen=True)
class EngineSpec:
    node: str
    exports: tuple[ExportSpec, ...] = field(default_factory=tuple)

    @property
    def digest(self) -> str:
        body = json.dumps([asdict(e) for e in sorted(self.exports, key=lambda e: e.name)],
                          sort_keys=True)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps({"node": self.node, "digest": self.digest,
                           "exports": [asdict(e) for e in self.exports]})

    @classmethod
    def from_json(cls, raw: str | bytes) -> EngineSpec:
        data = json.loads(raw)
        exports = tuple(ExportSpec.from_dict(e) for e in data.get("exports", []))
        return cls(node=str(data["node"]), exports=exports)


def desired_spec(node: str) -> EngineSpec:
    """The exports placed on ``node``, from the database (disabled ones marked so)."""
    from appliance.exports.selectors import export_list_on_node
    from appliance.storage.services import image_path

    exports = tuple(
        ExportSpec(
            name=export.name,
            path=str(image_path(export.image)),
            size=export.image.size,
            read_only=export.read_only,
            description=export.description,
            multi_conn=export.multi_conn,
            allowed_networks=tuple(export.allowed_networks or ()),
            enabled=export.enabled,
        )
        for export in export_list_on_node(node=node)
    )
    return EngineSpec(node=node, exports=exports)
