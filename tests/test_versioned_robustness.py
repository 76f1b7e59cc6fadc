"""A versioned model's everyday path survives lineage problems and wrapper prefixes.

Saving never fails because of the lineage (two heads, a missing folder, no
revisions): the state dict is written unstamped with one warning per class,
and the problem is reported when the class is first built. Loading a dict
that needs migrating then fails with a LoadError naming the fix. State dicts
saved through ``DataParallel`` or ``torch.compile`` load into the plain
versioned class with the wrapper prefix stripped.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tests.conftest import Run, make_lineage, write_revision
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

import ckptmigrate
from ckptmigrate.errors import LoadError, StampError

# The everyday lineage: at b1, Block has ln1/fc/ln_f; b2 renames fc to proj.
BLOCK_BASE = (
    "ln1.weight float32 [8]\nln1.bias float32 [8]\nfc.weight float32 [8,8]\n"
    "fc.bias float32 [8]\nln_f.weight float32 [8]\nln_f.bias float32 [8]\n"
)
RENAME_FC = [
    ("b1000001", None, "pass", "pass"),
    (
        "b2000002",
        "b1000001",
        'op.rename_prefix("fc.", "proj.")',
        'op.rename_prefix("proj.", "fc.")',
    ),
]
# Two feature branches off one base: fa adds `a`, fb adds `b`.
TWO_HEADS = [
    ("base0001", None, "pass", "pass"),
    ("fa000001", "base0001", 'op.add_tensor("a", (1,))', 'op.drop_key("a")'),
    ("fb000001", "base0001", 'op.add_tensor("b", (1,))', 'op.drop_key("b")'),
]


class V1Layout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)
        self.ln_f = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(self.fc(self.ln1(x)))  # type: ignore[no-any-return]


class V2Layout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8)
        self.ln_f = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(self.proj(self.ln1(x)))  # type: ignore[no-any-return]


class FeatureA(nn.Module):
    """The layout on branch fa: w plus a."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.a = nn.Parameter(torch.zeros(1))


def _trained(module: nn.Module) -> nn.Module:
    """Distinct, non-default values in every tensor, as after training."""
    torch.manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))
    return module


@pytest.fixture
def blocks(tmp_path: Path) -> tuple[type[nn.Module], type[nn.Module]]:
    """(OldBlock pinned to b1, Block following the head b2) on one lineage."""
    folder = make_lineage(tmp_path, "blk", BLOCK_BASE, RENAME_FC)

    @ckptmigrate.versioned(folder, revision="b1000001")
    class OldBlock(V1Layout):
        pass

    @ckptmigrate.versioned(folder)
    class Block(V2Layout):
        pass

    return OldBlock, Block


def _lineage_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, ckptmigrate.LineageWarning)]


@pytest.fixture
def caught() -> Iterator[list[warnings.WarningMessage]]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield record


# ----------------------------------------------------------------------------- item 3: saving


@pytest.fixture
def two_heads(tmp_path: Path) -> str:
    return make_lineage(tmp_path, "two", "w float32 [2]\n", TWO_HEADS)


def test_two_heads_state_dict_saves_unstamped_and_warns_once_per_class(
    two_heads: str, tmp_path: Path, caught: list[warnings.WarningMessage]
) -> None:
    @ckptmigrate.versioned(two_heads)
    class Model(FeatureA):
        pass

    assert _lineage_warnings(caught) == []  # decorating reads nothing
    model = _trained(Model())
    Model()  # a second instance: no second report
    [built] = _lineage_warnings(caught)
    assert "Model" in built and "2 heads" in built and "fa000001" in built
    assert "fb000001" in built
    assert "ckptmigrate merge heads" in built and "revision=" in built
    [entry] = [w for w in caught if w.category is ckptmigrate.LineageWarning]
    assert entry.filename == __file__  # points at the user's line, not into torch or ours

    torch.save(model.state_dict(), tmp_path / "ckpt.pth")  # the training job's checkpoint
    model.state_dict()
    [_, saved] = _lineage_warnings(caught)
    assert "saved without a ckptmigrate stamp" in saved and "ckptmigrate merge heads" in saved
    sd = torch.load(tmp_path / "ckpt.pth", weights_only=True)
    assert "ckptmigrate.revision" not in sd._metadata[""]
    assert torch.equal(sd["w"], model.w) and torch.equal(sd["a"], model.a)
    assert Model.__schema_revision__ is None


