"""The cache of parsed revision headers: used when it can be, never stale, never in the way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.conftest import Run
from tests.harness.common import revision_source, write_revision

from ckptmigrate.script import cache as cache_module
from ckptmigrate.script import directory
from ckptmigrate.script.cache import CACHE_DIR, RACY_NS, FileKey, Header, HeaderCache

HOUR_NS = 3600 * 10**9


def _age(path: Path, by_ns: int = HOUR_NS) -> None:
    """Make a file look written an hour ago (older than any racy window)."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns - by_ns, st.st_mtime_ns - by_ns))


@pytest.fixture
def lineage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """aaaa -> bbbb -> cccc. Files changed in the last two seconds are not trusted
    (see test_a_file_changed_just_now_is_not_trusted); here no file is that new."""
    monkeypatch.setattr(cache_module, "RACY_NS", 0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\n"
    )
    versions = tmp_path / "migrations" / "versions"
    for rev, down in (("aaaa0001", None), ("bbbb0002", "aaaa0001"), ("cccc0003", "bbbb0002")):
        _age(write_revision(versions, rev, down, doc=f"step {rev}"))
    return versions


def _parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files whose headers are parsed from here on."""
    parsed: list[str] = []
    real = directory.read_header

    def counting(path: Path) -> tuple[Header, object]:
        parsed.append(path.name)
        return real(path)

    monkeypatch.setattr(directory, "read_header", counting)
    return parsed


def test_second_command_parses_nothing(
    lineage: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = _parses(monkeypatch)
    first = run("history").stdout
    assert sorted(parsed) == ["aaaa0001.py", "bbbb0002.py", "cccc0003.py"]
    parsed.clear()
    assert run("history").stdout == first
    assert run("heads").stdout == "cccc0003 (head)\n"
    assert parsed == []


def test_an_edit_that_keeps_size_and_mtime_is_seen(
    lineage: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tools that keep a file's modification time (cp -p, rsync -a, tar) still change its ctime."""
    run("history")
    path = lineage / "bbbb0002.py"
    before = path.stat()
    text = path.read_text().replace("step bbbb0002", "STEP BBBB0002")
    assert len(text) == len(path.read_text())
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    parsed = _parses(monkeypatch)
    assert "aaaa0001 -> bbbb0002, STEP BBBB0002" in run("history").stdout
    assert parsed == ["bbbb0002.py"]


def test_added_removed_and_renamed_files(lineage: Path, run: Run) -> None:
    run("history")
    _age(write_revision(lineage, "dddd0004", "cccc0003", doc="step four"))
    assert run("heads").stdout == "dddd0004 (head)\n"
    (lineage / "dddd0004.py").rename(lineage / "dddd0004_renamed.py")
    assert run("heads").stdout == "dddd0004 (head)\n"
    (lineage / "dddd0004_renamed.py").unlink()
    assert run("heads").stdout == "cccc0003 (head)\n"


def test_a_file_changed_just_now_is_not_trusted(tmp_path: Path) -> None:
    """Within the file system's timestamp resolution a second change could look like none,
    so an entry is trusted only when its file's times are RACY_NS older than the cache."""
    written = time.time_ns() - HOUR_NS  # when the cache file below says it was written
    old: FileKey = (100, written - RACY_NS - 1, written - RACY_NS - 1, 7)
    new: FileKey = (100, written - RACY_NS // 2, written - RACY_NS // 2, 8)
    header = Header({"revision": "x", "down_revision": None}, "doc")
    entries = {"old.py": (old, header), "new.py": (new, header)}
    HeaderCache(tmp_path).save(entries)
    cache_file = tmp_path / CACHE_DIR / "headers.json"
    os.utime(cache_file, ns=(written, written))
    reread = HeaderCache(tmp_path)
    reread.load()
    assert reread.get("old.py", old) == header
    assert reread.get("new.py", new) is None  # too new to be sure of
    assert reread.get("old.py", (101, *old[1:])) is None  # another version of the file
    # the next command writes the cache again, after which the entry is old enough
    reread.save(entries)
    assert cache_file.stat().st_mtime_ns > written
    again = HeaderCache(tmp_path)
    again.load()
    assert again.get("new.py", new) == header


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00\xff garbage",
        b'{"format": 1, "entries": {"aaaa0001.py": [1, 2]',  # truncated
        b'{"format": 99, "entries": {}}',
        b'{"format": 1, "entries": []}',
        b'{"format": 1, "entries": {"aaaa0001.py": ["a", "b", "c", "d", {}, 7]}}',
        b"[1, 2, 3]",
    ],
)
def test_a_damaged_cache_is_rebuilt(lineage: Path, run: Run, content: bytes) -> None:
    run("heads")
    cache_file = lineage.parent / CACHE_DIR / "headers.json"
    cache_file.write_bytes(content)
    _age(cache_file, by_ns=-HOUR_NS)  # as if written after everything else
    assert run("history").stdout.splitlines() == [
        "bbbb0002 -> cccc0003 (head), step cccc0003",
        "aaaa0001 -> bbbb0002, step bbbb0002",
        "<base> -> aaaa0001, step aaaa0001",
    ]
    data = json.loads(cache_file.read_text())
    assert sorted(data["entries"]) == ["aaaa0001.py", "bbbb0002.py", "cccc0003.py"]


