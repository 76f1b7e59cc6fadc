"""Every ``op`` function, checked on real tensors: values, shapes, dtypes and key order.

Ops only rewrite a plan; the tests evaluate that plan against a small state
dict, as the writer would, and compare with what plain torch gives.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.conftest import REVISION_TEMPLATE
from tests.harness.common import same

from ckptmigrate import op
from ckptmigrate.errors import OperationError
from ckptmigrate.operations.checks import OpContext
from ckptmigrate.operations.context import activate
from ckptmigrate.plan.nodes import Source, TensorSpec
from ckptmigrate.plan.state import Evaluator, PlanState
from ckptmigrate.runtime.migration import MigrationStep, run_step
from ckptmigrate.script.directory import load_script

REV = "abc123def456"


# --------------------------------------------------------------------- helpers


def make_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "fc1.weight": torch.randn(4, 3, generator=g),
        "fc1.bias": torch.randn(4, generator=g),
        "fc2.weight": torch.randn(5, 4, generator=g),
        "fc2.bias": torch.randn(5, generator=g),
    }


def migrate(
    sd: dict[str, Any],
    fn: Callable[[], None],
    *,
    revision: str = REV,
    metadata: dict[str, dict[str, Any]] | None = None,
    reads: list[str] | None = None,
) -> tuple[dict[str, Any], PlanState]:
    """Run ``fn`` as a migration over ``sd``; return the evaluated output and the plan."""
    schema = {k: TensorSpec.of(v) if isinstance(v, torch.Tensor) else None for k, v in sd.items()}
    state = PlanState.from_schema(schema, metadata)
    with activate(OpContext(state, revision=revision)):
        fn()

    def read(key: str) -> Any:
        if reads is not None:
            reads.append(key)
        return sd[key]

    ev = Evaluator(state.entries, read)
    return {k: ev(k) for k in state.entries}, state


def symbolic(sd: dict[str, torch.Tensor], fn: Callable[[], None]) -> dict[str, TensorSpec | None]:
    """The schema ``fn`` produces, planned on meta tensors only."""
    state = PlanState.from_schema({k: TensorSpec.of(v) for k, v in sd.items()})
    with activate(OpContext(state, revision=REV)), torch.device("meta"):
        fn()
    return state.schema()


def write_revision(tmp_path: Path, body: str, rev: str = REV, name: str = "") -> Path:
    folder = tmp_path / (name or rev)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{rev}_test.py"
    code = textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")
    path.write_text(REVISION_TEMPLATE.format(rev=rev, body=code), encoding="utf-8")
    return path


def run_file(
    path: Path, sd: dict[str, torch.Tensor], *, sym: bool = False
) -> tuple[dict[str, Any], PlanState]:
    """Run a revision file's upgrade() the way the engine does (forked, seeded RNG)."""
    state = PlanState.from_schema({k: TensorSpec.of(v) for k, v in sd.items()})
    run_step(MigrationStep(load_script(path), True), state, symbolic=sym)
    if sym:
        return {}, state
    ev = Evaluator(state.entries, lambda k: sd[k])
    return {k: ev(k) for k in state.entries}, state


# --------------------------------------------------------------------- renames


def test_rename_key_moves_tensor_without_copying_and_keeps_position() -> None:
    sd = make_sd()
    out, _ = migrate(sd, lambda: op.rename_key("fc1.bias", "fc1.b"))
    assert list(out) == ["fc1.weight", "fc1.b", "fc2.weight", "fc2.bias"]
    assert out["fc1.b"] is sd["fc1.bias"]
    for k in ("fc1.weight", "fc2.weight", "fc2.bias"):
        assert out[k] is sd[k]


def test_rename_key_to_itself_is_a_no_op() -> None:
    sd = make_sd()
    out, _ = migrate(sd, lambda: op.rename_key("fc1.bias", "fc1.bias"))
    assert list(out) == list(sd)
    assert out["fc1.bias"] is sd["fc1.bias"]


def test_rename_key_swap_through_temporary_name() -> None:
    sd = make_sd()

    def fn() -> None:
        op.rename_key("fc1.weight", "tmp")
        op.rename_key("fc2.weight", "fc1.weight")
        op.rename_key("tmp", "fc2.weight")

    out, _ = migrate(sd, fn)
    assert list(out) == ["fc2.weight", "fc1.bias", "fc1.weight", "fc2.bias"]  # each keeps its slot
    assert out["fc1.weight"] is sd["fc2.weight"]
    assert out["fc2.weight"] is sd["fc1.weight"]


def test_rename_key_of_non_tensor_entry() -> None:
    sd: dict[str, Any] = {**make_sd(), "fc1._extra_state": {"a": 1}}
    out, state = migrate(sd, lambda: op.rename_key("fc1._extra_state", "fc9._extra_state"))
    assert out["fc9._extra_state"] == {"a": 1}
    assert state.schema()["fc9._extra_state"] is None


def test_rename_prefix_renames_every_key_in_place() -> None:
    sd = {
        "a.x": torch.ones(1),
        "enc.l0.w": torch.ones(2),
        "b": torch.ones(3),
        "enc.l1.w": torch.ones(4),
    }
    out, _ = migrate(sd, lambda: op.rename_prefix("enc.", "encoder."))
    assert list(out) == ["a.x", "encoder.l0.w", "b", "encoder.l1.w"]
    assert out["encoder.l0.w"] is sd["enc.l0.w"]
    assert out["encoder.l1.w"] is sd["enc.l1.w"]


def test_rename_prefix_strips_a_wrapper() -> None:
    sd = {"module.fc.weight": torch.ones(2, 2), "module.fc.bias": torch.zeros(2)}
    out, _ = migrate(sd, lambda: op.rename_prefix("module.", ""))
    assert list(out) == ["fc.weight", "fc.bias"]