def test_two_heads_own_state_dict_still_loads(
    two_heads: str, caught: list[warnings.WarningMessage]
) -> None:
    """An EMA copy or a resume from the job's own unstamped save must not crash."""

    @ckptmigrate.versioned(two_heads)
    class Model(FeatureA):
        pass

    model, ema = _trained(Model()), Model()
    ema.load_state_dict(model.state_dict())
    assert torch.equal(ema.w, model.w) and torch.equal(ema.a, model.a)


def test_two_heads_load_that_needs_migration_raises_load_error(two_heads: str) -> None:
    @ckptmigrate.versioned(two_heads, revision="base0001")
    class Base(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

    @ckptmigrate.versioned(two_heads)
    class Model(FeatureA):
        pass

    stamped = Base().state_dict()
    assert stamped._metadata[""]["ckptmigrate.revision"] == "base0001"
    with pytest.warns(ckptmigrate.LineageWarning):
        model = Model()
    for sd in (stamped, OrderedDict(w=torch.ones(2))):  # stamped, and unstamped but not fitting
        with pytest.raises(LoadError) as info:
            model.load_state_dict(sd)
        message = str(info.value)
        assert "Error(s) in loading" not in message
        assert "2 heads" in message and "ckptmigrate merge heads" in message
        assert "revision=" in message
    assert torch.equal(model.w, torch.zeros(2))  # nothing half-loaded


def test_checkpoint_saved_during_two_heads_loads_after_the_merge(
    tmp_path: Path, caught: list[warnings.WarningMessage]
) -> None:
    """Branches that left this class's layout alone: any of them gives the same tensors."""
    branches = [
        ("base0001", None, "pass", "pass"),
        ("fa000001", "base0001", "pass", "pass"),
        ("fb000001", "base0001", "pass", "pass"),
    ]
    during = make_lineage(tmp_path, "during", "w float32 [2]\n", branches)
    after = make_lineage(
        tmp_path,
        "after",
        "w float32 [2]\n",
        [*branches, ("m0000001", ("fa000001", "fb000001"), "pass", "pass")],
    )
    scaled = make_lineage(
        tmp_path,
        "scaled",  # the same graph, but fb changes values without changing the schema
        "w float32 [2]\n",
        [
            *branches[:2],
            ("fb000001", "base0001", 'op.map_tensor("w", lambda t: t * 2)', "pass"),
            ("m0000001", ("fa000001", "fb000001"), "pass", "pass"),
        ],
    )

    class Layout(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 2.0]))

    saved = ckptmigrate.versioned(during)(type("Model", (Layout,), {}))().state_dict()
    assert "ckptmigrate.revision" not in saved._metadata[""]

    merged = ckptmigrate.versioned(after)(type("Model", (Layout,), {}))()
    with torch.no_grad():
        merged.w.zero_()
    merged.load_state_dict(saved)
    assert torch.equal(merged.w, torch.tensor([1.0, 2.0]))

    ambiguous = ckptmigrate.versioned(scaled)(type("Model", (Layout,), {}))()
    with pytest.raises(LoadError, match="matches several revisions"):
        ambiguous.load_state_dict(saved)


def test_pinning_a_head_fixes_it(two_heads: str, caught: list[warnings.WarningMessage]) -> None:
    @ckptmigrate.versioned(two_heads, revision="fa000001")
    class Model(FeatureA):
        pass

    sd = Model().state_dict()
    assert sd._metadata[""]["ckptmigrate.revision"] == "fa000001"
    assert _lineage_warnings(caught) == []


def test_missing_migrations_folder(tmp_path: Path, caught: list[warnings.WarningMessage]) -> None:
    @ckptmigrate.versioned(tmp_path / "nowhere")
    class Model(FeatureA):
        pass

    assert _lineage_warnings(caught) == []
    model = Model()
    sd = model.state_dict()
    assert "ckptmigrate.revision" not in sd._metadata[""]
    built, saved = _lineage_warnings(caught)
    assert "does not exist" in built and f"ckptmigrate init {tmp_path / 'nowhere'}" in built
    assert "saved without a ckptmigrate stamp" in saved and "ckptmigrate init" in saved
    sd._metadata[""]["ckptmigrate.revision"] = "0123456789ab"
    with pytest.raises(LoadError, match="ckptmigrate init"):
        Model().load_state_dict(sd)


