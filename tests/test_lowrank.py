"""Each op's low-rank counterpart is exact: the delta it derives is the migrated delta.

For a base weight ``W`` with a LoRA delta ``D = scale * B @ A`` (``D^T`` where
the weight is stored ``[in, out]``), a migration maps ``W + D`` to
``m(W) + m(D)`` for every op that moves, cuts, joins or pads values. So the
delta the adapter carries after a step must equal the step applied to ``D``
itself, with zeros for the weights the adapter does not touch. Every case
below runs a real revision twice, on ``D`` (through the plan, as a model's
checkpoint) and on the factors (through each op's ``low_rank``), and compares.
"""

from __future__ import annotations

from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.harness.common import write_project

from ckptmigrate.adapters.follow import Followed, follow
from ckptmigrate.adapters.layout import Copy, Entry
from ckptmigrate.config import Config
from ckptmigrate.errors import OperationError
from ckptmigrate.plan.lowrank import CONV, EMBEDDING, LowRank
from ckptmigrate.plan.nodes import Source, TensorSpec
from ckptmigrate.plan.state import Evaluator
from ckptmigrate.runtime.memory import migrate_state_dict
from ckptmigrate.runtime.migration import upgrade_steps
from ckptmigrate.script.directory import ScriptDirectory

REV = "aaaa00000001"


class Adapter:
    """Factors for some base keys, with their values, as an adapter file would hold them."""

    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.values: dict[str, torch.Tensor] = {}
        self.entries: dict[str, Entry] = {}

    def lora(
        self,
        key: str,
        out: int,
        inp: int,
        rank: int = 2,
        *,
        scale: Fraction | float = Fraction(2),
        transposed: bool = False,
        batch: tuple[int, ...] = (),
        dora: bool = False,
        bias: bool = False,
        kind: str = "linear",
    ) -> None:
        a = self._tensor(f"{key}.A", (*batch, rank, inp))
        b = self._tensor(f"{key}.B", (*batch, out, rank))
        magnitude = self._tensor(f"{key}.m", (*batch, out)) if dora else None
        vector = self._tensor(f"{key}.bias", (*batch, out)) if bias else None
        self.entries[key] = LowRank(
            a, b, scale, transposed, kind, magnitude, vector, (f"base_model.model.{key}",)
        )

    def copy(self, key: str, shape: tuple[int, ...]) -> None:
        self.entries[key] = Copy(self._tensor(f"{key}.copy", shape), f"base_model.model.{key}")

    def _tensor(self, name: str, shape: tuple[int, ...]) -> Source:
        self.values[name] = torch.randn(shape, generator=self.gen, dtype=torch.float64)
        return Source(name, TensorSpec(shape, torch.float64))

    def value(self, node: Any) -> torch.Tensor:
        return Evaluator({"x": node}, self.values.__getitem__)("x")  # type: ignore[no-any-return]

    def delta(self, entry: LowRank) -> torch.Tensor:
        """What the adapter adds to its base weight, in the weight's storage layout."""
        d = float(entry.scale) * (self.value(entry.b) @ self.value(entry.a))
        return d.transpose(-1, -2) if entry.transposed else d


def lineage(tmp_path: Path, up: str) -> ScriptDirectory:
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_project(tmp_path, [(REV, None, up, "pass")])
    return ScriptDirectory.from_config(Config.from_location(tmp_path / "migrations", quiet=True))


def carry(
    tmp_path: Path, up: str, schema: Mapping[str, tuple[int, ...]], adapter: Adapter
) -> tuple[Followed, dict[str, torch.Tensor]]:
    """The adapter after the revision, and the revision run on the deltas themselves."""
    script_dir = lineage(tmp_path, up)
    specs = {k: TensorSpec(s, torch.float64) for k, s in schema.items()}
    followed = follow(upgrade_steps(script_dir, (), REV), specs, adapter.entries)
    deltas = {}
    for key, spec in specs.items():
        entry = adapter.entries.get(key)
        linear = isinstance(entry, LowRank) and entry.kind != CONV
        deltas[key] = adapter.delta(entry) if linear else torch.zeros(spec.shape).double()  # type: ignore[arg-type]
    migrated = migrate_state_dict(script_dir, deltas, {}, (), REV).state_dict
    return followed, dict(migrated)


