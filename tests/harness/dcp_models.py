"""A tiny transformer in two layouts and the lineage between them, for the DCP tests.

``TinyV1`` is the layout a job trained and saved with DCP; ``TinyV2`` is the
current class: ``block.`` became ``layers.0.``, the fused ``qkv`` is split
into ``q``/``k``/``v``, ``gate`` and ``up`` are fused into ``gate_up``, the
vocabulary grew from 10 to 12 rows, ``head`` became ``lm_head`` and the
unused ``old_scale`` was dropped. ``TinyV2.forward`` computes exactly what
``TinyV1.forward`` computes on the same trained values (the same matmuls on
the same numbers), so a migrated run's losses can be compared bit for bit.

Used by the pytest tests and by the ``torchrun`` job (``tests.harness.dcp_job``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import write_revision

DIM, VOCAB, NEW_VOCAB, HIDDEN = 8, 10, 12, 16
REV_V1 = "d1c0aa000001"
REV_V2 = "d2c0bb000002"

UPGRADE = """\
op.rename_prefix("block.", "layers.0.")
for part in ("weight", "bias"):
    qkv = [f"layers.0.{name}.{part}" for name in ("q", "k", "v")]
    op.split(f"layers.0.qkv.{part}", into=qkv)
op.concat(["layers.0.gate.weight", "layers.0.up.weight"], into="layers.0.gate_up.weight")
op.concat(["layers.0.gate.bias", "layers.0.up.bias"], into="layers.0.gate_up.bias")
op.resize("embed.weight", (12, 8))
op.rename_prefix("head.", "lm_head.")
op.drop_key("old_scale", intended=True)
"""

DOWNGRADE = """\
op.add_tensor("old_scale", (8,), init="ones")
op.rename_prefix("lm_head.", "head.")
op.resize("embed.weight", (10, 8), intended=True)
op.split("layers.0.gate_up.bias", into=["layers.0.gate.bias", "layers.0.up.bias"])
op.split("layers.0.gate_up.weight", into=["layers.0.gate.weight", "layers.0.up.weight"])
for part in ("bias", "weight"):
    qkv = [f"layers.0.{name}.{part}" for name in ("q", "k", "v")]
    op.concat(qkv, into=f"layers.0.qkv.{part}")
op.rename_prefix("layers.0.", "block.")
"""

#: A lineage that only renames and drops: TinyV1 -> TinyRenamed.
RENAMES_UP = """\
op.rename_prefix("block.", "layers.0.")
op.rename_prefix("head.", "lm_head.")
op.drop_key("old_scale", intended=True)
"""
RENAMES_DOWN = """\
op.add_tensor("old_scale", (8,), init="ones")
op.rename_prefix("lm_head.", "head.")
op.rename_prefix("layers.0.", "block.")
"""


def write_project(root: Path, up: str = UPGRADE, down: str = DOWNGRADE) -> Path:
    """``alembic_style.ini`` and ``migrations/`` with the two revisions; returns the folder."""
    folder = root / "migrations"
    versions = folder / "versions"
    write_revision(versions, REV_V1, None, doc="the layout as trained")
    write_revision(versions, REV_V2, REV_V1, up, down, doc="layers, fused mlp")
    (root / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\n", encoding="utf-8"
    )
    return folder


class _Attention(nn.Module):
    def attend(self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(h, w, b).chunk(3, dim=-1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(DIM)
        mask = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).triu(1)
        return scores.masked_fill(mask, float("-inf")).softmax(-1) @ v


class BlockV1(_Attention):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.out = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.gate = nn.Linear(DIM, HIDDEN)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h + self.out(self.attend(h, self.qkv.weight, self.qkv.bias)))
        gate = F.linear(h, self.gate.weight, self.gate.bias)
        up = F.linear(h, self.up.weight, self.up.bias)
        return h + self.down(F.silu(gate) * up)


class BlockV2(_Attention):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.k = nn.Linear(DIM, DIM)
        self.v = nn.Linear(DIM, DIM)
        self.out = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.gate_up = nn.Linear(DIM, 2 * HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        b = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        h = self.norm(h + self.out(self.attend(h, w, b)))
        wg, wu = self.gate_up.weight.split(HIDDEN)
        bg, bu = self.gate_up.bias.split(HIDDEN)
        return h + self.down(F.silu(F.linear(h, wg, bg)) * F.linear(h, wu, bu))


class TinyV1(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.block = BlockV1()
        self.head = nn.Linear(DIM, VOCAB)
        self.old_scale = nn.Parameter(torch.ones(DIM))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids)))  # old_scale is unused


class TinyV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(NEW_VOCAB, DIM)
        self.layers = nn.ModuleList([BlockV2()])
        self.lm_head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.layers[0](self.embed(ids)))


class TinyRenamed(nn.Module):
    """TinyV1 after the renames-only lineage: same blocks, new names, no ``old_scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.layers = nn.ModuleList([BlockV1()])
        self.lm_head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.layers[0](self.embed(ids)))


def renamed(key: str) -> str:
    """A TinyV1 key as the renames-only lineage names it."""
    if key.startswith("block."):
        return "layers.0." + key[len("block.") :]
    if key.startswith("head."):
        return "lm_head." + key[len("head.") :]
    return key


def batch(step: int) -> torch.Tensor:
    """The same token ids on every rank and every run (ids below the old vocabulary)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (4, 6), generator=g)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    ids = batch(step)
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> list[float]:
    """Adam steps on the fixed batches; the losses, as Python floats."""
    losses = []
    for step in steps:
        opt.zero_grad()
        loss = loss_of(model, step)
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    return losses


def expected_v2(v1: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the upgrade must make of V1's weights, computed here without ckptmigrate."""
    b = {k[len("block.") :]: t for k, t in v1.items() if k.startswith("block.")}
    out = {"embed.weight": torch.cat([v1["embed.weight"], torch.zeros(2, DIM)])}
    q, k, v = b["qkv.weight"].chunk(3)
    qb, kb, vb = b["qkv.bias"].chunk(3)
    layer = {
        "q.weight": q,
        "q.bias": qb,
        "k.weight": k,
        "k.bias": kb,
        "v.weight": v,
        "v.bias": vb,
        "out.weight": b["out.weight"],
        "out.bias": b["out.bias"],
        "norm.weight": b["norm.weight"],
        "norm.bias": b["norm.bias"],
        "gate_up.weight": torch.cat([b["gate.weight"], b["up.weight"]]),
        "gate_up.bias": torch.cat([b["gate.bias"], b["up.bias"]]),
        "down.weight": b["down.weight"],
        "down.bias": b["down.bias"],
    }
    out.update({f"layers.0.{k}": t for k, t in layer.items()})
    out["lm_head.weight"] = v1["head.weight"]
    out["lm_head.bias"] = v1["head.bias"]
    return out
