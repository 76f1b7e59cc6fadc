"""A model class's lineage: where its migrations live and which revision it is at."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import CkptMigrateError, LoadError
from ..formats.stamp import read_stamp
from ..schema import Schema
from ..script.directory import ScriptDirectory

log = logging.getLogger("ckptmigrate")

_SCRIPT_DIRS: dict[Path, ScriptDirectory] = {}
_LOCK = threading.Lock()


class Lineage:
    """Resolved lazily: decorating a class reads nothing until it is used."""

    def __init__(
        self,
        location: str | os.PathLike[str],
        revision: str | None,
        origin: Path | None,
        owner: str,
    ) -> None:
        self.location = location
        self.pinned = revision
        self.origin = origin
        self.owner = owner
        self._revision: str | None = None

    # ----------------------------------------------------------------- resolution

    def _path(self) -> Path:
        path = Path(self.location)
        if not path.is_absolute() and self.origin is not None and (self.origin / path).exists():
            return (self.origin / path).resolve()
        return path.resolve()

    @property
    def script_dir(self) -> ScriptDirectory:
        path = self._path()
        with _LOCK:
            found = _SCRIPT_DIRS.get(path)
            if found is None:
                if not path.exists():
                    raise CkptMigrateError(
                        f"{self.owner}: migrations location {self.location!r} does not exist "
                        f"(looked in {path})",
                        hint="pass @versioned the migrations folder or its ini file, relative "
                        "to the module that defines the class or absolute",
                    )
                found = ScriptDirectory.from_config(Config.from_location(path, quiet=True))
                _SCRIPT_DIRS[path] = found
        return found

    @property
    def revision(self) -> str:
        """The full revision id the class is at (its pin, or the lineage's head)."""
        if self._revision is None:
            rmap = self.script_dir.revision_map
            symbol = self.pinned or "head"
            try:
                rev = rmap.get_revision(symbol)
            except CkptMigrateError as exc:
                raise CkptMigrateError(
                    f"{self.owner}: cannot resolve its schema revision {symbol!r}: {exc.message}",
                    hint=exc.hint or "fix revision= in @ckptmigrate.versioned",
                ) from exc
            if rev is None:
                raise CkptMigrateError(
                    f"{self.owner}: its lineage has no revisions yet",
                    hint="write the first one with 'ckptmigrate revision -m \"initial\"'",
                )
            self._revision = rev.revision
        return self._revision

    # ----------------------------------------------------------------- state dicts

    def current(
        self, sub: Mapping[str, Any], meta: Mapping[str, Any] | None, where: str
    ) -> tuple[str, ...] | None:
        """The revisions a (sub-)state dict is at: its stamp, else its schema; None if unknown."""
        stamp = read_stamp(meta, where)
        rmap = self.script_dir.revision_map
        if stamp is not None:
            unknown = [r for r in stamp.revisions if r not in rmap]
            if unknown:
                raise LoadError(
                    f"{where} is at revision {', '.join(unknown)}, unknown to {self.owner}'s "
                    f"lineage (the class is at {self.revision}); it was probably saved by newer "
                    "code",
                    hint="update your code (git pull) or downgrade the checkpoint with the newer "
                    f"code: ckptmigrate downgrade CKPT {self.revision}",
                )
            return stamp.revisions
        return self.identify(sub, where)

    def identify(self, sub: Mapping[str, Any], where: str) -> tuple[str, ...] | None:
        from ..identify import exact_matches
        from ..runtime.memory import specs_of

        matches = exact_matches(self.script_dir, Schema.from_specs(specs_of(sub)))
        if not matches:
            return None
        if len(matches) > 1:
            names = ", ".join(m or "base" for m in matches)
            raise LoadError(
                f"{where} has no ckptmigrate stamp and matches several revisions of "
                f"{self.owner}'s lineage ({names})",
                hint="stamp the checkpoint with 'ckptmigrate stamp CKPT REV' first",
            )
        found = matches[0]
        log.info("%s has no stamp; identified by schema as %s", where, found or "base")
        return (found,) if found else ()
