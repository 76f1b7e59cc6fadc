"""Streaming writes: raw copies, sharded checkpoints, progress, equivalence with in-memory runs."""

from __future__ import annotations

import io
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import Run, two_step_lineage
from tests.harness.common import write_shards as _shard

from ckptmigrate import command
from ckptmigrate.config import Config
from ckptmigrate.runtime.memory import migrate_state_dict
from ckptmigrate.script.directory import ScriptDirectory

REV0, REV1 = "base00000001", "next00000002"


def lineage(root: Path, up: str, down: str = "pass") -> Path:
    return two_step_lineage(root, (REV0, REV1), up, down, name="mig")


def tensors_of(obj: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items()}


def test_untouched_records_are_copied_byte_for_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    lineage(tmp_path, 'op.rename_key("a", "z")')
    sd = OrderedDict(a=torch.randn(64, 64), b=torch.arange(10), c=torch.randn(3).half())
    torch.save(sd, "m.pt")
    run("upgrade", "m.pt", "--from", REV0, "-o", "out.pt")
    import zipfile

    def records(path: str) -> dict[bytes, int]:
        with zipfile.ZipFile(path) as zf:
            return {zf.read(i): i.CRC for i in zf.infolist() if "/data/" in i.filename}

    assert set(records("m.pt").values()) == set(records("out.pt").values())
    out = torch.load("out.pt", weights_only=True)
    assert list(out) == ["z", "b", "c"]
    assert torch.equal(out["z"], sd["a"]) and out["c"].dtype == torch.float16


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_sharded_checkpoint_upgrades_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run, fmt: str
) -> None:
    monkeypatch.chdir(tmp_path)
    lineage(
        tmp_path,
        'op.rename_prefix("l0.", "layer0."); op.add_tensor("layer0.extra", (4,), init="ones")',
        'op.drop_key("layer0.extra"); op.rename_prefix("layer0.", "l0.")',
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.manual_seed(0)
    parts = [
        {"l0.w": torch.randn(8, 8), "l0.b": torch.randn(8)},
        {"l1.w": torch.randn(8, 8), "l1.b": torch.randn(8)},
        {"head.w": torch.randn(2, 8)},
    ]
    index = _shard(ckpt, parts, fmt)
    shard2 = ckpt / json.loads(index.read_text())["weight_map"]["l1.w"]
    before = (shard2.stat().st_ino, shard2.stat().st_mtime_ns)
    run("upgrade", str(ckpt), "--from", REV0, "--jobs", "2")
    new_index = json.loads(index.read_text())
    assert new_index["metadata"]["ckptmigrate.revision"] == REV1
    wm = new_index["weight_map"]
    assert set(wm) == {"layer0.w", "layer0.b", "layer0.extra", "l1.w", "l1.b", "head.w"}
    assert wm["layer0.w"] == wm["layer0.extra"] != wm["l1.w"]
    assert (shard2.stat().st_ino, shard2.stat().st_mtime_ns) == before  # untouched shard kept
    names = sorted(p.name for p in ckpt.iterdir())
    assert len([n for n in names if n.endswith((".safetensors", ".bin"))]) == 3  # old shard 1 gone
    assert run("current", str(ckpt)).stdout == f"{REV1} (head)\n"
    run("downgrade", str(ckpt), REV0)
    from ckptmigrate.formats import read_checkpoint

    back = read_checkpoint(ckpt)
    original = {k: v for p in parts for k, v in p.items()}
    assert sorted(back.schema) == sorted(original)
    assert all(torch.equal(back.read(k), v) for k, v in original.items())
    back.close()


def test_sharded_output_elsewhere_keeps_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    lineage(
        tmp_path, 'op.rename_key("head.w", "head.weight")', 'op.rename_key("head.weight", "head.w")'
    )
    (tmp_path / "in").mkdir()
    index = _shard(
        tmp_path / "in", [{"a": torch.ones(2)}, {"head.w": torch.zeros(3)}], "safetensors"
    )
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    run("upgrade", str(index), "--from", REV0, "-o", "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    out = json.loads((tmp_path / "out" / index.name).read_text())
    assert set(out["weight_map"]) == {"a", "head.weight"}
    for name in set(out["weight_map"].values()):
        assert (tmp_path / "out" / name).exists()


def _sharded_gpt2(root: Path) -> Any:
    """A small GPT-2 saved by transformers in shards at ``root/gpt``, and a lineage whose
    older revision named the blocks ``transformer.blocks.``."""
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(root / "gpt", max_shard_size="40KB", safe_serialization=True)
    lineage(
        root,
        'op.rename_prefix("transformer.blocks.", "transformer.h.")',
        'op.rename_prefix("transformer.h.", "transformer.blocks.")',
    )
    return model


def test_transformers_loads_the_upgraded_shards(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    import transformers  # the test extra installs it: a missing package fails here

    monkeypatch.chdir(tmp_path)
    model = _sharded_gpt2(tmp_path)
    assert (tmp_path / "gpt" / "model.safetensors.index.json").exists()
    run("stamp", "gpt", REV1)
    run("downgrade", "gpt", REV0, "-j", "3")
    # transformers would load the old layout "successfully", with random blocks:
    _, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "gpt", output_loading_info=True
    )
    assert any(k.startswith("transformer.h.") for k in info["missing_keys"])
    run("upgrade", "gpt", "-j", "3")
    again, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "gpt", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    again.eval()
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def _shard_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")


def test_sharded_output_in_a_new_folder_keeps_the_standard_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """``-o v5`` and ``-o v5/model.safetensors.index.json`` (v5 absent) write the same folder.

    Nothing is replaced there, so the shards keep Hugging Face's names; only
    an in-place upgrade, whose old shards are still in use until the index
    switches, needs names of its own, and goes back to the standard ones
    where they are free again.
    """
    import transformers

    monkeypatch.chdir(tmp_path)
    model = _sharded_gpt2(tmp_path)
    names = _shard_names(tmp_path / "gpt")
    assert len(names) >= 3 and names[0] == f"model-00001-of-{len(names):05d}.safetensors"
    run("stamp", "gpt", REV1)
    run("downgrade", "gpt", REV0, "-o", "legacy")
    assert _shard_names(tmp_path / "legacy") == names
    run("upgrade", "legacy/model.safetensors.index.json", "-o", "v5/model.safetensors.index.json")
    run("upgrade", "legacy", "-o", "v6")
    v5 = {p.name: p.read_bytes() for p in (tmp_path / "v5").iterdir()}
    assert v5 == {p.name: p.read_bytes() for p in (tmp_path / "v6").iterdir()}
    # a model folder, loadable as it is: config.json and the others came along
    companions = ["config.json", "generation_config.json"]
    assert sorted(v5) == sorted([*names, "model.safetensors.index.json", *companions])
    assert json.loads(v5["config.json"])["ckptmigrate"]["ckptmigrate.revision"] == REV1
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        want = model(ids).logits
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "v5", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, want)
    run("downgrade", "v5", REV0)  # in place: the blocks' shards change under new names
    renamed = set(_shard_names(tmp_path / "v5")) - set(names)
    assert renamed and all("-ckm" in n for n in renamed)
    assert len(_shard_names(tmp_path / "v5")) == len(names)  # the old ones are gone
    run("upgrade", "v5")
    assert _shard_names(tmp_path / "v5") == names
    again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "v5").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