def test_a_lying_cache_entry_for_another_file_version_is_ignored(lineage: Path, run: Run) -> None:
    run("heads")
    cache_file = lineage.parent / CACHE_DIR / "headers.json"
    data = json.loads(cache_file.read_text())
    entry = data["entries"]["cccc0003.py"]
    entry[0] += 1  # another size: not this file
    entry[4]["revision"] = "ffff9999"
    cache_file.write_text(json.dumps(data))
    _age(cache_file, by_ns=-HOUR_NS)
    assert run("heads").stdout == "cccc0003 (head)\n"


def test_cannot_write_the_cache_is_no_error(lineage: Path, run: Run) -> None:
    (lineage.parent / CACHE_DIR).write_text("a file where the cache folder would go")
    assert run("heads").stdout == "cccc0003 (head)\n"
    assert run("history").stdout.count("\n") == 3


def test_the_cache_folder_is_ignored_by_git(lineage: Path, run: Run) -> None:
    run("heads")
    folder = lineage.parent / CACHE_DIR
    assert (folder / ".gitignore").read_text().splitlines()[-1] == "*"
    subprocess.run(["git", "init", "-q", str(lineage.parent.parent)], check=True)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=lineage.parent.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert CACHE_DIR not in status and "migrations/versions/aaaa0001.py" in status


def test_headers_that_are_not_literals_are_read_by_importing_every_time(
    lineage: Path, run: Run
) -> None:
    path = lineage / "dddd0004.py"
    text = revision_source("dddd0004", "cccc0003", doc="computed id")
    path.write_text(text.replace("revision = 'dddd0004'", "revision = 'dddd' + '0004'"))
    _age(path)
    assert run("heads").stdout == "dddd0004 (head)\n"
    data = json.loads((lineage.parent / CACHE_DIR / "headers.json").read_text())
    assert "dddd0004.py" not in data["entries"]
    assert run("heads").stdout == "dddd0004 (head)\n"


def test_concurrent_processes_agree_and_leave_a_valid_cache(lineage: Path) -> None:
    for i in range(40):
        _age(write_revision(lineage, f"x{i:07d}", "cccc0003" if i == 0 else f"x{i - 1:07d}"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(3):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "ckptmigrate", "history"],
                cwd=lineage.parent.parent,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for _ in range(4)
        ]
        outs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), outs
        assert len({out for out, _ in outs}) == 1 and outs[0][0].count("\n") == 43
        (lineage / "x0000039.py").touch()  # the next round rebuilds an entry, all at once
    data = json.loads((lineage.parent / CACHE_DIR / "headers.json").read_text())
    assert len(data["entries"]) == 43
    assert not [p for p in (lineage.parent / CACHE_DIR).iterdir() if p.suffix == ".tmp"]


def test_graph_commands_with_the_cache_do_not_import_torch(lineage: Path) -> None:
    code = (
        "import sys\nfrom ckptmigrate.cli import main\n"
        "for args in (['heads'], ['history'], ['history'], ['show', 'head']):\n"
        "    try:\n        main(args)\n    except SystemExit as e:\n        assert not e.code\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=lineage.parent.parent, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr
