"""``optimizer_state`` in the configuration: migrate (the default), keep or drop.

``migrate`` carries every parameter's state along the plan; the other two are
the way out when it cannot be carried (an optimizer ckptmigrate cannot pair
with the parameters), so the weights still upgrade: ``keep`` writes the state
back unchanged, ``drop`` removes it so training starts with a fresh optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..config import Config
from ..errors import ConfigError
from .optimizer import FoundOptimizer, remove_path

#: The way out when the state cannot be carried, for the end of hints.
ESCAPE = (
    "to upgrade the weights anyway, set optimizer_state = drop (remove the optimizer state) "
    "or keep (carry it unchanged) in the configuration"
)
#: ``optimizer_state`` in the configuration: what to do with optimizer state.
POLICIES = ("migrate", "keep", "drop")


def policy(config: Config) -> str:
    """The configured policy, checked: a typo must not silently mean ``migrate``."""
    value = (config.get("optimizer_state") or "migrate").strip().lower()
    if value not in POLICIES:
        raise ConfigError(
            f"optimizer_state = {value} in [{config.section}] is not one of {', '.join(POLICIES)}",
            hint="use migrate (the default: the state follows its parameters), keep (carry it "
            "unchanged) or drop (remove it from the checkpoint)",
        )
    return value


def keep_or_drop(
    config: Config,
    container: Any,
    found: Sequence[FoundOptimizer],
    chosen: str,
    *,
    dry_run: bool,
) -> Any | None:
    """``optimizer_state = keep``: carried unchanged; ``drop``: removed from the container."""
    say = config.print_stdout if dry_run else config.log
    where = ", ".join(f.label for f in found)
    if chosen == "keep":
        say(f"Optimizer state at {where}: kept unchanged (optimizer_state = keep)")
        return None
    say(f"Optimizer state at {where}: removed (optimizer_state = drop)")
    out = container
    for f in sorted(found, key=lambda f: f.path, reverse=True):
        out = remove_path(out, f.path)
    return None if dry_run else out
