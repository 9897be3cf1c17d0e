"""Storage behind an export: sparse raw files, memory (tests), fault injection."""

from .base import Backend, Capabilities
from .faults import Fault, FaultInjection
from .memory import MemoryBackend
from .sparse_file import SparseFile

__all__ = ["Backend", "Capabilities", "Fault", "FaultInjection", "MemoryBackend", "SparseFile"]
