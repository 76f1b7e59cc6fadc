"""Seeds: whose random numbers new values get, for revisions written by ``squash``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch

from ...plan.nodes import seed_for
from ..checks import OpContext
from ..registry import Operation, register


@register
class SeedsOf(Operation):
    """Inside ``with op.seeds_of(revision):`` new values are drawn as ``revision`` drew them.

    A squashed revision writes the ops of the revisions it replaces in such
    blocks, so every initialised tensor and every module a script builds gets
    exactly the values the replaced revision gave it. Blocks for the same
    revision continue one random stream, as its own ``upgrade()`` did.
    """

    name = "seeds_of"
    touches_data = False

    def record(self, ctx: OpContext, revision: str) -> AbstractContextManager[None]:
        if not isinstance(revision, str) or not revision:
            raise ctx.fail(ctx.call(self, revision), "name the revision whose values to draw")
        return _drawing_as(ctx, revision)


@contextmanager
def _drawing_as(ctx: OpContext, revision: str) -> Iterator[None]:
    generator = torch.default_generator
    outer = (ctx.seed_revision, generator.get_state())
    saved = ctx.rng_states.get(revision)
    if saved is None:
        generator.manual_seed(seed_for(revision, ctx.direction))
    else:
        generator.set_state(saved)
    ctx.seed_revision = revision
    try:
        yield
    finally:
        ctx.rng_states[revision] = generator.get_state()
        ctx.seed_revision = outer[0]
        generator.set_state(outer[1])
