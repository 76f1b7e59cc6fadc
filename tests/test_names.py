"""Names over shapes: which rename a key most likely is, and the order of fused parts."""

from __future__ import annotations

import pytest
import torch

from ckptmigrate.autogenerate.compare import diff_ops
from ckptmigrate.autogenerate.render import render_op
from ckptmigrate.names import name_similarity, part_order, path_similarity
from ckptmigrate.plan.nodes import TensorSpec
from ckptmigrate.schema import Entry, Schema


@pytest.mark.parametrize(
    "parts",
    [
        ["q.weight", "k.weight", "v.weight"],
        ["l.0.query.weight", "l.0.key.weight", "l.0.value.weight"],
        ["a.q_proj.weight", "a.k_proj.weight", "a.v_proj.weight"],
        ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight"],
        ["to_q.weight", "to_k.weight", "to_v.weight"],
        ["mlp.gate_proj.weight", "mlp.up_proj.weight"],
        ["q.weight", "k.weight", "v.weight", "o.weight"],
        ["q.weight", "kv.weight"],  # known roles first
        ["experts.1.w", "experts.2.w", "experts.10.w"],  # the rest: natural order
    ],
)
def test_fused_parts_go_in_role_then_natural_order(parts: list[str]) -> None:
    assert part_order(list(reversed(parts))) == parts
    assert part_order(sorted(parts)) == parts


def test_names_weigh_words_not_characters() -> None:
    assert path_similarity("attn.out_proj", "o") > path_similarity("attn.out_proj", "q")
    assert path_similarity("lm_head", "out") > path_similarity("lm_head", "k")
    assert name_similarity("attention.query.weight", "attn.q.weight") > name_similarity(
        "attention.query.weight", "attn.k.weight"
    )
    assert name_similarity("layers.3.fc.weight", "layers.30.fc.weight") < name_similarity(
        "layers.3.fc.weight", "blocks.3.fc.weight"
    )
    assert name_similarity("fc.weight", "fc.bias") == 0.0  # a weight is not a bias


def _schema(**shapes: tuple[int, ...]) -> Schema:
    return Schema(
        {
            k.replace("__", "."): Entry(TensorSpec(s, torch.float32), "param")
            for k, s in shapes.items()
        }
    )


def test_each_layer_splits_into_its_own_parts_with_their_sizes() -> None:
    """Grouped-query attention: q is wider than k and v; layer 1's parts stay in layer 1."""
    head = _schema(
        **{f"layers__{i}__qkv__weight": (48, 16) for i in range(2)},
        **{f"layers__{i}__gate_up__weight": (64, 16) for i in range(2)},
    )
    target = _schema(
        **{
            f"layers__{i}__{name}__weight": shape
            for i in range(2)
            for name, shape in [
                ("k_proj", (8, 16)),
                ("q_proj", (32, 16)),
                ("v_proj", (8, 16)),
                ("up", (32, 16)),
                ("gate", (32, 16)),
            ]
        }
    )
    lines = [render_op(op).split("  # review:")[0] for op in diff_ops(head, target)]
    assert lines == [
        f'op.split("layers.{i}.{fused}.weight", into=[{parts.format(i=i)}]{sizes})'
        for fused, parts, sizes in [
            (
                "qkv",
                '"layers.{i}.q_proj.weight", "layers.{i}.k_proj.weight", '
                '"layers.{i}.v_proj.weight"',
                ", sizes=[32, 8, 8]",
            ),
            ("gate_up", '"layers.{i}.gate.weight", "layers.{i}.up.weight"', ""),
        ]
        for i in range(2)
    ]


def test_a_split_along_the_input_dim_says_so() -> None:
    head = _schema(w=(16, 48))
    target = _schema(wq=(16, 16), wk=(16, 16), wv=(16, 16))
    (op,) = diff_ops(head, target)
    assert render_op(op).startswith('op.split("w", into=["wq", "wk", "wv"], dim=1)  # review:')
    assert [render_op(i) for i in op.inverse] == ['op.concat(["wq", "wk", "wv"], into="w", dim=1)']
