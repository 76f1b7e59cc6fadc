"""``ckptmigrate fixture record``: a small golden checkpoint at the head, the same every time."""

from __future__ import annotations

from pathlib import Path

import torch
from examples.simple_model import SimpleModel
from safetensors import safe_open
from tests.conftest import ADD_FC3, INITIAL, Run, load_dict
from tests.harness.common import write_revision


def test_recorded_at_the_head_stamped_and_loadable(project: Path, run: Run) -> None:
    out = run("fixture", "record")
    path = project / "migrations" / "fixtures" / f"{ADD_FC3}.pt"
    assert out.stdout.startswith(f"Recorded a golden checkpoint at {ADD_FC3} (6 tensors, ")
    assert run("current", str(path)).stdout == f"{ADD_FC3} (head)\n"
    sd = load_dict(path)
    SimpleModel().load_state_dict(sd, strict=True)
    assert all(v.abs().sum() > 0 for v in sd.values())  # drawn values, not zeros


def test_the_same_seed_gives_the_same_tensors(project: Path, run: Run) -> None:
    run("fixture", "record", "-o", "a.pt")
    run("fixture", "record", "-o", "b.pt")
    run("fixture", "record", "-o", "c.pt", "--seed", "7")
    a, b, c = (load_dict(project / n) for n in ("a.pt", "b.pt", "c.pt"))
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_as_safetensors(project: Path, run: Run) -> None:
    run("fixture", "record", "-o", "golden.safetensors")
    with safe_open(str(project / "golden.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(SimpleModel().state_dict())
        assert f.metadata()["ckptmigrate.revision"] == ADD_FC3
    assert run("current", "golden.safetensors").stdout == f"{ADD_FC3} (head)\n"


def test_refusals_say_what_to_do(project: Path, run: Run) -> None:
    run("fixture", "record")
    err = run("fixture", "record", code=1).stderr
    assert err == (
        f"Error: migrations/fixtures/{ADD_FC3}.pt already exists; "
        "pass -o PATH to write another one\n"
    )
    write_revision(project / "migrations" / "versions", "cccc3333", INITIAL)
    err = run("fixture", "record", "-o", "x.pt", code=1).stderr
    assert err.startswith(
        f"Error: the lineage has 2 heads ({ADD_FC3}, cccc3333): a golden checkpoint is "
        "recorded at the one head; merge the heads first"
    )
    (project / "migrations" / "versions" / "cccc3333.py").unlink()
    (project / "migrations" / "base_schema.txt").unlink()
    err = run("fixture", "record", "-o", "x.pt", code=1).stderr
    assert err.startswith("Error: no base schema recorded for this lineage")
    assert "ckptmigrate schema --record" in err
    assert not (project / "x.pt").exists()
