"""Half-precision checkpoints: identified up to a uniform floating dtype, upgraded in it.

An fp16 (or bf16) copy of a checkpoint has the keys and shapes of its
revision, only every floating tensor is in another dtype. It is identified as
that revision ("as float16"), claims about it are checked the same way, and
the tensors a migration creates take its dtype, so the upgraded file is the
fp32 upgrade cast to fp16 and loads into ``model.half()``.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from examples.simple_model import SimpleModel, SimpleModelV1
from tests.conftest import (
    ADD_FC3,
    INITIAL,
    REPO,
    Run,
    make_lineage,
    tensors,
    v1_state_dict,
)

import ckptmigrate

HALF = [torch.float16, torch.bfloat16]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _save_as(sd: dict[str, torch.Tensor], dtype: torch.dtype, path: str) -> None:
    torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, path)


@pytest.mark.parametrize("dtype", HALF, ids=_name)
@pytest.mark.parametrize("claim", [[], ["--from", INITIAL]], ids=["identified", "from"])
def test_half_precision_upgrade_is_the_fp32_upgrade_cast(
    project: Path, run: Run, dtype: torch.dtype, claim: list[str]
) -> None:
    torch.save(v1_state_dict(), "v1.pth")
    _save_as(v1_state_dict(), dtype, "v1_half.pth")
    run("upgrade", "v1.pth", "--from", INITIAL, "-o", "up32.pth")
    result = run("upgrade", "v1_half.pth", *claim, "-o", "up_half.pth")
    if not claim:
        assert f"identified by schema as {INITIAL} (as {_name(dtype)})" in result.stderr
    half, full = tensors(Path("up_half.pth")), tensors(Path("up32.pth"))
    assert list(half) == list(full)
    for key in full:
        assert half[key].dtype == dtype, key
        assert torch.equal(half[key], full[key].to(dtype)), key
    model = SimpleModel().to(dtype)
    model.load_state_dict(torch.load("up_half.pth", weights_only=True), strict=True)
    reference = SimpleModel()
    reference.load_state_dict(torch.load("up32.pth", weights_only=True), strict=True)
    x = torch.randn(8, 10).to(dtype)
    assert torch.equal(model(x), reference.to(dtype)(x))
    assert run("current", "up_half.pth").stdout == f"{ADD_FC3} (head)\n"


@pytest.mark.parametrize("dtype", HALF, ids=_name)
def test_current_says_the_dtype_it_matched_in(project: Path, run: Run, dtype: torch.dtype) -> None:
    _save_as(v1_state_dict(), dtype, "v1_half.pth")
    assert run("current", "v1_half.pth").stdout == (
        f"{INITIAL} (identified by schema, as {_name(dtype)})\n"
    )


def test_claims_are_checked_up_to_the_dtype(project: Path, run: Run) -> None:
    _save_as(v1_state_dict(), torch.float16, "v1_half.pth")
    err = run("upgrade", "v1_half.pth", "--from", ADD_FC3, "-o", "x.pth", code=1).stderr
    assert f"v1_half.pth is not at {ADD_FC3}" in err
    assert f"it matches {INITIAL} (as float16); pass --from {INITIAL}" in err
    run("stamp", "v1_half.pth", INITIAL)
    run("stamp", "v1_half.pth", ADD_FC3, code=1)
    run("upgrade", "v1_half.pth")
    assert {t.dtype for t in tensors(Path("v1_half.pth")).values()} == {torch.float16}


def test_a_mixed_copy_is_not_a_uniform_match(project: Path, run: Run) -> None:
    sd = v1_state_dict()
    sd["fc1.weight"] = sd["fc1.weight"].half()  # one tensor cast, the others not
    torch.save(sd, "mixed.pth")
    err = run("current", "mixed.pth", code=1).stderr
    assert "matches no revision's schema" in err
    assert "fc1.weight is [20, 10] float16 not [20, 10] float32" in err


def _lineage(root: Path, base: str, revisions: list[tuple[str, object, str, str]]) -> None:
    make_lineage(root, "migrations", base, revisions, ini="alembic_style.ini")


@pytest.fixture
def bn_lineage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lineage with an integer buffer (BatchNorm's num_batches_tracked)."""
    monkeypatch.chdir(tmp_path)
    _lineage(
        tmp_path,
        "bn.weight float32 [3] param\nbn.bias float32 [3] param\n"
        "bn.running_mean float32 [3] buffer\nbn.running_var float32 [3] buffer\n"
        "bn.num_batches_tracked int64 [] buffer\n",
        [
            ("b1000001", None, "pass", "pass"),
            ("b2000002", "b1000001", 'op.add_tensor("scale", (3,), init="ones")', "pass"),
        ],
    )
    return tmp_path


def _bn_state_dict() -> OrderedDict[str, torch.Tensor]:
    model = torch.nn.Module()
    model.bn = torch.nn.BatchNorm1d(3)
    return OrderedDict(model.half().state_dict())


def test_integer_tensors_must_match_exactly(bn_lineage: Path, run: Run) -> None:
    sd = _bn_state_dict()
    assert sd["bn.num_batches_tracked"].dtype == torch.int64  # .half() leaves it alone
    torch.save(sd, "bn_half.pth")
    assert run("current", "bn_half.pth").stdout == "b1000001 (identified by schema, as float16)\n"
    run("upgrade", "bn_half.pth")
    out = tensors(Path("bn_half.pth"))
    assert out["scale"].dtype == torch.float16 and torch.equal(out["scale"], torch.ones(3).half())
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    sd["bn.num_batches_tracked"] = sd["bn.num_batches_tracked"].int()
    torch.save(sd, "bn_int32.pth")
    err = run("current", "bn_int32.pth", code=1).stderr
    assert "bn.num_batches_tracked is [] int32 not [] int64" in err


