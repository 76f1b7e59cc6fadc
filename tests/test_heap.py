"""The command line's collector setting: imports frozen, the migration's garbage collected."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckptmigrate.runtime.heap import end_process, imports_frozen


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


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_process_ends_with_the_code_after_exit_handlers_ran_and_output_was_flushed() -> None:
    done = _run_python(
        "import atexit, sys\n"
        "from ckptmigrate.runtime.heap import end_process\n"
        "atexit.register(lambda: print('handler ran', file=sys.stderr))\n"
        "sys.stdout.write('unflushed output')\n"
        "end_process(3)\n"
        "print('never printed')\n"
    )
    assert done.returncode == 3
    assert done.stdout == "unflushed output"
    assert done.stderr == "handler ran\n"


def test_a_message_as_the_code_is_printed_and_the_status_is_1() -> None:
    done = _run_python(
        "from ckptmigrate.runtime.heap import end_process\nend_process('Aborted!')\n"
    )
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "Aborted!\n")


def test_with_another_thread_running_the_usual_shutdown_is_kept() -> None:
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        with pytest.raises(SystemExit) as exited:
            end_process(4)  # the usual path: SystemExit, which waits for the thread
        assert exited.value.code == 4
    finally:
        release.set()
        worker.join()


def test_the_command_line_ends_with_its_exit_status(tmp_path: Path) -> None:
    def ckptmigrate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ckptmigrate", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
        )

    made = ckptmigrate("init", "migrations")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "alembic_style.ini").is_file()
    missing = tmp_path / "missing.pt"
    failed = ckptmigrate("current", str(missing))
    assert failed.returncode == 1
    assert failed.stderr.startswith("Error: ") and str(missing) in failed.stderr
