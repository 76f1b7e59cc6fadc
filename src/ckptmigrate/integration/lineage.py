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
from ..schema import Schema, read_base_schema
from ..script.directory import ScriptDirectory

log = logging.getLogger("ckptmigrate")

_SCRIPT_DIRS: dict[tuple[str, str], ScriptDirectory] = {}
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
        key = (str(path), "")
        with _LOCK:
            found = _SCRIPT_DIRS.get(key)
            if found is None:
                if not path.exists():
                    raise CkptMigrateError(
                        f"{self.owner}: migrations location {self.location!r} does not exist "
                        f"(looked in {path})",
                        hint="pass @versioned the migrations folder or its ini file, relative "
                        "to the module that defines the class or absolute",
                    )
                found = ScriptDirectory.from_config(Config.from_location(path, quiet=True))
                _SCRIPT_DIRS[key] = found
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
        from ..runtime.memory import specs_of
        from ..runtime.symbolic import iter_revision_schemas

        base = read_base_schema(self.script_dir.dir)
        if base is None:
            return None
        have = Schema.from_specs(specs_of(sub))
        matches = [
            item.script.revision
            for item in iter_revision_schemas(self.script_dir, base)
            if item.schema.same_layout(have)
        ]
        if len(matches) == 1:
            log.info("%s has no stamp; identified by schema as %s", where, matches[0])
            return (matches[0],)
        if len(matches) > 1:
            raise LoadError(
                f"{where} has no ckptmigrate stamp and matches several revisions of "
                f"{self.owner}'s lineage ({', '.join(matches)})",
                hint="stamp the checkpoint with 'ckptmigrate stamp CKPT REV' first",
            )
        if have.same_layout(base):
            return ()
        return None
