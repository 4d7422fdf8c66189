"""Where pages live. Knows nothing of gRPC or protobuf: slots are ints, pages are buffers.

Callers (netswap.server.areas) validate every slot before calling in; stores
trust their arguments and only ever fail for reasons of the medium itself.
"""

from netswap.server.store.base import AreaKey, Backing, Store
from netswap.server.store.file import FileStore
from netswap.server.store.memory import MemoryStore

__all__ = ["AreaKey", "Backing", "FileStore", "MemoryStore", "Store", "open_store"]


def open_store(spec: str, *, mlock: bool = False) -> Store:
    """'memory' or 'file:PATH' (as validated by Config) -> a store; mlock applies to memory."""
    if spec == "memory":
        return MemoryStore(lock=mlock)
    return FileStore(spec.removeprefix("file:"))
