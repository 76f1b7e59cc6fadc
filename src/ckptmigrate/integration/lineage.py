"""A model class's lineage: where its migrations live and which revision it is at."""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..errors import CkptMigrateError, LineageWarning, LoadError, MultipleHeads
from ..formats.stamp import read_stamp
from ..paths import display_path
from ..plan.nodes import Source, TensorSpec
from ..plan.state import PlanState
from ..schema import Schema
from ..script.directory import ScriptDirectory

log = logging.getLogger("ckptmigrate")

_SCRIPT_DIRS: dict[Path, tuple[Config, ScriptDirectory]] = {}
_LOCK = threading.Lock()
# Frames in these folders are skipped, so a warning points at the user's line.
_INTERNAL = (
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
    os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,
)


def _warn(message: str, hint: str | None) -> None:
    """A :class:`LineageWarning` attributed to the first caller outside ckptmigrate and torch."""
    frame = sys._getframe(1)
    level = 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    text = CkptMigrateError(message, hint=hint).one_line()
    warnings.warn(text, LineageWarning, stacklevel=level)


class _LoggingConfig(Config):
    """A lineage's configuration as a library reads it: notes go to the ``ckptmigrate`` logger."""

    def log(self, text: str) -> None:
        log.info("%s", text)

    def print_stdout(self, text: str = "") -> None:
        log.info("%s", text)


