"""nbdcore: a pure-Python NBD server engine (fixed newstyle, structured replies, block status).

The protocol core (``nbdcore.protocol``) is sans-IO; ``nbdcore.server`` runs it on sockets
against the backends in ``nbdcore.backends``. Nothing here imports Django or Celery.
"""

from .exports import Export, ExportRegistry
from .server import NbdServer
from .stats import ConnectionInfo, ConnectionStats, Observer

__version__ = "0.1.0"
__all__ = ["ConnectionInfo", "ConnectionStats", "Export", "ExportRegistry", "NbdServer",
           "Observer", "__version__"]
