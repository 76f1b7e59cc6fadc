"""pytest plugin: ready-made tests of a project's checkpoint lineage, as pytest-alembic has.

Installed with ckptmigrate (a ``pytest11`` entry point) and off until asked:
``pytest --test-ckptmigrate`` (or ``addopts = --test-ckptmigrate`` in the
pytest configuration) adds

* ``test_single_head``: one head (``ckptmigrate_heads = 2`` or ``= ID ID``
  says otherwise);
* ``test_revisions_import``: every revision file imports and has its functions;
* ``test_up_down_consistency[REV]``: on a synthetic checkpoint built from the
  schema before each revision (real tensors), ``downgrade()`` gives back bit
  for bit what ``upgrade()`` started from (see
  :func:`ckptmigrate.testing.up_down_consistency`);
* ``test_model_matches_head``: the configured ``model =`` has the head schema;
* ``test_golden_checkpoints[FILE]``: every checkpoint in the migrations
  folder's ``fixtures/`` (``ckptmigrate fixture record``) upgrades to the head
  and loads strictly.

The fixtures ``ckptmigrate_config`` and ``ckptmigrate_runner`` are there for a
project's own tests either way. pytest ini options: ``ckptmigrate_config``
(the ini or pyproject file, relative to the rootdir; default: found as the
command line finds it), ``ckptmigrate_name`` (the lineage's section),
``ckptmigrate_heads``, ``ckptmigrate_include``/``ckptmigrate_exclude`` (test
names, ``name[param]`` for one case) and ``ckptmigrate_seed``. Loading the
plugin imports neither torch nor the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from .config import Config
    from .testing import MigrationRunner

OPTION = "--test-ckptmigrate"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ckptmigrate", "checkpoint migrations (ckptmigrate)")
    group.addoption(
        OPTION,
        action="store_true",
        dest="test_ckptmigrate",
        help="run ckptmigrate's built-in tests of the lineage (single head, imports, "
        "downgrade undoes upgrade, model matches head, golden checkpoints)",
    )
    parser.addini("ckptmigrate_config", "ckptmigrate's configuration file (default: discovered)")
    parser.addini("ckptmigrate_name", "the lineage's section (default: ckptmigrate)")
    parser.addini("ckptmigrate_heads", "the heads the lineage must have: a number or ids")
    parser.addini("ckptmigrate_include", "only these built-in tests", type="args")
    parser.addini("ckptmigrate_exclude", "built-in tests to leave out", type="args")
    parser.addini("ckptmigrate_seed", "the seed of synthetic checkpoints (default: 0)")


def configuration(pytestconfig: pytest.Config) -> Config:
    """The ckptmigrate configuration the ini options name, found from the rootdir."""
    from .config import DEFAULT_SECTION, Config

    root = Path(str(pytestconfig.rootpath))
    section = str(pytestconfig.getini("ckptmigrate_name") or DEFAULT_SECTION)
    given = str(pytestconfig.getini("ckptmigrate_config") or "")
    config = Config.discover(given or None, section, cwd=root, quiet=True)
    config.prepend_sys_path()
    return config


@pytest.fixture
def ckptmigrate_config(pytestconfig: pytest.Config) -> Config:
    """The project's ckptmigrate configuration (see the ``ckptmigrate_config`` ini option)."""
    return configuration(pytestconfig)


@pytest.fixture
def ckptmigrate_runner(ckptmigrate_config: Config) -> MigrationRunner:
    """The lineage: schemas, synthetic checkpoints at any revision, in-memory migrations."""
    from .testing import MigrationRunner

    return MigrationRunner(ckptmigrate_config)


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect, so they apply to these tests too
def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    if not config.getoption("test_ckptmigrate"):
        return
    collector = LineageTests.from_parent(session, name="ckptmigrate", nodeid="ckptmigrate")
    ours = list(collector.collect())
    # reported like any collected tests, so "collected N items" counts them
    session.ihook.pytest_collectreport(
        report=pytest.CollectReport(collector.nodeid, "passed", None, list[Any](ours))
    )
    items[:0] = ours


class LineageTest(pytest.Item):
    """One built-in test: a check that raises AssertionError (or calls pytest.skip)."""

    def __init__(self, *, check: Callable[[], object], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check

    def runtest(self) -> None:
        self.check()

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> Any:
        from .errors import CkptMigrateError

        if isinstance(excinfo.value, (AssertionError, CkptMigrateError)):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Any, int | None, str]:
        return self.path, None, f"ckptmigrate: {self.name}"


class LineageTests(pytest.Collector):
    """The built-in tests of the configured lineage."""

    def collect(self) -> Iterator[pytest.Item]:
        config = self.config
        include = [str(n) for n in config.getini("ckptmigrate_include")]
        exclude = {str(n) for n in config.getini("ckptmigrate_exclude")}
        for name, check in self._checks():
            base = name.split("[")[0]
            if include and base not in include and name not in include:
                continue
            if base in exclude or name in exclude:
                continue
            yield LineageTest.from_parent(self, name=name, check=check)

    def _checks(self) -> Iterator[tuple[str, Callable[[], object]]]:
        from . import testing
        from .errors import CkptMigrateError
        from .golden import golden_paths
        from .script.directory import ScriptDirectory

        try:
            lineage = configuration(self.config)
            script_dir = ScriptDirectory.from_config(lineage)
            script_dir.compact_map  # noqa: B018  (read every revision file now)
        except CkptMigrateError as exc:
            message = exc.one_line()

            def broken() -> None:
                raise AssertionError(message)

            yield "test_revisions_import", broken
            return
        expected = _expected_heads(str(self.config.getini("ckptmigrate_heads") or "1"))
        seed = int(str(self.config.getini("ckptmigrate_seed") or "0"))
        yield "test_single_head", lambda: testing.single_head(script_dir, expected)
        yield "test_revisions_import", lambda: testing.revisions_import(script_dir)
        for step in testing.steps(script_dir):
            combined = step.script.replaces and step.name == step.script.revision
            label = f"{step.name}, squashed" if combined else step.name
            yield (
                f"test_up_down_consistency[{label}]",
                _bind(testing.up_down_consistency, script_dir, step, seed=seed),
            )

        def model() -> None:
            if not lineage.get("model"):
                pytest.skip("no 'model = ...' in the ckptmigrate configuration")
            testing.model_matches_head(lineage, script_dir)

        yield "test_model_matches_head", model
        golden = golden_paths(script_dir)
        if not golden:

            def none() -> None:
                pytest.skip("no golden checkpoints: record one with 'ckptmigrate fixture record'")

            yield "test_golden_checkpoints", none
        for path in golden:
            yield (
                f"test_golden_checkpoints[{path.name}]",
                _bind(testing.golden_checkpoint_upgrades, lineage, path),
            )


def _bind(fn: Callable[..., object], *args: Any, **kwargs: Any) -> Callable[[], object]:
    return lambda: fn(*args, **kwargs)


def _expected_heads(text: str) -> int | list[str]:
    parts = text.replace(",", " ").split()
    if len(parts) == 1 and parts[0].isdigit():
        return int(parts[0])
    return parts