class Lineage:
    """Resolved lazily: decorating a class reads nothing until it is used.

    A lineage that cannot name the class's revision (several heads, no
    folder, no revisions, a broken script) is a *problem*, not an error:
    :meth:`resolve` returns None, the class saves unstamped with a
    :class:`LineageWarning`, and only a load that needs the revision fails.
    """

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
        self._problem: CkptMigrateError | None = None
        self._reported: set[str] = set()

    # ----------------------------------------------------------------- resolution

    def _candidates(self) -> list[Path]:
        path = Path(self.location)
        if path.is_absolute() or self.origin is None:
            return [path.resolve()]
        return [(self.origin / path).resolve(), path.resolve()]

    def _path(self) -> Path:
        candidates = self._candidates()
        return next((p for p in candidates if p.exists()), candidates[-1])

    @property
    def script_dir(self) -> ScriptDirectory:
        return self._folder()[1]

    @property
    def config(self) -> Config:
        """The lineage's configuration (``optimizer_state`` ...); its notes go to the logger."""
        return self._folder()[0]

    def _folder(self) -> tuple[Config, ScriptDirectory]:
        path = self._path()
        with _LOCK:
            found = _SCRIPT_DIRS.get(path)
            if found is None:
                if not path.exists():
                    candidates = self._candidates()
                    places = " or ".join(display_path(p) for p in dict.fromkeys(candidates))
                    raise CkptMigrateError(
                        f"{self.owner}: its migrations folder {str(self.location)!r} does not "
                        f"exist (looked in {places})",
                        hint=f"create it with 'ckptmigrate init {display_path(candidates[0])}', "
                        "or point @ckptmigrate.versioned at the folder (or its ini file), "
                        "relative to the module that defines the class or absolute",
                    )
                config = _LoggingConfig.from_location(path)
                found = (config, ScriptDirectory.from_config(config))
                _SCRIPT_DIRS[path] = found
        return found

    @property
    def revision(self) -> str:
        """The full revision id the class is at (its pin, or the lineage's head)."""
        found = self.resolve()
        if found is None:
            assert self._problem is not None
            raise CkptMigrateError(self._problem.message, hint=self._problem.hint)
        return found

    def resolve(self) -> str | None:
        """The class's revision, or None when the lineage cannot say (see :attr:`problem`)."""
        if self._revision is None and self._problem is None:
            try:
                self._revision = self._find_revision()
            except CkptMigrateError as exc:
                reason = exc.message.removeprefix(f"{self.owner}: ")
                self._problem = CkptMigrateError(f"{self.owner}: {reason}", hint=exc.hint)
            except OSError as exc:
                self._problem = CkptMigrateError(
                    f"{self.owner}: reading its migrations failed: {exc}",
                    hint="check the folder's permissions",
                )
        return self._revision

    @property
    def problem(self) -> CkptMigrateError | None:
        """Why the class has no revision (cached), or None when it has one."""
        self.resolve()
        return self._problem

    def _find_revision(self) -> str:
        script_dir = self.script_dir
        rmap = script_dir.revision_map
        symbol = self.pinned or "head"
        try:
            rev = rmap.get_revision(symbol)
        except MultipleHeads as exc:
            heads = ", ".join(exc.heads)
            raise CkptMigrateError(
                f"{self.owner}: revision={self.pinned!r} names {len(exc.heads)} heads ({heads})"
                if self.pinned
                else f"{self.owner}: its lineage ({display_path(script_dir.dir)}) has "
                f"{len(exc.heads)} heads ({heads}) and the class follows the head",
                hint="merge them with 'ckptmigrate merge heads -m \"merge\"', or pin the class "
                f"to one with @ckptmigrate.versioned(..., revision={exc.heads[0]!r})",
            ) from exc
        except CkptMigrateError as exc:
            raise CkptMigrateError(
                f"{self.owner}: cannot resolve its schema revision {symbol!r}: {exc.message}",
                hint=exc.hint or "fix revision= in @ckptmigrate.versioned",
            ) from exc
        if rev is None:
            raise CkptMigrateError(
                f"{self.owner}: its lineage ({display_path(script_dir.dir)}) has no revisions yet",
                hint="write the first one with 'ckptmigrate revision -m \"initial\"'",
            )
        return rev.revision

    # ----------------------------------------------------------------- reporting

    def _reason(self) -> tuple[str, str | None]:
        problem = self.problem
        assert problem is not None
        return problem.message.removeprefix(f"{self.owner}: "), problem.hint

    def report_built(self) -> None:
        """Warn, once per class, that its lineage cannot name its revision."""
        if "built" in self._reported or self.resolve() is not None:
            return
        self._reported.add("built")
        reason, fix = self._reason()
        _warn(
            f"{self.owner}: {reason}; until that is fixed its state dicts are saved without "
            "a ckptmigrate stamp, and loading a checkpoint that needs migrating fails",
            fix,
        )

    def report_unstamped(self) -> None:
        """Warn, once per class, that a state dict was just saved without a stamp."""
        if "saved" in self._reported:
            return
        self._reported.add("saved")
        reason, fix = self._reason()
        _warn(f"{self.owner}: state dict saved without a ckptmigrate stamp: {reason}", fix)

    def load_error(self, where: str, stamp: str | None) -> LoadError:
        """Why ``where`` (stamped ``stamp``) cannot be brought to the class's revision."""
        reason, fix = self._reason()
        what = (
            f"{where} is at revision {stamp}, but {self.owner}'s own revision is unknown"
            if stamp
            else f"{where} does not match {self.owner}"
        )
        return LoadError(f"{what}, so it cannot be migrated: {reason}", hint=fix)

    def unplaced_error(self, where: str, differences: list[str]) -> LoadError:
        """``where`` has no stamp, does not fit the class, and no base schema says its revision."""
        return LoadError(
            f"{where} has no ckptmigrate stamp, and {self.owner}'s lineage "
            f"({display_path(self.script_dir.dir)}) has no base schema to identify its "
            f"revision by; as it is, it does not fit {self.owner}: " + "; ".join(differences),
            hint="if it was saved at an older revision, record which in the file "
            "('ckptmigrate stamp CKPT REV', or 'ckptmigrate upgrade CKPT --from REV'), or record "
            "the base schema once ('ckptmigrate schema --record') so that unstamped "
            "checkpoints are identified; if the model changed without a migration, write it "
            "with 'ckptmigrate revision --autogenerate -m \"...\"'",
        )

    # ----------------------------------------------------------------- state dicts

    def current(
        self, sub: Mapping[str, Any], meta: Mapping[str, Any] | None, where: str
    ) -> tuple[str, ...] | None:
        """The revisions a (sub-)state dict is at: its stamp, else its schema; None if unknown."""
        stamp = read_stamp(meta, where)
        rmap = self.script_dir.revision_map
        if stamp is not None:
            unknown = [r for r in stamp.revisions if not rmap.knows(r)]
            if unknown:
                raise LoadError(
                    f"{where} is at revision {', '.join(unknown)}, unknown to {self.owner}'s "
                    f"lineage (the class is at {self.revision}); it was probably saved by newer "
                    "code",
                    hint="update your code (git pull) or downgrade the checkpoint with the newer "
                    f"code: ckptmigrate downgrade CKPT {self.revision}",
                )
            return rmap.canonical(stamp.revisions)
        return self.identify(sub, where)

    def identify(self, sub: Mapping[str, Any], where: str) -> tuple[str, ...] | None:
        from ..identify import exact_matches
        from ..runtime.memory import specs_of

        specs = specs_of(sub)
        matches = exact_matches(self.script_dir, Schema.from_specs(specs))
        if not matches:
            return None
        target = self.resolve()
        if (
            len(matches) > 1
            and target is not None
            and target in matches
            and all(self._changes_nothing(specs, m, target) for m in matches if m != target)
        ):
            log.info(
                "%s has no stamp; its schema is that of %s, and migrating from any of them "
                "to %s changes no tensor",
                where,
                ", ".join(m or "base" for m in matches),
                target,
            )
            return (target,)
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

    def _changes_nothing(
        self, specs: Mapping[str, TensorSpec | None], start: str | None, target: str
    ) -> bool:
        """Whether bringing ``specs`` from ``start`` to ``target`` leaves every tensor as is."""
        from ..runtime.memory import direction
        from ..runtime.migration import downgrade_steps, run_steps, upgrade_steps

        rmap = self.script_dir.revision_map
        current = (start,) if start else ()
        way = direction(rmap, current, target)
        if way not in ("upgrade", "downgrade"):
            return way == "none"
        steps = (upgrade_steps if way == "upgrade" else downgrade_steps)(
            self.script_dir, current, target
        )
        state = PlanState.from_schema(specs)
        try:
            run_steps(steps, state, current, rmap, symbolic=True)
        except CkptMigrateError:
            return False  # the ambiguity error says more than this step's failure
        return set(state.entries) == set(specs) and all(
            isinstance(node, Source) and node.key == key for key, node in state.entries.items()
        )