def test_lineage_without_revisions(tmp_path: Path, caught: list[warnings.WarningMessage]) -> None:
    (tmp_path / "fresh" / "versions").mkdir(parents=True)

    @ckptmigrate.versioned(tmp_path / "fresh")
    class Model(FeatureA):
        pass

    sd = Model().state_dict()
    assert "ckptmigrate.revision" not in sd._metadata[""]
    [built, _saved] = _lineage_warnings(caught)
    assert "no revisions yet" in built and "ckptmigrate revision -m" in built


def test_broken_revision_file_does_not_break_saving(
    tmp_path: Path, caught: list[warnings.WarningMessage]
) -> None:
    folder = make_lineage(tmp_path, "broken", "w float32 [2]\n", TWO_HEADS[:1])
    (Path(folder) / "versions" / "oops.py").write_text("revision = 'oops'\ndown_revision = (\n")

    @ckptmigrate.versioned(folder)
    class Model(FeatureA):
        pass

    assert list(Model().state_dict()) == ["w", "a"]
    [built, _saved] = _lineage_warnings(caught)
    assert "oops.py" in built


# ----------------------------------------------------------------------------- item 3: the CLI


def _feature_project(project_dir: Path, run: Run) -> None:
    run("init", "migrations")
    (project_dir / "migrations" / "base_schema.txt").write_text("w float32 [2]\n")
    for rev, down, up, down_body in TWO_HEADS:
        write_revision(project_dir / "migrations" / "versions", rev, down, up, down_body)
    (project_dir / "feature_model.py").write_text(
        "import torch\nimport ckptmigrate\nfrom torch import nn\n\n"
        "@ckptmigrate.versioned('migrations')\n"
        "class FeatureModel(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = nn.Parameter(torch.zeros(2))\n"
        "        self.a = nn.Parameter(torch.zeros(1))\n"
        "        self.c = nn.Parameter(torch.zeros(3))\n\n"
        "def build():\n    return FeatureModel()\n"
    )
    ini = project_dir / "alembic_style.ini"
    lines = [
        "model = feature_model:build" if line.lstrip("# ").startswith("model =") else line
        for line in ini.read_text().splitlines()
    ]
    ini.write_text("\n".join(lines) + "\n")


def test_autogenerate_on_a_lineage_with_two_heads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    monkeypatch.chdir(tmp_path)
    _feature_project(tmp_path, run)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = run("revision", "--autogenerate", "-m", "add c", code=1).stderr
        assert err.splitlines() == [
            "Error: multiple heads are present: fa000001, fb000001; pass --head REV to choose "
            "the parent, or join them with 'ckptmigrate merge heads -m ...'"
        ]
        run("revision", "--autogenerate", "--head", "fa000001", "-m", "add c", "--rev-id", "c1")
    assert _lineage_warnings(caught) == []  # the CLI speaks for itself, not in Python warnings
    [script] = (tmp_path / "migrations" / "versions").glob("c1_*.py")
    text = script.read_text()
    assert 'down_revision = "fa000001"' in text
    upgrade = text.split("def upgrade()")[1].split("def downgrade()")[0]
    assert '"c"' in upgrade and '"b"' not in upgrade and '"a"' not in upgrade
    assert set(run("heads").stdout.split()) == {"c1", "(head)", "fb000001"}

    sd = OrderedDict(w=torch.tensor([1.0, 2.0]), a=torch.tensor([3.0]))
    sd._metadata = {"": {"ckptmigrate.revision": "fa000001"}}  # type: ignore[attr-defined]
    torch.save(sd, tmp_path / "fa.pth")
    run("upgrade", "fa.pth", "c1")
    out = torch.load(tmp_path / "fa.pth", weights_only=True)
    assert list(out) == ["w", "a", "c"] and out["c"].shape == (3,)
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["a"], sd["a"])


def test_fresh_lineage_records_its_base_schema_from_a_versioned_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """Building the model for the CLI must not fail because the lineage has no revisions."""
    monkeypatch.chdir(tmp_path)
    _feature_project(tmp_path, run)
    (tmp_path / "migrations" / "base_schema.txt").unlink()
    for script in (tmp_path / "migrations" / "versions").glob("*.py"):
        script.unlink()
    run("schema", "--record")
    text = (tmp_path / "migrations" / "base_schema.txt").read_text()
    assert [line.split()[0] for line in text.splitlines() if not line.startswith("#")] == [
        "w",
        "a",
        "c",
    ]


# ----------------------------------------------------------------------------- item 4: wrappers


