"""Checkpoints on S3: a real S3-compatible server (moto, in server mode) on localhost.

ckptmigrate reaches it over HTTP through fsspec/s3fs, as it would reach S3.
Every result is compared with the same command run on a local copy: the
object written is the same bytes as the local file. The server's request log
says what was transferred, and lets a test act at an exact moment (when the
third part of an upload arrives) instead of after a guessed sleep.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
import torch
from safetensors.torch import load_file, save_file
from tests.conftest import ADD_FC3, INITIAL, Run, two_step_lineage, v1_state_dict
from tests.harness import dcp_models
from tests.harness.common import (
    REV_A,
    REV_B,
    stamp_state_dict,
    standard_project,
    write_shards,
)
from tests.harness.s3 import Request, S3Server

boto3 = pytest.importorskip("boto3")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@dataclass
class Bucket:
    """One fresh bucket on the server, and a plain boto3 client to look at it."""

    server: S3Server
    client: Any
    name: str

    def url(self, key: str) -> str:
        return f"s3://{self.name}/{key}"

    def put(self, key: str, path: Path) -> str:
        self.client.upload_file(str(path), self.name, key)
        return self.url(key)

    def put_folder(self, prefix: str, folder: Path) -> str:
        """Every file below ``folder`` (nested ones too) under ``prefix``."""
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                self.put(f"{prefix}/{p.relative_to(folder).as_posix()}", p)
        return self.url(prefix)

    def get(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.name, Key=key)["Body"].read())

    def objects(self) -> list[str]:
        found = self.client.list_objects_v2(Bucket=self.name).get("Contents", [])
        return sorted(o["Key"] for o in found)

    def pending_uploads(self) -> list[str]:
        found = self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", [])
        return sorted(u["Key"] for u in found)

    def hook(self, hook: Callable[[Request], bool]) -> None:
        self.server.hooks.append(hook)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield Bucket(s3_server, client, name)
    s3_server.hooks.clear()


def _stderr_lines(result: Any, *replace: tuple[str, str]) -> list[str]:
    text: str = result.stderr
    for old, new in replace:
        text = text.replace(old, new)
    return text.splitlines()


# --------------------------------------------------------------------------- the three formats


def test_a_torch_file_on_s3_upgrades_current_and_downgrades_as_on_disk(
    project: Path, s3: Bucket, run: Run
) -> None:
    torch.save(v1_state_dict(), "model.pth")
    url = s3.put("runs/model.pth", project / "model.pth")
    shutil.copy("model.pth", "original.pth")

    remote = run("upgrade", url)
    local = run("upgrade", "model.pth")
    assert _stderr_lines(remote, (url, "model.pth")) == _stderr_lines(local)
    assert s3.get("runs/model.pth") == (project / "model.pth").read_bytes()  # the same bytes
    assert run("current", url).stdout == f"{ADD_FC3} (head)\n"

    run("downgrade", url, "-1")
    run("downgrade", "model.pth", "-1")
    assert s3.get("runs/model.pth") == (project / "model.pth").read_bytes()
    back = torch.load(project / "model.pth", weights_only=True)
    original = torch.load("original.pth", weights_only=True)
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert run("current", url).stdout == f"{INITIAL}\n"
    assert s3.objects() == ["runs/model.pth"] and s3.pending_uploads() == []  # no lock, no tmp


def test_a_training_checkpoint_on_s3_carries_its_optimizer_state(
    project: Path, s3: Bucket, run: Run
) -> None:
    from examples.simple_model import SimpleModelV1

    torch.manual_seed(0)
    model = SimpleModelV1()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(4, 10)).sum().backward()
    opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, "t.pt")
    url = s3.put("t.pt", project / "t.pt")
    remote = run("upgrade", url, "--from", INITIAL)
    local = run("upgrade", "t.pt", "--from", INITIAL)
    assert _stderr_lines(remote, (url, "t.pt")) == _stderr_lines(local)
    assert "Optimizer state at 'optimizer': 4 -> 6 parameters" in remote.stderr
    assert s3.get("t.pt") == (project / "t.pt").read_bytes()


def test_a_safetensors_file_on_s3_upgrades_current_and_downgrades_as_on_disk(
    project: Path, s3: Bucket, run: Run
) -> None:
    save_file(v1_state_dict(), "model.safetensors")
    url = s3.put("model.safetensors", project / "model.safetensors")
    run("upgrade", url)
    run("upgrade", "model.safetensors")
    assert s3.get("model.safetensors") == (project / "model.safetensors").read_bytes()
    assert run("current", url).stdout == f"{ADD_FC3} (head)\n"
    run("downgrade", url, INITIAL)
    run("downgrade", "model.safetensors", INITIAL)
    assert s3.get("model.safetensors") == (project / "model.safetensors").read_bytes()
    back, original = load_file("model.safetensors"), v1_state_dict()
    assert all(torch.equal(back[k], original[k]) for k in original)


def _sharded(folder: Path) -> None:
    """The v1 model in two safetensors shards with a Hugging Face index."""
    folder.mkdir()
    sd = v1_state_dict()
    parts = [
        {k: sd[k] for k in ("fc1.weight", "fc1.bias")},
        {k: sd[k] for k in ("fc2.weight", "fc2.bias")},
    ]
    weight_map = {}
    for i, part in enumerate(parts, start=1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _folder_in(s3: Bucket, prefix: str) -> dict[str, bytes]:
    return {k[len(prefix) + 1 :]: s3.get(k) for k in s3.objects() if k.startswith(prefix + "/")}


def test_a_sharded_folder_on_s3_switches_its_index_in_one_step(
    project: Path, s3: Bucket, run: Run
) -> None:
    _sharded(project / "ckpt")
    url = s3.put_folder("ckpt", project / "ckpt")
    seen = s3.server.mark()
    run("upgrade", url, "--jobs", "2")
    run("upgrade", "ckpt", "--jobs", "2")
    local = {p.name: p.read_bytes() for p in (project / "ckpt").iterdir()}
    assert _folder_in(s3, "ckpt") == local  # new shards, new index, the replaced shard gone
    assert run("current", url).stdout == f"{ADD_FC3} (head)\n"
    # the index was the last object written: before it, the old checkpoint stood whole
    writes = [r for r in s3.server.since(seen) if r.method in ("PUT", "POST") and r.status == 200]
    objects = [r.key for r in writes if "uploadId" not in r.query and "lock" not in r.key]
    assert objects[-1] == f"{s3.name}/ckpt/model.safetensors.index.json"

    run("downgrade", url, "-1")
    run("downgrade", "ckpt", "-1")
    assert _folder_in(s3, "ckpt") == {p.name: p.read_bytes() for p in (project / "ckpt").iterdir()}
    assert s3.pending_uploads() == []


def test_between_disk_and_s3_in_both_directions(project: Path, s3: Bucket, run: Run) -> None:
    torch.save(v1_state_dict(), "model.pth")
    run("upgrade", "model.pth", "-o", s3.url("out.safetensors"))
    run("upgrade", "model.pth", "-o", "out.safetensors")
    assert s3.get("out.safetensors") == (project / "out.safetensors").read_bytes()
    url = s3.put("in.pth", project / "model.pth")
    run("upgrade", url, "-o", "from_s3.pth")
    run("upgrade", "model.pth", "-o", "from_disk.pth")
    assert (project / "from_s3.pth").read_bytes() == (project / "from_disk.pth").read_bytes()
    assert s3.get("in.pth") == (project / "model.pth").read_bytes()  # -o leaves the input


# --------------------------------------------------------------------------- lazy reads


def test_current_reads_the_stamp_and_nothing_else(project: Path, s3: Bucket, run: Run) -> None:
    big = OrderedDict((f"layers.{i}.weight", torch.randn(1024, 1024)) for i in range(8))
    torch.save(stamp_state_dict(big, INITIAL), "big.pth")  # 32 MiB
    save_file(dict(big), "big.safetensors", metadata={"ckptmigrate.revision": INITIAL})
    _sharded(project / "ckpt")
    index = json.loads((project / "ckpt/model.safetensors.index.json").read_text())
    index["metadata"]["ckptmigrate.revision"] = INITIAL
    (project / "ckpt/model.safetensors.index.json").write_text(json.dumps(index))
    urls = [
        s3.put("big.pth", project / "big.pth"),
        s3.put("big.safetensors", project / "big.safetensors"),
    ]
    urls.append(s3.put_folder("ckpt", project / "ckpt"))
    for url in urls:
        seen = s3.server.mark()
        assert run("current", url).stdout == f"{INITIAL}\n"
        requests = s3.server.since(seen)
        # the first 4 KiB (what the file is), the last 64 KiB (a zip's directory), a header
        assert sum(r.sent for r in requests) < 128 * 1024, url
        gets = [r for r in requests if r.method == "GET"]
        listings = [r for r in gets if "list-type" in r.query]
        assert len(gets) - len(listings) <= 4, url  # object reads
        # a folder is listed to tell a tree to search from a checkpoint folder, then opened
        assert len(listings) <= 4, url
        assert not any(
            r.key.endswith("-of-00002.safetensors") and r.method == "GET" for r in requests
        )
    # unstamped, the schema is read (by ranges): still no tensor data
    torch.save(v1_state_dict(), "v1.pth")
    url = s3.put("v1.pth", project / "v1.pth")
    seen = s3.server.mark()
    assert run("current", url).stdout == f"{INITIAL} (identified by schema)\n"
    assert s3.server.bytes_sent(seen) < 16 * 1024


# --------------------------------------------------------------------------- kills, writers


def _big_project(root: Path, rows: int = 1024) -> tuple[Path, Path]:
    """The harness lineage (A -> B renames, computes, casts and adds) and a file at A:
    by default 20 MB, written back as 24 MB (five parts of 5 MiB)."""
    ini = standard_project(root)
    g = torch.Generator().manual_seed(1)
    sd = OrderedDict((f"w{i}", torch.randn(rows, 1024, generator=g)) for i in range(5))
    path = root / "big.pth"
    torch.save(stamp_state_dict(sd, REV_A), path)
    return ini, path


def _cli(ini: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ckptmigrate", "-c", str(ini), *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class _Stop:
    """Hold the first request ``when`` matches: the moment to act on. Once released, the
    request is dropped, as if its sender had been killed just before sending it."""

    def __init__(self, when: Callable[[Request], bool]) -> None:
        self.when = when
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, request: Request) -> bool:
        if self.reached.is_set() or not self.when(request):
            return False
        self.reached.set()
        self.release.wait(60)
        return True


def _kill_when_reached(stop: _Stop, s3: Bucket, ini: Path, url: str, env: dict[str, str]) -> None:
    """``upgrade url`` in a process of its own, SIGKILLed when ``stop`` holds its request."""
    s3.hook(stop)
    proc = _cli(ini, "upgrade", url, env=env)
    try:
        assert stop.reached.wait(120), proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        stop.release.set()


@pytest.mark.parametrize("moment", ["third part", "commit"])
def test_a_run_killed_mid_upload_leaves_the_object_whole(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    monkeypatch.chdir(tmp_path)
    ini, path = _big_project(tmp_path)
    url = s3.put("big.pth", path)
    before = path.read_bytes()
    key = f"{s3.name}/big.pth"
    if moment == "third part":
        stop = _Stop(lambda r: r.key == key and r.query.get("partNumber") == ["3"])
    else:
        stop = _Stop(lambda r: r.key == key and r.method == "POST" and "uploadId" in r.query)
    _kill_when_reached(stop, s3, ini, url, env={"CKPTMIGRATE_S3_PART_SIZE": str(5 << 20)})
    assert s3.get("big.pth") == before  # the old object, whole, and it loads
    loaded = torch.load(io.BytesIO(s3.get("big.pth")), weights_only=True)
    original = torch.load(path, weights_only=True)
    assert list(loaded) == list(original)
    assert all(torch.equal(loaded[k], original[k]) for k in original)
    assert s3.pending_uploads() == ["big.pth"]  # the killed upload, never visible
    assert ".big.pth.ckptmigrate-lock" in s3.objects()  # and its lock, left behind

    # The next writer takes over the dead writer's lock at once and aborts its upload.
    result = run("-c", str(ini), "upgrade", url)
    assert "Waiting for another" not in result.stderr
    assert s3.pending_uploads() == [] and s3.objects() == ["big.pth"]
    run("-c", str(ini), "upgrade", str(path))
    assert s3.get("big.pth") == path.read_bytes()


def test_a_sharded_run_killed_at_its_switch_leaves_the_old_checkpoint(
    project: Path, s3: Bucket, run: Run
) -> None:
    """Killed as the new index goes up: the old index and every shard it names stand."""
    _sharded(project / "ckpt")
    url = s3.put_folder("ckpt", project / "ckpt")
    before = _folder_in(s3, "ckpt")
    index = f"{s3.name}/ckpt/model.safetensors.index.json"
    stop = _Stop(lambda r: r.key == index and r.method == "PUT")
    _kill_when_reached(stop, s3, project / "alembic_style.ini", url, env={})
    after = _folder_in(s3, "ckpt")
    assert {k: after[k] for k in before} == before  # the old checkpoint, whole
    assert run("current", url).stdout == f"{INITIAL} (identified by schema)\n"

    # The next run takes over the dead writer's lock and ends exactly as an unbroken run.
    result = run("upgrade", url)
    assert "Waiting for another" not in result.stderr
    run("upgrade", "ckpt")
    local = {p.name: p.read_bytes() for p in (project / "ckpt").iterdir()}
    assert _folder_in(s3, "ckpt") == local
    assert s3.pending_uploads() == []


def _foreign_write(s3: Bucket, key: str, data: bytes) -> Callable[[Request], bool]:
    """Another tool (no lock) replaces the object when our run sends its first part or PUT."""
    done = threading.Event()

    def hook(request: Request) -> bool:
        if done.is_set() or request.key != f"{s3.name}/{key}" or request.method != "PUT":
            return False
        done.set()
        s3.client.put_object(Bucket=s3.name, Key=key, Body=data)
        return False

    return hook


@pytest.mark.parametrize("size", ["one PUT", "multipart"])
def test_a_concurrent_writer_is_not_overwritten(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch, size: str
) -> None:
    """The commit is conditional on the version read: the other writer's object stays."""
    monkeypatch.chdir(tmp_path)
    ini, path = _big_project(tmp_path)
    if size == "one PUT":
        small = OrderedDict((f"w{i}", torch.full((4, 4), float(i))) for i in range(4))
        torch.save(stamp_state_dict(small, REV_A), path)
    monkeypatch.setattr("ckptmigrate.formats.s3.PART_SIZE", 5 << 20)
    url = s3.put("big.pth", path)
    theirs = b"written by someone else"
    s3.hook(_foreign_write(s3, "big.pth", theirs))
    result = run("-c", str(ini), "upgrade", url, code=1)
    lines = result.stderr.strip().splitlines()
    assert (
        lines[-1].startswith(f"Error: {url} was replaced")
        and len([ln for ln in lines if ln.startswith("Error:")]) == 1
    ), result.stderr
    assert s3.get("big.pth") == theirs
    assert s3.pending_uploads() == [] and s3.objects() == ["big.pth"]


