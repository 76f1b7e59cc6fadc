"""PEFT LoRA adapters follow their base model's lineage, checked with the real ``peft``.

The base model is GPT-2 built from a tiny config (2 layers, width 32), whose
attention has one fused ``c_attn`` (a ``Conv1D``, stored ``[in, out]``). A
custom class keeps GPT-2 but splits ``c_attn`` into ``q``/``k``/``v``
``nn.Linear`` modules (stored ``[out, in]``). The lineage between them splits
the fused weight along its output dim and transposes the parts. An adapter
trained on one layout, migrated with the command line, must compute what the
original pair computes on the other layout, and merge into the same weights.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from tests.conftest import Run
from tests.harness.common import write_project
from torch import nn

from ckptmigrate.schema import Schema, write_base_schema

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

INITIAL, SPLIT = "aaaa00000001", "bbbb00000002"
GPT2 = {
    "n_layer": 2,
    "n_embd": 32,
    "n_head": 2,
    "vocab_size": 50,
    "n_positions": 16,
    "bos_token_id": 0,
    "eos_token_id": 0,
}

SPLIT_UP = """\
for i in range(2):
    p = f"transformer.h.{i}.attn.c_attn."
    parts = [p + n + ".weight" for n in "qkv"]
    op.split(p + "weight", into=parts, dim=1)
    for key in parts:
        op.transpose(key, 0, 1)
    op.split(p + "bias", into=[p + n + ".bias" for n in "qkv"])
"""
SPLIT_DOWN = """\
for i in range(2):
    p = f"transformer.h.{i}.attn.c_attn."
    parts = [p + n + ".weight" for n in "qkv"]
    for key in parts:
        op.transpose(key, 0, 1)
    op.concat(parts, into=p + "weight", dim=1)
    op.concat([p + n + ".bias" for n in "qkv"], into=p + "bias")
"""


class SplitQKV(nn.Module):
    """GPT-2's fused ``c_attn`` as three ``nn.Linear`` modules (same output, concatenated)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


class SplitGPT2(GPT2LMHeadModel):
    """The new layout of the base model: GPT-2 with q/k/v as separate Linear modules."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config)
        for block in self.transformer.h:
            block.attn.c_attn = SplitQKV(config.n_embd)


def fused() -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(**GPT2)).eval()


def split() -> SplitGPT2:
    return SplitGPT2(GPT2Config(**GPT2)).eval()


@pytest.fixture(autouse=True)
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers/peft notes about the tiny config
        yield


def two_revisions(root: Path, base: nn.Module, up: str, down: str = "pass") -> None:
    """INITIAL (``base`` as saved; its schema recorded, its weights in base.pt) -> SPLIT."""
    write_project(root, [(INITIAL, None, "pass", "pass"), (SPLIT, INITIAL, up, down)])
    write_base_schema(root / "migrations", Schema.from_module(base), type(base).__name__)
    torch.save(base.state_dict(), root / "base.pt")


@pytest.fixture
def lineage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """INITIAL (GPT-2 as saved) -> SPLIT (q/k/v Linear); the base schema recorded."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    two_revisions(tmp_path, fused(), SPLIT_UP, SPLIT_DOWN)
    return tmp_path


def trained_fused(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return fused()


def save_adapter(model: nn.Module, folder: Path, **config: Any) -> Path:
    """A LoRA adapter with random (not PEFT's zero-B) factors, as if trained."""
    options = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **config}
    get_peft_model(model, LoraConfig(**options)).save_pretrained(str(folder))
    return folder


def adapter_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "adapter_config.json").read_text())  # type: ignore[no-any-return]


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()


def metadata_of(folder: Path) -> dict[str, str]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        return f.metadata() or {}


def stamp_of(folder: Path) -> str | None:
    return metadata_of(folder).get("ckptmigrate.revision")


def migrated_base(run: Run, base: nn.Module, tmp: Path, *args: str) -> dict[str, torch.Tensor]:
    """The base model's own weights, migrated by the same lineage."""
    torch.save(base.state_dict(), tmp / "base.pt")
    run(
        "upgrade" if not args else args[0],
        str(tmp / "base.pt"),
        *args[1:],
        "-o",
        str(tmp / "b2.pt"),
    )
    return torch.load(tmp / "b2.pt", weights_only=True)  # type: ignore[no-any-return]


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits  # type: ignore[no-any-return]