def test_sharded_output_onto_a_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    lineage(tmp_path, 'op.rename_key("a", "z")', 'op.rename_key("z", "a")')
    (tmp_path / "in").mkdir()
    _shard(tmp_path / "in", [{"a": torch.ones(2)}, {"b": torch.zeros(3)}], "safetensors")
    (tmp_path / "taken.pt").write_bytes(b"something else")
    err = run("upgrade", "in", "--from", REV0, "-o", "taken.pt", code=1).stderr
    assert err == (
        "Error: cannot write a sharded checkpoint to taken.pt: it is a file; "
        "give a folder or an *.index.json path with -o\n"
    )
    assert (tmp_path / "taken.pt").read_bytes() == b"something else"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    lineage(tmp_path, 'op.rename_key("a", "z")')
    torch.save({"a": torch.randn(100, 100), "b": torch.randn(10)}, "m.pt")
    tty = _Tty()
    cfg = Config(tmp_path / "alembic_style.ini", stderr=tty)
    command.upgrade(cfg, "m.pt", from_revision=REV0, output="o.pt")
    text = tty.getvalue()
    assert "\r" in text and "100%" in text and "2/2 tensors" in text
    quiet = _Tty()
    command.upgrade(
        Config(tmp_path / "alembic_style.ini", stderr=quiet, quiet=True),
        "m.pt",
        from_revision=REV0,
        output="p.pt",
    )
    assert quiet.getvalue() == ""
    plain = io.StringIO()
    command.upgrade(
        Config(tmp_path / "alembic_style.ini", stderr=plain),
        "m.pt",
        from_revision=REV0,
        output="q.pt",
    )
    assert "\r" not in plain.getvalue() and "Running upgrade" in plain.getvalue()


