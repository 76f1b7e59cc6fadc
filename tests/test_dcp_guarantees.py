"""What a DCP folder is promised: renames read no data, kills leave old or new, one writer,
damaged or foreign metadata refused clearly, layouts ckptmigrate does not migrate said so."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tests.conftest import Run, invoke
from tests.harness import dcp_models as tiny
from tests.harness.common import (
    REV_A,
    REV_B,
    TMP_SUFFIX,
    digest,
    fork_cli,
    standard_project,
    write_revision,
)

import ckptmigrate

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

R1, R2, R3 = "e1000000000e", "e2000000000e", "e3000000000e"


def save(state: dict[str, Any], folder: Path, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder, **kwargs)


R4 = "e4000000000e"


def renames_lineage(root: Path) -> Path:
    """R1 (TinyV1 as saved) -> R2 -> R3, renames and a drop only; then R4 computes a tensor."""
    versions = root / "migrations" / "versions"
    write_revision(versions, R1, None)
    write_revision(
        versions,
        R2,
        R1,
        'op.rename_prefix("block.", "layers.0.")',
        'op.rename_prefix("layers.0.", "block.")',
    )
    write_revision(
        versions,
        R3,
        R2,
        'op.rename_prefix("head.", "lm_head.")\nop.drop_key("old_scale", intended=True)',
        'op.add_tensor("old_scale", (8,), init="ones")\nop.rename_prefix("lm_head.", "head.")',
    )
    write_revision(versions, R4, R3, 'op.cast("embed.weight", torch.float64)')
    ini = root / "alembic_style.ini"
    ini.write_text("[ckptmigrate]\nscript_location = %(here)s/migrations\n", encoding="utf-8")
    return ini


def trained_v1(*, seed: int = 0) -> tuple[Any, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(seed)
    model = tiny.TinyV1()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tiny.train(model, opt, range(2))
    return get_state_dict(model, opt)


# ----------------------------------------------------------------------------- no data read


def _shut_out(files: list[Path]) -> Any:
    """Make ``files`` unreadable and unwritable for a command, as the kernel enforces.

    Mode 000. As root, who may read anything, the files also go to another
    owner, and the command runs without the capabilities that override file
    permissions and ownership (the function returned drops them, in the child).
    """
    for path in files:
        os.chmod(path, 0o000)
    if os.geteuid() != 0:
        return None
    import ctypes

    for path in files:
        os.chown(path, 65534, 65534)
    libc = ctypes.CDLL(None, use_errno=True)
    # CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER; PR_CAPBSET_DROP, then
    # capset(2) with them gone from the effective and permitted sets
    caps = (0, 1, 2, 3)

    def drop() -> None:
        for cap in caps:
            if libc.prctl(24, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "cannot drop a capability")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (ctypes.c_uint32 * 6)()
        if libc.capget(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capget")
        mask = ~sum(1 << c for c in caps) & 0xFFFFFFFF
        data[0] &= mask  # effective (low word)
        data[1] &= mask  # permitted
        if libc.capset(header, data) != 0:
            raise OSError(ctypes.get_errno(), "capset")

    return drop


def _give_back(files: list[Path]) -> None:
    for path in files:
        if os.geteuid() == 0:
            os.chown(path, 0, 0)
        os.chmod(path, 0o644)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX permissions")
def test_a_rename_chain_reads_and_writes_no_data_file(tmp_path: Path) -> None:
    """Every .distcp file is shut out during the upgrade: a single read or write would fail."""
    ini = renames_lineage(tmp_path)
    ckpt = tmp_path / "ckpt"
    msd, osd = trained_v1()
    save({"model": msd, "optim": osd, "step": 2}, ckpt)
    code, err = invoke("-c", str(ini), "upgrade", str(ckpt), R2, "--from", R1)
    assert code == 0, err  # (the first upgrade reads the optimizer's params lists, see below)
    files = sorted(ckpt.glob("*.distcp"))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, digest(p)) for p in files}
    drop = _shut_out(files)
    log, control_log = tmp_path / "upgrade.txt", tmp_path / "control.txt"
    try:
        code = fork_cli(["-c", str(ini), "upgrade", str(ckpt), R3], log, before=drop)
        # the control: an upgrade that computes a tensor has to read, and cannot
        control = fork_cli(["-c", str(ini), "upgrade", str(ckpt), R4], control_log, before=drop)
        modes = {p.name: p.stat().st_mode & 0o777 for p in files}
    finally:
        _give_back(files)
    assert control == 1 and "Permission denied" in control_log.read_text()
    assert code == 0, log.read_text()
    assert f"Running upgrade {R2} -> {R3}" in log.read_text()
    assert "Optimizer state at 'optim'" in log.read_text()
    assert set(modes.values()) == {0}  # still shut out: nothing changed them
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, digest(p)) for p in files}
    assert after == before and sorted(ckpt.glob("*.distcp")) == files
    assert invoke("-c", str(ini), "current", str(ckpt))[0] == 0
    state = {
        "model": {tiny.renamed(k): torch.zeros_like(v) for k, v in msd.items() if k != "old_scale"}
    }
    dcp.load(state, checkpoint_id=ckpt)
    for key, value in msd.items():
        if key != "old_scale":
            assert torch.equal(state["model"][tiny.renamed(key)], value), key


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")  # pragma: no cover


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_the_first_rename_of_a_training_checkpoint_reads_only_the_params_lists(
    tmp_path: Path,
) -> None:
    """Bytes read from data files, by the kernel's count: the optimizer's lists of names only."""
    ini = renames_lineage(tmp_path)
    ckpt = tmp_path / "ckpt"
    big = {f"extra.{i}": torch.randn(1024, 1024) for i in range(8)}  # 32 MB more to not read
    msd, osd = trained_v1()
    save({"model": {**msd, **big}, "optim": osd}, ckpt)
    ckptmigrate.upgrade(ckpt, location=ini, from_revision=R1, dry_run=True)  # imports done
    md = pickle.loads((ckpt / ".metadata").read_bytes())
    lists = sum(i.length for k, i in md.storage_data.items() if k.fqn.endswith(".params"))
    scripts = sum(p.stat().st_size for p in (tmp_path / "migrations").rglob("*.py"))
    before = _rchar()
    ckptmigrate.upgrade(ckpt, R2, location=ini, from_revision=R1)
    read = _rchar() - before
    data = sum(p.stat().st_size for p in ckpt.glob("*.distcp"))
    assert data > 32 << 20
    # .metadata (read to lock, to clean, to open, to verify), the scripts, the lists
    assert read < 6 * (ckpt / ".metadata").stat().st_size + 2 * scripts + lists + (64 << 10)


# ----------------------------------------------------------------------------- kills, locks


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_sigkill_at_random_moments_leaves_the_old_or_the_new_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.harness.dcp_crash", str(tmp_path), "--seed", "20260202"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(proc.stderr.strip().splitlines()[-1])
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], report
    assert report["kills"] >= 24
    assert sum(report["phases"].values()) == report["trials"]
    assert report["phases"].get("killed while writing", 0) >= 4, report
    assert report["phases"].get("killed before writing", 0) >= 2, report
    assert report["max_leftovers_seen"] >= 1  # killed writers left data files...
    assert report["leftovers_after_final_run"] == 0  # ...and the next run removed them


SLOW = (
    "import os, time\n"
    "gate = os.environ.get('CKPTMIGRATE_TEST_GATE')\n"
    "deadline = time.monotonic() + 60\n"
    "while gate and not os.path.exists(gate) and time.monotonic() < deadline:\n"
    "    time.sleep(0.02)\n"
    'op.map_tensor("w1", lambda t: t * 2)\n'
)


@pytest.mark.parametrize("listed", [True, False])
def test_files_a_killed_write_replaced_are_removed_by_the_next_one(
    tmp_path: Path, listed: bool
) -> None:
    """Killed after its switch: the files it replaced (listed in .metadata) go on the next run;
    an unreferenced DCP-named file that is not listed is someone else's and stays."""
    ini = renames_lineage(tmp_path)
    ckpt = tmp_path / "ckpt"
    msd, _ = trained_v1()
    save({"model": msd}, ckpt)
    from ckptmigrate.formats.dcp.metadata import REPLACED_KEY

    stale = ckpt / "__1_0.distcp"
    stale.write_bytes((ckpt / "__0_0.distcp").read_bytes())
    if listed:  # as a write leaves it killed between its switch and its clean-up
        md = pickle.loads((ckpt / ".metadata").read_bytes())
        md.planner_data[REPLACED_KEY] = [stale.name]
        (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    code, err = invoke("-c", str(ini), "upgrade", str(ckpt), R3, "--from", R1)
    assert code == 0, err
    assert stale.exists() is not listed
    kept = {k: v for k, v in msd.items() if k != "old_scale"}
    state = {"model": {tiny.renamed(k): torch.zeros_like(v) for k, v in kept.items()}}
    dcp.load(state, checkpoint_id=ckpt)
    for key, value in kept.items():
        assert torch.equal(state["model"][tiny.renamed(key)], value), key


def test_two_writers_one_migration(tmp_path: Path) -> None:
    ini = tmp_path / "alembic_style.ini"
    ini.write_text("[ckptmigrate]\nscript_location = %(here)s/migrations\n", encoding="utf-8")
    write_revision(tmp_path / "migrations" / "versions", REV_A, None)
    write_revision(tmp_path / "migrations" / "versions", REV_B, REV_A, SLOW)
    ckpt = tmp_path / "ckpt"
    w = {f"w{i}": torch.randn(64, 64) for i in range(3)}
    save(dict(w), ckpt)
    assert invoke("-c", str(ini), "stamp", str(ckpt), REV_A)[0] == 0
    gate = tmp_path / "gate"
    logs = [tmp_path / f"err{i}.txt" for i in range(2)]
    argv = ["-c", str(ini), "upgrade", str(ckpt)]
    env = {"CKPTMIGRATE_TEST_GATE": str(gate)}
    with ThreadPoolExecutor(2) as pool:
        codes = [pool.submit(fork_cli, argv, log, env=env) for log in logs]
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if any(log.exists() and "Waiting for another" in log.read_text() for log in logs):
                break
            time.sleep(0.05)
        gate.touch()
        assert [c.result(timeout=120) for c in codes] == [0, 0]
    texts = [p.read_text() for p in logs]
    assert sum("Running upgrade" in t for t in texts) == 1, texts
    assert sum(f"Nothing to upgrade: {ckpt} is at {REV_B}" in t for t in texts) == 1, texts
    state = {k: torch.zeros_like(v) for k, v in w.items()}
    dcp.load(state, checkpoint_id=ckpt)
    assert torch.equal(state["w1"], w["w1"] * 2) and torch.equal(state["w0"], w["w0"])


def test_a_failure_while_writing_leaves_the_folder_as_it_was(tmp_path: Path, run: Run) -> None:
    ini = tmp_path / "alembic_style.ini"
    ini.write_text("[ckptmigrate]\nscript_location = %(here)s/migrations\n", encoding="utf-8")
    versions = tmp_path / "migrations" / "versions"
    write_revision(versions, REV_A, None)
    fails = (
        'op.map_tensor("w0", lambda t: t * 2)\nop.map_tensor("w1", lambda t: 1 / 0, shape=(64, 64))'
    )
    write_revision(versions, REV_B, REV_A, fails)
    ckpt = tmp_path / "ckpt"
    save({f"w{i}": torch.randn(64, 64) for i in range(3)}, ckpt)
    run("-c", str(ini), "stamp", str(ckpt), REV_A)
    before = {p.name: digest(p) for p in ckpt.iterdir()}
    err = run("-c", str(ini), "upgrade", str(ckpt), code=1).stderr
    assert "w1: computing it failed" in err and "Traceback" not in err
    assert {p.name: digest(p) for p in ckpt.iterdir()} == before  # no new file left either


# ----------------------------------------------------------------------------- bad metadata


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    standard_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    ckpt = tmp_path / "ckpt"
    save({f"w{i}": torch.randn(4, 4) for i in range(4)}, ckpt)
    return ckpt


class _Payload:
    def __reduce__(self) -> Any:
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b"", ".metadata is not a valid DCP checkpoint's metadata: the file is empty"),
        (lambda b: b[: len(b) // 2], "its pickle is damaged"),
        (lambda b: bytes(range(7, 207)), "is not a valid DCP checkpoint's metadata"),
        (lambda b: pickle.dumps({"not": "metadata"}), "it holds a dict, not a Metadata object"),
        (lambda b: pickle.dumps(_Payload()), "needs the global posix.system"),
    ],
    ids=["empty", "truncated", "noise", "foreign", "hostile"],
)
def test_damaged_or_foreign_metadata_is_refused(
    project: Path, run: Run, damage: Any, message: str
) -> None:
    path = project / ".metadata"
    path.write_bytes(damage(path.read_bytes()))
    before = {p.name: digest(p) for p in project.iterdir()}
    for cmd in (["current"], ["upgrade", "--from", REV_A], ["stamp", REV_A]):
        err = run(cmd[0], str(project), *cmd[1:], code=1).stderr
        assert message in err, err
        assert [line for line in err.splitlines() if line.startswith("Error:")] == [err.strip()]
    assert not Path("pwned").exists()  # the payload never ran
    assert {p.name: digest(p) for p in project.iterdir()} == before


