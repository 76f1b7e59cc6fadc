"""A versioned ``PreTrainedModel`` subclass: ``from_pretrained`` upgrades what it reads.

Tiny models built from configs, saved to local folders (nothing is
downloaded). The lineage renames GPT-2's ``transformer.blocks.`` to
``transformer.h.``: plain ``GPT2LMHeadModel.from_pretrained`` on the old
layout "succeeds" with every block random; the versioned class loads it with
no missing, unexpected or mismatched key and the trained model's logits.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from tests.conftest import Run, make_lineage
from tests.harness.common import same

import ckptmigrate
from ckptmigrate.errors import LoadError
from ckptmigrate.formats.safetensors_file import write_safetensors
from ckptmigrate.runtime.memory import specs_of

R1, R2, R3 = "dddd00000001", "dddd00000002", "dddd00000003"
RENAME = ('op.rename_prefix("transformer.blocks.", "transformer.h.")',
          'op.rename_prefix("transformer.h.", "transformer.blocks.")')  # fmt: skip
ADD_EXTRA = ('op.add_tensor("extra.scale", shape=(4,), init="ones")', 'op.drop_key("extra.scale")')
IDS = torch.arange(24).reshape(2, 12) % 100


def gpt2_config() -> Any:
    return transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip


@pytest.fixture
def trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The model as trained, and a lineage: R1 (blocks.) -> R2 (h.) -> R3 (an extra tensor)."""
    monkeypatch.chdir(tmp_path)
    make_lineage(
        tmp_path,
        "migrations",
        None,
        [(R1, None, "pass", "pass"), (R2, R1, *RENAME), (R3, R2, *ADD_EXTRA)],
        ini="alembic_style.ini",
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(gpt2_config()).eval()


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.zeros(4))


class GPT2WithExtra(transformers.GPT2LMHeadModel):  # type: ignore[misc]
    """The model at R3: one more (unused) parameter, which the migration starts at ones."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.extra = Scale()


def versioned(base: type, revision: str) -> Any:
    cls = type(f"V{base.__name__}", (base,), {})
    return ckptmigrate.versioned(Path("migrations").resolve(), revision=revision)(cls)


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits  # type: ignore[no-any-return]


def stored(model: Any) -> dict[str, torch.Tensor]:
    """What save_pretrained stores: the tied lm_head once (as the embedding)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def save_folder(
    folder: Path, sd: dict[str, torch.Tensor], config: Any, *, shards: int, fmt: str,
    stamp: str | None = None,
) -> None:  # fmt: skip
    """A model folder as from_pretrained reads it: one file or ``shards`` and an index."""
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    if stamp is not None:
        data = json.loads((folder / "config.json").read_text())
        data["ckptmigrate"] = {"ckptmigrate.revision": stamp, "ckptmigrate.format": "1.0"}
        (folder / "config.json").write_text(json.dumps(data))
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    keys = list(sd)
    parts = [keys[i::shards] for i in range(shards)]
    names = [f"{stem}.{ext}"] if shards == 1 else [
        f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)
    ]  # fmt: skip
    for name, part in zip(names, parts):
        tensors = {k: sd[k] for k in part}
        if fmt == "safetensors":
            write_safetensors(folder / name, part, specs_of(tensors), tensors.__getitem__,
                              {"format": "pt"}, {})  # fmt: skip
        else:
            torch.save(tensors, folder / name)
    if shards > 1:
        weight_map = {k: name for name, part in zip(names, parts) for k in part}
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index))


def old_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("transformer.h.", "transformer.blocks."): v for k, v in sd.items()}


LAYOUTS = [(1, "safetensors"), (3, "safetensors"), (1, "bin"), (3, "bin")]


@pytest.mark.parametrize(("shards", "fmt"), LAYOUTS, ids=["single", "sharded", "bin", "bin-shards"])
def test_from_pretrained_upgrades_the_stored_layout(
    trained: Any, tmp_path: Path, shards: int, fmt: str
) -> None:
    save_folder(tmp_path / "old", old_layout(stored(trained)), trained.config, shards=shards,
                fmt=fmt, stamp=R1)  # fmt: skip
    # what transformers does alone: "loads", with every block left random
    plain, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "old", output_loading_info=True
    )
    assert any(k.startswith("transformer.h.") for k in info["missing_keys"])
    assert not torch.equal(logits(plain), logits(trained))

    model, info = versioned(transformers.GPT2LMHeadModel, R2).from_pretrained(
        tmp_path / "old", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert torch.equal(logits(model), logits(trained))
    assert model.config.ckptmigrate["ckptmigrate.revision"] == R2  # what it holds now


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_and_device_map_apply_to_the_migrated_weights(
    trained: Any, tmp_path: Path, keyword: str
) -> None:
    save_folder(tmp_path / "old", old_layout(stored(trained)), trained.config, shards=3,
                fmt="safetensors", stamp=R1)  # fmt: skip
    save_folder(tmp_path / "new", stored(trained), trained.config, shards=1, fmt="safetensors")
    kwargs = {keyword: torch.float16, "device_map": "cpu"}
    model = versioned(transformers.GPT2LMHeadModel, R2).from_pretrained(tmp_path / "old", **kwargs)
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "new", **kwargs)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(logits(model), logits(reference))