def assert_exact(
    followed: Followed, migrated: Mapping[str, torch.Tensor], adapter: Adapter
) -> None:
    """Every output delta is the migrated delta; every key without one migrated to zeros."""
    for key, value in migrated.items():
        entry = followed.entries.get(key)
        if isinstance(entry, LowRank):
            assert adapter.delta(entry).shape == value.shape, key
            torch.testing.assert_close(adapter.delta(entry), value, rtol=1e-12, atol=1e-12)
        elif entry is None:
            assert torch.count_nonzero(value) == 0, f"{key} has a delta but no adapter"


def refused(
    tmp_path: Path, up: str, schema: Mapping[str, tuple[int, ...]], adapter: Adapter
) -> str:
    script_dir = lineage(tmp_path, up)
    specs = {k: TensorSpec(s, torch.float64) for k, s in schema.items()}
    with pytest.raises(OperationError) as info:
        follow(upgrade_steps(script_dir, (), REV), specs, adapter.entries)
    return str(info.value)


# --------------------------------------------------------------------------- one weight


@pytest.mark.parametrize("transposed", [False, True])
def test_transpose_keeps_the_factors_and_flips_the_storage(
    tmp_path: Path, transposed: bool
) -> None:
    ad = Adapter()
    ad.lora("w", 6, 4, transposed=transposed)
    shape = (4, 6) if transposed else (6, 4)
    followed, migrated = carry(tmp_path, 'op.transpose("w", 0, 1)', {"w": shape}, ad)
    assert_exact(followed, migrated, ad)
    out = followed.entries["w"]
    assert isinstance(out, LowRank) and out.transposed is not transposed
    assert out.a is ad.entries["w"].a and out.b is ad.entries["w"].b  # type: ignore[union-attr]


def test_flipped_swaps_and_transposes_the_factors(tmp_path: Path) -> None:
    """The same delta stored the other way: B' = A^T, A' = B^T (exact)."""
    ad = Adapter()
    ad.lora("w", 6, 4)
    entry = ad.entries["w"]
    assert isinstance(entry, LowRank)
    flipped = entry.flipped()
    assert flipped.transposed and flipped.shape == entry.shape == (6, 4)
    torch.testing.assert_close(ad.value(flipped.b), ad.value(entry.a).T, rtol=0, atol=0)
    torch.testing.assert_close(ad.value(flipped.a), ad.value(entry.b).T, rtol=0, atol=0)
    torch.testing.assert_close(ad.delta(flipped), ad.delta(entry), rtol=0, atol=1e-15)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dim", [0, 1])
def test_split_cuts_one_factor_and_copies_the_other(
    tmp_path: Path, transposed: bool, dim: int
) -> None:
    ad = Adapter()
    ad.lora("w", 6, 9, transposed=transposed)
    shape = (9, 6) if transposed else (6, 9)
    n = shape[dim] // 3
    up = f'op.split("w", into=["p0", "p1", "p2"], dim={dim})'
    followed, migrated = carry(tmp_path, up, {"w": shape}, ad)
    assert_exact(followed, migrated, ad)
    out_side = (dim == 0) != transposed
    for key in ["p0", "p1", "p2"]:
        part = followed.entries[key]
        assert isinstance(part, LowRank) and part.rank == 2
        kept = part.a if out_side else part.b
        assert kept is getattr(ad.entries["w"], "a" if out_side else "b")
        assert part.shape[dim] == n


