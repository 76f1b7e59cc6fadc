"""The configured model (``model = package.module:build_model``), built without weights.

``check``, ``diff``, autogenerate, the training-state migration and the key
order of written files all ask the same question: what does the current model
class's state dict look like? The answer is read from the model built on the
``meta`` device, so even a huge model costs milliseconds and no memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config
from .errors import CkptMigrateError, CommandError
from .schema import Schema


@dataclass(frozen=True)
class ConfiguredModel:
    """The model ``model =`` names: its schema, the module (on meta) and the setting's text."""

    schema: Schema
    module: torch.nn.Module
    spec: str


def build_on_meta(factory: Callable[[], Any], name: str) -> torch.nn.Module:
    """Build the model without allocating weights (fall back to CPU if it must)."""
    try:
        with torch.device("meta"):
            model = factory()
    except Exception:
        try:
            model = factory()
        except Exception as exc:
            raise CkptMigrateError(
                f"building the model ({name}) failed: {type(exc).__name__}: {exc}",
                hint="make `model =` point at a function that returns an nn.Module",
            ) from exc
    if not isinstance(model, torch.nn.Module):
        raise CkptMigrateError(
            f"{name} returned {type(model).__name__}, not an nn.Module",
            hint="make `model =` point at a function or class that returns an nn.Module",
        )
    return model


def configured_model(config: Config) -> ConfiguredModel:
    """The configured model; an error naming the setting when there is none.

    Built once per configuration (a batch of checkpoints asks for every one).
    """
    found = config.memo.get("model")
    if isinstance(found, ConfiguredModel):
        return found
    factory = config.model_factory()
    spec = config.get("model") or ""
    if factory is None:
        where = config.file or "the configuration"
        raise CommandError(
            f"no model configured in [{config.section}] of {where}",
            hint="add 'model = package.module:build_model' (a function or class "
            "returning your nn.Module)",
        )
    module = build_on_meta(factory, spec)
    built = config.memo["model"] = ConfiguredModel(Schema.from_module(module), module, spec)
    return built


def configured_model_or_none(config: Config) -> ConfiguredModel | None:
    """The configured model, or None when ``model =`` is not set."""
    return configured_model(config) if config.get("model") else None
