"""The operations registry: every op is one definition, and ``op`` is its public face.

These tests hold the registry to what it claims: ``op``'s functions carry the
definitions' signatures and docstrings (and the documented signatures did not
change), an op that says it touches no tensor data leaves only source nodes,
and every inverse a definition offers really undoes its op on real tensors.
"""

from __future__ import annotations

import inspect
import pydoc
import re
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tests.conftest import REPO, assert_same_tensors

from ckptmigrate import op
from ckptmigrate.autogenerate.render import literal
from ckptmigrate.operations.checks import OpContext
from ckptmigrate.operations.context import activate
from ckptmigrate.operations.registry import (
    OpCall,
    Operation,
    operation,
    operations,
    register,
)
from ckptmigrate.plan.nodes import Source, TensorSpec
from ckptmigrate.plan.state import Evaluator, PlanState

REV = "abc123def456"

#: The signatures revision scripts rely on (DESIGN's and the README's Operations tables).
CONTRACT = {
    "rename_key": "(old, new)",
    "rename_prefix": "(old, new)",
    "rename_regex": "(pattern, repl)",
    "drop_key": "(key, *, intended=False)",
    "drop_prefix": "(prefix, *, intended=False)",
    "add_tensor": "(key, shape, *, dtype=None, init='zeros', **init_args)",
    "add_module": "(prefix, module)",
    "reshape": "(key, shape)",
    "transpose": "(key, dim0, dim1)",
    "permute": "(key, dims)",
    "cast": "(key, dtype)",
    "resize": "(key, shape, *, init='zeros', intended=False, **init_args)",
    "split": "(key, into, *, dim=0, sizes=None)",
    "concat": "(keys, into, *, dim=0)",
    "map_tensor": "(key, fn, *, shape=None, dtype=None)",
    "reset_optimizer_state": "(key)",
    "keys": "(prefix='')",
    "shape": "(key)",
    "dtype": "(key)",
}


def bare(sig: inspect.Signature) -> str:
    """A signature without annotations: what a caller can pass."""
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=sig.empty))


def make_sd() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "fc1.weight": torch.randn(4, 3, generator=g),
        "fc1.bias": torch.randn(4, generator=g),
        "fc2.weight": torch.randn(6, 4, generator=g),
        "fc2.bias": torch.randn(6, generator=g),
    }


def run_ops(sd: dict[str, Any], fn: Callable[[], None]) -> tuple[dict[str, Any], PlanState]:
    state = PlanState.from_schema({k: TensorSpec.of(v) for k, v in sd.items()})
    with activate(OpContext(state, revision=REV)):
        fn()
    ev = Evaluator(state.entries, sd.__getitem__)
    return {k: ev(k) for k in state.entries}, state


# --------------------------------------------------------------------- op is the registry


def test_every_registered_op_is_an_op_function_with_its_signature_and_docstring() -> None:
    registered = operations()
    assert sorted(op.__all__) == sorted(registered)
    for name, definition in registered.items():
        fn = getattr(op, name)
        assert fn.__name__ == name and fn.__module__ == "ckptmigrate.op"
        assert inspect.signature(fn) == definition.signature, name
        assert fn.__doc__ == definition.doc and fn.__doc__, name
        assert name in dir(op)


def test_the_documented_signatures_are_unchanged() -> None:
    for name, expected in CONTRACT.items():
        assert bare(inspect.signature(getattr(op, name))) == expected, name


def test_help_shows_the_signature_and_the_docstring() -> None:
    text = pydoc.render_doc(op.resize, renderer=pydoc.plaintext)
    assert "resize(key: str, shape:" in text and "intended: bool = False" in text
    assert "A shrink cuts trained values" in text


def test_a_wrong_call_fails_like_a_plain_function() -> None:
    with pytest.raises(TypeError, match=r"^rename_key\(\) missing 1 required positional"):
        op.rename_key("a")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match=r"^drop_key\(\) takes 1 positional argument"):
        op.drop_key("a", True)  # type: ignore[misc]


def test_the_readme_operations_table_lists_every_op() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = readme.split("\n## Operations\n", 1)[1].split("\n\n| op |", 1)[1].split("\n\n")[0]
    listed = set(re.findall(r"`(\w+)\(", table))
    assert set(operations()) <= listed