def adapted(
    model: nn.Module, folder: Path, inputs: torch.Tensor, weights: str | None = None
) -> Any:
    """``model`` (with ``weights`` loaded, a file in the folder above) and the adapter at
    ``folder``, as PEFT loads them, applied to ``inputs``."""
    if weights is not None:
        model.load_state_dict(torch.load(folder.parent / weights, weights_only=True))
    with torch.no_grad():
        return PeftModel.from_pretrained(model.eval(), str(folder)).eval()(inputs)


TOKENS = torch.randint(0, 50, (3, 12), generator=torch.Generator().manual_seed(7))


# --------------------------------------------------------------------------- fused -> split


def test_fused_to_split_conv1d_adapter_on_linear_modules(lineage: Path, run: Run) -> None:
    base = trained_fused()
    save_adapter(base, lineage / "adapter", target_modules=["c_attn"])
    assert adapter_config(lineage / "adapter")["fan_in_fan_out"] is True  # PEFT's Conv1D

    result = run("upgrade", "adapter", "-o", "adapter2")
    assert "identified by its keys and shapes as aaaa00000001" in result.stderr
    assert "Running upgrade aaaa00000001 -> bbbb00000002" in result.stderr

    config = adapter_config(lineage / "adapter2")
    assert config["target_modules"] == ["k", "q", "v"]
    assert config["fan_in_fan_out"] is False
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (4, 8, {})
    assert stamp_of(lineage / "adapter2") == SPLIT
    assert run("current", "adapter2").stdout.strip() == f"{SPLIT} (head)"

    old = PeftModel.from_pretrained(base, str(lineage / "adapter")).eval()
    new_base = split()
    new_base.load_state_dict(migrated_base(run, trained_fused(), lineage))
    new = PeftModel.from_pretrained(new_base, str(lineage / "adapter2")).eval()
    with_adapter = logits(old, TOKENS)
    assert (with_adapter - logits(trained_fused(), TOKENS)).abs().max() > 1e-2  # it does something
    torch.testing.assert_close(logits(new, TOKENS), with_adapter, atol=1e-5, rtol=0)

    merged_old = old.merge_and_unload()
    merged_new = new.merge_and_unload()
    for i in range(2):
        fused_w = merged_old.transformer.h[i].attn.c_attn.weight  # [in, 3 * out]
        parts = merged_new.transformer.h[i].attn.c_attn
        for j, name in enumerate("qkv"):
            want = fused_w[:, 32 * j : 32 * (j + 1)].T
            torch.testing.assert_close(getattr(parts, name).weight, want, atol=1e-6, rtol=0)


def test_split_copies_a_and_splits_b(lineage: Path, run: Run) -> None:
    """Along the output dim: B is cut in three, A copied; no value is recomputed."""
    save_adapter(trained_fused(), lineage / "adapter", target_modules=["c_attn"])
    run("upgrade", "adapter", "-o", "adapter2")
    before = adapter_tensors(lineage / "adapter")
    after = adapter_tensors(lineage / "adapter2")
    src = "base_model.model.transformer.h.0.attn.c_attn."
    for j, name in enumerate("qkv"):
        dst = f"base_model.model.transformer.h.0.attn.c_attn.{name}."
        assert torch.equal(after[dst + "lora_A.weight"], before[src + "lora_A.weight"])
        assert torch.equal(
            after[dst + "lora_B.weight"], before[src + "lora_B.weight"][32 * j : 32 * (j + 1)]
        )


# --------------------------------------------------------------------------- split -> fused


