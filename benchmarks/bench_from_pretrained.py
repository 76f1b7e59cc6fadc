"""What migrating on load costs in ``from_pretrained``: time and peak memory, side by side.

    python benchmarks/bench_from_pretrained.py [--layers 12] [--dim 512] [--repeat 3] [--check]

A GPT-2 of ``--layers`` x ``--dim`` is saved by transformers (one
model.safetensors), and the same weights in the older layout of a lineage
that renamed ``transformer.h.`` (``transformer.blocks.`` before). Each
approach runs in a fresh process; the table gives its median wall time, its
peak anonymous memory (RssAnon: memory the process owns) and its peak
resident memory (VmRSS: that and the pages of memory-mapped files), each
sampled every 5 ms:

* plain transformers loading the folder already at the class's revision;
* the versioned class loading the old folder, migrating on the way in;
* the naive way: read the whole old file, rename the keys in a dict, hand it
  to ``from_pretrained(state_dict=...)``.

``--check`` exits 1 unless the versioned load's peaks stay within 15% (+16 MB)
of the plain load's: the checkpoint is never held twice.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_upgrade import measure

R1, R2 = "aaaa00000001", "bbbb00000002"

SETUP = """
import os, sys, torch, transformers
from pathlib import Path
root = Path(sys.argv[1]); layers, dim = int(sys.argv[2]), int(sys.argv[3])
config = transformers.GPT2Config(n_layer=layers, n_embd=dim, n_head=8, vocab_size=8192,
                                 n_positions=64, bos_token_id=0, eos_token_id=0)
torch.manual_seed(0)
transformers.GPT2LMHeadModel(config).save_pretrained(root / "new")
"""

VERSIONED = """
import ckptmigrate, transformers
@ckptmigrate.versioned({migrations!r}, revision={rev!r})
class VGPT2(transformers.GPT2LMHeadModel):
    pass
"""

CASES = {
    "import transformers (for scale)": "import transformers",
    "plain GPT2LMHeadModel.from_pretrained(folder at the revision)": (
        "import transformers; transformers.GPT2LMHeadModel.from_pretrained({new!r})"
    ),
    "versioned class .from_pretrained(old folder), migrating on load": (
        VERSIONED + "VGPT2.from_pretrained({old!r})"
    ),
    "naive: load_file + rename + from_pretrained(state_dict=...)": (
        "import transformers\nfrom safetensors.torch import load_file\n"
        "sd = load_file({old!r} + '/model.safetensors')\n"
        "sd = {{k.replace('transformer.blocks.', 'transformer.h.'): v for k, v in sd.items()}}\n"
        "config = transformers.GPT2Config.from_pretrained({old!r})\n"
        "transformers.GPT2LMHeadModel.from_pretrained(None, config=config, state_dict=sd)"
    ),
}


def lineage(root: Path) -> Path:
    versions = root / "migrations" / "versions"
    versions.mkdir(parents=True)
    for rev, down, up, back in (
        (R1, None, "pass", "pass"),
        (
            R2,
            R1,
            'op.rename_prefix("transformer.blocks.", "transformer.h.")',
            'op.rename_prefix("transformer.h.", "transformer.blocks.")',
        ),
    ):
        (versions / f"{rev}.py").write_text(
            f'"""{rev}"""\nfrom ckptmigrate import op\nrevision = {rev!r}\n'
            f"down_revision = {down!r}\n\ndef upgrade():\n    {up}\n\n"
            f"def downgrade():\n    {back}\n"
        )
    (root / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\n"
    )
    return root / "migrations"


def cli(root: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "ckptmigrate", "-q", *args]
    subprocess.run(cmd, cwd=root, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        migrations = lineage(root)
        code = [sys.executable, "-c", SETUP, str(root), str(args.layers), str(args.dim)]
        subprocess.run(code, check=True, env=env)
        cli(root, "stamp", "new", R2)
        cli(root, "downgrade", "new", R1, "-o", "old")
        size = (root / "new" / "model.safetensors").stat().st_size
        print(
            f"GPT-2, {args.layers} layers x {args.dim} dim: model.safetensors is "
            f"{size / 2**20:.0f} MB; median wall of {args.repeat}, peak RssAnon, peak VmRSS"
        )
        results: dict[str, tuple[float, int, int]] = {}
        fields = {"new": str(root / "new"), "old": str(root / "old")}
        for label, template in CASES.items():
            cmd = [
                sys.executable,
                "-c",
                template.format(migrations=str(migrations), rev=R2, **fields),
            ]
            anon = [measure(cmd, env) for _ in range(args.repeat)]
            rss = [measure(cmd, env, "VmRSS:")[1] for _ in range(args.repeat)]
            wall = statistics.median(w for w, _ in anon)
            results[label] = (wall, max(p for _, p in anon), max(rss))
            print(
                f"  {label:<66} {wall:6.2f} s {results[label][1] / 2**20:7.0f} MB "
                f"{results[label][2] / 2**20:7.0f} MB",
                flush=True,
            )
    plain, versioned, naive = (results[label] for label in list(CASES)[1:])
    for name, column in (("RssAnon", 1), ("VmRSS", 2)):
        print(
            f"peak {name}: versioned / plain {versioned[column] / plain[column]:.2f}, "
            f"naive / plain {naive[column] / plain[column]:.2f}"
        )
    print(f"wall: versioned / plain {versioned[0] / plain[0]:.2f}")
    if args.check and any(versioned[c] > plain[c] * 1.15 + 16 * 2**20 for c in (1, 2)):
        raise SystemExit("the versioned load used more memory than the plain load allows")


if __name__ == "__main__":
    main()
