"""Model integration: versioned classes, and loading/saving through them."""

from .loading import LoadReport, load, save, upgrade_state_dict
from .versioning import versioned

__all__ = ["LoadReport", "load", "save", "upgrade_state_dict", "versioned"]