def test_split_to_fused_at_the_summed_rank(lineage: Path, run: Run) -> None:
    torch.manual_seed(1)
    base = split()
    base.load_state_dict(migrated_base(run, trained_fused(), lineage))
    torch.save(base.state_dict(), lineage / "split.pt")
    save_adapter(base, lineage / "adapter", target_modules=["q", "k", "v"])

    run("downgrade", "adapter", INITIAL, "-o", "fused")
    config = adapter_config(lineage / "fused")
    assert config["target_modules"] == ["c_attn"]
    assert config["fan_in_fan_out"] is True
    # three rank-4 adapters at scale 8/4 become one of rank 12 at the same scale
    assert (config["r"], config["lora_alpha"], config["rank_pattern"]) == (12, 24, {})
    tensors = adapter_tensors(lineage / "fused")
    a = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_A.weight"]
    b = tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"]
    assert (tuple(a.shape), tuple(b.shape)) == ((12, 32), (96, 12))
    assert torch.count_nonzero(b[:32, 4:]) == 0  # block-diagonal

    new = PeftModel.from_pretrained(base, str(lineage / "adapter")).eval()
    old_base = fused()
    run("downgrade", "split.pt", INITIAL, "--from", SPLIT, "-o", "fused.pt")
    old_base.load_state_dict(torch.load(lineage / "fused.pt", weights_only=True))
    old = PeftModel.from_pretrained(old_base, str(lineage / "fused")).eval()
    torch.testing.assert_close(logits(old, TOKENS), logits(new, TOKENS), atol=1e-5, rtol=0)


def test_fused_modules_of_different_ranks_get_them_in_the_patterns(lineage: Path, run: Run) -> None:
    """Layer 0's q/k/v at rank 4 fuse at rank 12, layer 1's at rank 2 at rank 6: r covers one,
    rank_pattern/alpha_pattern the other, each at its own scale."""
    torch.manual_seed(6)
    base = split()
    base.load_state_dict(migrated_base(run, trained_fused(), lineage))
    torch.save(base.state_dict(), lineage / "split.pt")
    layer1 = {f"transformer.h.1.attn.c_attn.{n}": 2 for n in "qkv"}
    save_adapter(
        base,
        lineage / "adapter",
        target_modules=["q", "k", "v"],
        rank_pattern=layer1,
        alpha_pattern={name: 6 for name in layer1},  # scale 3 there, 2 in layer 0
    )
    new = PeftModel.from_pretrained(base, str(lineage / "adapter")).eval()

    run("downgrade", "adapter", INITIAL, "-o", "fused")
    config = adapter_config(lineage / "fused")
    assert config["target_modules"] == ["c_attn"]
    ranks = {config["r"], *config["rank_pattern"].values()}
    assert ranks == {12, 6} and len(config["rank_pattern"]) == 1

    old_base = fused()
    run("downgrade", "split.pt", INITIAL, "--from", SPLIT, "-o", "fused.pt")
    old_base.load_state_dict(torch.load(lineage / "fused.pt", weights_only=True))
    old = PeftModel.from_pretrained(old_base, str(lineage / "fused")).eval()
    layers = old.base_model.model.transformer.h
    assert [layers[i].attn.c_attn.r["default"] for i in range(2)] == [12, 6]
    assert [layers[i].attn.c_attn.scaling["default"] for i in range(2)] == [2.0, 3.0]
    torch.testing.assert_close(logits(old, TOKENS), logits(new, TOKENS), atol=1e-5, rtol=0)


def test_a_split_module_beside_conv1d_modules_that_stay(lineage: Path, run: Run) -> None:
    """c_attn becomes Linear modules while c_proj stays a Conv1D: PEFT reads each by its type."""
    base = trained_fused()
    save_adapter(base, lineage / "adapter", target_modules=["c_attn", "c_proj"])
    old = PeftModel.from_pretrained(base, str(lineage / "adapter")).eval()
    want = logits(old, TOKENS)
    run("upgrade", "adapter", "-o", "adapter2")
    config = adapter_config(lineage / "adapter2")
    assert config["target_modules"] == ["c_proj", "k", "q", "v"]
    new_base = split()
    new_base.load_state_dict(migrated_base(run, trained_fused(), lineage))
    new = PeftModel.from_pretrained(new_base, str(lineage / "adapter2")).eval()
    torch.testing.assert_close(logits(new, TOKENS), want, atol=1e-5, rtol=0)
    merged_old = old.merge_and_unload().transformer.h[1].attn
    merged_new = new.merge_and_unload().transformer.h[1].attn
    torch.testing.assert_close(
        merged_new.c_proj.weight, merged_old.c_proj.weight, atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        merged_new.c_attn.v.weight, merged_old.c_attn.weight[:, 64:].T, atol=1e-6, rtol=0
    )

    # PEFT's one flag cannot say which square [32, 32] weights are Conv1D; the file says it
    storage = json.loads(metadata_of(lineage / "adapter2")["ckptmigrate.fan_in_fan_out"])
    assert {k: v for k, v in storage.items() if k.startswith("transformer.h.0.")} == {
        "transformer.h.0.attn.c_attn.q": False,
        "transformer.h.0.attn.c_attn.k": False,
        "transformer.h.0.attn.c_attn.v": False,
        "transformer.h.0.attn.c_proj": True,
        "transformer.h.0.mlp.c_proj": True,
    }
    run("downgrade", "adapter2", INITIAL, "-o", "back")
    assert adapter_config(lineage / "back")["fan_in_fan_out"] is True
    assert "ckptmigrate.fan_in_fan_out" not in metadata_of(lineage / "back")  # one storage again
    back = PeftModel.from_pretrained(trained_fused(), str(lineage / "back")).eval()
    torch.testing.assert_close(logits(back, TOKENS), want, atol=1e-5, rtol=0)