def _drop_an_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptmigrate.formats.dcp import writing

    real = writing._metadata

    def metadata(*args: Any) -> Any:
        md, blobs = real(*args)
        del md.state_dict_metadata["renamed0"]  # a writer that loses an entry
        return md, blobs

    monkeypatch.setattr(writing, "_metadata", metadata)


def _lose_the_last_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    real = Path.write_bytes

    def write_bytes(self: Path, data: Any) -> int:
        if self.name.startswith("..metadata.") and self.name.endswith(TMP_SUFFIX):  # the new one
            data = data[:-1]  # a disk that keeps less than it was given
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize(
    "fault, message",
    [
        (_drop_an_entry, "does not match the migration plan after writing (missing ['renamed0']"),
        (_lose_the_last_byte, "the new .metadata does not read back as it was written"),
    ],
    ids=["entry lost", "bytes lost"],
)
def test_a_bad_metadata_write_is_stopped_and_no_verify_skips_the_check(
    project: Path, run: Run, monkeypatch: pytest.MonkeyPatch, fault: Any, message: str
) -> None:
    before = {p.name: digest(p) for p in project.iterdir()}
    fault(monkeypatch)
    err = run("upgrade", str(project), "--from", REV_A, code=1).stderr
    (error,) = [line for line in err.splitlines() if line.startswith("Error:")]
    assert message in error and "the input is unchanged" in error, err
    assert {p.name: digest(p) for p in project.iterdir()} == before  # no new file left either
    # --no-verify lets the same bad write through: the check is what kept the folder
    run("upgrade", str(project), "--from", REV_A, "--no-verify")
    assert {p.name: digest(p) for p in project.iterdir()} != before