def test_rename_prefix_is_a_plain_string_prefix() -> None:
    # "layer1." is not a prefix of "layer10.w": only the dotted prefix matches
    sd = {"layer1.w": torch.ones(1), "layer10.w": torch.ones(2)}
    out, _ = migrate(sd, lambda: op.rename_prefix("layer1.", "block1."))
    assert list(out) == ["block1.w", "layer10.w"]


def test_rename_prefix_may_move_onto_names_it_frees() -> None:
    # "a." -> "b." while "b." -> "c." in one go is not a collision: a chain
    sd = {"a.w": torch.ones(1), "a.b.w": torch.ones(2)}
    out, _ = migrate(sd, lambda: op.rename_prefix("a.", "a.b."))
    assert list(out) == ["a.b.w", "a.b.b.w"]
    assert out["a.b.w"] is sd["a.w"]


def test_rename_prefix_moves_module_metadata() -> None:
    sd = {"enc.l0.w": torch.ones(1), "enc.w": torch.ones(1), "dec.w": torch.ones(1)}
    meta = {
        "": {"version": 1, "ckptmigrate.revision": "r0"},
        "enc": {"version": 2},
        "enc.l0": {"version": 3},
        "dec": {"version": 4},
    }
    _, state = migrate(sd, lambda: op.rename_prefix("enc.", "encoder."), metadata=meta)
    assert state.metadata == {
        "": {"version": 1, "ckptmigrate.revision": "r0"},
        "encoder": {"version": 2},
        "encoder.l0": {"version": 3},
        "dec": {"version": 4},
    }


def test_rename_prefix_replaces_leftover_metadata_of_a_dropped_module() -> None:
    sd = {"fc2.w": torch.ones(1), "fc3.w": torch.ones(2)}
    meta = {"": {}, "fc3": {"version": 1}, "fc2": {"version": 2}}

    def fn() -> None:
        op.drop_key("fc3.w")  # drop_key leaves fc3's module metadata behind
        op.rename_prefix("fc2.", "fc3.")

    out, state = migrate(sd, fn, metadata=meta)
    assert list(out) == ["fc3.w"]
    assert state.metadata == {"": {}, "fc3": {"version": 2}}


def test_rename_prefix_keeps_root_metadata_when_a_module_moves_to_the_root() -> None:
    sd = {"model.w": torch.ones(1)}
    meta = {"": {"ckptmigrate.revision": "r0"}, "model": {"version": 2}}
    _, state = migrate(sd, lambda: op.rename_prefix("model.", ""), metadata=meta)
    assert state.metadata[""] == {"ckptmigrate.revision": "r0"}


def test_rename_regex_prepends_with_caret() -> None:
    sd = make_sd()
    meta = {"": {"v": 0}, "fc1": {"version": 1}, "fc2": {"version": 1}}
    out, state = migrate(sd, lambda: op.rename_regex(r"^", "transformer."), metadata=meta)
    assert list(out) == ["transformer." + k for k in sd]
    for k, v in sd.items():
        assert out["transformer." + k] is v
    assert state.metadata == {
        "": {"v": 0},
        "transformer.fc1": {"version": 1},
        "transformer.fc2": {"version": 1},
    }


def test_rename_regex_with_groups_leaves_other_keys_alone() -> None:
    sd = {
        "layers.0.attn.w": torch.ones(1),
        "layers.1.attn.w": torch.ones(2),
        "head.w": torch.ones(3),
    }
    out, _ = migrate(
        sd, lambda: op.rename_regex(r"^layers\.(\d+)\.attn\.", r"blocks.\1.attention.")
    )
    assert list(out) == ["blocks.0.attention.w", "blocks.1.attention.w", "head.w"]
    assert out["head.w"] is sd["head.w"]


def test_rename_regex_can_swap_names() -> None:
    sd = {"a.w": torch.ones(1), "b.w": torch.ones(2)}
    swap = {"a": "b", "b": "a"}
    out, _ = migrate(sd, lambda: op.rename_regex(r"^(a|b)\.", lambda m: swap[m[1]] + "."))  # type: ignore[arg-type]
    assert list(out) == ["b.w", "a.w"]
    assert out["b.w"] is sd["a.w"]
    assert out["a.w"] is sd["b.w"]


_PATTERN_PARTS = [*"ab._-:^$\\()[]*+?{}|/ #é~=", "\\.", "\\d", "\\\\", "\\-", "{1}", "\\b"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.lists(st.sampled_from(_PATTERN_PARTS), max_size=5).map("".join),
    repl=st.lists(st.sampled_from([*"ab._-", "\\1", "\\\\"]), max_size=3).map("".join),
    keys=st.lists(st.text("ab._-:\\é# ", min_size=1, max_size=8), max_size=6, unique=True),
)
def test_rename_regex_renames_each_key_as_re_sub_does(
    pattern: str, repl: str, keys: list[str]
) -> None:
    # plain-text patterns take a faster path than the regular expression engine: same result
    try:
        rx = re.compile(pattern)
        want = {k: rx.sub(repl, k) for k in keys}
    except (re.error, IndexError):
        return
    if sorted(set(want.values())) != sorted(want.values()) or "" in want.values():
        return  # two keys meet, or one becomes empty: refused (tested above)
    if all(k == v for k, v in want.items()):
        return  # renamed no key: refused (tested above)
    sd = {k: torch.full((1,), float(i)) for i, k in enumerate(keys)}
    if any(v in sd and want[v] == v for k, v in want.items() if k != v):
        return  # onto a key that stays: refused (tested above)
    out, _ = migrate(sd, lambda: op.rename_regex(pattern, repl))
    assert list(out) == [want[k] for k in keys]
    for k in keys:
        assert out[want[k]] is sd[k]


