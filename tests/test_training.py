"""Training checkpoints: the optimizer state follows its parameters through a migration.

Every test builds a real optimizer state (or, for the transform table, one
with known values), upgrades the container through the command line, and
checks the result tensor by tensor: which parameter index holds which state,
the param groups' index lists, and that training resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from examples.simple_model import SimpleModel, SimpleModelV1
from tests.conftest import INITIAL, Run, load_dict, two_step_lineage
from tests.harness.common import same
from torch import nn

R1, R2 = "aaaa00000001", "aaaa00000002"

# --------------------------------------------------------------------- models and helpers


class Net(nn.Module):
    """fc1 -> BatchNorm (buffers between parameters) -> fc2."""

    def __init__(self, first: str = "fc1") -> None:
        super().__init__()
        self.first = first
        self.add_module(first, nn.Linear(6, 8))
        self.bn = nn.BatchNorm1d(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(getattr(self, self.first)(x))))


def renamed_net() -> nn.Module:
    """The model after the rename revision (``model =`` for the rename lineage)."""
    return Net("enc")


class Tied(nn.Module):
    """An embedding tied to the output layer: one parameter under two keys."""

    def __init__(self, mid: str = "mid") -> None:
        super().__init__()
        self.mid_name = mid
        self.emb = nn.Embedding(10, 4)
        self.add_module(mid, nn.Linear(4, 4))
        self.out = nn.Linear(4, 10)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(getattr(self, self.mid_name)(self.emb(x))))


def batches(seed: int, n: int, shape: tuple[int, ...], out: int) -> list[Any]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, *shape, generator=g), torch.randn(16, out, generator=g)) for _ in range(n)
    ]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: Iterable[Any]) -> None:
    model.train()
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def train_tied(model: nn.Module, opt: torch.optim.Optimizer, seed: int, steps: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, 10, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), x).backward()
        opt.step()


OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def assert_same_state(new: dict[str, Any], old: dict[str, Any]) -> None:
    assert list(new) == list(old)
    for name, value in old.items():
        if isinstance(value, torch.Tensor):
            assert same(new[name], value), name
        else:
            assert new[name] == value, name


# --------------------------------------------------------------------- the walkthrough: add fc3


def v1_training_checkpoint(path: str, make: Callable[[nn.Module], torch.optim.Optimizer]) -> Any:
    torch.manual_seed(0)
    model = SimpleModelV1()
    opt = make(model)
    train(model, opt, batches(1, 3, (10,), 5))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, path)
    return model


def test_add_fc3_adam_moments_move_with_the_layer_and_training_resumes(
    project: Path, run: Run
) -> None:
    old_model = v1_training_checkpoint("ckpt.pt", lambda m: torch.optim.Adam(m.parameters(), 1e-2))
    result = run("upgrade", "ckpt.pt", "--from", INITIAL, "-o", "up.pt")
    assert "Optimizer state at 'optimizer': 4 -> 6 parameters" in result.stderr
    before, after = load_dict("ckpt.pt"), load_dict("up.pt")
    assert after["epoch"] == 3
    old_opt, new_opt = before["optimizer"], after["optimizer"]
    # the new model's parameter order: fc1.weight, fc1.bias, fc2.weight, fc2.bias, fc3.*
    assert new_opt["param_groups"] == [{**old_opt["param_groups"][0], "params": [0, 1, 2, 3, 4, 5]}]
    assert list(new_opt["state"]) == [0, 1, 4, 5]  # the new fc2 starts with no state
    for new_id, old_id in {0: 0, 1: 1, 4: 2, 5: 3}.items():
        assert_same_state(new_opt["state"][new_id], old_opt["state"][old_id])

    model = SimpleModel()
    model.load_state_dict(after["model"])
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    opt.load_state_dict(new_opt)
    # moments, tensor by tensor, on the live optimizer: fc3 has what fc2 had
    old_params = dict(zip(["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"], range(4)))
    for new_key, old_key in [("fc1.weight", "fc1.weight"), ("fc3.weight", "fc2.weight")]:
        live = opt.state[model.get_parameter(new_key)]
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert same(live[name], old_opt["state"][old_params[old_key]][name])
    assert model.fc2.weight not in opt.state
    x = torch.randn(4, 10)
    assert torch.equal(model(x), old_model(x))  # the identity fc2 keeps the function
    train(model, opt, batches(2, 3, (10,), 5))
    assert float(opt.state[model.fc3.weight]["step"]) == 6.0
    assert float(opt.state[model.fc2.weight]["step"]) == 3.0


def test_dry_run_tells_what_happens_to_the_optimizer_state(project: Path, run: Run) -> None:
    v1_training_checkpoint("ckpt.pt", lambda m: torch.optim.Adam(m.parameters(), 1e-2))
    data = Path("ckpt.pt").read_bytes()
    out = run("upgrade", "ckpt.pt", "--from", INITIAL, "--dry-run").stdout
    assert (
        "Optimizer state at 'optimizer': 4 -> 6 parameters in 1 param group "
        "(2 moved, 2 new without state; state: step, exp_avg, exp_avg_sq)"
    ) in out
    assert "    fc2.weight: new parameter, starts with no state (#2)" in out
    assert "    fc3.weight: state of fc2.weight (#2 -> #4)" in out
    assert "    2 other parameters keep their state" in out
    assert Path("ckpt.pt").read_bytes() == data


def test_several_param_groups_keep_their_members_and_settings(project: Path, run: Run) -> None:
    def make(m: nn.Module) -> torch.optim.Optimizer:
        assert isinstance(m, SimpleModelV1)
        groups = [
            {"params": list(m.fc1.parameters()), "lr": 0.1},
            {"params": list(m.fc2.parameters()), "lr": 0.01},
        ]
        return torch.optim.SGD(groups, lr=0.05, momentum=0.9)

    v1_training_checkpoint("ckpt.pt", make)
    run("upgrade", "ckpt.pt", "--from", INITIAL, "-o", "up.pt")
    old_opt, new_opt = load_dict("ckpt.pt")["optimizer"], load_dict("up.pt")["optimizer"]
    g0, g1 = new_opt["param_groups"]
    # the new fc2 joins the group of the parameter before it (fc1's); fc3 keeps fc2's
    assert g0 == {**old_opt["param_groups"][0], "params": [0, 1, 2, 3]}
    assert g1 == {**old_opt["param_groups"][1], "params": [4, 5]}
    assert list(new_opt["state"]) == [0, 1, 4, 5]
    for new_id, old_id in {0: 0, 1: 1, 4: 2, 5: 3}.items():
        assert same(
            new_opt["state"][new_id]["momentum_buffer"], old_opt["state"][old_id]["momentum_buffer"]
        )
    model = SimpleModel()
    model.load_state_dict(load_dict("up.pt")["model"])
    opt = torch.optim.SGD(
        [
            {"params": [*model.fc1.parameters(), *model.fc2.parameters()], "lr": 0.1},
            {"params": list(model.fc3.parameters()), "lr": 0.01},
        ],
        lr=0.05,
        momentum=0.9,
    )
    opt.load_state_dict(new_opt)
    assert same(
        opt.state[model.fc3.bias]["momentum_buffer"], old_opt["state"][3]["momentum_buffer"]
    )
    train(model, opt, batches(2, 2, (10,), 5))


def test_downgrade_gives_back_the_original_optimizer_state(project: Path, run: Run) -> None:
    v1_training_checkpoint("ckpt.pt", lambda m: torch.optim.AdamW(m.parameters(), 1e-2))
    run("upgrade", "ckpt.pt", "--from", INITIAL, "-o", "up.pt")
    run("downgrade", "up.pt", INITIAL, "-o", "back.pt")
    old_opt, back = load_dict("ckpt.pt")["optimizer"], load_dict("back.pt")["optimizer"]
    assert back["param_groups"] == old_opt["param_groups"]
    assert list(back["state"]) == list(old_opt["state"])
    for pid, entry in old_opt["state"].items():
        assert_same_state(back["state"][pid], entry)


# --------------------------------------------------------------------- renames resume bit for bit


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "guessed-kinds"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rename_only_resume_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run, name: str, with_model: bool
) -> None:
    monkeypatch.chdir(tmp_path)
    model_spec = "tests.test_training:renamed_net" if with_model else None
    two_step_lineage(
        tmp_path,
        (R1, R2),
        'op.rename_prefix("fc1.", "enc.")',
        'op.rename_prefix("enc.", "fc1.")',
        model=model_spec,
    )
    make = OPTIMIZERS[name]
    torch.manual_seed(0)
    old = Net()
    opt = make(old.parameters())
    train(old, opt, batches(1, 3, (6,), 3))
    torch.save({"model": old.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, "ckpt.pt")
    run("upgrade", "ckpt.pt", "--from", R1, "-o", "up.pt")
    before, after = load_dict("ckpt.pt"), load_dict("up.pt")
    # same positions: buffers (running stats) never count, so nothing moved
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    for pid, entry in before["optimizer"]["state"].items():
        assert_same_state(after["optimizer"]["state"][pid], entry)

    data = batches(2, 4, (6,), 3)
    a = Net()
    a.load_state_dict(before["model"])
    opt_a = make(a.parameters())
    opt_a.load_state_dict(before["optimizer"])
    train(a, opt_a, data)
    b = Net("enc")
    b.load_state_dict(after["model"])
    opt_b = make(b.parameters())
    opt_b.load_state_dict(after["optimizer"])
    train(b, opt_b, data)
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sb) == [k.replace("fc1.", "enc.") for k in sa]
    for key, value in sa.items():
        assert same(sb[key.replace("fc1.", "enc.")], value), key
    for pa, pb in zip(a.parameters(), b.parameters()):
        for state_name, value in opt_a.state[pa].items():
            got = opt_b.state[pb][state_name]
            assert same(got, value) if isinstance(value, torch.Tensor) else got == value


def test_tied_parameters_count_once_and_resume_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    two_step_lineage(
        tmp_path,
        (R1, R2),
        'op.rename_prefix("mid.", "hidden.")',
        'op.rename_prefix("hidden.", "mid.")',
    )
    torch.manual_seed(0)
    old = Tied()
    opt = torch.optim.Adam(old.parameters(), 1e-2)
    assert len(opt.param_groups[0]["params"]) == 4  # emb/out weight counted once
    train_tied(old, opt, 1, 3)
    torch.save({"model": old.state_dict(), "optimizer": opt.state_dict()}, "ckpt.pt")
    run("upgrade", "ckpt.pt", "--from", R1, "-o", "up.pt")
    before, after = load_dict("ckpt.pt"), load_dict("up.pt")
    assert after["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    for pid, entry in before["optimizer"]["state"].items():
        assert_same_state(after["optimizer"]["state"][pid], entry)
    a, b = Tied(), Tied("hidden")
    a.load_state_dict(before["model"])
    b.load_state_dict(after["model"])
    opt_a, opt_b = torch.optim.Adam(a.parameters(), 1e-2), torch.optim.Adam(b.parameters(), 1e-2)
    opt_a.load_state_dict(before["optimizer"])
    opt_b.load_state_dict(after["optimizer"])
    train_tied(a, opt_a, 2, 3)
    train_tied(b, opt_b, 2, 3)
    for key, value in a.state_dict().items():
        assert same(b.state_dict()[key.replace("mid.", "hidden.")], value), key


# --------------------------------------------------------------------- every transform

# (key, shape) of the hand-made checkpoint, in state-dict order; all parameters.
SHAPES = {
    "a": (4, 6),
    "b": (2, 3, 4),
    "c": (6,),
    "d": (4, 3),
    "e": (5,),
    "q": (2, 3),
    "k": (2, 3),
    "s": (6, 2),
    "h": (3,),
    "gone": (2,),
}
TRANSFORMS = (
    "op.transpose('a', 0, 1); op.permute('b', (2, 0, 1)); op.reshape('c', (2, 3)); "
    "op.resize('d', (6, 3), init='normal'); op.resize('e', (3,)); "
    "op.concat(['q', 'k'], into='qk'); op.split('s', into=['s1', 's2'], sizes=[2, 4]); "
    "op.cast('h', torch.float64); op.drop_key('gone'); op.add_tensor('z', (3,), init='ones')"
)


class Parameters(nn.Module):
    """A model that is only parameters, in the given order (the ``model =`` of a lineage)."""

    def __init__(self, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        super().__init__()
        for key, (shape, dtype) in specs.items():
            self.register_parameter(key, nn.Parameter(torch.zeros(shape, dtype=dtype)))


F32 = torch.float32


def after_transforms() -> nn.Module:
    """The handmade model after TRANSFORMS: the order the new parameters have in the model."""
    shapes = {"a": (6, 4), "b": (4, 2, 3), "c": (2, 3), "d": (6, 3), "e": (3,), "qk": (4, 3)}
    shapes |= {"s1": (2, 2), "s2": (4, 2)}
    specs = {k: (v, F32) for k, v in shapes.items()}
    return Parameters({**specs, "h": ((3,), torch.float64), "z": ((3,), F32)})


def after_reset() -> nn.Module:
    shapes = {k: v for k, v in SHAPES.items() if k not in ("q", "k")}
    order = ["a", "b", "c", "d", "e", "qk", "s", "h", "gone"]
    return Parameters({k: ((4, 3) if k == "qk" else shapes[k], F32) for k in order})


def handmade_checkpoint(path: str, steps: dict[str, float] | None = None) -> dict[str, Any]:
    """Weights and an Adam-shaped state with known values (``step`` per key)."""
    g = torch.Generator().manual_seed(3)
    sd = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    state = {
        i: {
            "step": torch.tensor((steps or {}).get(k, 5.0)),
            "exp_avg": torch.randn(s, generator=g),
            "exp_avg_sq": torch.rand(s, generator=g),
        }
        for i, (k, s) in enumerate(SHAPES.items())
    }
    optimizer = {"state": state, "param_groups": [{"lr": 0.1, "params": list(range(len(SHAPES)))}]}
    ckpt = {"model": sd, "optimizer": optimizer, "epoch": 9}
    torch.save(ckpt, path)
    return ckpt


def test_every_transform_moves_the_state_like_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    two_step_lineage(tmp_path, (R1, R2), TRANSFORMS)
    ckpt = handmade_checkpoint("ckpt.pt", steps={"q": 5.0, "k": 7.0})
    # qk, s1, s2 and z have no place of their own in the old order: the model says where
    err = run("upgrade", "ckpt.pt", "--from", R1, "-o", "up.pt", code=1).stderr
    assert "order after the migration is not known: qk, s1, s2, z are parameters" in err
    two_step_lineage(tmp_path, (R1, R2), TRANSFORMS, model="tests.test_training:after_transforms")
    run("upgrade", "ckpt.pt", "--from", R1, "-o", "up.pt")
    out = load_dict("up.pt")
    keys = ["a", "b", "c", "d", "e", "qk", "s1", "s2", "h", "z"]
    assert list(out["model"]) == keys
    new = out["optimizer"]
    assert new["param_groups"] == [{"lr": 0.1, "params": list(range(10))}]
    assert list(new["state"]) == list(range(9))  # z is new: no state
    old = {k: ckpt["optimizer"]["state"][i] for i, k in enumerate(SHAPES)}
    st = dict(zip(keys, (new["state"].get(i) for i in range(10))))
    for name in ("exp_avg", "exp_avg_sq"):
        assert same(st["a"][name], old["a"][name].t())
        assert same(st["b"][name], old["b"][name].permute(2, 0, 1))
        assert same(st["c"][name], old["c"][name].reshape(2, 3))
        # grown with zeros (not the weights' normal init), shrunk by slicing
        assert same(st["d"][name], torch.cat([old["d"][name], torch.zeros(2, 3)]))
        assert same(st["e"][name], old["e"][name][:3])
        assert same(st["qk"][name], torch.cat([old["q"][name], old["k"][name]]))
        assert same(st["s1"][name], old["s"][name][:2])
        assert same(st["s2"][name], old["s"][name][2:])
        assert same(st["h"][name], old["h"][name].double())
    for key in ("a", "b", "c", "d", "e", "s1", "s2", "h"):
        assert same(st[key]["step"], torch.tensor(5.0)), key
    assert same(st["qk"]["step"], torch.tensor(7.0))  # differing steps: the largest
    assert st["z"] is None
    # parts of one old tensor are separate tensors: an in-place update of one
    # (Adam's step += 1) must not reach the other
    st["s1"]["step"] += 1
    assert float(st["s2"]["step"]) == 5.0
    assert out["epoch"] == 9


def test_map_tensor_is_an_error_unless_the_state_is_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    two_step_lineage(tmp_path, (R1, R2), "op.map_tensor('a', lambda t: t * 2)")
    handmade_checkpoint("ckpt.pt")
    err = run("upgrade", "ckpt.pt", "--from", R1, "-o", "up.pt", code=1).stderr
    assert "the optimizer state of a ('optimizer') cannot follow map_tensor" in err
    assert f"(revision {R2})" in err and "op.reset_optimizer_state('a')" in err
    assert not Path("up.pt").exists()

    two_step_lineage(
        tmp_path,
        (R1, R2),
        "op.map_tensor('a', lambda t: t * 2); op.reset_optimizer_state('a'); "
        "op.reset_optimizer_state('q'); op.concat(['q', 'k'], into='qk')",
        model="tests.test_training:after_reset",
    )
    ckpt = handmade_checkpoint("ckpt.pt")
    result = run("upgrade", "ckpt.pt", "--from", R1, "-o", "up.pt")
    assert "a: state reset, starts with none (#0)" not in result.stdout  # not a dry run
    out = load_dict("up.pt")
    old = ckpt["optimizer"]["state"]
    new = out["optimizer"]["state"]
    assert 0 not in new  # a: afresh
    assert same(out["model"]["a"], ckpt["model"]["a"] * 2)
    qk = new[5]
    assert same(qk["exp_avg"], torch.cat([torch.zeros(2, 3), old[6]["exp_avg"]]))
    assert same(qk["step"], old[6]["step"])  # only k's state is carried
    assert same(new[1]["exp_avg"], old[1]["exp_avg"])
    dry = run("upgrade", "ckpt.pt", "--from", R1, "--dry-run").stdout
    assert "    a: state reset, starts with none (#0)" in dry
    assert "    qk: state of q, k (concat), part reset (#5, #6 -> #5)" in dry


# ------------------------------------------------------------- pairing entries with parameters


def test_optimizer_over_some_parameters_needs_names(project: Path, run: Run) -> None:
    torch.manual_seed(0)
    model = SimpleModelV1()
    opt = torch.optim.SGD(model.fc2.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, batches(1, 2, (10,), 5))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "ckpt.pt")
    err = run("upgrade", "ckpt.pt", "--from", INITIAL, code=1).stderr
    assert "the optimizer state at 'optimizer' holds 2 parameters, but the checkpoint's" in err
    assert "param_names" in err and "optimizer_state = drop" in err

    # with its parameters' names (PyTorch >= 2.6), the state is paired by name
    opt = torch.optim.SGD(model.fc2.named_parameters(prefix="fc2"), lr=0.1, momentum=0.9)
    train(model, opt, batches(1, 2, (10,), 5))
    old_opt = opt.state_dict()
    torch.save({"model": model.state_dict(), "optimizer": old_opt}, "ckpt.pt")
    run("upgrade", "ckpt.pt", "--from", INITIAL, "-o", "up.pt")
    new_opt = load_dict("up.pt")["optimizer"]
    (group,) = new_opt["param_groups"]
    assert group["params"] == [0, 1] and group["param_names"] == ["fc3.weight", "fc3.bias"]
    for pid in (0, 1):
        assert_same_state(new_opt["state"][pid], old_opt["state"][pid])
    new_model = SimpleModel()
    resumed = torch.optim.SGD(new_model.fc3.named_parameters(prefix="fc3"), lr=0.1, momentum=0.9)
    resumed.load_state_dict(new_opt)
    assert same(
        resumed.state[new_model.fc3.weight]["momentum_buffer"],
        old_opt["state"][0]["momentum_buffer"],
    )


def test_parameters_in_another_order_are_refused(project: Path, run: Run) -> None:
    torch.manual_seed(0)
    model = SimpleModelV1()
    opt = torch.optim.Adam([*model.fc2.parameters(), *model.fc1.parameters()], lr=1e-2)
    train(model, opt, batches(1, 2, (10,), 5))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "ckpt.pt")
    err = run("upgrade", "ckpt.pt", "--from", INITIAL, code=1).stderr
    assert "does not line up with the checkpoint's parameters" in err
    assert "entry 0, holds 'exp_avg' of shape [5, 20], but parameter #0" in err


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_optimizer_state_policy_keep_or_drop(project: Path, run: Run, policy: str) -> None:
    torch.manual_seed(0)
    model = SimpleModelV1()
    opt = torch.optim.SGD(model.fc2.parameters(), lr=0.1, momentum=0.9)
    train(model, opt, batches(1, 2, (10,), 5))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 2}, "ckpt.pt")
    with open("alembic_style.ini", "a") as fh:
        fh.write(f"optimizer_state = {policy}\n")
    result = run("upgrade", "ckpt.pt", "--from", INITIAL, "-o", "up.pt")
    assert f"(optimizer_state = {policy})" in result.stderr
    out, before = load_dict("up.pt"), load_dict("ckpt.pt")
    assert out["epoch"] == 2 and "fc3.weight" in out["model"]
    if policy == "drop":
        assert "optimizer" not in out
    else:
        assert out["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
        assert same(
            out["optimizer"]["state"][0]["momentum_buffer"],
            before["optimizer"]["state"][0]["momentum_buffer"],
        )


def test_unknown_policy_is_a_config_error(project: Path, run: Run) -> None:
    v1_training_checkpoint("ckpt.pt", lambda m: torch.optim.Adam(m.parameters(), 1e-2))
    with open("alembic_style.ini", "a") as fh:
        fh.write("optimizer_state = maybe\n")
    err = run("upgrade", "ckpt.pt", "--from", INITIAL, code=1).stderr
    assert "optimizer_state = maybe in [ckptmigrate] is not one of migrate, keep, drop" in err


def test_container_without_optimizer_is_untouched(project: Path, run: Run) -> None:
    torch.manual_seed(0)
    sd = SimpleModelV1().state_dict()
    torch.save({"model": sd, "scheduler": {"last_epoch": 4}}, "ckpt.pt")
    result = run("upgrade", "ckpt.pt", "--from", INITIAL)
    assert "Optimizer state" not in result.stderr
    assert load_dict("ckpt.pt")["scheduler"] == {"last_epoch": 4}


class WithStats(Net):
    """Net plus a float buffer after fc2 with the shape of fc2.bias: kinds cannot be guessed."""

    def __init__(self, first: str = "fc1") -> None:
        super().__init__(first)
        self.post = nn.Module()
        self.post.register_buffer("shift", torch.zeros(3))


def test_base_schema_kinds_tell_a_float_buffer_from_a_parameter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    from ckptmigrate.schema import Schema, write_base_schema

    monkeypatch.chdir(tmp_path)
    two_step_lineage(
        tmp_path, (R1, R2), 'op.rename_prefix("fc1.", "enc.")', 'op.rename_prefix("enc.", "fc1.")'
    )
    torch.manual_seed(0)
    model = WithStats()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train(model, opt, batches(1, 2, (6,), 3))
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, "ckpt.pt")
    # post.shift might be the parameter instead of fc2.bias: both fit the state's shapes
    err = run("upgrade", "ckpt.pt", "--from", R1, code=1).stderr
    assert "several choices of parameters fit the optimizer state equally well" in err
    assert "set `model = package.module:build_model`" in err

    write_base_schema(tmp_path / "migrations", Schema.from_module(WithStats()), "the model")
    run("upgrade", "ckpt.pt", "--from", R1, "-o", "up.pt")
    new, old = load_dict("up.pt")["optimizer"], opt.state_dict()
    assert new["param_groups"] == old["param_groups"]
    for pid, entry in old["state"].items():
        assert_same_state(new["state"][pid], entry)


@pytest.mark.parametrize("wrapper", ["", "module."])
def test_parameter_names_as_ids_are_renamed(project: Path, run: Run, wrapper: str) -> None:
    """Optimizer states keyed by parameter name (as FSDP's full state dict is)."""
    torch.manual_seed(0)
    sd = SimpleModelV1().state_dict()
    names = [wrapper + k for k in sd]
    state = {
        n: {"step": torch.tensor(2.0), "exp_avg": torch.randn(v.shape)}
        for n, v in zip(names, sd.values())
    }
    opt = {"state": state, "param_groups": [{"lr": 0.1, "params": names}]}
    torch.save({"model": {wrapper + k: v for k, v in sd.items()}, "optimizer": opt}, "ckpt.pt")
    run("upgrade", "ckpt.pt", "--from", INITIAL, "-o", "up.pt")
    new = load_dict("up.pt")["optimizer"]
    keys = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]
    assert new["param_groups"] == [{"lr": 0.1, "params": [wrapper + k for k in keys]}]
    assert list(new["state"]) == [
        wrapper + k for k in ("fc1.weight", "fc1.bias", "fc3.weight", "fc3.bias")
    ]
    assert same(
        new["state"][wrapper + "fc3.weight"]["exp_avg"], state[wrapper + "fc2.weight"]["exp_avg"]
    )
