"""The pytest plugin, run by pytest's own ``pytester`` in a temporary project."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from tests.conftest import ADD_FC3, INITIAL, REPO
from tests.harness.common import write_revision

import ckptmigrate.golden
import ckptmigrate.runtime.session
import ckptmigrate.squash
import ckptmigrate.testing
from ckptmigrate import op

pytest_plugins = ["pytester"]

# pytester's in-process runs forget the modules first imported inside them; one imported
# here stays, so a run never meets two copies of a module (of op's context, say)
_ENGINE = (ckptmigrate.golden, ckptmigrate.runtime.session, ckptmigrate.squash, ckptmigrate.testing)
assert callable(op.rename_key)

def _installed() -> bool:
    """Whether pytest finds the plugin by its entry point (the package is installed)."""
    from importlib.metadata import entry_points

    return any(ep.value == "ckptmigrate.pytest_plugin" for ep in entry_points(group="pytest11"))


# installed, pytest loads the plugin itself (as for a user); from a source tree, -p does
PLUGIN: tuple[str, ...] = () if _installed() else ("-p", "ckptmigrate.pytest_plugin")


@pytest.fixture
def project(pytester: pytest.Pytester) -> Path:
    """The walkthrough's project (model, lineage, base schema) as pytester's test folder."""
    root = pytester.path
    shutil.copy(REPO / "alembic_style.ini", root / "alembic_style.ini")
    for folder in ("migrations", "examples"):
        shutil.copytree(
            REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", ".ckpt*")
        )
    return root


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_inprocess(*PLUGIN, "-p", "no:cacheprovider", *args)


def test_the_built_in_tests_pass_on_a_sound_lineage(
    pytester: pytest.Pytester, project: Path
) -> None:
    result = _run(pytester, "--test-ckptmigrate", "-v")
    result.stdout.fnmatch_lines(
        [
            "*collected 6 items*",
            "ckptmigrate::test_single_head PASSED*",
            "ckptmigrate::test_revisions_import PASSED*",
            f"ckptmigrate::test_up_down_consistency[[]{INITIAL}[]] PASSED*",
            f"ckptmigrate::test_up_down_consistency[[]{ADD_FC3}[]] PASSED*",
            "ckptmigrate::test_model_matches_head PASSED*",
            "ckptmigrate::test_golden_checkpoints SKIPPED*",
        ]
    )
    result.assert_outcomes(passed=5, skipped=1)


def test_off_until_asked_for(pytester: pytest.Pytester, project: Path) -> None:
    pytester.makepyfile(test_own="def test_own():\n    assert True\n")
    result = _run(pytester, "-v")
    result.assert_outcomes(passed=1)
    assert "ckptmigrate::" not in result.stdout.str()


def test_a_broken_downgrade_is_caught_on_real_tensors(
    pytester: pytest.Pytester, project: Path
) -> None:
    """fc2.weight becomes 20x20 at ADD_FC3: a transpose without its undo keeps every shape,
    so ``ckptmigrate check`` (shapes only) passes, but the values come back wrong."""
    from click.testing import CliRunner

    from ckptmigrate.cli import cli

    write_revision(
        project / "migrations" / "versions",
        "cccc3333",
        ADD_FC3,
        'op.transpose("fc2.weight", 0, 1)',
        "pass",
    )
    checked = CliRunner().invoke(cli, ["check"])
    assert checked.exit_code == 0, checked.output
    result = _run(pytester, "--test-ckptmigrate")
    result.assert_outcomes(passed=5, failed=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "*ckptmigrate: test_up_down_consistency[[]cccc3333[]]*",
            "cccc3333 (cccc3333.py): downgrade() does not undo upgrade() on a synthetic "
            "checkpoint: fc2.weight comes back with other values (max |diff| *)",
            "FAILED ckptmigrate::test_up_down_consistency[[]cccc3333[]]*",
        ]
    )


def test_a_downgrade_that_loses_a_key_and_one_that_cannot_run(
    pytester: pytest.Pytester, project: Path
) -> None:
    versions = project / "migrations" / "versions"
    write_revision(versions, "cccc3333", ADD_FC3, 'op.add_tensor("extra", shape=(3,))', "pass")
    write_revision(versions, "dddd4444", "cccc3333", "pass", 'op.drop_key("nonexistent")')
    result = _run(pytester, "--test-ckptmigrate", "-k", "consistency")
    result.assert_outcomes(passed=2, failed=2)
    out = result.stdout.str()
    assert "cccc3333 (cccc3333.py): downgrade() does not undo upgrade() on a synthetic " in out
    assert "the downgrade leaves extra" in out
    assert "dddd4444 (dddd4444.py): revision dddd4444" in out
    assert "drop_key('nonexistent'): key 'nonexistent' does not exist" in out


def test_heads_imports_and_the_model(pytester: pytest.Pytester, project: Path) -> None:
    versions = project / "migrations" / "versions"
    write_revision(versions, "cccc3333", INITIAL, "pass", "pass")  # a second head
    write_revision(versions, "dddd4444", ADD_FC3, "pass", "pass", header="import no_such_module\n")
    result = _run(pytester, "--test-ckptmigrate", "-k", "not consistency")
    result.assert_outcomes(failed=3, skipped=1)  # the model's test cannot import dddd4444 either
    out = result.stdout.str()
    assert "the lineage has 2 head(s) (cccc3333, dddd4444), expected 1; join them with" in out
    assert "importing revision file" in out and "dddd4444.py failed: ModuleNotFoundError" in out
    pytester.makeini("[pytest]\nckptmigrate_heads = 2\n")
    (versions / "dddd4444.py").unlink()
    write_revision(versions, "dddd4444", ADD_FC3, 'op.add_tensor("more", shape=(2,))', "pass")
    result = _run(pytester, "--test-ckptmigrate", "-k", "not consistency")
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    result.stdout.fnmatch_lines(["*differs from the schema at*", "*unexpected*more*[[]2[]]*"])


def test_no_model_configured_is_a_skip_with_the_reason(
    pytester: pytest.Pytester, project: Path
) -> None:
    ini = project / "alembic_style.ini"
    ini.write_text(ini.read_text().replace("model = ", "# model = "))
    result = _run(pytester, "--test-ckptmigrate", "-rs", "-k", "model")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*no 'model = ...' in the ckptmigrate configuration*"])


def test_golden_checkpoints_upgrade_to_head_and_load(
    pytester: pytest.Pytester, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from ckptmigrate.cli import cli

    monkeypatch.chdir(project)
    (project / "migrations" / "versions" / f"{ADD_FC3}_add_fc3.py").rename(
        project / "later.py"
    )  # record the golden checkpoint at the first revision, as a project did long ago
    recorded = CliRunner().invoke(cli, ["fixture", "record"])
    assert recorded.exit_code == 0, recorded.output
    assert recorded.stdout.startswith(f"Recorded a golden checkpoint at {INITIAL} (4 tensors, ")
    (project / "later.py").rename(project / "migrations" / "versions" / f"{ADD_FC3}_add_fc3.py")
    result = _run(pytester, "--test-ckptmigrate", "-v", "-k", "golden")
    result.stdout.fnmatch_lines([f"ckptmigrate::test_golden_checkpoints[[]{INITIAL}.pt[]] PASSED*"])
    # a later revision that breaks old checkpoints: the golden one says so
    write_revision(
        project / "migrations" / "versions",
        "cccc3333",
        ADD_FC3,
        'op.drop_key("fc3.bias", intended=True)',
        'op.add_tensor("fc3.bias", shape=(5,))',
    )
    result = _run(pytester, "--test-ckptmigrate", "-k", "golden")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"{INITIAL}.pt upgraded to the head does not load into the model: *",
            '*Missing key(s) in state_dict: "fc3.bias"*',
        ]
    )


def test_fixtures_for_a_projects_own_tests(pytester: pytest.Pytester, project: Path) -> None:
    pytester.makepyfile(
        test_own=f'''
import torch
from examples.simple_model import SimpleModel


def test_an_old_checkpoint_upgrades_and_loads(ckptmigrate_runner, ckptmigrate_config):
    assert ckptmigrate_config.script_location.name == "migrations"
    assert ckptmigrate_runner.heads == ("{ADD_FC3}",)
    old = ckptmigrate_runner.sample("{INITIAL}", seed=3)
    assert list(old) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    new = ckptmigrate_runner.migrate(old, "{INITIAL}")
    SimpleModel().load_state_dict(new, strict=True)
    assert torch.equal(new["fc3.weight"], old["fc2.weight"])
    back = ckptmigrate_runner.migrate(new, "{ADD_FC3}", "base")
    assert all(torch.equal(back[k], old[k]) for k in old)
'''
    )
    result = _run(pytester)
    result.assert_outcomes(passed=1)


def test_include_and_exclude(pytester: pytest.Pytester, project: Path) -> None:
    pytester.makeini(
        "[pytest]\nckptmigrate_include = test_single_head test_up_down_consistency\n"
        f"ckptmigrate_exclude = test_up_down_consistency[{INITIAL}]\n"
    )
    result = _run(pytester, "--test-ckptmigrate", "-v")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "ckptmigrate::test_single_head PASSED*",
            f"ckptmigrate::test_up_down_consistency[[]{ADD_FC3}[]] PASSED*",
        ]
    )


def test_a_squashed_lineage_is_tested_step_by_step_and_whole(
    pytester: pytest.Pytester, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from ckptmigrate.cli import cli

    monkeypatch.chdir(project)
    write_revision(
        project / "migrations" / "versions",
        "cccc3333",
        ADD_FC3,
        'op.reshape("fc1.weight", (200,))',
        'op.reshape("fc1.weight", (20, 10))',
    )
    done = CliRunner().invoke(cli, ["squash", f"{INITIAL}:cccc3333", "--rev-id", "squash01"])
    assert done.exit_code == 0, done.output
    result = _run(pytester, "--test-ckptmigrate", "-v", "-k", "consistency")
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(
        [
            f"*test_up_down_consistency[[]{INITIAL}[]] PASSED*",
            f"*test_up_down_consistency[[]{ADD_FC3}[]] PASSED*",
            "*test_up_down_consistency[[]cccc3333[]] PASSED*",
            "*test_up_down_consistency[[]squash01, squashed[]] PASSED*",
        ]
    )


def test_a_broken_configuration_fails_one_test_clearly(
    pytester: pytest.Pytester, project: Path
) -> None:
    (project / "migrations" / "versions" / f"{ADD_FC3}_add_fc3.py").write_text("revision = (\n")
    result = _run(pytester, "--test-ckptmigrate")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*2b7f0c1d9e4a_add_fc3.py, line 1: syntax error*"])


def test_installed_through_its_entry_point(
    pytester: pytest.Pytester, project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What pip installs: the pytest11 entry point of pyproject.toml loads the plugin."""
    from ckptmigrate.config import _load_toml

    entry = _load_toml(REPO / "pyproject.toml")["project"]["entry-points"]
    ((name, target),) = entry["pytest11"].items()
    site = project / "site"
    info = site / "ckptmigrate_plugin_probe-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: probe\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[pytest11]\n{name} = {target}\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *sys.path]))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    result = pytester.runpytest_subprocess("--test-ckptmigrate", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, skipped=1)
    off = pytester.runpytest_subprocess(
        "--test-ckptmigrate", "-p", f"no:{name}", "-p", "no:cacheprovider"
    )
    assert off.ret == pytest.ExitCode.USAGE_ERROR  # the option is the plugin's
    assert "--test-ckptmigrate" in off.stderr.str()
