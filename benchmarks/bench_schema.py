"""Schema work on a model of ~10,000 state-dict keys: how long it takes.

    python benchmarks/bench_schema.py [--layers 5000] [--dim 256]

Prints each step's wall time (best of 3) and, for scale, the time to build
the same model with real (CPU) weights, measured side by side in this run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from ckptmigrate.autogenerate.compare import diff_ops
from ckptmigrate.schema import Schema, build_on_meta, compare


class Wide(torch.nn.Module):
    def __init__(self, layers: int, dim: int, renamed: bool = False) -> None:
        super().__init__()
        blocks = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))
        if renamed:
            self.blocks = blocks
        else:
            self.layers = blocks


def best(fn: Callable[[], object], repeat: int = 3) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    n, dim = args.layers, args.dim

    t_cpu, _ = best(lambda: Wide(n, dim), repeat=1)
    t_meta, model = best(lambda: build_on_meta(lambda: Wide(n, dim), "Wide"))
    assert isinstance(model, torch.nn.Module)
    t_schema, schema = best(lambda: Schema.from_module(model))
    assert isinstance(schema, Schema)
    text = schema.to_text("benchmark")
    t_text, parsed = best(lambda: Schema.from_text(text, "benchmark"))
    renamed = Schema.from_module(build_on_meta(lambda: Wide(n, dim, renamed=True), "Wide"))
    t_cmp, diff = best(lambda: compare(schema, renamed))
    t_auto, ops = best(lambda: diff_ops(schema, renamed), repeat=1)

    keys = len(schema)
    print(f"model: {n} Linear({dim}, {dim}) layers, {keys} state-dict keys")
    print(f"{'step':<44}{'seconds':>10}")
    rows = [
        ("build with real weights (CPU), for scale", t_cpu),
        ("build on the meta device", t_meta),
        ("schema from the meta model", t_schema),
        ("parse the base-schema text file", t_text),
        ("compare two schemas (every key renamed)", t_cmp),
        ("autogenerate ops for that rename", t_auto),
    ]
    for name, t in rows:
        print(f"{name:<44}{t:>10.3f}")
    total = t_meta + t_schema + t_cmp
    print(
        f"meta build + schema + compare: {total:.3f} s; building on meta is "
        f"{t_cpu / max(t_meta, 1e-9):.1f}x faster than with real weights"
    )
    print(
        f"autogenerate found {len(ops)} op(s): {[o.name for o in ops][:3]}; "  # type: ignore[union-attr]
        f"compare saw {len(diff.missing)} missing / {len(diff.unexpected)} unexpected"
    )  # type: ignore[union-attr]
    assert len(parsed) == keys  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