# --------------------------------------------------------------------- drops


def test_drop_key() -> None:
    sd = make_sd()
    out, state = migrate(sd, lambda: op.drop_key("fc1.bias"))
    assert list(out) == ["fc1.weight", "fc2.weight", "fc2.bias"]
    assert out["fc2.weight"] is sd["fc2.weight"]
    assert "fc1.bias" not in state.source_keys()


def test_drop_key_then_add_again() -> None:
    sd = make_sd()

    def fn() -> None:
        op.drop_key("fc1.bias")
        op.add_tensor("fc1.bias", (4,), init="ones")

    out, _ = migrate(sd, fn)
    assert list(out) == ["fc1.weight", "fc2.weight", "fc2.bias", "fc1.bias"]
    assert same(out["fc1.bias"], torch.ones(4))


def test_drop_prefix_drops_keys_and_metadata() -> None:
    sd = {"enc.l0.w": torch.ones(1), "dec.w": torch.ones(1), "enc.w": torch.ones(1)}
    meta = {"": {"r": 1}, "enc": {"version": 2}, "enc.l0": {"version": 3}, "dec": {"version": 4}}
    out, state = migrate(sd, lambda: op.drop_prefix("enc."), metadata=meta)
    assert list(out) == ["dec.w"]
    assert out["dec.w"] is sd["dec.w"]
    assert state.metadata == {"": {"r": 1}, "dec": {"version": 4}}
    assert state.source_keys() == {"dec.w"}


def test_renames_and_drops_read_no_dropped_tensor() -> None:
    sd = make_sd()
    reads: list[str] = []

    def fn() -> None:
        op.drop_prefix("fc1.")
        op.rename_prefix("fc2.", "head.")

    out, _ = migrate(sd, fn, reads=reads)
    assert sorted(reads) == ["fc2.bias", "fc2.weight"]
    assert out["head.weight"] is sd["fc2.weight"]


# --------------------------------------------------------------------- add_tensor


@pytest.mark.parametrize(
    ("init", "kwargs", "expected"),
    [
        ("zeros", {}, torch.zeros(3, 4)),
        ("ones", {}, torch.ones(3, 4)),
        ("eye", {}, torch.eye(3, 4)),
        ("constant", {"value": 2.5}, torch.full((3, 4), 2.5)),
    ],
)
def test_add_tensor_fixed_inits(init: str, kwargs: dict[str, Any], expected: torch.Tensor) -> None:
    sd = make_sd()
    out, _ = migrate(sd, lambda: op.add_tensor("new", (3, 4), init=init, **kwargs))
    assert list(out) == [*sd, "new"]
    assert same(out["new"], expected)


def test_add_tensor_defaults_to_float32_zeros() -> None:
    out, _ = migrate({}, lambda: op.add_tensor("b", 5))
    assert same(out["b"], torch.zeros(5))


def test_add_tensor_scalar_and_empty_shapes() -> None:
    def fn() -> None:
        op.add_tensor("s", (), init="constant", value=3)
        op.add_tensor("e", (0, 4), init="xavier_uniform")
        op.add_tensor("n", (4, 0), init="kaiming_uniform")
        op.add_tensor("z", (0, 0), init="xavier_uniform")  # a zero fan must not divide by 0

    out, _ = migrate({}, fn)
    assert same(out["s"], torch.tensor(3.0))
    assert same(out["e"], torch.empty(0, 4))
    assert same(out["n"], torch.empty(4, 0))
    assert same(out["z"], torch.empty(0, 0))


def test_add_tensor_normal_has_requested_statistics() -> None:
    out, _ = migrate({}, lambda: op.add_tensor("w", (200, 100), init="normal", mean=3.0, std=0.5))
    w = out["w"]
    assert w.dtype == torch.float32 and w.shape == (200, 100)
    assert abs(w.mean().item() - 3.0) < 0.02
    assert abs(w.std().item() - 0.5) < 0.02


def test_add_tensor_uniform_stays_in_range() -> None:
    out, _ = migrate({}, lambda: op.add_tensor("w", (100, 100), init="uniform", a=-2.0, b=-1.0))
    w = out["w"]
    assert w.min().item() >= -2.0 and w.max().item() < -1.0
    assert abs(w.mean().item() + 1.5) < 0.02


def test_add_tensor_kaiming_uniform_bound() -> None:
    out, _ = migrate(
        {}, lambda: op.add_tensor("w", (64, 300), init="kaiming_uniform", a=math.sqrt(5))
    )
    bound = 1 / math.sqrt(300)  # what nn.Linear uses: gain(leaky_relu, sqrt 5) * sqrt(3 / fan_in)
    w = out["w"]
    assert w.abs().max().item() <= bound + 1e-7
    assert w.abs().max().item() > 0.9 * bound


def test_add_tensor_kaiming_uniform_fan_out_relu() -> None:
    out, _ = migrate(
        {},
        lambda: op.add_tensor(
            "w", (400, 30), init="kaiming_uniform", mode="fan_out", nonlinearity="relu"
        ),
    )
    bound = math.sqrt(2.0) * math.sqrt(3.0 / 400)
    assert out["w"].abs().max().item() <= bound + 1e-6
    assert out["w"].abs().max().item() > 0.9 * bound


def test_add_tensor_xavier_uniform_bound() -> None:
    out, _ = migrate({}, lambda: op.add_tensor("w", (60, 40), init="xavier_uniform", gain=2.0))
    bound = 2.0 * math.sqrt(6.0 / (60 + 40))
    assert out["w"].abs().max().item() <= bound + 1e-6
    assert out["w"].abs().max().item() > 0.9 * bound


