"""The database layer. Views and commands need only ``db`` (and models ``Base``);
``lifecycle`` is where a reader starts, ``features`` lists what it switches on."""

from .base import Base
from .lifecycle import Database, db
from .routing import ReplicaWriteError
from .session import AppSession
from .tracking import LostWriteError, has_writes

__all__ = ["AppSession", "Base", "Database", "LostWriteError", "ReplicaWriteError", "db", "has_writes"]