# ----------------------------------------------------------------------------- equivalence


@st.composite
def chains(draw: st.DrawFn) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A random state dict and a random valid op chain over it."""
    n = draw(st.integers(1, 5))
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for i in range(n):
        shapes[f"t{i}"] = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
        dtypes[f"t{i}"] = draw(st.sampled_from([torch.float32, torch.float16, torch.int64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    sd = {k: (torch.randn(s, generator=gen) * 10).to(dtypes[k]) for k, s in shapes.items()}
    ops: list[str] = []
    fresh = iter(range(1000))
    for _ in range(draw(st.integers(1, 8))):
        keys = sorted(shapes)
        kind = draw(
            st.sampled_from(
                [
                    "rename",
                    "drop",
                    "add",
                    "reshape",
                    "transpose",
                    "resize",
                    "split",
                    "concat",
                    "cast",
                ]
            )
        )
        if not keys:
            kind = "add"
        k = draw(st.sampled_from(keys)) if keys else ""
        new = f"n{next(fresh)}"
        if kind == "rename":
            ops.append(f"op.rename_key({k!r}, {new!r})")
            shapes[new], dtypes[new] = shapes.pop(k), dtypes.pop(k)
        elif kind == "drop":
            ops.append(f"op.drop_key({k!r})")
            shapes.pop(k), dtypes.pop(k)
        elif kind == "add":
            shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
            ops.append(f"op.add_tensor({new!r}, {shape!r}, init='normal')")
            shapes[new], dtypes[new] = shape, torch.float32
        elif kind == "reshape":
            numel = 1
            for d in shapes[k]:
                numel *= d
            ops.append(f"op.reshape({k!r}, ({numel},))")
            shapes[k] = (numel,)
        elif kind == "transpose" and len(shapes[k]) >= 2:
            ops.append(f"op.transpose({k!r}, 0, 1)")
            s = list(shapes[k])
            s[0], s[1] = s[1], s[0]
            shapes[k] = tuple(s)
        elif kind == "resize" and dtypes[k].is_floating_point:
            shape = tuple(max(1, d + draw(st.integers(-2, 2))) for d in shapes[k])
            ops.append(f"op.resize({k!r}, {shape!r}, init='uniform')")
            shapes[k] = shape
        elif kind == "split" and shapes[k][0] % 2 == 0:
            a, b = f"{new}a", f"{new}b"
            ops.append(f"op.split({k!r}, [{a!r}, {b!r}])")
            half = (shapes[k][0] // 2, *shapes[k][1:])
            for part in (a, b):
                shapes[part], dtypes[part] = half, dtypes[k]
            shapes.pop(k), dtypes.pop(k)
        elif kind == "concat":
            same = [
                o
                for o in keys
                if o != k
                and shapes[o][1:] == shapes[k][1:]
                and len(shapes[o]) == len(shapes[k])
                and dtypes[o] == dtypes[k]
            ]
            if same:
                o = draw(st.sampled_from(same))
                ops.append(f"op.concat([{k!r}, {o!r}], into={new!r})")
                shapes[new] = (shapes[k][0] + shapes[o][0], *shapes[k][1:])
                dtypes[new] = dtypes[k]
                for gone in (k, o):
                    shapes.pop(gone), dtypes.pop(gone)
        elif kind == "cast":
            ops.append(f"op.cast({k!r}, torch.float64)")
            dtypes[k] = torch.float64
    return sd, ops or ["pass"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=chains())
def test_streaming_equals_in_memory(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[dict[str, torch.Tensor], list[str]]
) -> None:
    sd, ops = case
    root = tmp_path_factory.mktemp("eq")
    mig = lineage(root, "; ".join(ops))
    script_dir = ScriptDirectory.from_config(Config(root / "alembic_style.ini"))
    expected = migrate_state_dict(script_dir, sd, {}, (REV0,), REV1).state_dict
    cfg = Config(root / "alembic_style.ini", quiet=True)
    torch.save(sd, root / "m.pt")
    command.upgrade(cfg, root / "m.pt", from_revision=REV0)
    got = torch.load(root / "m.pt", weights_only=True)
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and torch.equal(got[k], expected[k]), k
    if all(v.numel() for v in sd.values()):
        from safetensors.torch import load_file, save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "m.safetensors"))
        command.upgrade(cfg, root / "m.safetensors", from_revision=REV0)
        st_got = load_file(str(root / "m.safetensors"))
        assert sorted(st_got) == sorted(expected)
        for k in expected:
            assert torch.equal(st_got[k], expected[k]), k
    assert mig.exists() and os.path.exists(root / "m.pt")