def test_add_tensor_callable_fills_in_place() -> None:
    def arange_fill(t: torch.Tensor) -> None:
        t.copy_(torch.arange(t.numel(), dtype=t.dtype).reshape(t.shape))

    out, _ = migrate({}, lambda: op.add_tensor("w", (2, 3), init=arange_fill))
    assert same(out["w"], torch.arange(6.0).reshape(2, 3))


def test_add_tensor_callable_returning_a_tensor() -> None:
    out, _ = migrate(
        {},
        lambda: op.add_tensor("w", (3,), dtype=torch.float64, init=lambda t: torch.ones(3) * 7),
    )
    assert same(out["w"], torch.full((3,), 7.0, dtype=torch.float64))


def test_add_tensor_callable_torch_init_is_deterministic_and_leaves_rng_alone() -> None:
    def fn() -> None:
        op.add_tensor("w", (8, 8), init=torch.nn.init.orthogonal_)

    before = torch.get_rng_state()
    a, _ = migrate({}, fn)
    torch.manual_seed(999)
    b, _ = migrate({}, fn)
    torch.set_rng_state(before)
    c, _ = migrate({}, fn)
    assert torch.equal(torch.get_rng_state(), before)
    assert same(a["w"], b["w"]) and same(a["w"], c["w"])
    assert torch.allclose(a["w"] @ a["w"].T, torch.eye(8), atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_callable_init_leaves_the_cuda_rng_alone() -> None:
    torch.cuda.init()
    before = torch.cuda.get_rng_state()
    out, _ = migrate({}, lambda: op.add_tensor("w", (3,), init=lambda t: t.normal_()))
    assert out["w"].abs().sum() > 0
    assert torch.equal(torch.cuda.get_rng_state(), before)


@pytest.mark.parametrize("dtype", [torch.float16, "float16", "torch.float16"])
def test_add_tensor_dtype_as_dtype_or_string(dtype: Any) -> None:
    out, state = migrate({}, lambda: op.add_tensor("w", (2, 2), dtype=dtype, init="eye"))
    assert same(out["w"], torch.eye(2, dtype=torch.float16))
    assert state.schema()["w"] == TensorSpec((2, 2), torch.float16)


@pytest.mark.parametrize("init", ["normal", "uniform", "kaiming_uniform", "xavier_uniform"])
def test_random_inits_on_float8(init: str) -> None:
    out, _ = migrate({}, lambda: op.add_tensor("w", (8, 8), dtype="float8_e4m3fn", init=init))
    assert out["w"].dtype == torch.float8_e4m3fn and out["w"].shape == (8, 8)
    assert out["w"].float().abs().sum() > 0


def test_add_tensor_integer_and_bool_dtypes() -> None:
    def fn() -> None:
        op.add_tensor("i", (3,), dtype="int64", init="constant", value=7)
        op.add_tensor("b", (2, 2), dtype=torch.bool, init="eye")
        op.add_tensor("n", (), dtype=torch.int64)

    out, _ = migrate({}, fn)
    assert same(out["i"], torch.full((3,), 7, dtype=torch.int64))
    assert same(out["b"], torch.eye(2, dtype=torch.bool))
    assert same(out["n"], torch.tensor(0))


def test_add_tensor_shape_may_be_a_torch_size() -> None:
    sd = make_sd()
    out, _ = migrate(sd, lambda: op.add_tensor("w", op.shape("fc2.weight"), init="ones"))
    assert same(out["w"], torch.ones(5, 4))


@pytest.mark.parametrize(
    ("init", "kwargs"),
    [
        ("normal", {}),
        ("uniform", {"a": -1, "b": 1}),
        ("kaiming_uniform", {}),
        ("xavier_uniform", {}),
        (lambda t: t.normal_(), {}),
    ],
)
def test_random_inits_are_seeded_from_revision_and_key(init: Any, kwargs: dict[str, Any]) -> None:
    def fn() -> None:
        op.add_tensor("w1", (6, 5), init=init, **kwargs)
        op.add_tensor("w2", (6, 5), init=init, **kwargs)

    before = torch.get_rng_state()
    a, _ = migrate({}, fn)
    b, _ = migrate({}, fn)
    other, _ = migrate({}, fn, revision="ffff00001111")
    assert torch.equal(torch.get_rng_state(), before)
    assert same(a["w1"], b["w1"]) and same(a["w2"], b["w2"])
    assert not torch.equal(a["w1"], a["w2"])  # another key, other numbers
    assert not torch.equal(a["w1"], other["w1"])  # another revision, other numbers


def test_random_init_is_independent_of_the_global_seed() -> None:
    def fn() -> None:
        op.add_tensor("w", (4, 4), init="normal")

    torch.manual_seed(0)
    a, _ = migrate({}, fn)
    torch.manual_seed(1)
    b, _ = migrate({}, fn)
    assert same(a["w"], b["w"])


def test_add_tensor_symbolic_plan_allocates_nothing() -> None:
    schema = symbolic(make_sd(), lambda: op.add_tensor("big", (1 << 20, 1 << 20), init="normal"))
    assert schema["big"] == TensorSpec((1 << 20, 1 << 20), torch.float32)


# --------------------------------------------------------------------- add_module


def test_add_module_linear() -> None:
    sd = make_sd()
    lin = torch.nn.Linear(20, 5)
    out, state = migrate(sd, lambda: op.add_module("fc3", lin))
    assert list(out) == [*sd, "fc3.weight", "fc3.bias"]
    assert same(out["fc3.weight"], lin.weight.detach())
    assert same(out["fc3.bias"], lin.bias.detach())
    assert not out["fc3.weight"].requires_grad
    assert state.metadata["fc3"] == {"version": 1}
    # a snapshot: changing the module afterwards changes nothing
    with torch.no_grad():
        lin.weight.zero_()
    assert out["fc3.weight"].abs().sum() > 0
    assert torch.nn.Linear(20, 5).load_state_dict(
        {k[4:]: out[k] for k in ("fc3.weight", "fc3.bias")}
    )


def test_add_module_with_buffers_and_metadata() -> None:
    bn = torch.nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.num_batches_tracked.fill_(3)
    out, state = migrate({}, lambda: op.add_module("enc.bn.", bn))
    assert list(out) == [
        "enc.bn.weight",
        "enc.bn.bias",
        "enc.bn.running_mean",
        "enc.bn.running_var",
        "enc.bn.num_batches_tracked",
    ]
    assert same(out["enc.bn.running_mean"], torch.full((6,), 0.5))
    assert same(out["enc.bn.running_var"], torch.ones(6))
    assert same(out["enc.bn.num_batches_tracked"], torch.tensor(3))
    assert state.metadata["enc.bn"] == {"version": 2}
    fresh = torch.nn.BatchNorm1d(6)
    fresh.load_state_dict({k.removeprefix("enc.bn."): v for k, v in out.items()})
    assert fresh.num_batches_tracked.item() == 3


def test_add_module_nested_metadata() -> None:
    seq = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.BatchNorm1d(3))
    _, state = migrate({}, lambda: op.add_module("head", seq))
    assert state.metadata == {
        "head": {"version": 1},
        "head.0": {"version": 1},
        "head.1": {"version": 2},
    }