def test_an_exact_match_wins_over_a_match_up_to_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    _lineage(
        tmp_path,
        "w float32 [4]\n",
        [
            ("h1000001", None, "pass", "pass"),
            ("h2000002", "h1000001", 'op.cast("w", torch.float16)', 'op.cast("w", torch.float32)'),
        ],
    )
    torch.save({"w": torch.ones(4, dtype=torch.float16)}, "half.pth")
    assert run("current", "half.pth").stdout == "h2000002 (head) (identified by schema)\n"
    torch.save({"w": torch.ones(4)}, "full.pth")
    assert run("current", "full.pth").stdout == "h1000001 (identified by schema)\n"
    torch.save({"w": torch.ones(4, dtype=torch.bfloat16)}, "bf16.pth")
    both = run("current", "bf16.pth")  # as bfloat16 it matches both, and says so
    assert both.stdout == (
        "h1000001 (identified by schema, as bfloat16)\n"
        "h2000002 (head) (identified by schema, as bfloat16)\n"
    )
    assert "several revisions have this schema" in both.stderr


NEW_TENSORS = """
import torch
from ckptmigrate import op

revision = "n2000002"
down_revision = "n1000001"
branch_labels = None
depends_on = None


def upgrade():
    op.add_tensor("a", (4, 4), init="normal", std=0.02)     # follows the checkpoint
    op.add_tensor("b", (4,), dtype=torch.float32)           # named: stays float32
    op.add_module("lin", torch.nn.Linear(4, 4))             # follows the checkpoint
    op.add_module("bf", torch.nn.Linear(4, 2, dtype=torch.bfloat16))  # built in bf16: kept
    op.add_tensor("steps", (1,), dtype=torch.int64)
    op.resize("w", (6, 4), init="normal")                   # the new rows follow w


def downgrade():
    for key in ("a", "b", "lin.weight", "lin.bias", "bf.weight", "bf.bias", "steps"):
        op.drop_key(key)
    op.resize("w", (4, 4))
"""


@pytest.fixture
def adds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    _lineage(tmp_path, "w float32 [4,4]\nv float32 [4]\n", [("n1000001", None, "pass", "pass")])
    (tmp_path / "migrations/versions/n2000002.py").write_text(NEW_TENSORS)
    return tmp_path


def test_new_tensors_take_the_checkpoints_dtype_unless_named(adds: Path, run: Run) -> None:
    torch.manual_seed(0)
    sd = {"w": torch.randn(4, 4), "v": torch.randn(4)}
    torch.save(sd, "full.pth")
    _save_as(sd, torch.float16, "half.pth")
    run("upgrade", "full.pth")
    result = run("upgrade", "half.pth")
    assert "identified by schema as n1000001 (as float16)" in result.stderr
    full, half = tensors(Path("full.pth")), tensors(Path("half.pth"))
    dtypes = {k: v.dtype for k, v in half.items()}
    assert dtypes == {
        "w": torch.float16,
        "v": torch.float16,
        "a": torch.float16,
        "b": torch.float32,
        "lin.weight": torch.float16,
        "lin.bias": torch.float16,
        "bf.weight": torch.bfloat16,
        "bf.bias": torch.bfloat16,
        "steps": torch.int64,
    }
    assert {k: v.dtype for k, v in full.items()} == {
        **{k: torch.float32 for k in dtypes},
        "bf.weight": torch.bfloat16,
        "bf.bias": torch.bfloat16,
        "steps": torch.int64,
    }
    for key in full:  # the values are the fp32 upgrade's, rounded
        assert torch.equal(half[key], full[key].to(half[key].dtype)), key
    # the mixed result (b stays float32) is still recognised as the head, stamp or not
    assert run("current", "half.pth").stdout == "n2000002 (head)\n"
    del half["b"]
    half["b"] = torch.zeros(4)
    torch.save(half, "unstamped.pth")
    assert run("current", "unstamped.pth").stdout.startswith("n2000002 (head)")
    run("downgrade", "half.pth", "base")
    back = tensors(Path("half.pth"))
    assert {k: v.dtype for k, v in back.items()} == {"w": torch.float16, "v": torch.float16}


def test_dry_run_shows_the_dtype_new_tensors_get(adds: Path, run: Run) -> None:
    _save_as({"w": torch.ones(4, 4), "v": torch.ones(4)}, torch.bfloat16, "bf.pth")
    out = run("upgrade", "bf.pth", "--dry-run").stdout
    assert "a: [4, 4] bfloat16" in out and "b: [4] float32" in out
    assert "lin.weight: [4, 4] bfloat16" in out


def test_versioned_class_loads_a_half_precision_checkpoint(tmp_path: Path) -> None:
    @ckptmigrate.versioned(str(REPO / "migrations"), revision=ADD_FC3)
    class Model(SimpleModel):
        pass

    torch.manual_seed(0)
    old = SimpleModelV1().half()
    model = Model().half()
    model.load_state_dict(old.state_dict())  # no stamp: identified as 1a0c3e5f7b2d in fp16
    assert model.fc2.weight.dtype == torch.float16
    assert torch.equal(model.fc2.weight, torch.eye(20, dtype=torch.float16))
    assert torch.equal(model.fc3.weight, old.fc2.weight)


def test_in_memory_upgrade_follows_the_dtype() -> None:
    sd = {k: v.bfloat16() for k, v in v1_state_dict().items()}
    out = ckptmigrate.upgrade_state_dict(sd, str(REPO / "migrations"))
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
