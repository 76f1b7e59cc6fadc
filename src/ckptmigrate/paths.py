"""Paths as users see them in messages."""

from __future__ import annotations

import os


def display_path(path: str | os.PathLike[str] | object) -> str:
    """``path`` relative to the working directory when it lies below it; a URL as it is."""
    if not isinstance(path, (str, os.PathLike)) or (isinstance(path, str) and "://" in path):
        return str(path)
    try:
        rel = os.path.relpath(path)
    except ValueError:  # pragma: no cover - another drive on Windows
        return str(path)
    return str(path) if rel.startswith("..") else rel
