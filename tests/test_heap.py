"""The command line's collector setting: imports frozen, the migration's garbage collected."""

from __future__ import annotations

import gc
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptmigrate.runtime.heap import imports_frozen


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Whatever a test freezes goes back to the collector afterwards."""
    yield
    gc.unfreeze()


class _Node:
    other: object = None


def test_what_survives_a_collection_after_an_import_is_frozen_and_later_garbage_is_collected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unfrozen: None
) -> None:
    (tmp_path / "heap_probe_module.py").write_text("VALUE = [1, 2, 3]\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    callbacks = list(gc.callbacks)
    with imports_frozen():
        before = gc.get_freeze_count()
        import heap_probe_module  # noqa: F401

        gc.collect()
        assert gc.get_freeze_count() > before  # the module's objects are skipped from now on
        frozen = gc.get_freeze_count()
        # garbage the work makes once no module is imported any more: a cycle
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
        assert gc.get_freeze_count() == frozen  # nothing imported since: nothing frozen
    assert gc.callbacks == callbacks
    sys.modules.pop("heap_probe_module", None)


def test_the_setting_is_undone_when_the_command_fails() -> None:
    callbacks = list(gc.callbacks)
    with pytest.raises(SystemExit), imports_frozen():
        raise SystemExit(1)
    assert gc.callbacks == callbacks
