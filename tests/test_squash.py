"""``ckptmigrate squash``: one revision for a linear run, and every checkpoint still migrates
to bit-identical tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.conftest import INITIAL, Run, load_dict, make_lineage, v1_state_dict
from tests.harness.common import same, write_revision

from ckptmigrate.plan.nodes import TensorSpec
from ckptmigrate.schema import Entry, Schema

ADD_FC3 = "2b7f0c1d9e4a"
NORM, RANDOM, TIDY = "3c9d2e4f6a8b", "4e4e00000004", "5f5f00000005"

#: The walkthrough's lineage grown by three revisions: a module, random values, renames.
LATER = [
    (
        NORM,
        ADD_FC3,
        'op.add_module("norm", torch.nn.LayerNorm(20))',
        'op.drop_prefix("norm.")',
    ),
    (
        RANDOM,
        NORM,
        """\
        op.add_tensor("extra.weight", shape=(4, 20), init="normal", std=0.02)
        op.add_module("head", torch.nn.Linear(20, 3))
        op.add_tensor("scratch", shape=(3,), init="uniform")
        op.rename_key("fc3.weight", "out.weight")
        op.reshape("extra.weight", (80,))""",
        """\
        op.reshape("extra.weight", (4, 20))
        op.rename_key("out.weight", "fc3.weight")
        op.drop_key("scratch")
        op.drop_prefix("head.")
        op.drop_key("extra.weight")""",
    ),
    (
        TIDY,
        RANDOM,
        """\
        op.rename_key("out.weight", "output.weight")
        op.rename_key("fc3.bias", "output.bias")
        op.drop_key("scratch")
        op.reshape("extra.weight", (8, 10))
        op.add_module("head2", torch.nn.Linear(3, 2))""",
        """\
        op.drop_prefix("head2.")
        op.reshape("extra.weight", (80,))
        op.add_tensor("scratch", shape=(3,), init="uniform")
        op.rename_key("output.bias", "fc3.bias")
        op.rename_key("output.weight", "out.weight")""",
    ),
]
EVERY = [None, INITIAL, ADD_FC3, NORM, RANDOM, TIDY]  # None: base


@pytest.fixture
def lineage(project: Path) -> Path:
    """The walkthrough project with the three revisions above."""
    for rev, down, up, back in LATER:
        write_revision(project / "migrations" / "versions", rev, down, up, back, doc=f"step {rev}")
    return project


def _starts(run: Run, root: Path) -> dict[str | None, Path]:
    """A checkpoint stamped at every revision of the lineage as it is now (None: base)."""
    start = root / "start.pth"
    torch.save(v1_state_dict(), start)
    run("stamp", str(start), INITIAL, "-q")
    at: dict[str | None, Path] = {}
    for rev in EVERY:
        path = root / f"at-{rev}.pth"
        run("upgrade" if rev else "downgrade", str(start), rev or "base", "-o", str(path), "-q")
        at[rev] = path
    return at


def _migrate_all(
    run: Run, at: dict[str | None, Path], root: Path, tag: str
) -> dict[tuple[str | None, str | None], Path]:
    """Each checkpoint of ``at`` taken to every revision (as its stamp says it is)."""
    out = {}
    for src, path in at.items():
        for dst in EVERY:
            result = root / f"{tag}-{src}-to-{dst}.pth"
            cmd = "upgrade" if EVERY.index(dst) >= EVERY.index(src) else "downgrade"
            run(cmd, str(path), dst or "base", "-o", str(result), "-q")
            out[(src, dst)] = result
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_dict(path).items() if isinstance(v, torch.Tensor)}


def test_every_checkpoint_migrates_to_the_same_tensors_after_a_squash(
    lineage: Path, run: Run
) -> None:
    at = _starts(run, lineage)
    before = _migrate_all(run, at, lineage, "before")
    done = run("squash", f"{INITIAL}:{TIDY}", "-m", "squashed", "--rev-id", "squash01")
    assert done.stdout == "Generating migrations/versions/squash01_squashed.py ... done\n"
    assert "Squash of 5 revisions" in done.stderr and "bit for bit" in done.stderr
    assert sorted(p.name for p in (lineage / "migrations" / "versions").glob("*.py")) == [
        "squash01_squashed.py"
    ]
    assert run("history").stdout == "<base> -> squash01 (head), squashed\n"
    # the checkpoints stamped before the squash, with the ids it replaced
    after = _migrate_all(run, at, lineage, "after")
    for (src, dst), path in before.items():
        assert same(_tensors(path), _tensors(after[(src, dst)])), (src, dst)
    for rev in EVERY[1:-1]:
        assert run("current", str(at[rev])).stdout == f"{rev}\n"
    assert run("current", str(at[TIDY])).stdout == "squash01 (head)\n"
    assert run("current", str(after[(INITIAL, TIDY)])).stdout == "squash01 (head)\n"


def test_a_crossing_migration_runs_the_squash_in_one_step(lineage: Path, run: Run) -> None:
    at = _starts(run, lineage)
    run("upgrade", str(at[None]), "-o", str(lineage / "before.pth"), "-q")
    run("squash", f"{INITIAL}:{TIDY}", "-m", "squashed", "--rev-id", "squash01")
    log = run("upgrade", str(at[None]), "-o", str(lineage / "after.pth")).stderr
    assert [ln for ln in log.splitlines() if ln.startswith("Running")] == [
        "Running upgrade  -> squash01, squashed"
    ]
    assert same(_tensors(lineage / "before.pth"), _tensors(lineage / "after.pth"))
    log = run("upgrade", str(at[ADD_FC3]), "-o", str(lineage / "inside.pth")).stderr
    assert [ln for ln in log.splitlines() if ln.startswith("Running")] == [
        f"Running upgrade {ADD_FC3} -> {NORM}, step {NORM}",
        f"Running upgrade {NORM} -> {RANDOM}, step {RANDOM}",
        f"Running upgrade {RANDOM} -> squash01, step {TIDY}",
    ]


def test_the_squashed_file_is_simplified_and_seeded(lineage: Path, run: Run) -> None:
    out = run("squash", f"{NORM}:{TIDY}", "--dry-run", "--rev-id", "squash01").stdout
    norm = "torch.nn.LayerNorm((20,), eps=1e-05, elementwise_affine=True, bias=True)"
    assert out.splitlines() == [
        "def upgrade() -> None:",
        f'    with op.seeds_of("{NORM}"):',
        f'        op.add_module("norm", {norm})',
        f'    with op.seeds_of("{RANDOM}"):',
        '        op.add_tensor("extra.weight", (4, 20), init="normal", std=0.02)',
        '        op.add_module("head", torch.nn.Linear(in_features=20, out_features=3, bias=True))',
        # scratch: added, then dropped; fc3.weight: renamed twice; extra.weight: reshaped twice
        '    op.rename_key("fc3.weight", "output.weight")',
        '    op.reshape("extra.weight", (8, 10))',
        '    op.rename_key("fc3.bias", "output.bias")',
        f'    with op.seeds_of("{TIDY}"):',
        '        op.add_module("head2", torch.nn.Linear(in_features=3, out_features=2, bias=True))',
        "",
        "def downgrade() -> None:",
        '    op.drop_prefix("head2.")',
        '    op.rename_key("output.bias", "fc3.bias")',
        '    op.rename_key("output.weight", "fc3.weight")',
        '    op.drop_prefix("head.")',
        '    op.drop_key("extra.weight")',  # reshaped twice, then dropped: dropped
        '    op.drop_prefix("norm.")',
    ]
    assert sorted(p.name for p in (lineage / "migrations" / "versions").glob("*.py")) == [
        f"{INITIAL}_initial.py",
        f"{ADD_FC3}_add_fc3.py",
        f"{NORM}.py",
        f"{RANDOM}.py",
        f"{TIDY}.py",
    ]


def test_keep_leaves_the_replaced_files_and_the_graph_shows_the_squash(
    lineage: Path, run: Run
) -> None:
    versions = lineage / "migrations" / "versions"
    before = sorted(p.name for p in versions.glob("*.py"))
    run("squash", f"{ADD_FC3}:{RANDOM}", "-m", "middle", "--rev-id", "mid01", "--keep")
    assert sorted(p.name for p in versions.glob("*.py")) == sorted([*before, "mid01_middle.py"])
    assert run("history").stdout.splitlines() == [
        f"mid01 -> {TIDY} (head), step {TIDY}",
        f"{INITIAL} -> mid01, middle",
        f"<base> -> {INITIAL}, initial",
    ]
    err = run("show", NORM, code=1).stderr
    assert f"revision {NORM} was squashed into mid01" in err
    assert run("show", RANDOM).stdout.startswith("Rev: mid01")  # the squash ends there


def test_a_squash_of_squashes_keeps_every_old_stamp(lineage: Path, run: Run) -> None:
    at = _starts(run, lineage)
    before = _migrate_all(run, at, lineage, "before")
    run("squash", f"{ADD_FC3}:{NORM}", "--rev-id", "first01")
    middle = _migrate_all(run, at, lineage, "middle")
    run("squash", f"{INITIAL}:{TIDY}", "--rev-id", "second01")
    assert run("history").stdout == f"<base> -> second01 (head), squash {INITIAL}..{TIDY}\n"
    after = _migrate_all(run, at, lineage, "after")
    for key, path in before.items():
        assert same(_tensors(path), _tensors(middle[key])), key
        assert same(_tensors(path), _tensors(after[key])), key
    # a checkpoint stamped with the first squash's id, before the second
    assert run("current", str(middle[(INITIAL, NORM)])).stdout == "first01\n"
    run("upgrade", str(middle[(INITIAL, NORM)]), "-o", str(lineage / "from-first.pth"), "-q")
    assert same(_tensors(lineage / "from-first.pth"), _tensors(before[(INITIAL, TIDY)]))


def test_ranges_that_are_not_one_line_are_refused(project: Path, run: Run) -> None:
    versions = project / "migrations" / "versions"
    write_revision(versions, "cccc0003", ADD_FC3, "pass", "pass")
    write_revision(versions, "dddd0004", ADD_FC3, "pass", "pass")  # ADD_FC3 branches
    write_revision(versions, "eeee0005", ("cccc0003", "dddd0004"), "pass", "pass")  # merges
    err = run("squash", f"{INITIAL}:cccc0003", code=1).stderr
    assert err.startswith(f"Error: {ADD_FC3} is a branch point (cccc0003, dddd0004 build on it)")
    err = run("squash", f"{ADD_FC3}:eeee0005", code=1).stderr
    assert "eeee0005 is a merge of cccc0003, dddd0004: a squash cannot cross it" in err
    err = run("squash", f"cccc0003:{INITIAL}", code=1).stderr
    assert "cccc0003 is not below 1a0c3e5f7b2d on one line of history" in err
    err = run("squash", f"{INITIAL}:{INITIAL}", code=1).stderr
    assert "nothing to squash" in err
    err = run("squash", "nonsense", code=1).stderr
    assert "needs a colon" in err
    for err in (run("squash", f"{INITIAL}:cccc0003", code=1).stderr,):
        assert len(err.strip().splitlines()) == 1


def test_calls_that_cannot_be_written_as_source_are_refused(project: Path, run: Run) -> None:
    versions = project / "migrations" / "versions"
    write_revision(
        versions,
        "cccc0003",
        ADD_FC3,
        'op.map_tensor("fc1.bias", lambda t: t * 2)',
        'op.map_tensor("fc1.bias", lambda t: t / 2)',
    )
    err = run("squash", f"{INITIAL}:cccc0003", code=1).stderr
    assert err.startswith(
        "Error: cannot squash 1a0c3e5f7b2d..cccc0003: revision cccc0003 calls op.map_tensor "
        "with the function '<lambda>'"
    )
    assert "squash the ranges before and after cccc0003" in err
    (versions / "cccc0003.py").unlink()
    custom = (
        "import torch\n\n\nclass Scale(torch.nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.s = torch.nn.Parameter(torch.ones(3))\n\n\n"
    )
    write_revision(
        versions,
        "dddd0004",
        ADD_FC3,
        'op.add_module("scale", Scale())',
        'op.drop_prefix("scale.")',
        header=custom,
    )
    err = run("squash", f"{INITIAL}:dddd0004", code=1).stderr
    assert "calls op.add_module with the Scale module: only torch.nn modules" in err
    assert sorted(p.name for p in versions.glob("*.py")) == [
        f"{INITIAL}_initial.py",
        f"{ADD_FC3}_add_fc3.py",
        "dddd0004.py",
    ]


def test_an_importable_function_is_written_by_name(project: Path, run: Run) -> None:
    versions = project / "migrations" / "versions"
    write_revision(
        versions,
        "cccc0003",
        ADD_FC3,
        'op.map_tensor("fc1.bias", torch.neg)',
        'op.map_tensor("fc1.bias", torch.neg)',
    )
    out = run("squash", f"{ADD_FC3}:cccc0003", "--dry-run").stdout
    assert '        op.map_tensor("fc1.bias", torch.neg)' in out.splitlines()


def test_a_squash_needs_the_base_schema(project: Path, run: Run) -> None:
    (project / "migrations" / "base_schema.txt").unlink()
    err = run("squash", f"{INITIAL}:{ADD_FC3}", code=1).stderr
    assert "no base schema recorded" in err and "schema --record" in err


def test_the_proof_catches_a_squash_that_computes_other_values(
    lineage: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without op.seeds_of the new tensors would be drawn from the new revision's seeds."""
    from ckptmigrate.squash.source import Source

    real = Source.body

    def unseeded(self: Source, calls: object, *, blocks: bool) -> list[str]:
        return real(self, calls, blocks=False)  # type: ignore[arg-type]

    monkeypatch.setattr(Source, "body", unseeded)
    err = run("squash", f"{NORM}:{TIDY}", "--rev-id", "squash01", code=1).stderr
    assert err.startswith("Error: the squashed revision's upgrade() computes other values for ")
    assert sorted(p.name for p in (lineage / "migrations" / "versions").glob("*.py"))[-1] == (
        f"{TIDY}.py"
    )  # nothing written, nothing removed


def test_an_id_a_squash_replaced_cannot_be_reused(lineage: Path, run: Run) -> None:
    run("squash", f"{ADD_FC3}:{NORM}", "--rev-id", "squash01")
    err = run("revision", "-m", "x", "--rev-id", ADD_FC3, code=1).stderr
    assert f"revision id {ADD_FC3} already exists (squashed into squash01)" in err


# A new tensor whose script names no dtype is made in the floating dtype its own revision
# finds (uniform, else float32); the squashed step starts where the range starts.
FIRST, SECOND = "aaaa00000001", "bbbb00000002"
NEW_T = ('op.add_tensor("t", shape=(3,), init="normal")', 'op.drop_key("t")')


def _float_lineage(root: Path, first: tuple[str, str]) -> Path:
    """Base: floats ``a`` and ``b``; FIRST runs ``first`` (up, down), SECOND adds ``t``
    with no dtype. Returns the versions folder."""
    base = Schema({k: Entry(TensorSpec((4,), torch.float32)) for k in ("a", "b")})
    steps = [(FIRST, None, *first), (SECOND, FIRST, *NEW_T)]
    make_lineage(root, "migrations", base.to_text("test"), steps, ini="alembic_style.ini")
    return root / "migrations" / "versions"


def _upgraded_before_and_after_squash(
    run: Run, root: Path, *, force: tuple[torch.dtype, ...] = ()
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """Squash FIRST:SECOND; an fp16 and an fp32 checkpoint at base and at FIRST, each
    upgraded to the head before and after it (``force``: the dtypes whose mixed results
    need --force, as a stamp is checked against the recorded schema in one dtype only)."""
    starts: dict[tuple[str, str], tuple[Path, list[str]]] = {}
    for dtype in (torch.float16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        extra = ["--force"] if dtype in force else []
        base = root / f"{name}-base.pth"
        torch.manual_seed(0)
        torch.save({"a": torch.randn(4, dtype=dtype), "b": torch.randn(4, dtype=dtype)}, base)
        at_first = root / f"{name}-first.pth"
        run("upgrade", str(base), FIRST, "-o", str(at_first), "-q", *extra)
        starts[(name, "base")] = base, extra
        starts[(name, FIRST)] = at_first, extra

    def head(tag: str) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
        out = {}
        for (name, at), (path, extra) in starts.items():
            result = root / f"{tag}-{name}-{at}.pth"
            run("upgrade", str(path), "-o", str(result), "-q", *extra)
            out[(name, at)] = _tensors(result)
        return out

    before = head("before")
    run("squash", f"{FIRST}:{SECOND}", "-m", "squashed", "--rev-id", "squash01")
    after = head("after")
    for key, tensors in before.items():
        assert same(tensors, after[key]), key
    return after


def test_a_dtype_less_new_tensor_that_follows_the_range_start_is_kept_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    versions = _float_lineage(tmp_path, ('op.rename_key("a", "c")', 'op.rename_key("c", "a")'))
    results = _upgraded_before_and_after_squash(run, tmp_path)
    text = (versions / "squash01_squashed.py").read_text()
    assert '        op.add_tensor("t", (3,), init="normal")' in text.splitlines()
    for (name, _), tensors in results.items():  # the checkpoint's own dtype, as before
        assert list(tensors) == ["c", "b", "t"]
        assert tensors["t"].dtype == getattr(torch, name)


def test_a_dtype_less_new_tensor_gets_the_one_dtype_its_revision_always_gave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """After FIRST the floats are mixed whatever the checkpoint: SECOND's ``t`` is float32,
    where the squashed step, starting from an fp16 checkpoint, would make it float16."""
    monkeypatch.chdir(tmp_path)
    first = (
        'op.add_tensor("x", shape=(2,), dtype=torch.float32)\nop.cast("b", torch.float64)',
        'op.cast("b", torch.float32)\nop.drop_key("x")',
    )
    versions = _float_lineage(tmp_path, first)
    results = _upgraded_before_and_after_squash(run, tmp_path, force=(torch.float16,))
    text = (versions / "squash01_squashed.py").read_text()
    assert '        op.add_tensor("t", (3,), dtype=torch.float32, init="normal")' in (
        text.splitlines()
    )
    for (name, _), tensors in results.items():
        assert tensors["a"].dtype == getattr(torch, name)
        assert (tensors["b"].dtype, tensors["t"].dtype) == (torch.float64, torch.float32)


def test_a_squash_no_step_can_stand_for_is_refused_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """After FIRST, ``t`` is float32 on fp16 and fp32 checkpoints and float64 on fp64 ones:
    neither the range start's dtype (fp16 stays fp16) nor one constant."""
    monkeypatch.chdir(tmp_path)
    versions = _float_lineage(
        tmp_path, ('op.cast("a", torch.float64)', 'op.cast("a", torch.float32)')
    )
    files = {p.name: p.read_bytes() for p in versions.iterdir() if p.is_file()}
    err = run("squash", f"{FIRST}:{SECOND}", "--rev-id", "squash01", code=1).stderr
    assert err.startswith(
        f"Error: cannot squash {FIRST}..{SECOND}: revision {SECOND}'s upgrade() calls "
        "op.add_tensor('t', ...) without a dtype"
    )
    assert "give the call a dtype= there, or start the range at it, or end it before it" in err
    assert len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in versions.iterdir() if p.is_file()} == files
