"""Alembic's remaining commands and hooks: edit, list_templates, init --template,
post_write_hooks, history --indicate-current, merge --splice."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from tests.conftest import ADD_FC3, INITIAL, Run, load_dict, v1_state_dict, write_revision
from tests.harness.common import same, stamp_state_dict


@pytest.fixture
def empty(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> Path:
    monkeypatch.chdir(tmp_path)
    run("init", "migrations")
    return tmp_path


def _program(path: Path, body: str) -> Path:
    """An executable Python script (what $EDITOR or a hook runs)."""
    path.write_text(f"#!{sys.executable}\nimport sys\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# --------------------------------------------------------------------------- merge --splice


def test_merge_splice_joins_revisions_that_are_not_heads(empty: Path, run: Run) -> None:
    """Alembic's test_merge_cmd_splice: a -> b -> c, a -> d -> e; merge b and d."""
    for rev, head, splice in (
        ("aaaa1111", "head", False),
        ("bbbb2222", "aaaa1111", False),
        ("cccc3333", "bbbb2222", False),
        ("dddd4444", "aaaa1111", True),
        ("eeee5555", "dddd4444", False),
    ):
        run("revision", "-m", rev, "--rev-id", rev, "--head", head, *(["--splice"] * splice))
    err = run("merge", "bbbb2222", "dddd4444", "-m", "m", code=1).stderr
    assert "bbbb2222 is not a head revision; pass --splice" in err
    out = run("merge", "bbbb2222", "dddd4444", "-m", "m", "--rev-id", "ffff6666", "--splice")
    assert out.stdout == "Generating migrations/versions/ffff6666_m.py ... done\n"
    assert run("show", "ffff6666").stdout.splitlines()[:2] == [
        "Rev: ffff6666 (head) (mergepoint)",
        "Merges: bbbb2222, dddd4444",
    ]
    assert run("heads").stdout.splitlines() == [
        "cccc3333 (head)",
        "eeee5555 (head)",
        "ffff6666 (head)",
    ]


# --------------------------------------------------------------------------- edit


def test_edit_opens_the_revision_in_the_editor(
    empty: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("revision", "-m", "first", "--rev-id", "aaaa1111")
    run("revision", "-m", "second", "--rev-id", "bbbb2222")
    editor = _program(
        empty / "editor",
        "open(sys.argv[-1], 'a').write('# edited\\n')\nopen('opened.txt', 'w').write(sys.argv[-1])",
    )
    monkeypatch.setenv("EDITOR", f"{editor} --wait")
    monkeypatch.delenv("VISUAL", raising=False)
    run("edit", "aaaa")
    opened = Path((empty / "opened.txt").read_text())
    assert opened.name == "aaaa1111_first.py"
    assert opened.read_text().endswith("# edited\n")
    run("edit")  # the head
    assert Path((empty / "opened.txt").read_text()).name == "bbbb2222_second.py"


def test_edit_without_an_editor_or_with_a_failing_one(
    empty: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    run("revision", "-m", "first", "--rev-id", "aaaa1111")
    monkeypatch.delenv("EDITOR", raising=False)
    monkeypatch.delenv("VISUAL", raising=False)
    err = run("edit", "head", code=1).stderr
    assert err.startswith("Error: no editor to open migrations/versions/aaaa1111_first.py")
    assert "set $EDITOR" in err
    monkeypatch.setenv("EDITOR", str(_program(empty / "bad", "sys.exit(3)")))
    assert "exited with status 3" in run("edit", "head", code=1).stderr
    monkeypatch.setenv("VISUAL", "/no/such/editor")
    monkeypatch.delenv("EDITOR")
    assert "cannot run the editor" in run("edit", "head", code=1).stderr
    assert "names no revisions" in run("edit", "base", code=1).stderr


# --------------------------------------------------------------------------- templates


def test_list_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> None:
    monkeypatch.chdir(tmp_path)
    lines = run("list_templates").stdout.splitlines()
    assert lines[0] == "Available templates:"
    names = [ln.split(" - ")[0] for ln in lines if " - " in ln]
    assert names == ["pytorch", "huggingface", "lightning"]
    assert "  ckptmigrate init --template lightning ./migrations" in lines
    err = run("init", "--template", "keras", "m", code=1).stderr
    assert "no template named 'keras'; choose one of pytorch, huggingface, lightning" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "alembic_style.ini").exists()


@pytest.mark.parametrize("template", ["pytorch", "huggingface", "lightning"])
def test_every_template_makes_a_working_project(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run, template: str
) -> None:
    monkeypatch.chdir(tmp_path)
    run("init", "--template", template, "migrations")
    from ckptmigrate.config import Config

    config = Config(tmp_path / "alembic_style.ini")
    assert config.script_location == tmp_path / "migrations"
    assert config.get("key_prefix") == ("model." if template == "lightning" else None)
    assert config.post_write_hooks() == []  # the example is commented out
    readme = (tmp_path / "migrations" / "README").read_text()
    assert (
        readme.splitlines()[0]
        == run("list_templates").stdout.split(f"{template} - ")[1].split("\n")[0]
    )
    run("revision", "-m", "initial", "--rev-id", "aaaa1111")
    assert run("heads").stdout == "aaaa1111 (head)\n"


def test_lightning_template_upgrades_a_lightning_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    from examples.simple_model import SimpleModelV1
    from tests.test_lightning import Classifier, RenamedV1, trained_checkpoint

    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    run("init", "--template", "lightning", "migrations")
    ini = tmp_path / "alembic_style.ini"  # the model inside the LightningModule, as it says
    ini.write_text(
        ini.read_text().replace(
            "# model = mypackage.models:build_model", "model = tests.test_lightning:RenamedV1"
        )
    )
    versions = tmp_path / "migrations" / "versions"
    write_revision(versions, "aaaa1111", None)
    write_revision(
        versions,
        "bbbb2222",
        "aaaa1111",
        'op.rename_prefix("fc1.", "enc.")',
        'op.rename_prefix("enc.", "fc1.")',
    )
    trained_checkpoint("v1.ckpt", SimpleModelV1())
    run("stamp", "v1.ckpt", "aaaa1111")  # no --key-prefix: the template set it
    run("upgrade", "v1.ckpt", "-o", "up.ckpt")
    assert run("current", "up.ckpt").stdout == "bbbb2222 (head)\n"
    module = Classifier(RenamedV1())
    module.load_state_dict(load_dict("up.ckpt")["state_dict"], strict=True)
    before = load_dict("v1.ckpt")["state_dict"]
    assert same(module.model.enc.weight.detach(), before["model.fc1.weight"])


def test_huggingface_template_upgrades_a_model_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    import transformers

    monkeypatch.chdir(tmp_path)
    run("init", "--template", "huggingface", "migrations")
    versions = tmp_path / "migrations" / "versions"
    write_revision(versions, "aaaa1111", None)
    write_revision(  # the older code named the blocks transformer.blocks
        versions,
        "bbbb2222",
        "aaaa1111",
        'op.rename_prefix("transformer.blocks.", "transformer.h.")',
        'op.rename_prefix("transformer.h.", "transformer.blocks.")',
    )
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "gpt", max_shard_size="40KB", safe_serialization=True)
    run("stamp", "gpt", "bbbb2222")
    run("downgrade", "gpt", "aaaa1111")  # as the older code saved it...
    assert run("current", "gpt").stdout == "aaaa1111\n"
    run("upgrade", "gpt")  # ... and back, for from_pretrained
    loaded, info = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "gpt", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)
    index = json.loads((tmp_path / "gpt" / "model.safetensors.index.json").read_text())
    assert any("ckptmigrate" in k for k in index.get("metadata", {}))