def test_importing_op_imports_no_torch() -> None:
    code = "import sys; from ckptmigrate import op; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_an_op_is_registered_once_with_a_name_and_a_docstring() -> None:
    class Again(Operation):
        """A second rename_key."""

        name = "rename_key"

    class Undocumented(Operation):
        name = "undocumented"

    class BadName(Operation):
        """A name Python cannot call."""

        name = "not-a-name"

    for cls, problem in [
        (Again, "two definitions of the op 'rename_key'"),
        (Undocumented, "needs a docstring"),
        (BadName, "must be a Python identifier"),
    ]:
        with pytest.raises(TypeError, match=problem):
            register(cls)
    assert "undocumented" not in operations() and operation("rename_key") is not None


# --------------------------------------------------------------------- what a definition claims

#: A call of every op that says it touches no tensor data (and records something).
NO_DATA: dict[str, Callable[[], object]] = {
    "rename_key": lambda: op.rename_key("fc1.weight", "enc.weight"),
    "rename_prefix": lambda: op.rename_prefix("fc1.", "enc."),
    "rename_regex": lambda: op.rename_regex(r"^fc", "layer"),
    "drop_key": lambda: op.drop_key("fc2.bias", intended=True),
    "drop_prefix": lambda: op.drop_prefix("fc2.", intended=True),
    "keys": lambda: op.keys("fc1."),
    "shape": lambda: op.shape("fc1.weight"),
    "dtype": lambda: op.dtype("fc1.weight"),
    "seeds_of": lambda: op.seeds_of("aaaa1111"),
}


def test_an_op_that_touches_no_data_leaves_only_sources() -> None:
    claims = {name for name, d in operations().items() if not d.touches_data}
    assert claims == set(NO_DATA)  # a new data-free op gets a call here
    for name, call in NO_DATA.items():
        sd = make_sd()
        out, state = run_ops(sd, call)
        assert all(isinstance(n, Source) for n in state.entries.values()), name
        for key, node in state.entries.items():
            assert out[key] is sd[node.key], name  # type: ignore[attr-defined]


#: A call of every op with an inverse, on make_sd(), as autogenerate would write it.
INVERTIBLE = [
    OpCall("rename_key", ("fc1.weight", "enc.weight")),
    OpCall("rename_prefix", ("fc2.", "head.")),
    OpCall("reshape", ("fc2.weight", (2, 12))),
    OpCall("transpose", ("fc1.weight", 0, 1)),
    OpCall("permute", ("fc2.weight", [1, 0])),
    OpCall("cast", ("fc1.bias", torch.float64)),
    OpCall("resize", ("fc2.weight", (9, 5))),
    OpCall("split", ("fc2.weight",), {"into": ["a", "b", "c"]}),
    OpCall("split", ("fc2.weight",), {"into": ["a", "b"], "dim": 1, "sizes": [1, 3]}),
    OpCall("concat", (["fc1.bias", "fc2.bias"],), {"into": "b"}),
    OpCall("add_tensor", ("extra",), {"shape": (3,), "init": "ones"}),
    OpCall("add_module", ("fc3", torch.nn.Linear(2, 2))),
    OpCall("reset_optimizer_state", ("fc1.weight",)),
]


def apply(calls: list[OpCall]) -> Callable[[], None]:
    def run() -> None:
        for c in calls:
            getattr(op, c.name)(*c.args, **c.kwargs)

    return run


@pytest.mark.parametrize("call", INVERTIBLE, ids=lambda c: c.name)
def test_an_inverse_undoes_its_op_bit_for_bit(call: OpCall) -> None:
    sd = make_sd()
    definition = operation(call.name)
    schema = {k: TensorSpec.of(v) for k, v in sd.items()}
    back = definition.inverse(call, schema.get)
    assert back is not None
    after, _ = run_ops(sd, apply([call]))
    restored, _ = run_ops(after, apply(back))
    assert_same_tensors(restored, sd, ordered=False)
    for c in [call, *back]:  # each renders as a call a person would write
        compile(operation(c.name).render(c, literal), "<rendered>", "eval")


def test_rendering_checks_the_call_against_the_signature() -> None:
    rename = operation("rename_key")
    assert rename.render(OpCall("rename_key", ("a.w", "b.w")), literal) == (
        'op.rename_key("a.w", "b.w")'
    )
    with pytest.raises(ValueError, match=r"op\.rename_key cannot be called that way"):
        rename.render(OpCall("rename_key", ("a.w",), {"to": "b.w"}), literal)
