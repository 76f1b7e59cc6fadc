"""``op.stack`` / ``op.unstack``: MoE experts as one ``[E, ...]`` tensor and back.

A mixture-of-experts layer keeps its experts either as a ``ModuleList``
(``experts.{i}.w1.weight``, one ``[out, in]`` tensor each) or stacked into one
parameter ``experts.w1`` of shape ``[E, out, in]`` (transformers'
MergeModulelist / SplitModulelist). The end-to-end test upgrades a real
training checkpoint from the first layout to the second with a revision that
autogenerate's renderer wrote, resumes Adam on it, and downgrades it back.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import Run
from torch import nn

from ckptmigrate import op
from ckptmigrate.autogenerate.compare import Op
from ckptmigrate.autogenerate.render import inverse, render
from ckptmigrate.errors import OperationError
from ckptmigrate.operations.checks import OpContext
from ckptmigrate.operations.context import activate
from ckptmigrate.plan.discards import find_discards
from ckptmigrate.plan.nodes import TensorSpec
from ckptmigrate.plan.state import Evaluator, PlanState

REV = "abc123def456"
E, D, H = 4, 6, 8  # experts, model width, hidden width


def same(a: Any, b: Any) -> bool:
    """Bit-identical tensors: dtype, shape and every value."""
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    return True


def experts_sd(n: int = E, shape: tuple[int, ...] = (H, D)) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    sd = {"gate.weight": torch.randn(n, D, generator=g)}
    for i in range(n):
        sd[f"experts.{i}.w1.weight"] = torch.randn(*shape, generator=g)
    sd["norm.weight"] = torch.ones(D)
    return sd


def run_ops(sd: dict[str, Any], fn: Any) -> tuple[dict[str, Any], PlanState]:
    state = PlanState.from_schema({k: TensorSpec.of(v) for k, v in sd.items()})
    with activate(OpContext(state, revision=REV)):
        fn()
    ev = Evaluator(state.entries, sd.__getitem__)
    return {k: ev(k) for k in state.entries}, state


def fails(sd: dict[str, Any], fn: Any) -> str:
    with pytest.raises(OperationError) as info:
        run_ops(sd, fn)
    return str(info.value)


W1 = [f"experts.{i}.w1.weight" for i in range(E)]


# --------------------------------------------------------------------- the ops on real tensors


def test_the_signatures() -> None:
    assert str(inspect.signature(op.stack)).startswith("(keys: ")
    assert [p.name for p in inspect.signature(op.stack).parameters.values()] == [
        "keys",
        "into",
        "dim",
    ]
    assert inspect.signature(op.unstack).parameters["dim"].default == 0
    assert "MoE" in (op.stack.__doc__ or "") and "MoE" in (op.unstack.__doc__ or "")


def test_stack_joins_the_experts_along_a_new_dim_where_the_first_was() -> None:
    sd = experts_sd()
    out, state = run_ops(sd, lambda: op.stack(W1, into="experts.w1"))
    assert list(out) == ["gate.weight", "experts.w1", "norm.weight"]
    assert same(out["experts.w1"], torch.stack([sd[k] for k in W1]))
    assert state.schema()["experts.w1"] == TensorSpec((E, H, D), torch.float32)
    for dim in (1, 2, -1):
        out, _ = run_ops(sd, lambda d=dim: op.stack(W1, into="w", dim=d))
        assert same(out["w"], torch.stack([sd[k] for k in W1], dim=dim)), dim


def test_unstack_gives_one_key_per_entry_each_its_own_copy() -> None:
    sd = {"before": torch.zeros(1), "experts.w1": torch.randn(E, H, D), "after": torch.ones(2)}
    out, _ = run_ops(sd, lambda: op.unstack("experts.w1", into=W1))
    assert list(out) == ["before", *W1, "after"]
    for i, key in enumerate(W1):
        assert same(out[key], sd["experts.w1"][i])
        # a copy: a part kept alone must not drag the whole stacked storage into the file
        assert out[key].untyped_storage().nbytes() == out[key].nbytes
    out, _ = run_ops(
        sd, lambda: op.unstack("experts.w1", into=["a", "b", "c", "d", "e", "f"], dim=2)
    )
    assert same(out["f"], sd["experts.w1"][:, :, 5])


def test_stack_then_unstack_gives_back_every_tensor_bit_for_bit() -> None:
    sd = experts_sd()

    def there_and_back() -> None:
        op.stack(W1, into="experts.w1", dim=1)
        op.unstack("experts.w1", into=W1, dim=1)

    out, _ = run_ops(sd, there_and_back)
    assert list(out) == list(sd)
    assert all(same(out[k], sd[k]) for k in sd)


def test_stack_into_one_of_its_own_keys() -> None:
    sd = experts_sd()
    out, _ = run_ops(sd, lambda: op.stack(W1, into=W1[0]))
    assert same(out[W1[0]], torch.stack([sd[k] for k in W1]))


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (lambda: op.stack([], into="w"), "stack([], into='w'): give at least one key to stack"),
        (lambda: op.stack([W1[0], W1[0]], into="w"), "a key is listed twice"),
        (lambda: op.stack([W1[0], "experts.9.w1.weight"], into="w"), "does not exist"),
        (lambda: op.stack(W1, into="gate.weight"), "key 'gate.weight' already exists"),
        (
            lambda: op.stack([W1[0], "gate.weight"], into="w"),
            "'gate.weight' has shape [4, 6] but 'experts.0.w1.weight' has [8, 6]; "
            "stack needs tensors of one shape",
        ),
        (
            lambda: op.stack(W1, into="w", dim=3),
            "dim 3 is out of range for stacking 2-D tensors (it can be -3 to 2)",
        ),
        (lambda: op.stack(W1, into="w", dim=-4), "dim -4 is out of range"),
    ],
)
def test_stack_checks_its_preconditions(call: Any, problem: str) -> None:
    assert problem in fails(experts_sd(), call)


def test_stack_refuses_mixed_dtypes() -> None:
    sd = experts_sd()
    sd[W1[2]] = sd[W1[2]].half()
    message = fails(sd, lambda: op.stack(W1, into="w"))
    assert "'experts.2.w1.weight' is torch.float16 but 'experts.0.w1.weight' is torch.float32" in (
        message
    )


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (
            lambda: op.unstack("experts.w1", into=W1[:3]),
            "'experts.w1' has 4 entries along dim 0, but into= names 3 keys",
        ),
        (lambda: op.unstack("experts.w1", into=[]), "into= needs at least one key"),
        (lambda: op.unstack("experts.w1", into=["a", "a", "b", "c"]), "into= names a key twice"),
        (lambda: op.unstack("experts.w1", into=["gate", "b", "c", "d"]), "'gate' already exists"),
        (lambda: op.unstack("experts.w1", into=W1, dim=3), "dim 3 is out of range for a 3-D"),
        (lambda: op.unstack("experts.w2", into=W1), "key 'experts.w2' does not exist"),
        (
            lambda: op.unstack("scalar", into=["a"]),
            "'scalar' is a 0-D tensor and cannot be unstacked",
        ),
    ],
)
def test_unstack_checks_its_preconditions(call: Any, problem: str) -> None:
    sd = {"gate": torch.zeros(2), "experts.w1": torch.randn(E, H, D), "scalar": torch.tensor(1.0)}
    assert problem in fails(sd, call)


def test_unstack_keeping_only_some_experts_is_a_discard_check_reports() -> None:
    sd = {"experts.w1": torch.randn(E, H, D)}

    def keep_three() -> None:
        op.unstack("experts.w1", into=W1)
        op.drop_key(W1[3])

    _, state = run_ops(sd, keep_three)
    [lost] = find_discards({k: TensorSpec.of(v) for k, v in sd.items()}, state)
    assert (lost.key, lost.detail, lost.lost) == ("experts.w1", "part not kept", H * D)


def test_autogenerate_renders_stack_and_unstack_and_their_inverses() -> None:
    up = Op("stack", (W1,), {"into": "experts.w1"}, review="guessed stack")
    up.inverse = inverse(up, {}.get) or []
    lines, back, imports = render([up])
    assert lines[1] == (
        'op.stack(["experts.0.w1.weight", "experts.1.w1.weight", "experts.2.w1.weight", '
        '"experts.3.w1.weight"], into="experts.w1")  # review: guessed stack'
    )
    assert back[1] == (
        'op.unstack("experts.w1", into=["experts.0.w1.weight", "experts.1.w1.weight", '
        '"experts.2.w1.weight", "experts.3.w1.weight"])'
    )
    assert imports == []
    down = Op("unstack", ("experts.w1",), {"into": W1, "dim": 1})
    assert [str(i) for i in inverse(down, {}.get) or []] == [
        str(Op("stack", (W1,), {"into": "experts.w1", "dim": 1}))
    ]


# --------------------------------------------------------------------- a real MoE layer, trained


class Expert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Linear(D, H, bias=False)
        self.w2 = nn.Linear(H, D, bias=False)


class MoEList(nn.Module):
    """v1: the experts as a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(E))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [e.w2(F.silu(e.w1(x))) for e in self.experts]
        return (F.softmax(self.gate(x), -1).unsqueeze(-1) * torch.stack(outs, 1)).sum(1)


