"""Turn an EngineSpec into the running engine's exports, touching only what changed."""

from __future__ import annotations

import ipaddress
import logging

from nbdcore.backends import SparseFile
from nbdcore.exports import Export, ExportRegistry, peer_host
from nbdcore.server import NbdServer

from .spec import EngineSpec, ExportSpec

log = logging.getLogger(__name__)


class SpecApplier:
    """Keeps ``registry`` equal to the last spec applied.

    - an export that is new gets a backend and is published;
    - one whose file, read-only flag or multi-conn changed is re-published with a new
      backend and its clients are disconnected (they negotiated the old flags);
    - one whose allowed networks or description changed keeps its backend, and only the
      clients the new policy refuses are disconnected;
    - one that was disabled stays known (clients get NBD_REP_ERR_POLICY) but its clients
      are disconnected; one that is gone (deleted) is withdrawn likewise.
    Backends of withdrawn exports are closed once no connection uses them.
    """

    def __init__(self, server: NbdServer, registry: ExportRegistry) -> None:
        self.server = server
        self.registry = registry
        self.current: dict[str, tuple[ExportSpec, Export]] = {}
        self.retired: list[Export] = []
        self.failed: dict[str, str] = {}  # export name -> why it could not be published
        self.digest = ""

    def apply(self, spec: EngineSpec) -> None:
        wanted = {e.name: e for e in spec.exports}
        for name in list(self.current):
            if name not in wanted:
                self._withdraw(name)
        self.failed = {}
        for name, export_spec in wanted.items():
            old = self.current.get(name)
            if old is None:
                self._publish(export_spec)
            elif old[0] != export_spec:
                self._change(old, export_spec)
        self.digest = spec.digest
        self.close_retired()

    def _change(self, old: tuple[ExportSpec, Export], new: ExportSpec) -> None:
        old_spec, old_export = old
        same_backend = (old_spec.path, old_spec.size, old_spec.read_only,
                        old_spec.multi_conn) == (new.path, new.size, new.read_only,
                                                 new.multi_conn)
        if not same_backend:
            self._withdraw(new.name)
            self._publish(new)
            return
        export = self._export(new, old_export.backend)
        self.registry.add(export)
        self.current[new.name] = (new, export)
        dropped = self.server.close_connections(
            lambda info: info.export_name == new.name
            and not (export.enabled and export.allows(peer_host(info.peer))))
        log.info("export %r: policy updated, %d client(s) no longer allowed", new.name, dropped)

    def _publish(self, spec: ExportSpec) -> None:
        try:
            backend = SparseFile(spec.path, read_only=spec.read_only)
        except OSError as exc:
            self.failed[spec.name] = f"cannot open {spec.path}: {exc.strerror}"
            log.error("export %r not published: %s", spec.name, self.failed[spec.name])
            return
        export = self._export(spec, backend)
        self.registry.add(export)
        self.current[spec.name] = (spec, export)
        log.info("export %r published (%s%s)", spec.name, spec.path,
                 ", read-only" if spec.read_only else "")

    def _withdraw(self, name: str) -> None:
        self.registry.remove(name)
        _, export = self.current.pop(name)
        dropped = self.server.close_connections(lambda info: info.export_name == name)
        self.retired.append(export)
        log.info("export %r withdrawn, %d client(s) disconnected", name, dropped)

    def close_retired(self) -> None:
        if not self.retired:
            return
        in_use = {id(e.backend) for e in self.server.exports_in_use()}
        live = {id(export.backend) for _, export in self.current.values()}
        keep = []
        for export in self.retired:
            backend_id = id(export.backend)
            if backend_id in in_use or backend_id in live:
                keep.append(export)
            else:
                export.backend.close()
        self.retired = keep

    def close_all(self) -> None:
        for _, export in self.current.values():
            export.backend.close()
        for export in self.retired:
            export.backend.close()
        self.current.clear()
        self.retired.clear()

    @staticmethod
    def _export(spec: ExportSpec, backend: SparseFile) -> Export:
        return Export(
            name=spec.name,
            backend=backend,
            description=spec.description,
            read_only=spec.read_only,
            multi_conn=spec.multi_conn,
            enabled=spec.enabled,
            allowed_networks=[ipaddress.ip_network(n, strict=False)
                              for n in spec.allowed_networks],
        )
