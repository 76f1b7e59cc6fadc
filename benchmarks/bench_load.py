"""What a versioned class costs when a checkpoint is already at its revision.

    python benchmarks/bench_load.py [--layers 48] [--dim 1024] [--repeat 15]

Loads the same in-memory state dict into an unversioned model with plain
``load_state_dict`` and into the same model decorated with
``@ckptmigrate.versioned`` (stamped at its revision, so nothing to migrate),
interleaved, and prints the medians and their ratio. Also times an upgrade
on load (one "add fc3"-style step) for scale.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ckptmigrate

REV1, REV2 = "aaaa00000001", "bbbb00000002"


def make_lineage(root: Path, layers: int, dim: int) -> Path:
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    (versions / f"{REV1}.py").write_text(
        f'"""initial"""\nrevision = "{REV1}"\ndown_revision = None\n\n'
        "def upgrade():\n    pass\n\ndef downgrade():\n    pass\n"
    )
    (versions / f"{REV2}.py").write_text(
        f'"""add out"""\nfrom ckptmigrate import op\nrevision = "{REV2}"\n'
        f'down_revision = "{REV1}"\n\n'
        f'def upgrade():\n    op.add_tensor("out.weight", ({dim}, {dim}), init="eye")\n\n'
        'def downgrade():\n    op.drop_key("out.weight")\n'
    )
    return root / "migrations"


class Net(nn.Module):
    def __init__(self, layers: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.out = nn.Linear(dim, dim, bias=False)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        location = make_lineage(Path(tmp), args.layers, args.dim)

        @ckptmigrate.versioned(str(location))
        class VersionedNet(Net):
            pass

        plain = Net(args.layers, args.dim)
        versioned = VersionedNet(args.layers, args.dim)
        own = versioned.state_dict()  # stamped at the class's revision
        stamped = type(own)((k, v.clone()) for k, v in own.items())  # not the params themselves
        stamped._metadata = own._metadata  # type: ignore[attr-defined]
        unstamped = {k: v.clone() for k, v in plain.state_dict().items()}
        old = {k: v for k, v in unstamped.items() if k != "out.weight"}
        old_sd = torch.nn.Module.state_dict(plain)
        old_sd = type(old_sd)((k, v) for k, v in old_sd.items() if k != "out.weight")
        old_sd._metadata = {"": {"ckptmigrate.revision": REV1}}  # type: ignore[attr-defined]

        for _ in range(2):  # warm up both paths (imports, lineage resolution)
            plain.load_state_dict(unstamped)
            versioned.load_state_dict(stamped)
        t_plain, t_versioned, t_upgrade = [], [], []
        for _ in range(args.repeat):
            t_plain.append(timed(lambda: plain.load_state_dict(unstamped)))
            t_versioned.append(timed(lambda: versioned.load_state_dict(stamped)))
            t_upgrade.append(timed(lambda: versioned.load_state_dict(old_sd)))
        mb = sum(v.numel() * v.element_size() for v in unstamped.values()) / 2**20
        p, v, u = (statistics.median(t) * 1000 for t in (t_plain, t_versioned, t_upgrade))
        print(
            f"model: {args.layers} x Linear({args.dim}, {args.dim}) + out, {mb:.0f} MB, "
            f"{len(unstamped)} keys; median of {args.repeat}"
        )
        print(f"plain load_state_dict (unversioned class)     {p:8.1f} ms")
        print(f"versioned class, checkpoint at its revision   {v:8.1f} ms   ratio {v / p:.2f}")
        print(f"versioned class, one upgrade step on load     {u:8.1f} ms   ratio {u / p:.2f}")
        assert len(old) == len(unstamped) - 1


if __name__ == "__main__":
    main()