class Stacked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(E, H, D))
        self.w2 = nn.Parameter(torch.randn(E, D, H))


class MoEStacked(nn.Module):
    """v2: each expert weight one parameter ``[E, out, in]``, indexed per expert."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = Stacked()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w1, w2 = self.experts.w1, self.experts.w2
        outs = [F.linear(F.silu(F.linear(x, w1[e])), w2[e]) for e in range(E)]
        return (F.softmax(self.gate(x), -1).unsqueeze(-1) * torch.stack(outs, 1)).sum(1)


MODELS = f"""
import torch
from torch import nn
import torch.nn.functional as F
E, D, H = {E}, {D}, {H}
{inspect.getsource(Expert)}
{inspect.getsource(MoEList)}
{inspect.getsource(Stacked)}
{inspect.getsource(MoEStacked)}
def build():
    return MoEStacked()
def build_v1():
    return MoEList()
"""

R1, R2 = "ee0000000001", "ee0000000002"


def moe_lineage(root: Path) -> None:
    """R1: the ModuleList layout; R2: stacked, its script written by autogenerate's renderer."""
    ops = [
        Op("stack", ([f"experts.{i}.{w}.weight" for i in range(E)],), {"into": f"experts.{w}"})
        for w in ("w1", "w2")
    ]
    for o in ops:
        o.inverse = inverse(o, {}.get) or []
    up, down, _ = render(ops)
    (root / "moe_models.py").write_text(MODELS)
    (root / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\nprepend_sys_path = .\n"
        "model = moe_models:build\n"
    )
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    head = "from ckptmigrate import op\n\nbranch_labels = None\ndepends_on = None\n"
    (versions / f"{R1}.py").write_text(
        f'"""experts as a list"""\n{head}revision = {R1!r}\ndown_revision = None\n\n'
        "def upgrade():\n    pass\n\ndef downgrade():\n    pass\n"
    )
    body = "\n".join("    " + line for line in up)
    back = "\n".join("    " + line for line in down)
    (versions / f"{R2}.py").write_text(
        f'"""stack the experts"""\n{head}revision = {R2!r}\ndown_revision = {R1!r}\n\n'
        f"def upgrade():\n{body}\n\ndef downgrade():\n{back}\n"
    )