def test_add_module_skips_non_persistent_buffers() -> None:
    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.register_buffer("cache", torch.zeros(2), persistent=False)

    out, _ = migrate({}, lambda: op.add_module("m", M()))
    assert list(out) == ["m.w"]


def test_add_module_built_in_a_script_is_deterministic(tmp_path: Path) -> None:
    body = """
    op.add_module("fc3", torch.nn.Linear(20, 5))
    op.add_module("emb", torch.nn.Embedding(10, 4))
    op.add_tensor("w", (3, 3), init="normal")
    """
    sd = make_sd()
    path = write_revision(tmp_path, body)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a, _ = run_file(path, sd)
    assert torch.equal(torch.get_rng_state(), before)
    expected_next = torch.rand(3)
    torch.set_rng_state(before)
    b, _ = run_file(write_revision(tmp_path, body, name="copy"), sd)
    assert torch.equal(torch.rand(3), expected_next)  # caller's RNG stream unchanged
    for k in ("fc3.weight", "fc3.bias", "emb.weight", "w"):
        assert same(a[k], b[k]), k
    c, _ = run_file(write_revision(tmp_path, body, rev="0123456789ab"), sd)
    assert not torch.equal(a["fc3.weight"], c["fc3.weight"])
    assert not torch.equal(a["w"], c["w"])


def test_add_module_in_a_symbolic_run_builds_on_meta(tmp_path: Path) -> None:
    path = write_revision(tmp_path, 'op.add_module("big", torch.nn.Linear(1 << 16, 1 << 16))')
    _, state = run_file(path, make_sd(), sym=True)
    assert state.schema()["big.weight"] == TensorSpec((1 << 16, 1 << 16), torch.float32)


# --------------------------------------------------------------------- one-tensor transforms


def test_reshape() -> None:
    sd = make_sd()

    def fn() -> None:
        op.reshape("fc1.weight", (2, 6))
        op.reshape("fc2.weight", (-1,))
        op.reshape("fc2.bias", [5, 1, -1])
        op.reshape("fc1.bias", 4)

    out, state = migrate(sd, fn)
    assert list(out) == list(sd)
    assert same(out["fc1.weight"], sd["fc1.weight"].reshape(2, 6))
    assert same(out["fc2.weight"], sd["fc2.weight"].reshape(20))
    assert same(out["fc2.bias"], sd["fc2.bias"].reshape(5, 1, 1))
    assert same(out["fc1.bias"], sd["fc1.bias"])
    assert state.schema()["fc2.weight"] == TensorSpec((20,), torch.float32)


def test_reshape_scalar_round_trip() -> None:
    sd = {"s": torch.tensor(4.0)}

    def fn() -> None:
        op.reshape("s", (1, 1))
        op.reshape("s", ())

    out, _ = migrate(sd, fn)
    assert same(out["s"], torch.tensor(4.0))


def test_transpose() -> None:
    sd = {"a": torch.arange(24.0).reshape(2, 3, 4), "b": torch.ones(1)}

    def fn() -> None:
        op.transpose("a", 0, -1)

    out, state = migrate(sd, fn)
    assert same(out["a"], sd["a"].transpose(0, 2))
    assert out["a"].is_contiguous()
    assert state.schema()["a"] == TensorSpec((4, 3, 2), torch.float32)
    assert list(out) == ["a", "b"]


