"""Finding the revision of a checkpoint that carries no stamp."""

from __future__ import annotations

from .config import Config
from .errors import StampError
from .formats.checkpoint import Checkpoint
from .paths import display_path
from .script.directory import ScriptDirectory


def identify_or_fail(
    config: Config, script_dir: ScriptDirectory, ckpt: Checkpoint
) -> tuple[str, ...]:
    where = display_path(ckpt.path)
    raise StampError(
        f"{where} has no ckptmigrate stamp, so its revision is unknown",
        hint=f"record it with 'ckptmigrate stamp {where} REV', or pass --from REV",
    )


def identify_current(
    config: Config, script_dir: ScriptDirectory, ckpt: Checkpoint, *, verbose: bool = False
) -> tuple[str, ...]:
    config.log(f"Note: {display_path(ckpt.path)} has no ckptmigrate stamp")
    return ()