def train(model: nn.Module, opt: torch.optim.Optimizer, seed: int, steps: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, D, generator=g), torch.randn(16, D, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def test_moe_training_checkpoint_stacks_with_adam_and_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "moe_models", raising=False)  # this test's own models
    moe_lineage(tmp_path)
    torch.manual_seed(0)
    v1 = MoEList()
    opt1 = torch.optim.Adam(v1.parameters(), lr=1e-2)
    train(v1, opt1, seed=1, steps=3)
    torch.save({"model": v1.state_dict(), "optimizer": opt1.state_dict(), "epoch": 1}, "v1.pt")

    result = run("upgrade", "v1.pt", "--from", R1, "-o", "v2.pt")
    assert "Optimizer state at 'optimizer': 9 -> 3 parameters in 1 param group (2 moved" in (
        result.stderr
    )
    old, new = torch.load("v1.pt", weights_only=True), torch.load("v2.pt", weights_only=True)
    v2 = MoEStacked()
    v2.load_state_dict(new["model"], strict=True)
    x = torch.randn(5, D)
    assert torch.equal(v2(x), v1(x))

    # Adam's moments: v1 numbers gate, then expert i's w1 and w2 as 1 + 2i and 2 + 2i
    old_state, new_state = old["optimizer"]["state"], new["optimizer"]["state"]
    assert list(new_state) == [0, 1, 2]
    for new_id, first in ((1, 1), (2, 2)):
        for name in ("exp_avg", "exp_avg_sq"):
            parts = [old_state[first + 2 * i][name] for i in range(E)]
            assert same(new_state[new_id][name], torch.stack(parts)), (new_id, name)
        assert same(new_state[new_id]["step"], old_state[first]["step"])

    # training goes on exactly as it would have in the old layout
    opt2 = torch.optim.Adam(v2.parameters(), lr=1e-2)
    opt2.load_state_dict(new["optimizer"])
    train(v1, opt1, seed=2, steps=2)
    train(v2, opt2, seed=2, steps=2)
    assert torch.allclose(v2(x), v1(x), rtol=1e-5, atol=1e-6)

    # the old code base configures the old model; the downgrade gives back the file's contents
    ini = tmp_path / "alembic_style.ini"
    ini.write_text(ini.read_text().replace("moe_models:build\n", "moe_models:build_v1\n"))
    run("downgrade", "v2.pt", R1, "-o", "back.pt")
    back = torch.load("back.pt", weights_only=True)
    assert list(back["model"]) == list(old["model"])
    assert all(same(back["model"][k], old["model"][k]) for k in old["model"])
    assert back["optimizer"]["param_groups"] == old["optimizer"]["param_groups"]
    assert list(back["optimizer"]["state"]) == list(old_state)
    for pid, entry in old_state.items():
        assert all(same(back["optimizer"]["state"][pid][n], v) for n, v in entry.items()), pid
    assert back["epoch"] == 1
