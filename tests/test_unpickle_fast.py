"""The weights-only fast path: what PyTorch's unpickler gives, or it steps aside for it.

Every pickle here is unpickled by ``unpickle.unpickle`` (fast path first) and
by ``torch.load(weights_only=True)``; they must agree, in the object or in
the refusal, and no allow-listed global may be changed by a pickle.
"""

from __future__ import annotations

import collections
import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptmigrate.formats import torch_save, unpickle


def _saved(obj: object, tmp_path: Path) -> tuple[bytes, Path]:
    """``obj`` as ``torch.save`` writes it, and its ``data.pkl``."""
    path = tmp_path / "obj.pt"
    torch.save(obj, path)
    import zipfile

    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("data.pkl"))
        return zf.read(name), path


def _no_storage(saved_id: Any) -> Any:
    raise pickle.UnpicklingError("no storages in this pickle")


def test_a_training_checkpoint_reads_as_torch_load_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    sd = model.state_dict()
    obj = {
        "state_dict": sd,
        "param": torch.nn.Parameter(torch.arange(6.0).reshape(2, 3)),
        "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
        "view": torch.arange(10.0)[2:7],
        "half": torch.ones(3, dtype=torch.float16),
        "epoch": 3,
        "names": {"a", "b"},
        "blob": b"\x00\x01",
        "buf": bytearray(b"xy"),
        "z": complex(1, 2),
        "shape": torch.Size([2, 3]),
        "device": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "counts": collections.Counter("aab"),
    }
    _data, path = _saved(obj, tmp_path)
    want = torch.load(path, weights_only=True)

    def not_needed(*args: object, **kwargs: object) -> None:
        raise AssertionError("the fast path declined a plain training checkpoint")

    monkeypatch.setattr(torch._weights_only_unpickler, "Unpickler", not_needed)
    got, _source = torch_save.load(path)
    assert set(got) == set(want)
    for key in ("param", "frozen", "view", "half"):
        assert type(got[key]) is type(want[key])
        assert torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype
        assert got[key].requires_grad == want[key].requires_grad
        assert (got[key].stride(), got[key].storage_offset()) == (
            want[key].stride(),
            want[key].storage_offset(),
        )
    assert list(got["state_dict"]) == list(sd)
    assert all(torch.equal(got["state_dict"][k], v) for k, v in sd.items())
    assert got["state_dict"]._metadata == sd._metadata  # type: ignore[attr-defined]
    for key in ("epoch", "names", "blob", "buf", "z", "shape", "device", "dtype", "counts"):
        assert got[key] == want[key] and type(got[key]) is type(want[key])


def _build_on_global(module: str, name: str) -> bytes:
    """A pickle that sets an attribute ``pwned`` on a global (BUILD with slot state)."""
    return (
        b"\x80\x02c" + f"{module}\n{name}\n".encode()
        + b"N}X\x05\x00\x00\x00pwnedK\x01s\x86b."
    )  # fmt: skip


@pytest.mark.parametrize(
    ("module", "name", "target"),
    [
        ("torch._utils", "_rebuild_tensor_v2", lambda: torch._utils._rebuild_tensor_v2),
        ("collections", "Counter", lambda: collections.Counter),
        ("collections", "OrderedDict", lambda: OrderedDict),
        ("torch", "FloatStorage", lambda: unpickle._allowed_globals()["torch.FloatStorage"]),
    ],
)
def test_a_pickle_cannot_change_an_allowed_global(module: str, name: str, target: Any) -> None:
    data = _build_on_global(module, name)
    with pytest.raises(Exception):  # noqa: B017 - PyTorch's refusal, whatever its type
        torch.load(io.BytesIO(_as_zip(data)), weights_only=True)
    with pytest.raises(pickle.UnpicklingError):
        unpickle.unpickle(data, _no_storage)
    assert not hasattr(target(), "pwned")


def _as_zip(data: bytes) -> bytes:
    """A torch file whose ``data.pkl`` is ``data``."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    return buf.getvalue()


def test_a_global_kept_as_a_value_comes_out_as_itself() -> None:
    data = pickle.dumps({"kind": torch.Size, "rebuild": torch._utils._rebuild_tensor_v2}, 2)
    got = unpickle.unpickle(data, _no_storage)
    assert got == {"kind": torch.Size, "rebuild": torch._utils._rebuild_tensor_v2}
    assert got["kind"] is torch.Size


def test_a_global_outside_the_allow_list_is_refused_by_name() -> None:
    data = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R."
    with pytest.raises(pickle.UnpicklingError, match=r"GLOBAL os\.system|posix\.system"):
        unpickle.unpickle(data, _no_storage)


def test_newobj_needs_a_real_class_and_reads_as_pytorch_reads_it() -> None:
    # NEWOBJ on an allowed class: the fast path declines, PyTorch's unpickler decides
    data = b"\x80\x02ccollections\nOrderedDict\n)\x81."
    assert unpickle.unpickle(data, _no_storage) == OrderedDict()


def test_a_damaged_pickle_gets_pytorchs_answer() -> None:
    data = pickle.dumps({"a": 1}, 2)[:-3]
    with pytest.raises(Exception) as fast:
        unpickle.unpickle(data, _no_storage)
    from torch import _weights_only_unpickler

    with pytest.raises(type(fast.value)):
        _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8").load()
