"""Broken revision scripts: a clear error naming the file (and line), nothing written."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tests.conftest import invoke
from tests.harness.common import (
    DOWNGRADE_B,
    REV_A,
    REV_B,
    UPGRADE_B,
    leftovers,
    revision_source,
    stamp_state_dict,
    write_project,
)

REV_C = "cccc00000003"


def _script(rev: str, down: object, up: str = "    pass", extra: str = "") -> str:
    return revision_source(rev, down, up, doc=f"step {rev}", header=extra)


def _b_with(up: str) -> Callable[[Path], None]:
    def edit(versions: Path) -> None:
        (versions / f"{REV_B}.py").write_text(_script(REV_B, REV_A, up))

    return edit


def _c(text: str) -> Callable[[Path], None]:
    def edit(versions: Path) -> None:
        (versions / f"{REV_C}.py").write_text(text)

    return edit


def _write(name: str, text: str) -> Callable[[Path], None]:
    def edit(versions: Path) -> None:
        (versions / name).write_text(text)

    return edit


def _copy(name: str, to: str) -> Callable[[Path], None]:
    def edit(versions: Path) -> None:
        (versions / to).write_text((versions / name).read_text())

    return edit


def _both(*edits: Callable[[Path], None]) -> Callable[[Path], None]:
    def edit(versions: Path) -> None:
        for e in edits:
            e(versions)

    return edit


#: name -> (edit of the versions folder, what the Error line must say)
CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "exception in upgrade()": (
        _b_with("    op.rename_key('w0', 'renamed0')\n    raise ValueError('boom')"),
        [f"{REV_B}.py, line 13", "upgrade() raised ValueError: boom", "nothing was written"],
    ),
    "exception in a later step": (
        _c(_script(REV_C, REV_B, "    raise KeyError('later')")),
        [f"{REV_C}.py, line 12", "upgrade() raised KeyError", "nothing was written"],
    ),
    "exception while computing a tensor": (
        _b_with(
            "    def fn(t):\n"
            "        if t.device.type != 'meta':\n"
            "            raise RuntimeError('bad data')\n"
            "        return t\n"
            "    op.map_tensor('w1', fn)"
        ),
        ["w1: computing it failed", "bad data", "nothing was written"],
    ),
    "syntax error": (
        _c(_script(REV_C, REV_B).replace("def upgrade() -> None:", "def upgrade(:")),
        [f"{REV_C}.py, line 11: syntax error"],
    ),
    "missing revision variable": (
        _c(_script(REV_C, REV_B).replace(f"revision = {REV_C!r}\n", "")),
        [f"{REV_C}.py does not define 'revision'"],
    ),
    "module fails to import": (
        _c(_script(REV_C, REV_B, extra="import no_such_module_for_ckptmigrate_tests\n")),
        ["importing revision file", f"{REV_C}.py failed: ModuleNotFoundError"],
    ),
    "no upgrade() function": (
        _c(_script(REV_C, REV_B).replace("def upgrade() -> None:\n    pass\n", "")),
        [f"{REV_C}", f"{REV_C}.py", "has no upgrade() function"],
    ),
    "cycle": (
        _both(
            _write(f"{REV_B}.py", _script(REV_B, REV_C, UPGRADE_B)),
            _c(_script(REV_C, REV_B)),
        ),
        ["cycle detected", f"{REV_B}.py", f"{REV_C}.py"],
    ),
    "down_revision that does not exist": (
        _c(_script(REV_C, "dddd99999999")),
        ["dddd99999999", "is not present", f"{REV_C}.py"],
    ),
    "two files with one id": (
        _copy(f"{REV_B}.py", "copy_of_b.py"),
        [f"{REV_B} is used by two files", "copy_of_b.py", f"{REV_B}.py"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_script_is_named_and_nothing_is_written(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ini = write_project(
        tmp_path, [(REV_A, None, "    pass", "    pass"), (REV_B, REV_A, UPGRADE_B, DOWNGRADE_B)]
    )
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "model.pth"
    gen = torch.Generator().manual_seed(2)
    sd = OrderedDict((f"w{i}", torch.randn(64, 64, generator=gen)) for i in range(4))
    torch.save(stamp_state_dict(sd, REV_A), ckpt)
    before = ckpt.read_bytes()
    edit, needles = CASES[case]
    edit(tmp_path / "migrations" / "versions")
    for args in (["upgrade", "model.pth"], ["upgrade", "model.pth", "-o", "out.pth"]):
        code, err = invoke("-c", str(ini), *args)
        lines = err.strip().splitlines()
        assert code == 1, err
        assert lines[-1].startswith("Error: ") and "Traceback" not in err
        assert sum(line.startswith("Error:") for line in lines) == 1, err
        for needle in needles:
            assert needle in lines[-1], (needle, lines[-1])
        assert ckpt.read_bytes() == before
        assert not (tmp_path / "out.pth").exists()
        assert leftovers(tmp_path) == []