def test_two_writers_take_turns(
    tmp_path: Path, s3: Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second writer waits for the first one's lock, then goes ahead."""
    from ckptmigrate.formats.storage import location

    monkeypatch.chdir(tmp_path)
    ini, path = _big_project(tmp_path, rows=16)
    url = s3.put("big.pth", path)
    lock_key = f"{s3.name}/.big.pth.ckptmigrate-lock"

    def refused() -> int:
        return sum(r.key == lock_key and r.status == 412 for r in s3.server.since(seen))

    target = location(url)
    with target.store.locked(target.path):  # type: ignore[union-attr]
        proc = _cli(ini, "upgrade", url, env={})
        seen = s3.server.mark()
        # refused twice: it has looked at who holds the lock, said so, and tried again
        while refused() < 2:
            with s3.server.lock:
                s3.server.lock.wait(1)
            assert proc.poll() is None, proc.communicate()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert err.splitlines()[0] == f"Waiting for another ckptmigrate process writing {url} ...", err
    assert f"Running upgrade {REV_A} -> {REV_B}" in err
    assert s3.objects() == ["big.pth"]


# --------------------------------------------------------------------------- DCP folders


def _dcp_project(root: Path, monkeypatch: pytest.MonkeyPatch, run: Run, *lineage: str) -> Path:
    """The tiny DCP lineage (``lineage``: its upgrade and downgrade), and ``ckpt`` saved at v1,
    stamped; returns the ini."""
    from tests.test_dcp import save_v1

    dcp_models.write_project(root, *lineage)
    monkeypatch.chdir(root)
    save_v1(root / "ckpt")
    run("stamp", "ckpt", dcp_models.REV_V1)
    return root / "alembic_style.ini"


def _local(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_dcp_rename_chain_on_s3_rewrites_only_its_metadata(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dcp_project(tmp_path, monkeypatch, run, dcp_models.RENAMES_UP, dcp_models.RENAMES_DOWN)
    url = s3.put_folder("ckpt", tmp_path / "ckpt")
    before = _folder_in(s3, "ckpt")
    assert run("current", url).stdout == f"{dcp_models.REV_V1}\n"
    seen = s3.server.mark()
    remote = run("upgrade", url)
    requests = s3.server.since(seen)
    local = run("upgrade", "ckpt")
    assert _stderr_lines(remote, (url, "ckpt")) == _stderr_lines(local)
    after = _folder_in(s3, "ckpt")
    assert after == _local(tmp_path / "ckpt")  # the same .metadata as on disk
    assert after[".metadata"] != before[".metadata"]
    assert {k: v for k, v in after.items() if k != ".metadata"} == {
        k: v for k, v in before.items() if k != ".metadata"
    }
    writes = [r.key for r in requests if r.method in ("PUT", "POST", "DELETE")]
    assert [k for k in writes if "lock" not in k] == [f"{s3.name}/ckpt/.metadata"]
    # of the data, one small object read by its range (the optimizer's param groups): no tensor
    data_reads = [r for r in requests if r.method == "GET" and r.key.endswith(".distcp")]
    assert len(data_reads) == 1 and data_reads[0].status == 206 and data_reads[0].sent < 4096
    assert run("current", url).stdout == f"{dcp_models.REV_V2} (head)\n"

    run("downgrade", url, "-1")
    run("downgrade", "ckpt", "-1")
    assert _folder_in(s3, "ckpt") == _local(tmp_path / "ckpt")
    assert run("current", url).stdout == f"{dcp_models.REV_V1}\n"
    assert s3.pending_uploads() == []


@pytest.mark.filterwarnings("ignore::UserWarning")  # dcp.load without a process group
def test_a_dcp_folder_on_s3_upgrades_and_downgrades_its_tensors_as_on_disk(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_dcp import load_into

    _dcp_project(tmp_path, monkeypatch, run)
    url = s3.put_folder("ckpt", tmp_path / "ckpt")
    original = _folder_in(s3, "ckpt")
    remote = run("upgrade", url, "--jobs", "2")
    local = run("upgrade", "ckpt", "--jobs", "2")
    assert _stderr_lines(remote, (url, "ckpt")) == _stderr_lines(local)
    upgraded = _folder_in(s3, "ckpt")
    assert upgraded == _local(tmp_path / "ckpt")  # new data files, new .metadata, old gone
    assert any(k.startswith("ckptmigrate-") for k in upgraded) and upgraded != original
    assert run("current", url).stdout == f"{dcp_models.REV_V2} (head)\n"
    download = tmp_path / "download"
    download.mkdir()
    for name, data in upgraded.items():
        (download / name).write_bytes(data)
    model, _, step = load_into(dcp_models.TinyV2, download, optimizer=False)
    assert step == 2 and model.state_dict()["embed.weight"].shape == (dcp_models.NEW_VOCAB, 8)

    run("downgrade", url, dcp_models.REV_V1)
    run("downgrade", "ckpt", dcp_models.REV_V1)
    assert _folder_in(s3, "ckpt") == _local(tmp_path / "ckpt")
    assert run("current", url).stdout == f"{dcp_models.REV_V1}\n"
    assert s3.pending_uploads() == []


@pytest.mark.parametrize("moment", ["a data file", "the switch"])
def test_a_dcp_run_killed_mid_write_leaves_the_old_checkpoint(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    ini = _dcp_project(tmp_path, monkeypatch, run)
    url = s3.put_folder("ckpt", tmp_path / "ckpt")
    before = _folder_in(s3, "ckpt")
    if moment == "a data file":
        stop = _Stop(lambda r: r.method == "PUT" and r.key.endswith(".distcp"))
    else:
        stop = _Stop(lambda r: r.method == "PUT" and r.key == f"{s3.name}/ckpt/.metadata")
    _kill_when_reached(stop, s3, ini, url, env={})
    after = _folder_in(s3, "ckpt")
    assert {k: after[k] for k in before} == before  # the old checkpoint, whole
    assert run("current", url).stdout == f"{dcp_models.REV_V1}\n"

    # The next run takes over the dead writer's lock and ends exactly as an unbroken run.
    result = run("upgrade", url)
    assert "Waiting for another" not in result.stderr
    run("upgrade", "ckpt")
    assert _folder_in(s3, "ckpt") == _local(tmp_path / "ckpt")
    assert s3.pending_uploads() == []
    assert not any("lock" in k for k in s3.objects())


def test_a_dcp_upload_killed_mid_part_is_aborted_by_the_next_writer(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 12 MiB data file goes up in 5 MiB parts; killed at its second, nothing is visible,
    and the next writer of the folder (it holds the .metadata lock) aborts that upload."""
    import torch.distributed.checkpoint as dcp

    monkeypatch.chdir(tmp_path)
    two_step_lineage(tmp_path, ("base00000001", "next00000002"), 'op.transpose("w", 0, 1)')
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3072, 1024, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": w}}, checkpoint_id=tmp_path / "ckpt")
    run("stamp", "ckpt", "base00000001")
    url = s3.put_folder("ckpt", tmp_path / "ckpt")
    before = _folder_in(s3, "ckpt")
    stop = _Stop(lambda r: r.key.endswith(".distcp") and r.query.get("partNumber") == ["2"])
    env = {"CKPTMIGRATE_S3_PART_SIZE": str(5 << 20)}
    _kill_when_reached(stop, s3, tmp_path / "alembic_style.ini", url, env=env)
    # the old checkpoint, and nothing else visible but the dead writer's lock
    assert _folder_in(s3, "ckpt") == {**before, "..metadata.ckptmigrate-lock": ANY}
    assert [k for k in s3.pending_uploads() if k.endswith(".distcp")]  # the killed upload

    # a writer that uploads no data file of that name (stamp rewrites .metadata alone)
    run("stamp", url, "base")
    assert s3.pending_uploads() == []
    assert _folder_in(s3, "ckpt").keys() == before.keys()  # the lock gone too
    monkeypatch.setattr("ckptmigrate.formats.s3.PART_SIZE", 5 << 20)
    run("stamp", "ckpt", "base")
    for where in (url, "ckpt"):
        run("upgrade", where, "--from", "base00000001")
    assert _folder_in(s3, "ckpt") == _local(tmp_path / "ckpt")
    assert s3.pending_uploads() == []


def test_a_concurrent_writer_of_a_dcp_folder_is_not_overwritten(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another tool replaces .metadata while the new data goes up: the switch is refused."""
    _dcp_project(tmp_path, monkeypatch, run)
    url = s3.put_folder("ckpt", tmp_path / "ckpt")
    before = _folder_in(s3, "ckpt")
    theirs = b"written by someone else"
    done = threading.Event()

    def hook(request: Request) -> bool:
        if not done.is_set() and request.method == "PUT" and request.key.endswith(".distcp"):
            done.set()
            s3.client.put_object(Bucket=s3.name, Key="ckpt/.metadata", Body=theirs)
        return False

    s3.hook(hook)
    result = run("upgrade", url, code=1)
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: {url}/.metadata was replaced"), (
        result.stderr
    )
    after = _folder_in(s3, "ckpt")
    assert after == {**before, ".metadata": theirs}  # theirs stands; none of our files stay
    assert s3.pending_uploads() == []


# --------------------------------------------------------------------------- other stores, errors


def test_any_fsspec_store_works_too(project: Path, run: Run) -> None:
    """memory:// has no conditional writes: a temporary object beside the target, then moved."""
    import fsspec

    fs = fsspec.filesystem("memory")
    torch.save(v1_state_dict(), "model.pth")
    save_file(v1_state_dict(), "model.safetensors")
    folder = f"/runs-{uuid.uuid4().hex[:8]}"
    for name in ("model.pth", "model.safetensors"):
        fs.pipe(f"{folder}/{name}", (project / name).read_bytes())
        run("upgrade", f"memory://{folder}/{name}")
        run("upgrade", name)
        assert fs.cat(f"{folder}/{name}") == (project / name).read_bytes()
        assert run("current", f"memory://{folder}/{name}").stdout == f"{ADD_FC3} (head)\n"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)) == [
        "model.pth",
        "model.safetensors",
    ]


def test_file_urls_are_local_paths(project: Path, run: Run) -> None:
    torch.save(v1_state_dict(), "model.pth")
    run("upgrade", f"file://{project}/model.pth")
    assert run("current", "model.pth").stdout == f"{ADD_FC3} (head)\n"
    (project / "runs/exp").mkdir(parents=True)
    torch.save(v1_state_dict(), "runs/exp/model.pth")
    shutil.copy("model.pth", "runs/head.pth")
    data = json.loads(run("current", f"file://{project}/runs/", "--format", "json").stdout)
    rows = {r["path"]: (r["to"], r["status"]) for r in data["checkpoints"]}
    assert rows == {  # searched as the directory is, named by the URL
        f"file://{project}/runs/exp/model.pth": ([INITIAL], "behind"),
        f"file://{project}/runs/head.pth": ([ADD_FC3], "at_head"),
    }


def test_store_problems_are_one_clear_line(project: Path, s3: Bucket, run: Run) -> None:
    torch.save(v1_state_dict(), "model.pth")
    result = run("current", s3.url("missing.pth"), code=1)
    assert (
        result.stderr
        == f"Error: {s3.url('missing.pth')}: no such file; check the checkpoint path\n"
    )
    result = run("upgrade", "model.pth", "-o", "s3://no-such-bucket-here/x.pth", code=1)
    assert result.stderr.splitlines()[-1].startswith(
        "Error: cannot write s3://no-such-bucket-here/x.pth"
    )
    assert "Traceback" not in result.stderr


def test_an_adapter_folder_on_s3_is_refused_plainly(project: Path, s3: Bucket, run: Run) -> None:
    """Adapter folders are switched with local calls: on a store, one Error line, no guess."""
    folder = project / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file(
        {"base_model.model.fc1.lora_A.weight": torch.zeros(2, 4)},
        folder / "adapter_model.safetensors",
    )
    url = s3.put_folder("adapter", folder)
    for args in (
        ("current", url),
        ("upgrade", url),
        ("current", f"{url}/adapter_model.safetensors"),
    ):
        result = run(*args, code=1)
        assert result.stderr.splitlines() == [
            f"Error: {url}: PEFT adapter folders on remote storage are not supported yet; copy "
            "the folder to a local disk, migrate it there, and upload it"
        ]
    assert _folder_in(s3, "adapter") == {p.name: p.read_bytes() for p in folder.iterdir()}


def test_urls_need_the_remote_extra(
    project: Path, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if it were not installed
    result = run("current", "s3://bucket/model.pth", code=1)
    assert result.stderr == (
        "Error: s3://bucket/model.pth is a URL, and reading or writing URLs needs fsspec; "
        "pip install 'ckptmigrate[remote]'\n"
    )


def test_optimizer_state_computed_from_a_file_on_s3(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A migration that transposes a weight transposes its Adam moments: fetched, then computed."""
    monkeypatch.chdir(tmp_path)
    two_step_lineage(tmp_path, ("base00000001", "next00000002"), 'op.transpose("w", 0, 1)')
    w = torch.nn.Parameter(torch.randn(3, 5))
    opt = torch.optim.Adam([w])
    (w * torch.arange(15.0).reshape(3, 5)).sum().backward()
    opt.step()
    torch.save({"model": {"w": w.detach()}, "optimizer": opt.state_dict()}, "train.pt")
    url = s3.put("train.pt", tmp_path / "train.pt")
    remote = run("upgrade", url, "--from", "base00000001")
    local = run("upgrade", "train.pt", "--from", "base00000001")
    assert _stderr_lines(remote, (url, "train.pt")) == _stderr_lines(local)
    assert s3.get("train.pt") == (tmp_path / "train.pt").read_bytes()
    out = torch.load(tmp_path / "train.pt", weights_only=True)
    moment = out["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(moment, opt.state_dict()["state"][0]["exp_avg"].t())


# --------------------------------------------------------------------------- trees on a store


def _tiny_tree(root: Path, monkeypatch: pytest.MonkeyPatch, run: Run) -> Path:
    """The DCP lineage, and ``runs/`` mixing formats: every checkpoint at v1 but one at head,
    a non-checkpoint, and a hidden copy; returns ``runs``."""
    from tests.test_dcp import save_v1

    dcp_models.write_project(root)
    monkeypatch.chdir(root)
    runs = root / "runs"
    for sub in ("exp1/sub", "exp2", "exp3/sharded", "exp4", ".cache"):
        (runs / sub).mkdir(parents=True)
    torch.manual_seed(0)
    sd = dcp_models.TinyV1().state_dict()
    torch.save(stamp_state_dict(sd, dcp_models.REV_V1), runs / "exp1/sub/model.pt")
    save_file(
        dict(sd),
        str(runs / "exp2/weights.safetensors"),
        metadata={"ckptmigrate.revision": dcp_models.REV_V1},
    )
    names = sorted(sd)
    write_shards(
        runs / "exp3/sharded",
        [{k: sd[k] for k in names[:3]}, {k: sd[k] for k in names[3:]}],
        "safetensors",
    )
    save_v1(runs / "exp4/dcp")
    torch.save(stamp_state_dict(sd, dcp_models.REV_V1), runs / "exp2/head.pt")
    run("stamp", "runs/exp3/sharded", "runs/exp4/dcp", dcp_models.REV_V1)
    run("upgrade", "runs/exp2/head.pt")
    (runs / "exp1/notes.txt").write_text("not a checkpoint")
    shutil.copy(runs / "exp1/sub/model.pt", runs / ".cache/hidden.pt")
    return runs


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _rows(result: Any, prefix: str) -> dict[str, dict[str, Any]]:
    """A JSON report's rows by path, ``prefix`` cut off, without the time taken."""
    rows = json.loads(result.stdout)["checkpoints"]
    return {
        r["path"].removeprefix(prefix): {k: v for k, v in r.items() if k not in ("path", "seconds")}
        for r in rows
    }


EXPECTED_TREE = [
    "exp1/sub/model.pt",
    "exp2/head.pt",
    "exp2/weights.safetensors",
    "exp3/sharded",  # one checkpoint, not two shards
    "exp4/dcp",  # one checkpoint, not a pile of .distcp files
]


def test_current_over_a_tree_on_s3_says_which_are_behind(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _tiny_tree(tmp_path, monkeypatch, run)
    url = s3.put_folder("runs", runs)
    v1, v2 = dcp_models.REV_V1, dcp_models.REV_V2

    data = json.loads(run("current", url + "/", "--format", "json").stdout)
    rows = {r["path"]: r for r in data["checkpoints"]}
    assert list(rows) == [f"{url}/{name}" for name in EXPECTED_TREE]  # URLs, hidden ones left
    assert {p: (r["to"], r["steps"], r["status"]) for p, r in rows.items()} == {
        f"{url}/exp1/sub/model.pt": ([v1], 1, "behind"),
        f"{url}/exp2/head.pt": ([v2], 0, "at_head"),
        f"{url}/exp2/weights.safetensors": ([v1], 1, "behind"),
        f"{url}/exp3/sharded": ([v1], 1, "behind"),
        f"{url}/exp4/dcp": ([v1], 1, "behind"),
    }
    local = run("current", "runs", "--format", "json")
    assert _rows(local, "runs/") == _rows(run("current", url, "--format", "json"), url + "/")

    text = run("current", url).stdout.splitlines()
    assert text[1].split() == [f"{url}/exp1/sub/model.pt", v1, "1", "behind"]
    assert text[-1].startswith("5 checkpoints: 1 at head, 4 behind (by up to 1 step")

    def found(*args: str) -> list[str]:
        report = json.loads(run("current", *args, "--format", "json").stdout)
        return [r["path"].removeprefix(url + "/") for r in report["checkpoints"]]

    assert found(url, "--pattern", "*.pt") == ["exp1/sub/model.pt", "exp2/head.pt"]
    assert found(url, "--pattern", "exp2/*") == ["exp2/head.pt", "exp2/weights.safetensors"]
    assert found(f"{url}/*/*.pt", f"{url}/exp3/*") == ["exp2/head.pt", "exp3/sharded"]
    assert found(f"{url}/exp3/sharded/model-00001-of-00002.safetensors") == ["exp3/sharded"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # dcp.load without a process group
def test_a_tree_on_s3_upgrades_as_the_same_tree_on_disk(
    tmp_path: Path, s3: Bucket, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = _tiny_tree(tmp_path, monkeypatch, run)
    url = s3.put_folder("runs", runs)
    hidden = s3.get("runs/.cache/hidden.pt")

    remote = run("upgrade", url + "/", "-j", "2", "--format", "json")
    local = run("upgrade", "runs", "-j", "2", "--format", "json")
    rows = _rows(remote, url + "/")
    assert rows == _rows(local, "runs/")  # the same steps, statuses and sizes
    assert list(rows) == EXPECTED_TREE
    assert [r["status"] for r in rows.values()].count("upgraded") == 4
    assert rows["exp2/head.pt"]["status"] == "at_target"
    assert _folder_in(s3, "runs") == _tree(runs)  # every object the same bytes as on disk
    assert s3.get("runs/.cache/hidden.pt") == hidden
    assert s3.pending_uploads() == []
    upgraded = load_file(str(runs / "exp2/weights.safetensors"))
    assert upgraded["embed.weight"].shape == (dcp_models.NEW_VOCAB, dcp_models.DIM)
    assert "layers.0.q.weight" in upgraded and "block.qkv.weight" not in upgraded

    table = run("current", url).stdout.splitlines()
    assert table[-1].startswith("5 checkpoints: 5 at head")