# --------------------------------------------------------------------------- post_write_hooks


def _hooks(root: Path, section: str) -> None:
    ini = root / "alembic_style.ini"
    ini.write_text(ini.read_text() + "\n[post_write_hooks]\n" + section)


def test_an_exec_hook_runs_on_every_new_revision(empty: Path, run: Run) -> None:
    stamp_hook = _program(
        empty / "stamp_hook",
        "path = sys.argv[2]\nopen(path, 'a').write('# seen by ' + sys.argv[1] + '\\n')",
    )
    _hooks(
        empty,
        f"hooks = mark\nmark.type = exec\nmark.executable = {stamp_hook}\n"
        "mark.options = --as-hook REVISION_SCRIPT_FILENAME\n",
    )
    out = run("revision", "-m", "first", "--rev-id", "aaaa1111")
    assert "Running post_write_hook 'mark' on aaaa1111_first.py" in out.stderr
    path = empty / "migrations" / "versions" / "aaaa1111_first.py"
    assert path.read_text().endswith("# seen by --as-hook\n")
    run("revision", "-m", "second", "--rev-id", "bbbb2222", "--head", "base")
    run("merge", "heads", "-m", "join", "--rev-id", "cccc3333")
    assert (
        (empty / "migrations" / "versions" / "cccc3333_join.py")
        .read_text()
        .endswith("# seen by --as-hook\n")
    )


def test_ruff_format_as_a_module_hook(empty: Path, run: Run) -> None:
    """The template writes single quotes; `ruff format` makes them double."""
    template = empty / "migrations" / "script.py.tmpl"
    template.write_text(
        template.read_text().replace('revision = "${up_revision}"', "revision = '${up_revision}'")
    )
    _hooks(
        empty,
        "hooks = ruff\nruff.type = module\nruff.module = ruff\n"
        "ruff.options = format --quiet REVISION_SCRIPT_FILENAME\n",
    )
    run("revision", "-m", "first", "--rev-id", "aaaa1111")
    text = (empty / "migrations" / "versions" / "aaaa1111_first.py").read_text()
    assert 'revision = "aaaa1111"' in text
    assert run("heads").stdout == "aaaa1111 (head)\n"