def test_permute() -> None:
    sd = {"a": torch.arange(24.0).reshape(2, 3, 4)}
    out, state = migrate(sd, lambda: op.permute("a", (2, 0, -2)))
    assert same(out["a"], sd["a"].permute(2, 0, 1))
    assert out["a"].is_contiguous()
    assert state.schema()["a"] == TensorSpec((4, 2, 3), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16", "int32", torch.float64])
def test_cast(dtype: Any) -> None:
    sd = make_sd()
    out, state = migrate(sd, lambda: op.cast("fc1.weight", dtype))
    target = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert same(out["fc1.weight"], sd["fc1.weight"].to(target))
    assert state.schema()["fc1.weight"] == TensorSpec((4, 3), target)
    assert sd["fc1.weight"].dtype == torch.float32


def test_transforms_chain_and_keep_positions() -> None:
    sd = make_sd()

    def fn() -> None:
        op.transpose("fc1.weight", 0, 1)
        op.cast("fc1.weight", torch.float64)
        op.reshape("fc1.weight", (-1,))
        op.rename_key("fc1.weight", "fc1.flat")

    out, _ = migrate(sd, fn)
    assert list(out) == ["fc1.flat", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert same(out["fc1.flat"], sd["fc1.weight"].T.to(torch.float64).reshape(-1))


# --------------------------------------------------------------------- resize


def test_resize_grows_a_vocabulary_keeping_old_rows() -> None:
    emb = torch.randn(100, 16, generator=torch.Generator().manual_seed(0))
    out, state = migrate({"emb.weight": emb}, lambda: op.resize("emb.weight", (120, 16)))
    assert state.schema()["emb.weight"] == TensorSpec((120, 16), torch.float32)
    assert same(out["emb.weight"][:100], emb)
    assert same(out["emb.weight"][100:], torch.zeros(20, 16))


def test_resize_grows_with_random_init_deterministically() -> None:
    emb = torch.randn(100, 16, generator=torch.Generator().manual_seed(0))

    def fn() -> None:
        op.resize("emb.weight", (120, 16), init="normal", std=0.02)

    a, _ = migrate({"emb.weight": emb}, fn)
    b, _ = migrate({"emb.weight": emb}, fn)
    c, _ = migrate({"emb.weight": emb}, fn, revision="999999999999")
    assert same(a["emb.weight"][:100], emb)
    assert same(a["emb.weight"], b["emb.weight"])
    assert not torch.equal(a["emb.weight"][100:], c["emb.weight"][100:])
    new = a["emb.weight"][100:]
    assert 0.01 < new.std().item() < 0.03


def test_resize_shrinks_by_slicing() -> None:
    w = torch.arange(20.0).reshape(4, 5)
    out, _ = migrate({"w": w}, lambda: op.resize("w", (2, 3)))
    assert same(out["w"], w[:2, :3])
    assert out["w"].untyped_storage().nbytes() == 2 * 3 * 4  # a copy, not a view of w


def test_resize_mixed_grow_and_shrink_per_dim() -> None:
    w = torch.arange(20, dtype=torch.int64).reshape(4, 5)
    out, _ = migrate({"w": w}, lambda: op.resize("w", (6, 2), init="constant", value=-1))
    expected = torch.full((6, 2), -1, dtype=torch.int64)
    expected[:4] = w[:, :2]
    assert same(out["w"], expected)


def test_resize_to_same_shape_and_to_zero() -> None:
    w = torch.arange(6.0).reshape(2, 3)

    def fn() -> None:
        op.resize("w", (2, 3))
        op.add_tensor("v", (3,), init="ones")
        op.resize("v", (0,))

    out, _ = migrate({"w": w}, fn)
    assert same(out["w"], w)
    assert same(out["v"], torch.empty(0))


def test_resize_grow_with_eye_and_callable() -> None:
    w = torch.full((2, 2), 5.0)

    def fn() -> None:
        op.resize("w", (3, 3), init="eye")
        op.add_tensor("b", (2,), init="ones")
        op.resize("b", (4,), init=lambda t: t.fill_(9))

    out, _ = migrate({"w": w}, fn)
    assert same(out["w"], torch.tensor([[5.0, 5, 0], [5, 5, 0], [0, 0, 1]]))
    assert same(out["b"], torch.tensor([1.0, 1, 9, 9]))


# --------------------------------------------------------------------- split / concat


def test_split_qkv_equal_parts_in_place() -> None:
    qkv = torch.randn(12, 4, generator=torch.Generator().manual_seed(3))
    sd = {"attn.qkv.weight": qkv, "attn.out.weight": torch.ones(4, 4)}
    into = ["attn.q.weight", "attn.k.weight", "attn.v.weight"]
    out, state = migrate(sd, lambda: op.split("attn.qkv.weight", into))
    assert list(out) == [*into, "attn.out.weight"]
    for i, k in enumerate(into):
        assert same(out[k], qkv[4 * i : 4 * (i + 1)])
        assert state.schema()[k] == TensorSpec((4, 4), torch.float32)


def test_split_along_dim_1_with_sizes() -> None:
    w = torch.arange(30.0).reshape(3, 10)
    out, state = migrate({"w": w}, lambda: op.split("w", ["a", "b", "c"], dim=1, sizes=[2, 5, 3]))
    assert same(out["a"], w[:, :2])
    assert same(out["b"], w[:, 2:7])
    assert same(out["c"], w[:, 7:])
    assert all(out[k].is_contiguous() for k in "abc")
    assert state.schema()["b"] == TensorSpec((3, 5), torch.float32)


def test_split_negative_dim_and_zero_size() -> None:
    w = torch.arange(6.0).reshape(2, 3)
    out, _ = migrate({"w": w}, lambda: op.split("w", ["a", "b"], dim=-1, sizes=[3, 0]))
    assert same(out["a"], w)
    assert same(out["b"], torch.empty(2, 0))


def test_split_may_reuse_the_source_name() -> None:
    w = torch.arange(8.0)
    out, _ = migrate({"w": w}, lambda: op.split("w", ["w", "extra"], sizes=[6, 2]))
    assert list(out) == ["w", "extra"]
    assert same(out["w"], w[:6])


def test_split_reads_the_fused_tensor_once() -> None:
    sd = {"qkv": torch.randn(9, 2)}
    reads: list[str] = []
    out, _ = migrate(sd, lambda: op.split("qkv", ["q", "k", "v"]), reads=reads)
    assert reads == ["qkv"]
    assert same(torch.cat([out["q"], out["k"], out["v"]]), sd["qkv"])


def test_split_parts_do_not_share_the_fused_storage() -> None:
    sd = {"emb": torch.randn(1000, 16)}

    def fn() -> None:
        op.split("emb", ["emb", "spare"], sizes=[10, 990])
        op.drop_key("spare")

    out, _ = migrate(sd, fn)
    assert out["emb"].untyped_storage().nbytes() == 10 * 16 * 4
    buf = io.BytesIO()
    torch.save(out, buf)
    assert len(buf.getvalue()) < 10_000  # not the 64 kB of the full tensor


def test_concat_fuses_in_place_of_the_first_key() -> None:
    g = torch.Generator().manual_seed(5)
    sd = {
        "pre": torch.ones(1),
        "q": torch.randn(4, 3, generator=g),
        "k": torch.randn(2, 3, generator=g),
        "mid": torch.ones(2),
        "v": torch.randn(4, 3, generator=g),
    }
    out, state = migrate(sd, lambda: op.concat(["q", "k", "v"], into="qkv"))
    assert list(out) == ["pre", "qkv", "mid"]
    assert same(out["qkv"], torch.cat([sd["q"], sd["k"], sd["v"]]))
    assert state.schema()["qkv"] == TensorSpec((10, 3), torch.float32)


def test_concat_along_dim_1_into_one_of_its_inputs() -> None:
    sd = {"a": torch.ones(2, 3), "b": torch.zeros(2, 1)}
    out, _ = migrate(sd, lambda: op.concat(["a", "b"], into="b", dim=-1))
    assert list(out) == ["b"]
    assert same(out["b"], torch.cat([sd["a"], sd["b"]], dim=1))


@pytest.mark.parametrize(("dim", "sizes"), [(0, None), (0, [1, 5, 2]), (1, None), (1, [0, 3, 3])])
def test_concat_inverts_split_bit_for_bit(dim: int, sizes: list[int] | None) -> None:
    w = torch.randn(8, 6, dtype=torch.bfloat16)

    def fn() -> None:
        parts = ["a", "b"] if sizes is None and dim == 0 else ["a", "b", "c"]
        op.split("w", parts, dim=dim, sizes=sizes)
        op.concat(parts, into="w", dim=dim)

    out, state = migrate({"w": w}, fn)
    assert same(out["w"], w)
    assert state.schema() == {"w": TensorSpec((8, 6), torch.bfloat16)}


def test_split_inverts_concat() -> None:
    sd = make_sd()

    def fn() -> None:
        op.concat(["fc1.bias", "fc2.bias"], into="b")
        op.split("b", ["fc1.bias", "fc2.bias"], sizes=[4, 5])

    out, _ = migrate(sd, fn)
    assert list(out) == ["fc1.weight", "fc1.bias", "fc2.bias", "fc2.weight"]
    assert same(out["fc1.bias"], sd["fc1.bias"])
    assert same(out["fc2.bias"], sd["fc2.bias"])


# --------------------------------------------------------------------- map_tensor


def test_map_tensor_infers_shape_on_meta() -> None:
    sd = make_sd()
    out, state = migrate(
        sd, lambda: op.map_tensor("fc1.weight", lambda t: t[:, :2].to(torch.float16) * 2)
    )
    assert same(out["fc1.weight"], (sd["fc1.weight"][:, :2].to(torch.float16) * 2))
    assert state.schema()["fc1.weight"] == TensorSpec((4, 2), torch.float16)
    assert list(out) == list(sd)


def test_map_tensor_slice_does_not_keep_the_full_storage() -> None:
    sd = {"w": torch.randn(100, 10)}
    out, _ = migrate(sd, lambda: op.map_tensor("w", lambda t: t[:2]))
    assert same(out["w"], sd["w"][:2])
    assert out["w"].untyped_storage().nbytes() == 2 * 10 * 4


def test_map_tensor_explicit_shape_and_dtype_for_value_dependent_fn() -> None:
    sd = {"w": torch.tensor([3.0, -1.0, 2.0, -5.0])}

    def positives(t: torch.Tensor) -> torch.Tensor:
        return t[t > 0].to(torch.int64)  # shape depends on the values

    out, state = migrate(sd, lambda: op.map_tensor("w", positives, shape=(2,), dtype="int64"))
    assert same(out["w"], torch.tensor([3, 2]))
    assert state.schema()["w"] == TensorSpec((2,), torch.int64)


def test_map_tensor_in_place_fn_does_not_touch_the_input() -> None:
    sd = make_sd()
    original = sd["fc1.weight"].clone()
    out, _ = migrate(sd, lambda: op.map_tensor("fc1.weight", lambda t: t.mul_(3)))
    assert same(sd["fc1.weight"], original)
    assert same(out["fc1.weight"], original * 3)


def test_map_tensor_random_fn_is_deterministic_and_leaves_rng_alone() -> None:
    sd = {"w": torch.zeros(5)}

    def fn() -> None:
        op.map_tensor("w", lambda t: t + torch.randn(t.shape, device=t.device))

    before = torch.get_rng_state()
    a, _ = migrate(sd, fn)
    b, _ = migrate(sd, fn)
    assert torch.equal(torch.get_rng_state(), before)
    assert same(a["w"], b["w"])
    assert a["w"].abs().sum() > 0


def test_map_tensor_after_other_transforms() -> None:
    sd = make_sd()

    def fn() -> None:
        op.transpose("fc2.weight", 0, 1)
        op.map_tensor("fc2.weight", lambda t: torch.flip(t, dims=[0]))

    out, _ = migrate(sd, fn)
    assert same(out["fc2.weight"], torch.flip(sd["fc2.weight"].T, dims=[0]))


# --------------------------------------------------------------------- introspection


def test_keys_shape_dtype_follow_the_migration() -> None:
    sd = make_sd()
    seen: dict[str, Any] = {}

    def fn() -> None:
        seen["all"] = op.keys()
        seen["fc1"] = op.keys("fc1.")
        seen["none"] = op.keys("nope.")
        op.rename_prefix("fc1.", "in.")
        op.cast("in.weight", "float16")
        op.reshape("fc2.weight", (-1,))
        seen["after"] = op.keys()
        seen["shape"] = op.shape("fc2.weight")
        seen["dtype"] = op.dtype("in.weight")
        seen["shape0"] = op.shape("in.bias")

    migrate(sd, fn)
    assert seen["all"] == list(sd)
    assert seen["fc1"] == ["fc1.weight", "fc1.bias"]
    assert seen["none"] == []
    assert seen["after"] == ["in.weight", "in.bias", "fc2.weight", "fc2.bias"]
    assert seen["shape"] == torch.Size([20]) and isinstance(seen["shape"], torch.Size)
    assert seen["dtype"] == torch.float16
    assert seen["shape0"] == (4,)


def test_script_loops_over_layers(tmp_path: Path) -> None:
    sd = {f"layers.{i}.qkv": torch.randn(6, 2) for i in range(3)}
    body = """
    for key in op.keys("layers."):
        layer = key.rsplit(".", 1)[0]
        n = op.shape(key)[0] // 3
        op.split(key, [f"{layer}.q", f"{layer}.k", f"{layer}.v"], sizes=[n, n, n])
        op.cast(f"{layer}.q", op.dtype(f"{layer}.k"))
    """
    out, _ = run_file(write_revision(tmp_path, body), sd)
    assert list(out) == [f"layers.{i}.{p}" for i in range(3) for p in "qkv"]
    assert same(out["layers.1.v"], sd["layers.1.qkv"][4:])


# --------------------------------------------------------------------- the plan, symbolic and real


def test_symbolic_plan_matches_real_result() -> None:
    sd = make_sd()

    def fn() -> None:
        op.rename_regex(r"^", "net.")
        op.add_module("net.fc3", torch.nn.Linear(5, 2))
        op.resize("net.fc2.weight", (6, 4), init="xavier_uniform")
        op.split("net.fc2.weight", ["net.a", "net.b"], dim=1)
        op.permute("net.a", (1, 0))
        op.map_tensor("net.b", lambda t: t.sum(0))
        op.add_tensor("net.scale", (), dtype="bfloat16", init="ones")

    schema = symbolic(sd, fn)
    out, _ = migrate(sd, fn)
    assert list(schema) == list(out)
    for k, v in out.items():
        assert schema[k] == TensorSpec.of(v), k


def test_plan_nodes_for_pure_renames_are_sources() -> None:
    _, state = migrate(make_sd(), lambda: op.rename_prefix("fc1.", "a."))
    assert isinstance(state.entries["a.weight"], Source)
    assert state.entries["a.weight"].key == "fc1.weight"  # type: ignore[attr-defined]


def test_records_list_each_op() -> None:
    state = PlanState.from_schema({k: TensorSpec.of(v) for k, v in make_sd().items()})
    ops = OpContext(state, revision=REV)
    with activate(ops):
        op.rename_key("fc1.bias", "b")
        op.add_tensor("n", (2,), dtype="float16", init="ones")
        op.drop_prefix("fc2.")
    calls = [r.call for r in ops.records]
    assert calls == [
        "rename_key('fc1.bias', 'b')",
        "add_tensor('n', (2,), dtype='float16', init='ones')",
        "drop_prefix('fc2.')",
    ]
    assert ops.records[1].results == [("n", TensorSpec((2,), torch.float16))]
    assert ops.records[2].removed == ["fc2.weight", "fc2.bias"]


# --------------------------------------------------------------------- training state


def test_reset_optimizer_state_leaves_the_tensor_and_follows_later_ops() -> None:
    from ckptmigrate.plan.nodes import ResetOptimizerState

    sd = make_sd()
    state = PlanState.from_schema({k: TensorSpec.of(v) for k, v in sd.items()})
    ops = OpContext(state, revision=REV)
    with activate(ops):
        op.reset_optimizer_state("fc1.weight")
        op.rename_key("fc1.weight", "enc.weight")
        op.transpose("enc.weight", 0, 1)
    assert ops.records[0].call == "reset_optimizer_state('fc1.weight')"
    assert ops.records[0].results == [("fc1.weight", TensorSpec((4, 3), torch.float32))]
    node = state.entries["enc.weight"]
    assert isinstance(node.inputs[0], ResetOptimizerState)
    out = {k: Evaluator(state.entries, sd.__getitem__)(k) for k in state.entries}
    assert same(out["enc.weight"], sd["fc1.weight"].t())
    assert list(out) == ["enc.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_reset_optimizer_state_of_a_missing_key_fails(tmp_path: Path) -> None:
    path = write_revision(tmp_path, 'op.reset_optimizer_state("fc9.weight")')
    with pytest.raises(
        OperationError, match=r"reset_optimizer_state\('fc9.weight'\).*does not exist"
    ) as info:
        run_file(path, make_sd())
    line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if "fc9" in text)
    assert info.value.revision == REV and info.value.location == f"{path}, line {line}"