def test_a_missing_or_truncated_data_file_is_refused(project: Path, run: Run) -> None:
    (data,) = project.glob("*.distcp")
    raw = data.read_bytes()
    data.write_bytes(raw[:100])
    err = run("upgrade", str(project), "--from", REV_A, code=1).stderr
    assert "cannot be read" in err or "shorter than its .metadata says" in err, err
    data.unlink()
    err = run("current", str(project), code=1).stderr
    assert f"its data file {data.name} is missing" in err


def test_layouts_ckptmigrate_does_not_migrate_are_refused_with_what_to_do(
    tmp_path: Path, run: Run
) -> None:
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    standard_project(tmp_path)
    sd = {"w0": torch.randn(4, 4)}
    st = tmp_path / "st"
    writer = FileSystemWriter(st, serialization_format=SerializationFormat.SAFETENSORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(dict(sd), storage_writer=writer)
    err = run("-c", str(tmp_path / "alembic_style.ini"), "current", str(st), code=1).stderr
    assert "serialization_format=SerializationFormat.SAFETENSORS" in err
    local = tmp_path / "local"
    local.mkdir()
    (local / "__0.metadata").write_bytes(b"x")
    (local / "__0_0.distcp").write_bytes(b"x")
    err = run("-c", str(tmp_path / "alembic_style.ini"), "current", str(local), code=1).stderr
    assert "saved without collectives" in err
    per_rank = tmp_path / "per_rank"
    per_rank.mkdir()
    (per_rank / "shard-00001-model-00001-of-00001.safetensors").write_bytes(b"x")
    err = run("-c", str(tmp_path / "alembic_style.ini"), "current", str(per_rank), code=1).stderr
    assert "consolidate it first" in err


def test_the_hugging_face_safetensors_layout_is_migrated_as_a_sharded_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Run
) -> None:
    """``HuggingFaceStorageWriter`` (rank 0): upgraded, then read back by DCP's own reader."""
    from torch.distributed.checkpoint.hf_storage import (
        HuggingFaceStorageReader,
        HuggingFaceStorageWriter,
    )

    tiny.write_project(
        tmp_path,
        'op.rename_key("model.head.weight", "model.lm_head.weight")',
        'op.rename_key("model.lm_head.weight", "model.head.weight")',
    )
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    sd = dict(tiny.TinyV1().state_dict())
    hf = tmp_path / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd}, storage_writer=HuggingFaceStorageWriter(str(hf)))
    run("upgrade", str(hf), "--from", tiny.REV_V1)
    new = {
        k.replace("head.weight", "lm_head.weight") if k == "head.weight" else k: v
        for k, v in sd.items()
    }
    state = {"model": {k: torch.zeros_like(v) for k, v in new.items()}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(hf)))
    for key, value in new.items():
        assert torch.equal(state["model"][key], value), key
    assert run("current", str(hf)).stdout.strip() == f"{tiny.REV_V2} (head)"