def test_a_console_scripts_hook(empty: Path, run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed console script (a distribution with the entry point, on sys.path)."""
    site = empty / "site"
    (site / "tidy_tool").mkdir(parents=True)
    (site / "tidy_tool" / "__init__.py").write_text(
        "import sys\n\ndef main():\n    open(sys.argv[1], 'a').write('# tidied\\n')\n    return 0\n"
    )
    info = site / "tidy_tool-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tidy-tool\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[console_scripts]\ntidy = tidy_tool:main\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *sys.path]))
    _hooks(empty, "hooks = tidy\ntidy.type = console_scripts\ntidy.entrypoint = tidy\n")
    run("revision", "-m", "first", "--rev-id", "aaaa1111")
    text = (empty / "migrations" / "versions" / "aaaa1111_first.py").read_text()
    assert text.endswith("# tidied\n")


def test_a_failing_hook_is_an_error_and_the_file_stays(empty: Path, run: Run) -> None:
    failing = _program(empty / "failing", "print('E999 nonsense', file=sys.stderr)\nsys.exit(2)")
    _hooks(empty, f"hooks = lint\nlint.type = exec\nlint.executable = {failing}\n")
    err = run("revision", "-m", "first", "--rev-id", "aaaa1111", code=1).stderr.splitlines()
    assert err[-1].startswith(
        "Error: post_write_hook 'lint' exited with status 2 on aaaa1111_first.py: E999 nonsense"
    )
    err = err[-1]
    assert "(the file migrations/versions/aaaa1111_first.py was written)" in err
    assert run("heads").stdout == "aaaa1111 (head)\n"
    ini = empty / "alembic_style.ini"
    ini.write_text(ini.read_text().split("[post_write_hooks]")[0])
    _hooks(empty, "hooks = odd\nodd.type = telepathy\n")
    err = run("revision", "-m", "second", code=1).stderr
    assert err == (
        "Error: post_write_hooks: odd.type is 'telepathy'; say how to run the hook: "
        "console_scripts, exec, module\n"
    )
    assert sorted(p.name for p in (empty / "migrations" / "versions").iterdir()) == [
        "aaaa1111_first.py"
    ]


def test_a_hook_without_a_type_is_named(empty: Path, run: Run) -> None:
    _hooks(empty, "hooks = odd\nodd.executable = /bin/true\n")
    err = run("revision", "-m", "x", code=1).stderr
    assert err.startswith("Error: post_write_hooks: odd.type is missing")


def test_hooks_in_pyproject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> None:
    monkeypatch.chdir(tmp_path)
    marker = _program(tmp_path / "marker", "open(sys.argv[1], 'a').write('# toml hook\\n')")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.ckptmigrate]\nscript_location = "migrations"\n\n'
        f'[[tool.ckptmigrate.post_write_hooks]]\nname = "mark"\ntype = "exec"\n'
        f'executable = "{marker}"\n'
    )
    (tmp_path / "migrations" / "versions").mkdir(parents=True)
    run("revision", "-m", "first", "--rev-id", "aaaa1111")
    assert (
        (tmp_path / "migrations" / "versions" / "aaaa1111_first.py")
        .read_text()
        .endswith("# toml hook\n")
    )


# --------------------------------------------------------------------------- history -i


def test_history_indicates_where_a_checkpoint_is(project: Path, run: Run) -> None:
    torch.save(stamp_state_dict(v1_state_dict(), INITIAL), project / "old.pth")
    assert run("history", "--indicate-current", "old.pth").stdout.splitlines() == [
        f"{INITIAL} -> {ADD_FC3} (head), add fc3",
        f"<base> -> {INITIAL} (current), initial",
    ]
    torch.save(v1_state_dict(), project / "unstamped.pth")  # identified by its schema
    out = run("history", "-i", "unstamped.pth", "--graph").stdout.splitlines()
    assert out == [f"* {ADD_FC3} (head), add fc3", f"* {INITIAL} (current), initial"]
    verbose = run("history", "-i", "old.pth", "-v").stdout
    assert f"Rev: {INITIAL} (current)" in verbose
    err = run("history", "-i", "nope.pth", code=1).stderr
    assert err.startswith("Error: nope.pth") and len(err.strip().splitlines()) == 1


def test_history_indicates_a_checkpoint_inside_a_squash(project: Path, run: Run) -> None:
    versions = project / "migrations" / "versions"
    write_revision(versions, "cccc3333", ADD_FC3, "pass", "pass", doc="third")
    torch.save(stamp_state_dict(v1_state_dict(), INITIAL), project / "old.pth")
    run("squash", f"{INITIAL}:cccc3333", "-m", "all", "--rev-id", "squash01")
    assert run("history", "-i", "old.pth").stdout == (
        f"<base> -> squash01 (head) (current: at {INITIAL}, which it replaced), all\n"
    )
    assert load_dict(project / "old.pth")["fc2.weight"].shape == (5, 20)