def test_resize_grows_with_zero_delta_and_refuses_a_shrink(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("w", 6, 4, bias=True)
    followed, _ = carry(tmp_path, 'op.resize("w", (8, 5), init="normal")', {"w": (6, 4)}, ad)
    # the base weight's new part is random; the delta's is zeros (it has seen no training)
    entry = followed.entries["w"]
    assert isinstance(entry, LowRank) and entry.shape == (8, 5)
    delta = ad.delta(entry)
    torch.testing.assert_close(delta[:6, :4], ad.delta(ad.entries["w"]))  # type: ignore[arg-type]
    assert torch.count_nonzero(delta[6:]) == 0 and torch.count_nonzero(delta[:, 4:]) == 0
    assert torch.count_nonzero(ad.value(entry.bias)[6:]) == 0

    error = refused(tmp_path / "shrink", 'op.resize("w", (6, 3), intended=True)', {"w": (6, 4)}, ad)
    assert "resize('w', (6, 3), intended=True) has no exact counterpart" in error
    assert "shrinks dim 1 from 4 to 3" in error


def test_cast_casts_the_factors(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("w", 6, 4, dora=True)
    followed, _ = carry(tmp_path, 'op.cast("w", torch.float16)', {"w": (6, 4)}, ad)
    entry = followed.entries["w"]
    assert isinstance(entry, LowRank)
    for node in (entry.a, entry.b, entry.magnitude):
        assert ad.value(node).dtype == torch.float16
    error = refused(tmp_path / "int", 'op.cast("w", torch.int8)', {"w": (6, 4)}, ad)
    assert "leaves no floating factors" in error


def test_reshape_is_refused_unless_it_keeps_the_shape(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("w", 6, 4)
    followed, migrated = carry(tmp_path, 'op.reshape("w", (6, 4))', {"w": (6, 4)}, ad)
    assert_exact(followed, migrated, ad)
    error = refused(tmp_path / "other", 'op.reshape("w", (4, 6))', {"w": (6, 4)}, ad)
    assert f"revision {REV}" in error
    assert (
        "reshape('w', (4, 6)) has no exact counterpart for the adapter's base_model.model.w"
        in error
    )
    assert "across the low-rank factors" in error


def test_map_tensor_is_refused(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("w", 6, 4)
    error = refused(tmp_path, 'op.map_tensor("w", lambda t: t * 2)', {"w": (6, 4)}, ad)
    assert "map_tensor('w', <lambda>) has no exact counterpart" in error
    assert "says nothing about what becomes of a low-rank delta" in error


def test_drops_and_additions(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("w", 6, 4)
    ad.lora("v", 6, 4)
    up = """\
op.drop_key("w", intended=True)
op.add_tensor("new", (6, 4), init="normal")
op.rename_key("v", "u")
"""
    followed, _ = carry(tmp_path, up, {"w": (6, 4), "v": (6, 4)}, ad)
    assert list(followed.entries) == ["u"]
    assert followed.entries["u"] is ad.entries["v"]
    assert followed.reports[0].lines == [
        "base_model.model.v -> u (rank 2)",
        "base_model.model.w: dropped with w",
    ]


# --------------------------------------------------------------------------- several weights


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dim", [0, 1])
def test_concat_of_independent_deltas_at_the_summed_rank(
    tmp_path: Path, transposed: bool, dim: int
) -> None:
    ad = Adapter()
    shape = (4, 6) if transposed else (6, 4)
    ad.lora("q", 6, 4, 2, transposed=transposed)
    ad.lora("k", 6, 4, 3, scale=Fraction(3, 2), transposed=transposed)  # folded into its B
    schema = {"q": shape, "k": shape, "v": shape}  # v has no adapter: no delta for its part
    up = f'op.concat(["q", "k", "v"], into="qkv", dim={dim})'
    followed, migrated = carry(tmp_path, up, schema, ad)
    assert_exact(followed, migrated, ad)
    entry = followed.entries["qkv"]
    assert isinstance(entry, LowRank) and entry.rank == 5 and entry.scale == 2


def test_concat_of_a_mixed_storage_flips_the_parts_to_the_first(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("q", 6, 4)
    ad.lora("k", 6, 4, transposed=True)  # a Conv1D-stored part: [4, 6]
    up = 'op.transpose("k", 0, 1)\nop.concat(["q", "k"], into="qk")'
    followed, migrated = carry(tmp_path, up, {"q": (6, 4), "k": (4, 6)}, ad)
    assert_exact(followed, migrated, ad)


def test_split_then_concat_gives_back_the_same_factors(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("w", 6, 4)
    up = 'op.split("w", into=["a", "b"])\nop.concat(["a", "b"], into="w")'
    followed, migrated = carry(tmp_path, up, {"w": (6, 4)}, ad)
    assert_exact(followed, migrated, ad)
    entry, before = followed.entries["w"], ad.entries["w"]
    assert isinstance(entry, LowRank) and isinstance(before, LowRank)
    assert entry.a is before.a and entry.b is before.b  # nothing to compute


def test_dora_magnitude_follows_the_output_dim_only(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("w", 6, 4, dora=True)
    followed, migrated = carry(tmp_path, 'op.split("w", into=["a", "b"])', {"w": (6, 4)}, ad)
    assert_exact(followed, migrated, ad)
    part = followed.entries["b"]
    assert isinstance(part, LowRank) and part.magnitude is not None
    torch.testing.assert_close(ad.value(part.magnitude), ad.values["w.m"][3:])
    error = refused(tmp_path / "in", 'op.split("w", into=["a", "b"], dim=1)', {"w": (6, 4)}, ad)
    assert "DoRA's magnitude is the norm of each output row" in error


# --------------------------------------------------------------------------- experts


def test_stack_and_unstack_experts(tmp_path: Path) -> None:
    ad = Adapter()
    for i in range(3):
        ad.lora(f"e{i}", 6, 4, rank=2 + i % 2, scale=Fraction(2 + i))
    schema = {f"e{i}": (6, 4) for i in range(4)}  # e3 has no adapter: zero factors
    up = 'op.stack(["e0", "e1", "e2", "e3"], into="experts")'
    followed, migrated = carry(tmp_path, up, schema, ad)
    assert_exact(followed, migrated, ad)
    stacked = followed.entries["experts"]
    assert isinstance(stacked, LowRank) and stacked.batch == 1 and stacked.rank == 3

    ad2 = Adapter(1)
    ad2.lora("experts", 6, 4, batch=(3,))
    up = 'op.unstack("experts", into=["x0", "x1", "x2"])\nop.transpose("x1", 0, 1)'
    followed, migrated = carry(tmp_path / "un", up, {"experts": (3, 6, 4)}, ad2)
    assert_exact(followed, migrated, ad2)


def test_experts_permute_and_concat_along_the_expert_dim(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("a", 6, 4, batch=(2,))
    ad.lora("b", 6, 4, batch=(3,), rank=3)
    up = 'op.concat(["a", "b"], into="e")\nop.permute("e", [0, 2, 1])'
    followed, migrated = carry(tmp_path, up, {"a": (2, 6, 4), "b": (3, 6, 4)}, ad)
    assert_exact(followed, migrated, ad)
    error = refused(tmp_path / "mix", 'op.transpose("a", 0, 1)', {"a": (2, 6, 4)}, ad)
    assert "swapping an expert dim with a dim of the weight matrix" in error


# --------------------------------------------------------------------------- other kinds


def test_an_embedding_grows_its_vocabulary(tmp_path: Path) -> None:
    ad = Adapter()
    ad.lora("emb", 8, 20, kind=EMBEDDING, transposed=True)  # weight [num=20, dim=8]
    followed, migrated = carry(tmp_path, 'op.resize("emb", (25, 8))', {"emb": (20, 8)}, ad)
    assert_exact(followed, migrated, ad)
    error = refused(tmp_path / "t", 'op.transpose("emb", 0, 1)', {"emb": (20, 8)}, ad)
    assert "an embedding's adapter (lora_embedding_A/B) stays an embedding's" in error


def test_a_convolution_follows_casts_only(tmp_path: Path) -> None:
    ad = Adapter()
    a = ad._tensor("c.A", (2, 3, 3, 3))
    b = ad._tensor("c.B", (5, 2, 1, 1))
    ad.entries["c"] = LowRank(a, b, Fraction(1), kind=CONV, origin=("base_model.model.c",))
    followed, _ = carry(tmp_path, 'op.cast("c", torch.float32)', {"c": (5, 3, 3, 3)}, ad)
    assert isinstance(followed.entries["c"], LowRank)
    error = refused(
        tmp_path / "s", 'op.split("c", into=["x", "y"], sizes=[2, 3])', {"c": (5, 3, 3, 3)}, ad
    )
    assert "a convolution's adapter follows renames, drops and casts only" in error


def test_saved_copies_follow_the_ops_like_weights(tmp_path: Path) -> None:
    ad = Adapter()
    ad.copy("head", (6, 4))
    ad.lora("w", 6, 4)
    up = 'op.split("head", into=["h0", "h1"])\nop.transpose("h1", 0, 1)'
    followed, _ = carry(tmp_path, up, {"head": (6, 4), "w": (6, 4)}, ad)
    copy = followed.entries["h1"]
    assert isinstance(copy, Copy)
    torch.testing.assert_close(ad.value(copy.node), ad.values["head.copy"][3:].T, rtol=0, atol=0)
    error = refused(
        tmp_path / "mix", 'op.concat(["head", "w"], into="hw")', {"head": (6, 4), "w": (6, 4)}, ad
    )
    assert "it joins a saved module's head and the adapted w" in error
    error = refused(
        tmp_path / "other",
        'op.concat(["head", "x"], into="hx")',
        {"head": (6, 4), "x": (6, 4)},
        ad,
    )
    assert "from x, which the adapter does not hold" in error