def test_parts_at_different_scales_fold_the_ratio_into_b(lineage: Path, run: Run) -> None:
    torch.manual_seed(2)
    base = split()
    base.load_state_dict(migrated_base(run, trained_fused(), lineage))
    torch.save(base.state_dict(), lineage / "split.pt")
    save_adapter(
        base,
        lineage / "adapter",
        target_modules=["q", "k", "v"],
        rank_pattern={"k": 2},
        alpha_pattern={"k": 6},  # k's scale is 3, q's and v's 2
    )
    run("downgrade", "adapter", INITIAL, "-o", "fused")
    config = adapter_config(lineage / "fused")
    assert (config["r"], config["lora_alpha"]) == (10, 20)  # scale 2 for all ten ranks

    new = PeftModel.from_pretrained(base, str(lineage / "adapter")).eval()
    old_base = fused()
    run("downgrade", "split.pt", INITIAL, "--from", SPLIT, "-o", "fused.pt")
    old_base.load_state_dict(torch.load(lineage / "fused.pt", weights_only=True))
    old = PeftModel.from_pretrained(old_base, str(lineage / "fused")).eval()
    torch.testing.assert_close(logits(old, TOKENS), logits(new, TOKENS), atol=1e-5, rtol=0)
    merged = old.merge_and_unload().transformer.h[0].attn.c_attn.weight
    parts = new.merge_and_unload().transformer.h[0].attn.c_attn
    torch.testing.assert_close(merged[:, 32:64].T, parts.k.weight, atol=1e-6, rtol=0)


def test_a_split_undone_in_the_same_run_keeps_the_rank(lineage: Path, run: Run) -> None:
    """Upgrading and downgrading in one lineage walk is not needed for this: the
    adapter's q/k/v, cut from one delta in one run, join back at rank r."""
    (lineage / "migrations" / "versions" / "cccc00000003.py").write_text(
        (lineage / "migrations" / "versions" / f"{SPLIT}.py")
        .read_text()
        .replace(f"revision = {SPLIT!r}", "revision = 'cccc00000003'")
        .replace(f"down_revision = {INITIAL!r}", f"down_revision = {SPLIT!r}")
        .replace("def upgrade", "def _up")
        .replace("def downgrade", "def upgrade")
        .replace("def _up", "def downgrade")
    )
    save_adapter(trained_fused(), lineage / "adapter", target_modules=["c_attn"])
    run("upgrade", "adapter", "-o", "adapter3")
    before = adapter_tensors(lineage / "adapter")
    after = adapter_tensors(lineage / "adapter3")
    assert adapter_config(lineage / "adapter3")["r"] == 4
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


# --------------------------------------------------------------------------- renames


