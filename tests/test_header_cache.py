"""The cache of parsed revision headers and of the graph they make: used when it can be,
never stale, never in the way."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.conftest import Run
from tests.harness.common import revision_source, write_revision

from ckptmigrate.script import cache as cache_module
from ckptmigrate.script import directory
from ckptmigrate.script.cache import (
    CACHE_DIR,
    RACY_NS,
    FileKey,
    GraphCache,
    Header,
    HeaderCache,
    StoredGraph,
)
from ckptmigrate.script.revision import RevisionMap

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
    (lineage.parent / CACHE_DIR / "graph.json").unlink()  # else the headers are not needed
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
    (lineage.parent / CACHE_DIR / "graph.json").unlink()
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
    assert not (lineage.parent / CACHE_DIR / "graph.json").exists()  # a file ran to make it
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


# --------------------------------------------------------------------------- the stored graph

HISTORY = [
    "bbbb0002 -> cccc0003 (head), step cccc0003",
    "aaaa0001 -> bbbb0002, step bbbb0002",
    "<base> -> aaaa0001, step aaaa0001",
]


def test_a_warm_command_builds_no_graph_and_heads_reads_only_the_summary(
    lineage: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    cold = run("history", "-v").stdout
    assert run("heads", "-v").stdout in cold

    def refuse(*_: object) -> None:
        raise AssertionError("built again")

    monkeypatch.setattr(RevisionMap, "__init__", refuse)
    assert run("history", "-v").stdout == cold
    assert run("history").stdout.splitlines() == HISTORY
    monkeypatch.setattr(StoredGraph, "graph", refuse)
    assert run("heads").stdout == "cccc0003 (head)\n"
    assert run("heads", "--resolve-dependencies").stdout == "cccc0003 (head)\n"


def _same_size_edit(path: Path, old: str, new: str) -> None:
    """Change a file keeping its size and modification time (as cp -p would)."""
    before = path.stat()
    text = path.read_text()
    assert len(old) == len(new) and old in text
    path.write_text(text.replace(old, new))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


BREAKS = {
    "cycle, same size and mtime": lambda v: _same_size_edit(
        v / "bbbb0002.py", "down_revision = 'aaaa0001'", "down_revision = 'cccc0003'"
    ),
    "missing parent": lambda v: _age(write_revision(v, "dddd0004", "zzzz9999")),
    "duplicate id": lambda v: _age(Path(shutil.copy2(v / "bbbb0002.py", v / "bbbb0002_copy.py"))),
    "no down_revision": lambda v: (v / "cccc0003.py").write_text(
        (v / "cccc0003.py").read_text().replace("down_revision = 'bbbb0002'\n", "")
    ),
}


@pytest.mark.parametrize("name", list(BREAKS))
@pytest.mark.parametrize("command", ["heads", "history"])
def test_a_stored_graph_never_hides_a_broken_file(
    lineage: Path, run: Run, name: str, command: str
) -> None:
    assert run("history").stdout.splitlines() == HISTORY  # the graph is stored
    BREAKS[name](lineage)
    # as if stored after the change: only the files' fingerprint can tell
    _age(lineage.parent / CACHE_DIR / "graph.json", by_ns=-HOUR_NS)
    warm = run(command, code=1).stderr
    assert warm.startswith("Error: ")
    shutil.rmtree(lineage.parent / CACHE_DIR)
    assert run(command, code=1).stderr == warm  # as a cold run says it
    assert not (lineage.parent / CACHE_DIR / "graph.json").exists()  # a broken graph is not kept


def _graph_lines(lineage: Path) -> list[bytes]:
    return (lineage.parent / CACHE_DIR / "graph.json").read_bytes().split(b"\n")


@pytest.mark.parametrize(
    "damage",
    [
        lambda lines: b"",
        lambda lines: b"\x00\xff garbage",
        lambda lines: lines[0],  # truncated after the fingerprint
        lambda lines: lines[0][:-9],
        lambda lines: lines[0].replace(b'"version":"', b'"version":"0.0.0+'),
        lambda lines: b"\n".join([lines[0], b"{}", b"{}"]),
        lambda lines: b"\n".join([lines[0], b"[]", b"[]"]),
        lambda lines: b"\n".join([lines[0], lines[1], b'{"nodes": 7}']),
        lambda lines: b"\n".join([lines[0], lines[1], b'{"nodes": [["x"]]}']),
        lambda lines: b"\n".join([lines[0], lines[1], lines[2][:-40]]),
        lambda lines: b"\n".join(  # an order naming a revision that is not there
            [lines[0], lines[1], lines[2].replace(b'"walk":[', b'"walk":["x",')]
        ),
        lambda lines: b"\n".join(
            [lines[0], b'{"heads":["cccc0003"],"tips":[[1,2,3,4,5]]}', lines[2]]
        ),
    ],
)
def test_a_damaged_graph_is_rebuilt(
    lineage: Path, run: Run, damage: Callable[[list[bytes]], bytes]
) -> None:
    run("history")
    graph_file = lineage.parent / CACHE_DIR / "graph.json"
    graph_file.write_bytes(damage(_graph_lines(lineage)))
    _age(graph_file, by_ns=-HOUR_NS)  # as if written after everything else
    assert run("heads").stdout == "cccc0003 (head)\n"
    assert run("history").stdout.splitlines() == HISTORY
    key, summary, graph = (json.loads(line) for line in _graph_lines(lineage))
    assert len(key["files"]) == 3 * 5 and summary["heads"] == ["cccc0003"]
    assert [row[0] for row in graph["nodes"]] == ["aaaa0001", "bbbb0002", "cccc0003"]


def fingerprint(files: list[tuple[str, FileKey]]) -> list[object]:
    return [x for name, key in files for x in (name, *key)]


def test_a_graph_written_just_after_a_change_is_not_trusted(tmp_path: Path) -> None:
    written = time.time_ns() - HOUR_NS
    old: FileKey = (100, written - RACY_NS - 1, written - RACY_NS - 1, 7)
    new: FileKey = (100, written - RACY_NS // 2, written - RACY_NS - 1, 8)
    summary = {"heads": ["x"]}
    cache = GraphCache(tmp_path)
    for files in ([("a.py", old)], [("a.py", old), ("b.py", new)]):
        cache.save(fingerprint(files), summary, {"nodes": []})
        os.utime(cache.path, ns=(written, written))
        stored = cache.load(fingerprint(files))
        if files[-1][1] is old:
            assert stored is not None and stored.summary == summary
        else:
            assert stored is None  # b.py changed too shortly before to be sure of
    assert cache.load(fingerprint([("a.py", (101, *old[1:]))])) is None  # another version
    assert cache.load(fingerprint([("a.py", old)])) is None  # the file it was stored for
    cache.save(fingerprint([("a.py", old), ("b.py", new)]), summary, {"nodes": []})
    assert cache.load(fingerprint([("a.py", old), ("b.py", new)])) is not None  # aged enough


def _header_file(versions: Path, rev: str, down: object, **more: object) -> None:
    """A revision file with only a header: graph commands never import it."""
    lines = [f'"""step {rev}\n\nThe longer story of {rev}.\n"""', f"revision = {rev!r}"]
    lines.append(f"down_revision = {down!r}")
    lines += [f"{name} = {value!r}" for name, value in more.items()]
    (versions / f"{rev}_step.py").write_text("\n".join(lines) + "\n")
    _age(versions / f"{rev}_step.py")


GRAPH_COMMANDS = [
    ("history",),
    ("history", "-v"),
    ("history", "--graph"),
    ("history", "-r", "bbbb0002:ffff0009"),
    ("heads",),
    ("heads", "-v"),
    ("heads", "--resolve-dependencies"),
    ("branches", "-v"),
    ("show", "ssss0006"),
    ("show", "yyyy0008"),
]


def test_a_stored_graph_answers_as_the_files_do(
    tmp_path: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Branches, a merge, labels, depends_on and a squash whose replaced files were kept."""
    monkeypatch.setattr(cache_module, "RACY_NS", 0)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alembic_style.ini").write_text(
        "[ckptmigrate]\nscript_location = %(here)s/migrations\n"
    )
    versions = tmp_path / "migrations" / "versions"
    versions.mkdir(parents=True)
    _header_file(versions, "aaaa0001", None)
    _header_file(versions, "bbbb0002", "aaaa0001")
    _header_file(versions, "cccc0003", "aaaa0001", branch_labels=("side",))
    _header_file(versions, "dddd0004", ("bbbb0002", "cccc0003"))
    _header_file(versions, "eeee0005", "dddd0004", depends_on="cccc0003")
    _header_file(versions, "gggg0010", "aaaa0001", depends_on="side")
    _header_file(versions, "ssss0006", "eeee0005", replaces=("xxxx0007", "yyyy0008"))
    _header_file(versions, "xxxx0007", "eeee0005")  # kept by 'squash --keep'
    _header_file(versions, "yyyy0008", "xxxx0007")
    _header_file(versions, "ffff0009", "yyyy0008")  # revises where the squash ends
    cold = {}
    for args in GRAPH_COMMANDS:
        shutil.rmtree(tmp_path / "migrations" / CACHE_DIR, ignore_errors=True)
        cold[args] = run(*args).stdout
    assert "ssss0006" in cold[("history",)] and "xxxx0007" not in cold[("history",)]
    assert (tmp_path / "migrations" / CACHE_DIR / "graph.json").exists()

    def refuse(*_: object) -> None:
        raise AssertionError("the headers were read again")

    monkeypatch.setattr(directory.ScriptDirectory, "_build", refuse)
    for args in GRAPH_COMMANDS:
        assert run(*args).stdout == cold[args], args