def _assert_loaded(model: nn.Module, saved_from: nn.Module) -> None:
    theirs = {k.replace("fc.", "proj."): v for k, v in saved_from.state_dict().items()}
    ours = model.state_dict()
    assert list(ours) == list(theirs)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    x = torch.randn(3, 8)
    assert torch.equal(model(x), saved_from(x))


@pytest.mark.parametrize("stamped", [True, False], ids=["stamped", "identified"])
@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(nn.DataParallel, id="DataParallel"),
        pytest.param(torch.compile, id="torch.compile"),
        pytest.param(lambda m: nn.DataParallel(torch.compile(m)), id="DataParallel+compile"),
    ],
)
def test_wrapped_old_state_dict_loads_into_the_versioned_class(
    blocks: tuple[type[nn.Module], type[nn.Module]], wrap: object, stamped: bool, tmp_path: Path
) -> None:
    OldBlock, Block = blocks
    old = _trained(OldBlock() if stamped else V1Layout())
    wrapped = wrap(old)  # type: ignore[operator]
    torch.save(wrapped.state_dict(), tmp_path / "wrapped_v1.pth")
    sd = torch.load(tmp_path / "wrapped_v1.pth", weights_only=True)
    assert next(iter(sd)).startswith(("module.", "_orig_mod."))
    model = Block()
    model.load_state_dict(sd)  # strict
    _assert_loaded(model, old)
    rewrapped = Block()
    wrap(rewrapped).load_state_dict(sd)  # type: ignore[operator]  # the hook runs at its prefix
    _assert_loaded(rewrapped, old)


def test_compiled_model_trained_one_step_then_loaded(
    blocks: tuple[type[nn.Module], type[nn.Module]], tmp_path: Path
) -> None:
    OldBlock, Block = blocks
    old = OldBlock()
    compiled = torch.compile(old, backend="eager")
    opt = torch.optim.SGD(compiled.parameters(), lr=0.1)
    compiled(torch.randn(4, 8)).pow(2).sum().backward()
    opt.step()
    torch.save(compiled.state_dict(), tmp_path / "compiled.pth")
    model = Block()
    model.load_state_dict(torch.load(tmp_path / "compiled.pth", weights_only=True))
    _assert_loaded(model, old)


def test_versioned_part_of_a_plain_model_behind_wrappers(
    blocks: tuple[type[nn.Module], type[nn.Module]],
) -> None:
    OldBlock, Block = blocks

    class OldNet(nn.Module):
        def __init__(self, compiled: bool) -> None:
            super().__init__()
            self.head = nn.Linear(8, 2)
            block = OldBlock()
            self.block = torch.compile(block) if compiled else block

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 2)
            self.block = Block()

    old = _trained(OldNet(compiled=False))
    dp_sd = nn.DataParallel(old).state_dict()  # keys module.block.fc.weight, ...

    into_dp = nn.DataParallel(Net())  # the block's hook runs at prefix module.block.
    into_dp.load_state_dict(dp_sd)
    _assert_loaded(into_dp.module.block, old.block)

    plain = Net()  # PyTorch's own way to drop the prefix, then plain load_state_dict
    consume_prefix_in_state_dict_if_present(dp_sd, "module.")
    plain.load_state_dict(dp_sd)
    _assert_loaded(plain.block, old.block)

    inner = _trained(OldNet(compiled=True))  # keys block._orig_mod.fc.weight, ...
    assert "block._orig_mod.fc.weight" in inner.state_dict()
    net = Net()
    net.load_state_dict(inner.state_dict())
    _assert_loaded(net.block, inner.block._orig_mod)
    assert torch.equal(net.head.weight, inner.head.weight)


def test_load_error_never_proposes_a_wrapper_prefix_as_a_rename(
    blocks: tuple[type[nn.Module], type[nn.Module]],
) -> None:
    _OldBlock, Block = blocks

    class Unmigrated(V2Layout):  # a change nobody wrote a revision for: ln_f -> norm
        def __init__(self) -> None:
            super().__init__()
            self.norm = self.ln_f
            del self.ln_f

    sd = nn.DataParallel(Unmigrated()).state_dict()
    with pytest.raises(LoadError) as info:
        Block().load_state_dict(sd)
    message = str(info.value)
    assert "module." not in message
    assert "likely renames: norm.weight -> ln_f.weight" in message
    assert "missing ln_f.weight" in message and "unexpected norm.weight" in message


def test_load_error_names_a_wrapper_inside_the_dict_instead_of_renames(
    blocks: tuple[type[nn.Module], type[nn.Module]],
) -> None:
    _OldBlock, Block = blocks
    saved = V2Layout()
    saved.ln1 = nn.DataParallel(saved.ln1)  # type: ignore[assignment]
    with pytest.raises(LoadError) as info:
        Block().load_state_dict(saved.state_dict())
    message = str(info.value)
    assert "likely renames" not in message
    assert "wrapper: ln1.module.weight for ln1.weight, ln1.module.bias for ln1.bias" in message
    assert "save the unwrapped module's state_dict()" in message
    assert "revision --autogenerate" not in message  # no migration would fix this


def test_a_child_named_module_is_not_a_wrapper(tmp_path: Path) -> None:
    folder = make_lineage(
        tmp_path,
        "holder",
        "module.w float32 [2]\nmodule.v float32 [2]\n",
        [("h1000001", None, "pass", "pass")],
    )

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))
            self.v = nn.Parameter(torch.zeros(2))

    @ckptmigrate.versioned(folder)
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = Inner()

    saved = _trained(Holder())
    for sd in (saved.state_dict(), nn.DataParallel(saved).state_dict()):  # module.module.w
        sd = OrderedDict(sd)  # unstamped: identified by schema, which needs the right keys
        fresh = Holder()
        fresh.load_state_dict(sd)
        assert torch.equal(fresh.module.w, saved.module.w)
        assert torch.equal(fresh.module.v, saved.module.v)


# ----------------------------------------------------------------------------- stamps on load


def _newer_format(sd: OrderedDict[str, torch.Tensor], at: str = "") -> None:
    """What a future ckptmigrate with another stamp layout would write."""
    sd._metadata[at].update(  # type: ignore[attr-defined]
        {"ckptmigrate.version": "99.0.0", "ckptmigrate.format": "99.0"}
    )


@pytest.mark.parametrize("saved_by", ["OldBlock", "Block"])
def test_a_stamp_in_a_newer_format_is_refused_on_load(
    blocks: tuple[type[nn.Module], type[nn.Module]], saved_by: str
) -> None:
    """At the class's own revision too: the stamp may mean something else in that format."""
    OldBlock, Block = blocks
    sd = _trained(OldBlock() if saved_by == "OldBlock" else Block()).state_dict()
    _newer_format(sd)
    fresh = Block()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(StampError) as info:
        fresh.load_state_dict(sd)
    message = str(info.value)
    assert message.startswith("the state dict of Block was stamped by ckptmigrate 99.0.0")
    assert "in stamp format 99.0, newer than this ckptmigrate" in message
    assert message.endswith("upgrade ckptmigrate (pip install -U ckptmigrate)")
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_a_newer_stamp_on_a_versioned_part_of_a_plain_model_is_refused(
    blocks: tuple[type[nn.Module], type[nn.Module]], tmp_path: Path
) -> None:
    _OldBlock, Block = blocks

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 2)
            self.block = Block()

    sd = _trained(Net()).state_dict()
    _newer_format(sd, "block")
    torch.save(sd, tmp_path / "net.pth")
    for load in (
        lambda model: model.load_state_dict(torch.load(tmp_path / "net.pth", weights_only=True)),
        lambda model: ckptmigrate.load(model, tmp_path / "net.pth"),
    ):
        with pytest.raises(StampError, match=r"at 'block' was stamped .* stamp format 99\.0"):
            load(Net())


def test_a_partial_load_with_strict_false_is_left_to_torch(tmp_path: Path) -> None:
    """PEFT loads an adapter's keys alone into the whole model with strict=False: a part
    that cannot be placed (no stamp, no base schema) loads as PyTorch loads it."""
    folder = make_lineage(tmp_path, "blk", None, RENAME_FC)

    @ckptmigrate.versioned(folder)
    class Block(V2Layout):
        pass

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Block()

    model = Wrapper()
    part = {"inner.ln_f.weight": torch.full((8,), 3.0)}
    result = model.load_state_dict(part, strict=False)
    assert torch.equal(model.inner.ln_f.weight.detach(), torch.full((8,), 3.0))
    assert "inner.proj.weight" in result.missing_keys
    with pytest.raises(RuntimeError, match=r"Missing key\(s\)"):  # strict, as PyTorch is
        model.load_state_dict(part)
    old = {"inner.fc.weight": torch.zeros(8, 8)}  # not of the layout now: the fix, not torch's
    with pytest.raises(LoadError, match="no base schema"):
        model.load_state_dict(old, strict=False)