def test_a_newer_checkpoint_is_downgraded(trained: Any, tmp_path: Path) -> None:
    sd = {**stored(trained), "extra.scale": torch.ones(4)}
    save_folder(tmp_path / "newer", sd, trained.config, shards=1, fmt="safetensors", stamp=R3)
    model, info = versioned(transformers.GPT2LMHeadModel, R2).from_pretrained(
        tmp_path / "newer", output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert torch.equal(logits(model), logits(trained))


def test_save_pretrained_stamps_and_the_stamp_is_enough(
    trained: Any, tmp_path: Path, run: Run
) -> None:
    """No base schema anywhere: the revision a versioned class saved is read, not guessed."""
    model = versioned(transformers.GPT2LMHeadModel, R2)(trained.config)
    model.load_state_dict(trained.state_dict())
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "many", max_shard_size="40KB")
    assert json.loads((tmp_path / "one/config.json").read_text())["ckptmigrate"] == {
        "ckptmigrate.revision": R2,
        "ckptmigrate.version": ckptmigrate.__version__,
        "ckptmigrate.format": "1.0",
    }
    index = json.loads((tmp_path / "many/model.safetensors.index.json").read_text())
    assert index["metadata"]["ckptmigrate.revision"] == R2
    for folder in ("one", "many"):
        assert run("current", folder).stdout == f"{R2}\n"
        newer, info = versioned(GPT2WithExtra, R3).from_pretrained(
            tmp_path / folder, output_loading_info=True
        )
        assert newer.config.ckptmigrate["ckptmigrate.revision"] == R3
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert same(newer.extra.scale.detach(), torch.ones(4))
        assert torch.equal(logits(newer), logits(trained))


def test_the_cli_upgrades_a_single_file_model_folder_into_a_loadable_one(
    trained: Any, tmp_path: Path, run: Run
) -> None:
    save_folder(tmp_path / "old", old_layout(stored(trained)), trained.config, shards=1,
                fmt="safetensors", stamp=R1)  # fmt: skip
    (tmp_path / "old" / "tokenizer_config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()}
    run("upgrade", "old", R2, "-o", "new")
    assert {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer_config.json",
    ]
    assert run("current", "new").stdout == f"{R2}\n"
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "new", output_loading_info=True
    )
    assert not info["missing_keys"] and torch.equal(logits(loaded), logits(trained))
    run("upgrade", "old", R2)  # in place: the weights file, and config.json's stamp
    config = json.loads((tmp_path / "old/config.json").read_text())
    assert config["ckptmigrate"]["ckptmigrate.revision"] == R2
    assert (tmp_path / "old/model.safetensors").read_bytes() == (
        tmp_path / "new/model.safetensors"
    ).read_bytes()


