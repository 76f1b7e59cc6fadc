"""ckptmigrate: Alembic-style schema migrations for PyTorch checkpoints.

Importing the package is cheap: torch is imported only by what needs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import CkptMigrateError, LineageWarning

if TYPE_CHECKING:
    from . import dcp, op
    from .api import (
        current,
        current_all,
        downgrade,
        downgrade_all,
        stamp,
        stamp_all,
        upgrade,
        upgrade_all,
    )
    from .config import Config
    from .integration import LoadReport, load, save, upgrade_state_dict, versioned

__all__ = [
    "CkptMigrateError",
    "Config",
    "LineageWarning",
    "LoadReport",
    "__version__",
    "current",
    "current_all",
    "dcp",
    "downgrade",
    "downgrade_all",
    "load",
    "op",
    "save",
    "stamp",
    "stamp_all",
    "upgrade",
    "upgrade_all",
    "upgrade_state_dict",
    "versioned",
]

_LAZY = {
    "op": (".op", None),
    "Config": (".config", "Config"),
    "upgrade": (".api", "upgrade"),
    "downgrade": (".api", "downgrade"),
    "stamp": (".api", "stamp"),
    "current": (".api", "current"),
    "upgrade_all": (".api", "upgrade_all"),
    "downgrade_all": (".api", "downgrade_all"),
    "stamp_all": (".api", "stamp_all"),
    "current_all": (".api", "current_all"),
    "versioned": (".integration", "versioned"),
    "dcp": (".dcp", None),
    "load": (".integration", "load"),
    "save": (".integration", "save"),
    "upgrade_state_dict": (".integration", "upgrade_state_dict"),
    "LoadReport": (".integration", "LoadReport"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'ckptmigrate' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name, __name__)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
