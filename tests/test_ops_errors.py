"""Precondition failures of the ``op`` functions.

Each failure must let a user find the mistake without a traceback: the
revision id, the script's file and line, the op call with its key, and the
nearest keys that do exist (the usual cause is a typo or a checkpoint that is
not at the revision the user believes).
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.conftest import REVISION_TEMPLATE

from ckptmigrate import op
from ckptmigrate.errors import CkptMigrateError, OperationError, ScriptError
from ckptmigrate.operations.checks import OpContext
from ckptmigrate.operations.context import activate
from ckptmigrate.paths import display_path
from ckptmigrate.plan.nodes import TensorSpec
from ckptmigrate.plan.state import Evaluator, PlanState
from ckptmigrate.runtime.migration import MigrationStep, run_step
from ckptmigrate.script.directory import load_script

REV = "1a0c3e5f7b2d"


def make_schema() -> dict[str, TensorSpec]:
    return {
        "fc1.weight": TensorSpec((20, 10), torch.float32),
        "fc1.bias": TensorSpec((20,), torch.float32),
        "fc2.weight": TensorSpec((5, 20), torch.float32),
        "fc2.bias": TensorSpec((5,), torch.float32),
        "emb.weight": TensorSpec((100, 16), torch.float32),
        "qkv.weight": TensorSpec((12, 4), torch.float32),
        "steps": TensorSpec((), torch.int64),
        "half": TensorSpec((5, 20), torch.float16),
    }


def fail_in_script(tmp_path: Path, body: str, schema: dict[str, TensorSpec] | None = None) -> str:
    """Run ``body`` as upgrade(); return the error message after checking where it points.

    The line marked ``# <-`` in ``body`` is the one the message must name.
    """
    lines = textwrap.dedent(body).strip("\n").splitlines()
    marked = [i for i, line in enumerate(lines) if line.rstrip().endswith("# <-")]
    assert len(marked) == 1, "mark the failing line with '# <-'"
    text = REVISION_TEMPLATE.format(rev=REV, body=textwrap.indent("\n".join(lines), "    "))
    path = tmp_path / f"{REV}_failing.py"
    path.write_text(text, encoding="utf-8")
    line = text.splitlines().index(textwrap.indent(lines[marked[0]], "    ")) + 1
    state = PlanState.from_schema(schema if schema is not None else make_schema())
    before = dict(state.entries)
    with pytest.raises(OperationError) as info:
        run_step(MigrationStep(load_script(path), True), state, symbolic=False)
    message = str(info.value)
    assert message.startswith(f"revision {REV} ({display_path(path)}, line {line}): "), message
    assert info.value.revision == REV
    assert info.value.location == f"{display_path(path)}, line {line}"
    assert "\n" not in message
    if len(marked) == 1 and marked[0] == 0:
        assert state.entries == before  # a failing first op leaves the plan as it was
    return message


def fail_direct(fn: Any, schema: dict[str, TensorSpec] | None = None) -> OperationError:
    """The error ``fn`` raises when run as a migration outside any file."""
    state = PlanState.from_schema(schema if schema is not None else make_schema())
    with pytest.raises(OperationError) as info, activate(OpContext(state, revision=REV)):
        fn()
    return info.value


# --------------------------------------------------------------------- missing keys


def test_missing_key_names_revision_file_line_call_and_nearest(tmp_path: Path) -> None:
    msg = fail_in_script(
        tmp_path,
        """
        op.rename_key("fc1.weight", "enc.weight")
        op.rename_key("fc2.wieght", "fc3.weight")  # <-
        """,
    )
    assert "rename_key('fc2.wieght', 'fc3.weight')" in msg
    assert "key 'fc2.wieght' does not exist" in msg
    assert "; nearest existing keys: fc2.weight, " in msg  # the typo's target first


def test_line_of_an_op_inside_a_helper_and_loop(tmp_path: Path) -> None:
    msg = fail_in_script(
        tmp_path,
        """
        def drop(name):
            op.drop_key(name)  # <-

        for layer in ("fc1", "fc2", "fc3"):
            drop(layer + ".bias")
        """,
    )
    assert "drop_key('fc3.bias'): key 'fc3.bias' does not exist" in msg
    assert "nearest existing keys:" in msg


@pytest.mark.parametrize(
    ("call", "shown"),
    [
        ('op.drop_key("fc2.wieght")', "drop_key('fc2.wieght')"),
        ('op.reshape("fc2.wieght", (-1,))', "reshape('fc2.wieght', (-1,))"),
        ('op.transpose("fc2.wieght", 0, 1)', "transpose('fc2.wieght', 0, 1)"),
        ('op.permute("fc2.wieght", (1, 0))', "permute('fc2.wieght', (1, 0))"),
        ('op.cast("fc2.wieght", torch.float16)', "cast('fc2.wieght', torch.float16)"),
        ('op.resize("fc2.wieght", (6, 20))', "resize('fc2.wieght', (6, 20))"),
        ('op.split("fc2.wieght", ["a", "b"])', "split('fc2.wieght', ['a', 'b'])"),
        ('op.concat(["fc2.bias", "fc2.wieght"], into="x")', "concat(['fc2.bias', 'fc2.wieght']"),
        ('op.map_tensor("fc2.wieght", torch.neg)', "map_tensor('fc2.wieght', neg)"),
        ('op.shape("fc2.wieght")', "shape('fc2.wieght')"),
        ('op.dtype("fc2.wieght")', "dtype('fc2.wieght')"),
    ],
)
def test_every_op_on_a_missing_key(tmp_path: Path, call: str, shown: str) -> None:
    msg = fail_in_script(tmp_path, call + "  # <-")
    assert shown in msg
    assert "key 'fc2.wieght' does not exist" in msg
    assert "nearest existing keys: fc2.weight" in msg


def test_missing_key_when_nothing_is_left(tmp_path: Path) -> None:
    msg = fail_in_script(
        tmp_path,
        """
        op.drop_prefix("fc")
        op.drop_key("fc1.weight")  # <-
        """,
        {"fc1.weight": TensorSpec((1,), torch.float32)},
    )
    assert "the state dict has no keys left" in msg


def test_key_that_is_not_a_string() -> None:
    err = fail_direct(lambda: op.drop_key(3))  # type: ignore[arg-type]
    assert "keys are strings, not int" in str(err)


def test_shape_of_a_non_tensor_entry() -> None:
    schema: dict[str, TensorSpec | None] = {"fc1._extra_state": None}
    err = fail_direct(lambda: op.shape("fc1._extra_state"), schema)  # type: ignore[arg-type]
    assert "'fc1._extra_state' is not a tensor" in str(err)


# --------------------------------------------------------------------- targets that exist


@pytest.mark.parametrize(
    "call",
    [
        'op.rename_key("fc1.weight", "fc2.weight")',
        'op.add_tensor("fc2.weight", (5, 20))',
        'op.add_module("fc2", torch.nn.Linear(20, 5))',
        'op.split("qkv.weight", ["q", "fc2.weight", "v"])',
        'op.concat(["fc1.bias", "fc2.bias"], into="fc2.weight")',
    ],
)
def test_target_key_already_exists(tmp_path: Path, call: str) -> None:
    msg = fail_in_script(tmp_path, call + "  # <-")
    assert "key 'fc2.weight' already exists" in msg
    assert "drop or rename it first" in msg


def test_rename_key_to_empty_or_non_string() -> None:
    assert "non-empty string" in str(fail_direct(lambda: op.rename_key("fc1.bias", "")))
    assert "non-empty string" in str(fail_direct(lambda: op.rename_key("fc1.bias", None)))  # type: ignore[arg-type]


def test_rename_regex_collision_two_keys_to_one(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.rename_regex(r"^fc\\d\\.", "fc.")  # <-')
    assert "'fc1.weight' and 'fc2.weight' would both become 'fc.weight'" in msg


def test_rename_regex_onto_a_key_it_does_not_move(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.rename_regex(r"^fc1\\.", "fc2.")  # <-')
    assert "'fc1.weight' would become 'fc2.weight', which already exists" in msg


def test_rename_prefix_collision(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.rename_prefix("fc1.", "fc2.")  # <-')
    assert "rename_prefix('fc1.', 'fc2.')" in msg
    assert "'fc1.weight' would become 'fc2.weight', which already exists" in msg


def test_rename_regex_to_an_empty_key(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.rename_regex(r"^steps$", "")  # <-')
    assert "'steps' would be renamed to an empty key" in msg


def test_failed_rename_leaves_keys_and_metadata_alone() -> None:
    state = PlanState.from_schema(make_schema(), {"": {}, "fc1": {"version": 1}})
    before = (list(state.entries), dict(state.metadata))
    with pytest.raises(OperationError), activate(OpContext(state, revision=REV)):
        op.rename_prefix("fc1.", "fc2.")
    assert (list(state.entries), dict(state.metadata)) == before


# --------------------------------------------------------------------- prefixes and patterns


def test_rename_prefix_matching_nothing(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.rename_prefix("fc3.", "head.")  # <-')
    assert "no key starts with 'fc3.'" in msg
    assert "nearest existing keys: fc1." in msg


def test_drop_prefix_matching_nothing(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.drop_prefix("encoder.")  # <-')
    assert "drop_prefix('encoder.'): no key starts with 'encoder.'" in msg
    assert "nearest existing keys:" in msg


@pytest.mark.parametrize(
    "call", ['op.rename_prefix("", "x.")', 'op.drop_prefix("")', "op.rename_prefix(None, 'x.')"]
)
def test_empty_prefix(tmp_path: Path, call: str) -> None:
    msg = fail_in_script(tmp_path, call + "  # <-")
    assert "non-empty string" in msg


def test_rename_regex_matching_nothing(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.rename_regex(r"^decoder\\.", "dec.")  # <-')
    assert "pattern '^decoder\\\\.' renamed no key" in msg
    assert "nearest existing keys:" in msg


def test_rename_regex_bad_pattern(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.rename_regex(r"fc(1", "x")  # <-')
    assert "bad regular expression: missing ), unterminated subpattern" in msg


def test_rename_regex_bad_replacement(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.rename_regex(r"^(fc)1", r"\\2")  # <-')
    assert "bad replacement: invalid group reference 2" in msg


# --------------------------------------------------------------------- shapes and dims


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        (
            "(6, 20)",
            "'fc2.weight' has shape [5, 20] (100 elements), which cannot be reshaped to [6, 20]",
        ),
        ("(-1, -1)", "only one dimension can be -1"),
        ("(3, -1)", "cannot infer -1: 100 elements, [3, -1]"),
        ("(0, -1)", "cannot infer -1"),
        ("(-2, -50)", "has a negative size"),
        ("(2.5, 40)", "shape must be a tuple of ints, not (2.5, 40)"),
        ('"100"', "shape must be a tuple of ints"),
    ],
)
def test_reshape_bad_shape(tmp_path: Path, shape: str, problem: str) -> None:
    msg = fail_in_script(tmp_path, f'op.reshape("fc2.weight", {shape})  # <-')
    assert f"reshape('fc2.weight', {shape.replace(chr(34), chr(39))})" in msg
    assert problem in msg


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        ('op.transpose("fc1.bias", 0, 1)', "dim 1 is out of range for a 1-D tensor"),
        ('op.transpose("fc1.weight", 0, -3)', "dim -3 is out of range for a 2-D tensor"),
        ('op.transpose("fc1.weight", 0, "1")', "dim '1' is out of range"),
        ('op.permute("fc1.weight", (0, 0))', "[0, 0] is not a permutation of the 2 dims"),
        ('op.permute("fc1.weight", (0,))', "[0] is not a permutation of the 2 dims"),
        ('op.permute("fc1.weight", (1, 0, 2))', "dim 2 is out of range for a 2-D tensor"),
        ('op.permute("fc1.weight", 1)', "dims must be a sequence of dims, not 1"),
    ],
)
def test_bad_dims(tmp_path: Path, call: str, problem: str) -> None:
    msg = fail_in_script(tmp_path, call + "  # <-")
    assert problem in msg


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        ("(120,)", "'emb.weight' has 2 dims [100, 16]; resize keeps the number of dims"),
        ("(120, 16, 1)", "resize keeps the number of dims (use reshape to change it)"),
        ("(120, -16)", "shape [120, -16] has a negative size"),
    ],
)
def test_resize_bad_shape(tmp_path: Path, shape: str, problem: str) -> None:
    msg = fail_in_script(tmp_path, f'op.resize("emb.weight", {shape})  # <-')
    assert problem in msg


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        ('op.resize("emb.weight", (120, 16), init="gaussian")', "unknown init 'gaussian'"),
        ('op.resize("emb.weight", (50, 16), init="gaussian")', "unknown init 'gaussian'"),
        ('op.resize("emb.weight", (120, 16), init="normal", sd=0.1)', "does not take sd"),
        ('op.resize("steps", ())', None),
    ],
)
def test_resize_bad_init(tmp_path: Path, call: str, problem: str | None) -> None:
    if problem is None:  # a 0-D resize to () is fine: nothing to grow
        state = PlanState.from_schema(make_schema())
        with activate(OpContext(state, revision=REV)):
            op.resize("steps", ())
        return
    msg = fail_in_script(tmp_path, call + "  # <-")
    assert problem in msg


def test_resize_random_init_on_integer_tensor(tmp_path: Path) -> None:
    msg = fail_in_script(
        tmp_path,
        'op.resize("ids", (8,), init="uniform")  # <-',
        {"ids": TensorSpec((4,), torch.int64)},
    )
    assert "init='uniform' needs a floating-point dtype, not torch.int64" in msg


# --------------------------------------------------------------------- split / concat


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (
            'op.split("qkv.weight", ["q", "k", "v", "o", "p"])',
            "dim 0 of 'qkv.weight' has size 12, which does not split into 5 equal parts; "
            "pass sizes=[...]",
        ),
        (
            'op.split("qkv.weight", ["q", "k", "v"], sizes=[4, 4, 5])',
            "sizes [4, 4, 5] must have one entry per key in into= and add up to 12 "
            "(dim 0 of 'qkv.weight')",
        ),
        ('op.split("qkv.weight", ["q", "k"], sizes=[4, 4, 4])', "must have one entry per key"),
        ('op.split("qkv.weight", ["q", "k"], sizes=[16, -4])', "must have one entry per key"),
        ('op.split("qkv.weight", ["q", "k"], sizes=[6.0, 6.0])', "sizes must be a list of ints"),
        ('op.split("qkv.weight", ["a", "b"], dim=1, sizes=[3, 3])', "add up to 4 (dim 1"),
        ('op.split("qkv.weight", ["q", "k", "v"], dim=2)', "dim 2 is out of range for a 2-D"),
        ('op.split("qkv.weight", ["q", "q"])', "into= names a key twice"),
        ('op.split("qkv.weight", [])', "into= needs at least one key"),
        ('op.split("steps", ["a", "b"])', "'steps' is a 0-D tensor and cannot be split"),
    ],
)
def test_split_failures(tmp_path: Path, call: str, problem: str) -> None:
    msg = fail_in_script(tmp_path, call + "  # <-")
    assert problem in msg


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        (
            'op.concat(["fc2.weight", "half"], into="w")',
            "'half' is torch.float16 but 'fc2.weight' is torch.float32; cast first",
        ),
        (
            'op.concat(["fc1.weight", "fc2.weight"], into="w")',
            "'fc2.weight' has shape [5, 20], which does not fit 'fc1.weight' [20, 10] along dim 0",
        ),
        (
            'op.concat(["fc2.weight", "fc1.weight"], into="w", dim=1)',
            "'fc1.weight' has shape [20, 10], which does not fit 'fc2.weight' [5, 20] along dim 1",
        ),
        ('op.concat(["fc1.weight", "fc1.bias"], into="w")', "'fc1.bias' has shape [20]"),
        ('op.concat(["fc1.bias", "fc2.bias"], into="w", dim=1)', "dim 1 is out of range"),
        ('op.concat(["fc1.bias", "fc1.bias"], into="w")', "a key is listed twice"),
        ('op.concat([], into="w")', "give at least one key to concatenate"),
        ('op.concat(["steps", "steps2"], into="w")', "is a 0-D tensor"),
        ('op.concat(["fc1.bias"], into="")', "a key must be a non-empty string"),
    ],
)
def test_concat_failures(tmp_path: Path, call: str, problem: str) -> None:
    schema = {**make_schema(), "steps2": TensorSpec((), torch.int64)}
    msg = fail_in_script(tmp_path, call + "  # <-", schema)
    assert problem in msg


# --------------------------------------------------------------------- add_tensor inits


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ('(3, 3), init="gaussian"', "unknown init 'gaussian'; choose one of zeros, ones, eye"),
        ('(3, 3), init="normal", a=1.0', "init='normal' does not take a (it takes mean, std)"),
        (
            '(3, 3), init="zeros", value=1',
            "init='zeros' does not take value (it takes no arguments)",
        ),
        ('(3, 3), init="uniform", low=0', "does not take low (it takes a, b)"),
        ('(3, 3), init="constant"', "init='constant' needs value=..."),
        ('(3, 3), init="constant", value="x"', "needs a number for value=, not 'x'"),
        ('(3, 3), init="normal", std=-1.0', "init='normal' needs std >= 0"),
        ('(3, 3), init="normal", mean="0"', "needs a number for mean="),
        ('(3, 3), init="uniform", a=1.0, b=0.0', "init='uniform' needs a <= b"),
        ('(3, 3), init="kaiming_uniform", mode="fan"', "takes mode='fan_in' or 'fan_out'"),
        ('(3, 3), init="kaiming_uniform", nonlinearity="swish"', "Unsupported nonlinearity swish"),
        ('(3, 3), init="xavier_uniform", gain=None', "needs a number for gain="),
        ('(2, 3, 4), init="eye"', "init='eye' needs a 2-D shape, not [2, 3, 4]"),
        ('(4,), init="xavier_uniform"', "needs at least 2 dimensions (fan-in/fan-out), not [4]"),
        (
            '(3, 3), dtype=torch.int64, init="normal"',
            "needs a floating-point dtype, not torch.int64",
        ),
        ('(3, 3), dtype="int32", init="kaiming_uniform"', "needs a floating-point dtype"),
        ('(3, 3), dtype=torch.bool, init="uniform"', "needs a floating-point dtype"),
        ("(3, 3), init=lambda t: t.fill_(1), value=2", "a callable init takes no extra keyword"),
        ('(3, 3), dtype="floot32"', "not a dtype: 'floot32'"),
        ('(3, 3), dtype="Tensor"', "not a dtype: 'Tensor'"),
        ("(3, -3)", "shape [3, -3] has a negative size"),
        ("(3.0, 3)", "shape must be a tuple of ints"),
        ("None", "shape must be a tuple of ints, not None"),
    ],
)
def test_add_tensor_bad_init(tmp_path: Path, args: str, problem: str) -> None:
    msg = fail_in_script(tmp_path, f'op.add_tensor("fc3.weight", {args})  # <-')
    assert "add_tensor('fc3.weight'" in msg
    assert problem in msg


# --------------------------------------------------------------------- add_module


@pytest.mark.parametrize(
    ("call", "problem"),
    [
        ('op.add_module("fc3", {"weight": torch.ones(2)})', "expected an nn.Module, got dict"),
        ('op.add_module("fc3", torch.nn.Linear)', "expected an nn.Module, got type"),
        ('op.add_module("fc3", torch.nn.ReLU())', "ReLU has no parameters or buffers"),
        ('op.add_module("", torch.nn.Linear(2, 2))', "the prefix is a module name"),
        ('op.add_module(".", torch.nn.Linear(2, 2))', "the prefix is a module name"),
        ('op.add_module("fc1", torch.nn.Linear(10, 20))', "key 'fc1.weight' already exists"),
    ],
)
def test_add_module_failures(tmp_path: Path, call: str, problem: str) -> None:
    msg = fail_in_script(tmp_path, call + "  # <-")
    assert problem in msg


def test_add_module_failure_adds_nothing() -> None:
    # fc1.bias is free but fc1.weight is not: no key of the module may land
    schema = {"fc1.weight": TensorSpec((20, 10), torch.float32)}
    state = PlanState.from_schema(schema)
    with pytest.raises(OperationError), activate(OpContext(state, revision=REV)):
        op.add_module("fc1", torch.nn.Linear(10, 20))
    assert list(state.entries) == ["fc1.weight"]
    assert state.metadata == {}


# --------------------------------------------------------------------- map_tensor / cast


def test_map_tensor_fn_failing_on_meta(tmp_path: Path) -> None:
    msg = fail_in_script(
        tmp_path, 'op.map_tensor("fc1.weight", lambda t: t * t.abs().max().item())  # <-'
    )
    assert "map_tensor('fc1.weight', <lambda>)" in msg
    assert "the function could not run on a shape-only tensor" in msg
    assert "pass shape= and dtype= so the plan knows the result" in msg


def test_map_tensor_bad_fn(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.map_tensor("fc1.weight", "neg")  # <-')
    assert "fn must be a function of one tensor" in msg
    msg = fail_in_script(tmp_path, 'op.map_tensor("fc1.weight", lambda t: t.shape)  # <-')
    assert "the function returned Size, not a tensor" in msg


def test_map_tensor_bad_explicit_shape_or_dtype(tmp_path: Path) -> None:
    msg = fail_in_script(tmp_path, 'op.map_tensor("fc1.weight", torch.neg, shape=(-1,))  # <-')
    assert "map_tensor('fc1.weight', neg, shape=(-1,))" in msg
    assert "has a negative size" in msg
    msg = fail_in_script(tmp_path, 'op.map_tensor("fc1.weight", torch.neg, dtype="f16")  # <-')
    assert "not a dtype: 'f16'" in msg


def test_map_tensor_that_lies_about_its_shape_fails_when_written() -> None:
    sd = {"w": torch.arange(4.0)}
    state = PlanState.from_schema({"w": TensorSpec.of(sd["w"])})
    with activate(OpContext(state, revision=REV)):
        op.map_tensor("w", lambda t: t[t > 1], shape=(3,))
    with pytest.raises(
        OperationError,
        match=r"w: the migration produced \[2\] torch.float32 "
        r"but its plan said \[3\] torch.float32",
    ):
        Evaluator(state.entries, sd.__getitem__)("w")


def test_map_tensor_returning_a_non_tensor_when_written() -> None:
    sd = {"w": torch.arange(4.0)}
    state = PlanState.from_schema({"w": TensorSpec.of(sd["w"])})
    with activate(OpContext(state, revision=REV)):
        op.map_tensor("w", lambda t: t.tolist(), shape=(4,))
    with pytest.raises(OperationError, match="w: the migration produced list, not a tensor"):
        Evaluator(state.entries, sd.__getitem__)("w")


def test_callable_init_returning_the_wrong_shape_fails_when_written() -> None:
    state = PlanState()
    with activate(OpContext(state, revision=REV)):
        op.add_tensor("w", (2, 2), init=lambda t: torch.ones(3))
    with pytest.raises(OperationError) as info:
        Evaluator(state.entries, lambda k: None)("w")
    assert str(info.value) == (
        "w: computing it failed: init=<lambda> raised ValueError: init function returned "
        "shape [3], expected [2, 2]; fix the function in the revision script; nothing was written"
    )


def test_map_tensor_fn_failing_on_real_data_names_the_key() -> None:
    sd = {"w": torch.arange(4.0)}
    state = PlanState.from_schema({"w": TensorSpec.of(sd["w"])})
    with activate(OpContext(state, revision=REV)):
        op.map_tensor("w", lambda t: t.reshape(3, -1), shape=(3, 1))
    with pytest.raises(
        OperationError, match=r"^w: computing it failed: map\(\) raised RuntimeError"
    ):
        Evaluator(state.entries, sd.__getitem__)("w")


def test_cast_to_unknown_dtype(tmp_path: Path) -> None:
    msg = fail_in_script(
        tmp_path,
        """
        op.cast("fc1.weight", "float")
        op.cast("fc1.bias", "f16")  # <-
        """,
    )
    assert (
        "cast('fc1.bias', 'f16'): not a dtype: 'f16' (use e.g. torch.float16 or 'float16')" in msg
    )


# --------------------------------------------------------------------- outside a migration


def test_op_outside_a_migration() -> None:
    with pytest.raises(CkptMigrateError, match=r"op.drop_key\(\) was called outside a migration"):
        op.drop_key("fc1.weight")


def test_other_exceptions_in_a_script_are_script_errors(tmp_path: Path) -> None:
    path = tmp_path / f"{REV}_raises.py"
    body = '    op.drop_key("fc1.weight")\n    raise RuntimeError("boom")'
    path.write_text(REVISION_TEMPLATE.format(rev=REV, body=body), encoding="utf-8")
    state = PlanState.from_schema(make_schema())
    with pytest.raises(ScriptError) as info:
        run_step(MigrationStep(load_script(path), True), state, symbolic=False)
    assert not isinstance(info.value, OperationError)
    assert "upgrade() raised RuntimeError: boom" in str(info.value)


def test_nearest_keys_for_an_unrelated_name() -> None:
    err = fail_direct(lambda: op.drop_key("fc2.zzz"))
    # nothing is close enough for difflib: fall back to the longest common prefix
    assert err.nearest == ("fc2.bias", "fc2.weight", "fc1.bias")


def test_failure_message_without_a_script_file() -> None:
    err = fail_direct(lambda: op.rename_key("fc2.wieght", "x"))
    assert str(err).startswith(f"revision {REV}: rename_key('fc2.wieght', 'x'): ")
    assert err.location is None