def test_checkpoints_that_cannot_be_placed_are_a_ckptmigrate_error(
    trained: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cls = versioned(transformers.GPT2LMHeadModel, R2)
    save_folder(tmp_path / "legacy", old_layout(stored(trained)), trained.config, shards=1,
                fmt="safetensors")  # fmt: skip
    with pytest.raises(LoadError) as info:
        cls.from_pretrained(tmp_path / "legacy")
    text = str(info.value)
    assert "has no ckptmigrate stamp" in text and "no base schema" in text
    assert "ckptmigrate stamp CKPT REV" in text and "ckptmigrate schema --record" in text
    assert "newly initialized" not in caplog.text and "MISSING" not in caplog.text

    save_folder(tmp_path / "future", stored(trained), trained.config, shards=1,
                fmt="safetensors", stamp="ffff99999999")  # fmt: skip
    with pytest.raises(LoadError, match="ffff99999999, unknown to"):
        cls.from_pretrained(tmp_path / "future")


def test_a_key_no_migration_explains_is_refused_not_initialised(
    trained: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sd = stored(trained)
    sd["transformer.ln_final.weight"] = sd.pop("transformer.ln_f.weight")  # nobody wrote this one
    save_folder(tmp_path / "odd", sd, trained.config, shards=1, fmt="safetensors", stamp=R2)
    with pytest.raises(LoadError) as info:
        versioned(transformers.GPT2LMHeadModel, R2).from_pretrained(tmp_path / "odd")
    text = str(info.value)
    assert "missing transformer.ln_f.weight" in text
    assert "unexpected transformer.ln_final.weight" in text
    assert "revision --autogenerate" in text
    assert "newly initialized" not in caplog.text


# ------------------------------------------------------------------ with transformers' conversions


def mixtral_config() -> Any:
    return transformers.MixtralConfig(
        num_hidden_layers=2, hidden_size=16, intermediate_size=8, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=3, num_experts_per_tok=2, vocab_size=50,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip


EXPERT_NAMES = {"gate": "w1", "down": "w2", "up": "w3"}
EXPERTS = (
    "\n".join(
        f'op.rename_regex(r"\\.experts\\.(\\d+)\\.{old}\\.", r".experts.\\1.{new}.")'
        for old, new in EXPERT_NAMES.items()
    ),
    "\n".join(
        f'op.rename_regex(r"\\.experts\\.(\\d+)\\.{new}\\.", r".experts.\\1.{old}.")'
        for old, new in EXPERT_NAMES.items()
    ),
)


def test_ckptmigrate_runs_before_transformers_conversions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """Mixtral's checkpoints store one tensor per expert, which transformers merges on load.

    The lineage describes the stored layout: an older one named the experts'
    projections gate/down/up. Only when ckptmigrate renames them first can
    transformers' converters (which look for w1/w2/w3) merge them.
    """
    monkeypatch.chdir(tmp_path)
    make_lineage(tmp_path, "migrations", None, [(R1, None, "pass", "pass"), (R2, R1, *EXPERTS)],
                 ini="alembic_style.ini")  # fmt: skip
    torch.manual_seed(0)
    trained = transformers.MixtralForCausalLM(mixtral_config()).eval()
    assert "model.layers.0.mlp.experts.gate_up_proj" in trained.state_dict()  # the model's layout
    trained.save_pretrained(tmp_path / "saved")  # the stored layout: experts.N.w1, ...
    run("stamp", "saved", R2)
    run("downgrade", "saved", R1, "-o", "old")
    stored_keys = json.loads((tmp_path / "old/config.json").read_text())
    assert stored_keys["ckptmigrate"]["ckptmigrate.revision"] == R1

    cls = versioned(transformers.MixtralForCausalLM, R2)
    model, info = cls.from_pretrained(tmp_path / "old", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert torch.equal(logits(model), logits(trained))
    # transformers alone cannot merge experts it does not recognise
    _, info = transformers.MixtralForCausalLM.from_pretrained(
        tmp_path / "old", output_loading_info=True
    )
    assert "model.layers.0.mlp.experts.gate_up_proj" in info["missing_keys"]
    # the same load as the folder ckptmigrate upgrade writes
    run("upgrade", "old", "-o", "upgraded")
    plain = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "upgraded")
    assert torch.equal(logits(plain), logits(model))
    # and saving writes the stored layout back, stamped
    model.save_pretrained(tmp_path / "again")
    assert run("current", "again").stdout == f"{R2} (head)\n"
    again = cls.from_pretrained(tmp_path / "again")
    for key, value in trained.state_dict().items():
        assert same(again.state_dict()[key], value), key


def _rss_anon() -> int:
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def test_the_checkpoint_is_in_memory_once_and_never_written(trained: Any, tmp_path: Path) -> None:
    """Renamed weights stay views of the file's private memory map, as transformers leaves
    its own: loading adds next to no memory of its own, and training writes only to copies."""
    config = transformers.GPT2Config(
        n_layer=8, n_embd=256, n_head=8, vocab_size=4096, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(1)
    big = transformers.GPT2LMHeadModel(config)
    save_folder(tmp_path / "old", old_layout(stored(big)), config, shards=1, fmt="safetensors",
                stamp=R1)  # fmt: skip
    del big
    weights = tmp_path / "old" / "model.safetensors"
    size, before_bytes = weights.stat().st_size, weights.read_bytes()
    cls = versioned(transformers.GPT2LMHeadModel, R2)
    warm = cls.from_pretrained(tmp_path / "old")  # imports, caches; kept, so that its memory
    before = _rss_anon()  # is not what the next load reuses
    model = cls.from_pretrained(tmp_path / "old")
    grown = _rss_anon() - before
    assert grown < size / 4, f"loading a {size >> 20} MB checkpoint took {grown >> 20} MB"
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    assert weights.read_bytes() == before_bytes
    assert torch.equal(logits(warm), logits(cls.from_pretrained(tmp_path / "old")))