class Small(nn.Module):
    """A model with an embedding, a Linear, a LayerNorm and a head."""

    names = ("emb", "proj", "norm", "head")

    def __init__(self) -> None:
        super().__init__()
        emb, proj, norm, head = self.names
        setattr(self, emb, nn.Embedding(20, 8))
        setattr(self, proj, nn.Linear(8, 8))
        setattr(self, norm, nn.LayerNorm(8))
        setattr(self, head, nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb, proj, norm, head = (getattr(self, n) for n in self.names)
        return head(norm(proj(emb(x))))  # type: ignore[no-any-return]


class SmallRenamed(Small):
    names = ("tokens", "mix", "ln", "out")


RENAME_UP = """\
op.rename_prefix("emb.", "tokens.")
op.rename_prefix("proj.", "mix.")
op.rename_prefix("norm.", "ln.")
op.rename_prefix("head.", "out.")
"""
RENAME_DOWN = """\
op.rename_prefix("out.", "head.")
op.rename_prefix("ln.", "norm.")
op.rename_prefix("mix.", "proj.")
op.rename_prefix("tokens.", "emb.")
"""


def test_renames_carry_the_adapter_bit_for_bit(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    base = Small().eval()
    two_revisions(tmp_path, base, RENAME_UP, RENAME_DOWN)
    save_adapter(
        base, tmp_path / "adapter", target_modules=["emb", "proj"], modules_to_save=["norm"]
    )
    before = adapter_tensors(tmp_path / "adapter")
    tokens = torch.randint(0, 20, (4, 6))
    want = adapted(base, tmp_path / "adapter", tokens)

    run("upgrade", "adapter")  # in place
    after = adapter_tensors(tmp_path / "adapter")
    names = {"emb.": "tokens.", "proj.": "mix.", "norm.": "ln."}
    renamed = {}
    for key, value in before.items():
        module = key.removeprefix("base_model.model.")
        for old, new in names.items():
            module = new + module[len(old) :] if module.startswith(old) else module
        renamed["base_model.model." + module] = value
    assert sorted(after) == sorted(renamed)
    for key, value in renamed.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    config = adapter_config(tmp_path / "adapter")
    assert config["target_modules"] == ["mix", "tokens"]
    assert config["modules_to_save"] == ["ln"]
    assert stamp_of(tmp_path / "adapter") == SPLIT

    run("upgrade", "base.pt", "--from", INITIAL, "-o", "b2.pt")
    assert torch.equal(adapted(SmallRenamed(), tmp_path / "adapter", tokens, "b2.pt"), want)

    run("downgrade", "adapter", INITIAL)
    back = adapter_tensors(tmp_path / "adapter")
    assert sorted(back) == sorted(before)
    for key, value in before.items():
        assert torch.equal(back[key], value), key
    config = adapter_config(tmp_path / "adapter")
    assert sorted(config["target_modules"]) == ["emb", "proj"]
    assert config["modules_to_save"] == ["norm"]


# --------------------------------------------------------------------------- refusals


MAP_UP = """\
op.map_tensor("transformer.h.1.attn.c_attn.weight", lambda t: t * 2)
"""


def test_an_op_without_exact_counterpart_is_refused(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    two_revisions(tmp_path, fused(), MAP_UP)
    save_adapter(trained_fused(), tmp_path / "adapter", target_modules=["c_attn"])
    files = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}

    result = run("upgrade", "adapter", "--from", INITIAL, code=1)
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: revision {SPLIT} (migrations/versions/{SPLIT}.py): ")
    assert "map_tensor('transformer.h.1.attn.c_attn.weight', <lambda>)" in error
    assert "base_model.model.transformer.h.1.attn.c_attn (lora_A/lora_B)" in error
    assert "drop that adapter module" in error and "merge_and_unload()" in error
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == files


def test_an_op_on_weights_the_adapter_does_not_touch_is_fine(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    two_revisions(tmp_path, fused(), MAP_UP)
    save_adapter(trained_fused(), tmp_path / "adapter", target_modules=["c_proj"])
    before = adapter_tensors(tmp_path / "adapter")
    run("upgrade", "adapter", "--from", INITIAL)
    after = adapter_tensors(tmp_path / "adapter")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert stamp_of(tmp_path / "adapter") == SPLIT


# --------------------------------------------------------------------------- experts


class ExpertList(nn.Module):
    """Three experts as a ModuleList of Linear layers (each output summed, for the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 6, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(e(x) for e in self.experts)  # type: ignore[return-value]


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 6, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("eoi,ni->no", self.w, x)


class ExpertStack(nn.Module):
    """The same experts as one [E, out, in] parameter (PEFT adapts it with target_parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = Stacked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x)  # type: ignore[no-any-return]


STACK_UP = 'op.stack([f"experts.{i}.weight" for i in range(3)], into="experts.w")'
STACK_DOWN = 'op.unstack("experts.w", into=[f"experts.{i}.weight" for i in range(3)])'


def test_experts_stacked_into_a_parameter_adapter_and_back(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(4)
    base = ExpertList().eval()
    two_revisions(tmp_path, base, STACK_UP, STACK_DOWN)
    # experts of different ranks and scales: one rank for the stack, the ratio folded into B
    save_adapter(
        base,
        tmp_path / "adapter",
        target_modules=["experts.0", "experts.1", "experts.2"],
        rank_pattern={"experts.1": 3},
        alpha_pattern={"experts.2": 2},
    )
    x = torch.randn(5, 4)
    want = adapted(base, tmp_path / "adapter", x)

    run("upgrade", "adapter", "-o", "stacked")
    config = adapter_config(tmp_path / "stacked")
    assert config["target_parameters"] == ["experts.w"]
    assert config["target_modules"] == []
    tensors = adapter_tensors(tmp_path / "stacked")
    # ranks 4, 3 and 4: one rank, 4, for the stack; [E * r, in] and [out, r * E]
    assert tensors["base_model.model.experts.lora_A.weight"].shape == (12, 4)
    assert tensors["base_model.model.experts.lora_B.weight"].shape == (6, 12)
    assert (config["r"], config["lora_alpha"]) == (4, 8)

    run("upgrade", "base.pt", "--from", INITIAL, "-o", "b2.pt")
    got = adapted(ExpertStack(), tmp_path / "stacked", x, "b2.pt")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    run("downgrade", "stacked", INITIAL, "-o", "unstacked")
    config = adapter_config(tmp_path / "unstacked")
    assert config["target_modules"] == ["0", "1", "2"]
    assert config["target_parameters"] is None
    again = adapted(ExpertList(), tmp_path / "unstacked", x, "base.pt")
    torch.testing.assert_close(again, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- where an adapter is


def test_current_stamp_and_claims(lineage: Path, run: Run) -> None:
    save_adapter(trained_fused(), lineage / "adapter", target_modules=["c_attn"])
    result = run("current", "adapter")
    assert result.stdout.strip() == f"{INITIAL} (identified by its keys and shapes)"
    assert result.stderr.strip() == (
        f"Note: adapter has no stamp; identified by its keys and shapes as {INITIAL}"
    )

    result = run("upgrade", "adapter", "--from", SPLIT, code=1)
    assert result.stderr.strip() == (
        f"Error: adapter is not at {SPLIT} (--from says so): its modules do not fit the base "
        "model's schema there (base_model.model.transformer.h.0.attn.c_attn adapts "
        "transformer.h.0.attn.c_attn.weight, which is no tensor of the model; "
        "base_model.model.transformer.h.1.attn.c_attn adapts "
        "transformer.h.1.attn.c_attn.weight, which is no tensor of the model); it fits base, "
        f"{INITIAL}; pass --from REV (or --force if you are sure)"
    )
    assert run("stamp", "adapter", SPLIT, code=1).stderr.startswith(
        f"Error: adapter is not at {SPLIT} (stamp says so)"
    )
    run("stamp", "adapter", INITIAL)
    assert stamp_of(lineage / "adapter") == INITIAL
    assert run("current", "adapter").stdout.strip() == INITIAL
    run("upgrade", "adapter")
    assert run("current", "adapter").stdout.strip() == f"{SPLIT} (head)"
    assert adapter_config(lineage / "adapter")["target_modules"] == ["k", "q", "v"]


def test_dry_run_shows_the_plan_and_writes_nothing(lineage: Path, run: Run) -> None:
    save_adapter(trained_fused(), lineage / "adapter", target_modules=["c_attn"])
    files = {p.name: p.read_bytes() for p in (lineage / "adapter").iterdir()}
    out = run("upgrade", "adapter", "--dry-run").stdout
    assert out.startswith(f"Plan for adapter: {INITIAL} -> {SPLIT}, 1 step (dry run")
    tail = out[out.index("Adapter modules") :].splitlines()
    assert tail[:2] == [
        f"Adapter modules, upgrade {INITIAL} -> {SPLIT}, step {SPLIT}:",
        "    base_model.model.transformer.h.0.attn.c_attn -> "
        "transformer.h.0.attn.c_attn.q.weight (rank 4)",
    ]
    assert tail[-3:] == [
        "adapter_config.json:",
        "    fan_in_fan_out: true -> false",
        '    target_modules: ["c_attn"] -> ["k", "q", "v"]',
    ]
    assert {p.name: p.read_bytes() for p in (lineage / "adapter").iterdir()} == files


def test_an_adapter_needs_the_base_schema(lineage: Path, run: Run) -> None:
    save_adapter(trained_fused(), lineage / "adapter", target_modules=["c_attn"])
    (lineage / "migrations" / "base_schema.txt").unlink()
    error = run("upgrade", "adapter", "--from", INITIAL, code=1).stderr.strip()
    assert error.startswith("Error: no base schema recorded for this lineage")
    assert "migrating a PEFT adapter runs the lineage on its base model's schema" in error


def test_not_an_adapter_of_this_model(lineage: Path, run: Run) -> None:
    save_adapter(Small(), lineage / "adapter", target_modules=["proj"])
    error = run("upgrade", "adapter", code=1).stderr.strip()
    assert error.startswith(
        "Error: adapter has no stamp, and its modules fit the base model at no revision"
    )
    assert "base_model.model.proj adapts proj.weight, which is no tensor of the model" in error


# --------------------------------------------------------------------------- kinds of adapters


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_dora_and_lora_bias_follow_the_split(lineage: Path, run: Run, kind: str) -> None:
    options = {"use_dora": True} if kind == "dora" else {"lora_bias": True}
    base = trained_fused()
    save_adapter(base, lineage / "adapter", target_modules=["c_attn"], **options)
    run("upgrade", "adapter", "-o", "adapter2")
    tensors = adapter_tensors(lineage / "adapter2")
    name = "lora_magnitude_vector" if kind == "dora" else "lora_B.bias"
    assert tensors[f"base_model.model.transformer.h.0.attn.c_attn.q.{name}"].shape == (32,)
    old = PeftModel.from_pretrained(base, str(lineage / "adapter")).eval()
    new_base = split()
    new_base.load_state_dict(migrated_base(run, trained_fused(), lineage))
    new = PeftModel.from_pretrained(new_base, str(lineage / "adapter2")).eval()
    torch.testing.assert_close(logits(new, TOKENS), logits(old, TOKENS), atol=1e-5, rtol=0)


class SmallBig(Small):
    """Small with a vocabulary of 25 (the first 20 entries as before)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(25, 8)


def test_a_grown_vocabulary_pads_the_embedding_adapter(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(5)
    base = Small().eval()
    grow = 'op.resize("emb.weight", (25, 8))'
    two_revisions(tmp_path, base, grow, 'op.resize("emb.weight", (20, 8), intended=True)')
    save_adapter(base, tmp_path / "adapter", target_modules=["emb"])
    tokens = torch.randint(0, 20, (4, 6))
    want = adapted(base, tmp_path / "adapter", tokens)
    run("upgrade", "adapter", "-o", "big")
    a = adapter_tensors(tmp_path / "big")["base_model.model.emb.lora_embedding_A"]
    assert a.shape == (4, 25) and torch.count_nonzero(a[:, 20:]) == 0
    run("upgrade", "base.pt", "--from", INITIAL, "-o", "b2.pt")
    got = adapted(SmallBig(), tmp_path / "big", tokens, "b2.pt")
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    error = run("downgrade", "big", INITIAL, code=1).stderr
    assert "shrinks dim 0 from 25 to 20" in error


def test_a_bin_adapter_stays_a_bin_adapter(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    base = Small().eval()
    two_revisions(tmp_path, base, RENAME_UP, RENAME_DOWN)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "adapter"), safe_serialization=False)
    before = torch.load(tmp_path / "adapter" / "adapter_model.bin", weights_only=True)
    run("upgrade", "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.bin",
    ]
    after = torch.load(tmp_path / "adapter" / "adapter_model.bin", weights_only=True)
    assert after._metadata[""]["ckptmigrate.revision"] == SPLIT
    for key, value in before.items():
        assert torch.equal(after[key.replace(".proj.", ".mix.")], value)
    assert run("current", "adapter").stdout.strip() == f"{SPLIT} (head)"


# --------------------------------------------------------------------------- Python


def test_the_python_api_takes_adapter_folders(lineage: Path) -> None:
    import ckptmigrate

    save_adapter(trained_fused(), lineage / "adapter", target_modules=["c_attn"])
    result = ckptmigrate.upgrade("adapter", location="migrations", output="adapter2")
    assert (result.from_revisions, result.to_revisions) == ((INITIAL,), (SPLIT,))
    assert ckptmigrate.current("adapter2", location="migrations") == (SPLIT,)
    ckptmigrate.downgrade("adapter2", INITIAL, location="migrations")
    assert adapter_config(lineage / "adapter2")["target_modules"] == ["c_attn"]


VERSIONED = """\
import ckptmigrate
from tests.test_peft import SplitGPT2


@ckptmigrate.versioned("migrations")
class VersionedSplit(SplitGPT2):
    pass
"""


def test_from_pretrained_migrates_an_old_adapter_for_a_versioned_base(
    lineage: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from ckptmigrate.integration.peft import from_pretrained

    base = trained_fused()
    torch.save(base.state_dict(), lineage / "base.pt")
    save_adapter(base, lineage / "adapter", target_modules=["c_attn"])
    files = {p.name: p.read_bytes() for p in (lineage / "adapter").iterdir()}
    (lineage / "versioned_split.py").write_text(VERSIONED)
    monkeypatch.syspath_prepend(str(lineage))
    from versioned_split import VersionedSplit  # type: ignore[import-not-found]

    model = VersionedSplit(GPT2Config(**GPT2)).eval()
    with caplog.at_level(logging.INFO, logger="ckptmigrate"):
        model.load_state_dict(torch.load(lineage / "base.pt", weights_only=True))  # upgraded
        peft_model = from_pretrained(model, lineage / "adapter").eval()
    assert f"migrated the adapter {lineage / 'adapter'} from {INITIAL} to {SPLIT}" in caplog.text
    want = logits(PeftModel.from_pretrained(trained_fused(), str(lineage / "adapter")), TOKENS)
    torch.testing.assert_close(logits(peft_model, TOKENS), want, atol=1e-5, rtol=0)
    assert {p.name: p.read_bytes() for p in (lineage / "adapter").iterdir()} == files


def test_diff_and_schema_record_refuse_an_adapter(lineage: Path, run: Run) -> None:
    save_adapter(trained_fused(), lineage / "adapter", target_modules=["c_attn"])
    error = run("diff", "adapter", code=1).stderr.strip()
    assert error == (
        "Error: adapter is a PEFT adapter: diff compares a model's checkpoint with the model; "
        "'ckptmigrate current adapter' says which revision it is at, and 'ckptmigrate upgrade "
        "adapter --dry-run' what upgrading does to it"
    )
    error = run("schema", "--record", "adapter", "--from", INITIAL, code=1).stderr
    assert "adapter is a PEFT adapter, which holds only part of its base model" in error


def test_o_writes_a_new_folder_with_the_other_files(lineage: Path, run: Run) -> None:
    save_adapter(trained_fused(), lineage / "adapter", target_modules=["c_attn"])
    (lineage / "adapter" / "tokenizer.json").write_text("{}")
    (lineage / "out").mkdir()
    run("upgrade", "adapter", "-o", "out/new")  # a new folder in an existing one
    assert sorted(p.name for p in (lineage / "out" / "new").iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
    ]
    assert os.stat(lineage / "out/new/tokenizer.json").st_nlink == 1  # a copy of its own
    assert stamp_of(lineage / "adapter") is None  # the input is left alone
    (lineage / "other").mkdir()
    (lineage / "other" / "notes.txt").write_text("mine")
    error = run("upgrade", "adapter", "-o", "other", code=1).stderr
    assert "cannot write a PEFT adapter into other: the folder holds other files" in error
    error = run("upgrade", "adapter", "-o", "missing/new", code=1).stderr
    assert "folder missing does not exist" in error
