"""`current` on a stamped file answers from its stamp, without importing torch.

The stamp sits in ``data.pkl`` (read with an inert, torch-free unpickler), a
safetensors header or a sharded index. Whatever that look cannot answer
plainly goes the ordinary way, so the output is exactly what opening the
file with torch prints: the tests compare the two on ordinary files, odd
ones and hundreds of damaged ones.
"""

from __future__ import annotations

import json
import pickle
import random
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from tests.harness.common import (
    REV_A,
    REV_B,
    stamp_state_dict,
    standard_project,
    torch_zip_file,
)
from tests.harness.fuzz import ZIP_DAMAGE, st_flips, st_lies, zip_cases

from ckptmigrate.cli import cli
from ckptmigrate.formats.stamp import FORMAT_KEY, REVISION_KEY, VERSION_KEY
from ckptmigrate.runtime import session

_SHOW_IMPORTS = """
import sys
from ckptmigrate.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("imported:", sorted(m for m in ("torch", "fsspec", "s3fs") if m in sys.modules),
      file=sys.stderr)
sys.exit(code)
"""


def _sd(seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((f"w{i}", torch.randn(16, 16, generator=g)) for i in range(4))


def _stamped(revision: str = REV_B) -> OrderedDict[str, torch.Tensor]:
    return stamp_state_dict(_sd(), revision)  # type: ignore[no-any-return]


def _in_process(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _process(root: Path, *args: str) -> tuple[int, str, list[str]]:
    """The command line as a real process: (exit code, stdout, stderr lines)."""
    proc = subprocess.run(
        [sys.executable, "-c", _SHOW_IMPORTS, *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stdout, proc.stderr.splitlines()


@pytest.fixture
def ini(tmp_path: Path) -> Path:
    return standard_project(tmp_path)


def _files(root: Path) -> dict[str, Path]:
    """Stamped checkpoints of every kind `current` can answer without torch."""
    files = {"plain": root / "plain.pt", "container": root / "train.ckpt"}
    torch.save(_stamped(), files["plain"])
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    torch.save(
        {"state_dict": _stamped(), "optimizer": opt.state_dict(), "epoch": 3}, files["container"]
    )
    wrapped = OrderedDict((f"module.{k}", v) for k, v in _sd().items())
    wrapped._metadata = OrderedDict({"module": {REVISION_KEY: REV_B}})  # type: ignore[attr-defined]
    files["wrapped"] = root / "ddp.pt"
    torch.save(wrapped, files["wrapped"])
    files["safetensors"] = root / "model.safetensors"
    save_file(dict(_sd()), files["safetensors"], metadata={REVISION_KEY: REV_A, FORMAT_KEY: "1.0"})
    folder = root / "sharded"
    folder.mkdir()
    save_file({"w0": _sd()["w0"]}, folder / "model-00001-of-00001.safetensors")
    index = {
        "metadata": {REVISION_KEY: REV_B},
        "weight_map": {"w0": "model-00001-of-00001.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    files["sharded"] = folder
    return files


def test_a_stamped_file_is_answered_without_importing_torch(ini: Path, tmp_path: Path) -> None:
    files = _files(tmp_path)
    expected = {
        "plain": f"{REV_B} (head)\n",
        "container": f"{REV_B} (head)\n",
        "wrapped": f"{REV_B} (head)\n",
        "safetensors": f"{REV_A}\n",
        "sharded": f"{REV_B} (head)\n",
    }
    for name, path in files.items():
        code, out, err = _process(tmp_path, "-c", str(ini), "current", str(path))
        assert (code, out) == (0, expected[name]), (name, err)
        assert err[-1] == "imported: []", (name, err)  # neither torch nor fsspec
    # the notes say how the file was read, as when it is opened with torch
    _, _, err = _process(tmp_path, "-c", str(ini), "current", str(files["container"]))
    assert err[0] == "Note: state dict found under 'state_dict'"
    _, _, err = _process(tmp_path, "-c", str(ini), "current", str(files["wrapped"]))
    assert err[0].startswith("Note: stripped wrapper prefix 'module.' (DataParallel")


def test_what_the_stamp_cannot_tell_is_read_with_torch(ini: Path, tmp_path: Path) -> None:
    """No stamp: the file's schema identifies it, which needs torch."""
    torch.save(_sd(), tmp_path / "unstamped.pt")
    code, _, err = _process(
        tmp_path, "-c", str(ini), "schema", "--record", "unstamped.pt", "--from", REV_A
    )
    assert code == 0, err
    code, out, err = _process(tmp_path, "-c", str(ini), "current", "unstamped.pt")
    assert (code, out) == (0, f"{REV_A} (identified by schema)\n"), err
    assert err[-1] == "imported: ['torch']", err


def _both_ways(
    monkeypatch: pytest.MonkeyPatch, *args: str, looked: list[bool] | None = None
) -> tuple[object, object]:
    """`current` as it answers, and with the torch-free look switched off.

    ``looked`` gets whether the look answered (rather than giving way to opening the file).
    """
    real = session.peeked

    def spy(*a: object, **k: object) -> object:
        found = real(*a, **k)  # type: ignore[arg-type]
        if looked is not None:
            looked.append(found is not None)
        return found

    monkeypatch.setattr(session, "peeked", spy)
    quick = _in_process(*args)
    monkeypatch.setattr(session, "peeked", real)
    with monkeypatch.context() as m:
        m.setattr(session, "peeked", lambda *a, **k: None)
        full = _in_process(*args)
    return quick, full


def _odd_files(root: Path) -> dict[str, list[str]]:
    """Files whose stamp look must give up or agree exactly: name -> extra arguments."""
    cases: dict[str, list[str]] = {}
    newer = _sd()
    newer._metadata = OrderedDict(
        {"": {REVISION_KEY: REV_B, VERSION_KEY: "9.0", FORMAT_KEY: "9.0"}}
    )  # type: ignore[attr-defined]
    torch.save(newer, root / "newer.pt")
    cases["newer.pt"] = []
    unknown = _sd()
    unknown._metadata = OrderedDict({"": {REVISION_KEY: "ffffffffffff"}})  # type: ignore[attr-defined]
    torch.save(unknown, root / "unknown.pt")
    cases["unknown.pt"] = []
    torch.save(_stamped(), root / "legacy.pt", _use_new_zipfile_serialization=False)
    cases["legacy.pt"] = []
    nested = {
        "model": stamp_state_dict(OrderedDict((f"enc.{k}", v) for k, v in _sd().items()), REV_A)
    }
    torch.save(nested, root / "nested.pt")
    cases["nested.pt"] = []
    sd = OrderedDict((f"enc.{k}", v) for k, v in _sd().items())
    sd._metadata = OrderedDict({"enc": {REVISION_KEY: REV_B}})  # type: ignore[attr-defined]
    torch.save({"model": sd}, root / "prefixed.pt")
    cases["prefixed.pt"] = ["--key-prefix", "enc."]
    cases["prefixed.pt "] = ["--key-prefix", "nothere."]
    cases["nested.pt "] = ["--state-dict-key", "model"]
    two = {"a": _stamped(), "b": _stamped()}
    torch.save(two, root / "two.pt")
    cases["two.pt"] = []
    cases["two.pt "] = ["--state-dict-key", "b"]
    torch.save(
        {"state_dict": _stamped(), "hp": __import__("argparse").Namespace(lr=1)}, root / "ns.pt"
    )
    cases["ns.pt"] = []
    payload = pickle.dumps(OrderedDict(x=__import__("os").getcwd))  # a global outside the list
    torch_zip_file(root / "evil.pt", payload)
    cases["evil.pt"] = []
    torch_zip_file(root / "big_endian.pt", pickle.dumps(_stamped_pickle()), byteorder="big")
    cases["big_endian.pt"] = []
    (root / "empty.pt").write_bytes(b"")
    cases["empty.pt"] = []
    return cases


def _stamped_pickle() -> object:
    return {"note": "not a state dict"}


def test_the_answer_is_what_opening_the_file_gives(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, path in _files(tmp_path).items():
        quick, full = _both_ways(monkeypatch, "-c", str(ini), "current", str(path))
        assert quick == full, name
        quick, full = _both_ways(monkeypatch, "-c", str(ini), "current", str(path), "-v")
        assert quick == full, name
    answered = []
    for name, extra in _odd_files(tmp_path).items():
        args = ["-c", str(ini), "current", name.strip(), *extra]
        looked: list[bool] = []
        quick, full = _both_ways(monkeypatch, *args, looked=looked)
        assert quick == full, (name, quick, full)
        if looked == [True]:
            answered.append(name)
    # the stamp was read without torch where it is plainly there; the rest were opened
    assert answered == ["unknown.pt", "nested.pt", "prefixed.pt", "nested.pt ", "two.pt "]


def test_damaged_files_get_the_same_answer(
    ini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Truncations, flipped bytes and lying headers: exactly the output of opening them."""
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    torch.save({"model": _stamped(REV_A), "optimizer": opt.state_dict()}, tmp_path / "base.pth")
    save_file(dict(_sd()), tmp_path / "base.safetensors", metadata={REVISION_KEY: REV_A})
    rng = random.Random(5)
    counts = dict.fromkeys(ZIP_DAMAGE, 12)
    cases = zip_cases("torch", (tmp_path / "base.pth").read_bytes(), rng, counts)
    st = (tmp_path / "base.safetensors").read_bytes()
    cases += st_lies(st, rng, 40)
    cases += st_flips(st, rng, {"safetensors length flip": 10, "truncate": 20})
    answered = 0
    for i, case in enumerate(cases):
        path = tmp_path / f"case{i}{'.safetensors' if case.base == 'safetensors' else '.pth'}"
        path.write_bytes(case.data)
        quick, full = _both_ways(monkeypatch, "-c", str(ini), "current", path.name)
        assert quick == full, (case.kind, case.detail)
        answered += quick[0] == 0  # type: ignore[index]
        path.unlink()
    assert answered  # some damage is in bytes a stamp does not need
