"""What a checkpoint's pickle may do when it is loaded: the safety policy in one place.

Checkpoints are untrusted. By default a pickle is loaded under PyTorch's
weights-only allow-list (tensors and plain containers, nothing that runs
code): first by the C unpickler restricted to what ``torch.save`` writes for
dense tensors (:func:`_weights_only_fast`, about four times faster), and
whenever that declines, by PyTorch's own weights-only unpickler, whose
answer (or refusal) is then the one given. ``trust_pickle`` allows any
global (the user vouched for the file); ``opaque`` reads the structure of
a pickle this process wrote from a trusted input without running anything
in it (each unknown class becomes an inert stand-in). A refusal is
reported as :class:`UnsafeCheckpointError` naming the global the pickle
asked for, as Python 3 spells it.

:func:`inert` reads a pickle without torch at all, for a stamp: containers,
and tensors as mere descriptions; anything more, and the file is opened the
ordinary way.

Importing this module does not import torch; the unpicklers do when used.
"""

from __future__ import annotations

import _compat_pickle
import functools
import io
import pickle
import re
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..errors import UnsafeCheckpointError

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING"}
# What the weights-only unpickler says when a pickle asks for code (as
# opposed to bytes that are not a pickle at all).
_UNSAFE_MARKERS = ("Unsupported global", "GLOBAL ", "unrecognized function", "Unsupported class")
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    allowed: dict[str, Any] = getattr(_weights_only_unpickler, "_get_allowed_globals", dict)()
    return allowed


def unpickle(
    data: bytes,
    persistent_load: Callable[[Any], Any],
    *,
    trust_pickle: bool = False,
    opaque: bool = False,
) -> Any:
    """Load ``data`` under the policy; a refusal names the global the pickle asked for."""
    if trust_pickle:
        unpickler: Any = _TrustedUnpickler(io.BytesIO(data), encoding="utf-8")
    elif opaque:
        unpickler = _OpaqueUnpickler(io.BytesIO(data), encoding="utf-8")
    else:
        fast = _weights_only_fast(data, persistent_load)
        if fast is not _DECLINED:
            return fast
        from torch import _weights_only_unpickler

        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": errors say enough
            warnings.simplefilter("ignore")
            return unpickler.load()
    except pickle.UnpicklingError as exc:
        # The weights-only unpickler knows GLOBAL only; a pickle importing
        # code another way (STACK_GLOBAL, INST, OBJ: protocol 4, hand-made)
        # fails as an "unsupported operand". Name what it asked for.
        name = None if trust_pickle else disallowed_global(data)
        if name is not None and "GLOBAL" not in str(exc):
            raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {name}") from exc
        raise


def disallowed_global(data: bytes) -> str | None:
    """The first global a pickle imports that PyTorch's weights-only load refuses.

    Found by parsing the opcodes (nothing is executed); None when there is no
    such import or the bytes stop parsing first.
    """
    import pickletools

    allowed = _allowed_globals()
    strings: list[str] = []
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = None
            if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                name = ".".join(arg.split(" ", 1))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                name = f"{strings[-2]}.{strings[-1]}"
            elif op.name in _STRING_OPS and isinstance(arg, (str, bytes)):
                strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            if name is not None and name not in allowed:
                return name
    except Exception:  # not parseable further: what was found so far is all there is
        return None
    return None


def refusal(exc: pickle.UnpicklingError, where: str) -> UnsafeCheckpointError | None:
    """The error to report when ``exc`` is the policy refusing code (None: a damaged pickle)."""
    text = str(exc)
    if not any(marker in text for marker in _UNSAFE_MARKERS):
        return None
    name = _unsafe_global(text)
    what = f"the global {name}" if name else "objects outside the weights-only allow-list"
    return UnsafeCheckpointError(
        f"refusing to load {where}: its pickle needs {what}, which could run arbitrary code",
        hint="if you trust the file's origin, pass --trust-pickle",
    )


def _unsafe_global(message: str) -> str | None:
    """The global a refused pickle asked for, as Python 3 would resolve it.

    PyTorch names builtins without their module (``GLOBAL eval``), and a
    protocol-2 pickle spells some modules the Python 2 way (``commands.Popen``
    is what ``subprocess.Popen`` becomes), so both are mapped back.
    """
    match = _GLOBAL.search(message)
    if match is None:
        return None
    module, _, name = match.group(1).rpartition(".")
    if not module:
        return f"builtins.{name}"
    module, name = _python3(module, name)
    return f"{module}.{name}"


def _python3(module: str, name: str) -> tuple[str, str]:
    """A global as Python 3 spells it (protocol 2 pickles may use Python 2's names),
    mapped as ``pickle.Unpickler`` maps it."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


class _TrustedUnpickler(pickle.Unpickler):
    """Any global (only with --trust-pickle); PyTorch's old module path mapped."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.tensor":
            module = "torch._tensor"
        return super().find_class(module, name)


class _Opaque(dict[Any, Any]):
    """An inert stand-in for an object whose class is outside the allow-list.

    A dict, so that a dict subclass's items (a training container of a custom
    class) stay visible; list items and attribute state are kept aside.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _OpaqueUnpickler(pickle.Unpickler):
    """Allow-listed globals as themselves, every other one as :class:`_Opaque`."""

    def find_class(self, module: str, name: str) -> Any:
        module, name = _python3(module, name)
        full = f"{module}.{name}"
        if full == _REBUILD_V2:
            return _rebuild_tensor_v2
        found = _allowed_globals().get(full)
        return found if found is not None else _Opaque


_REBUILD_V2 = "torch._utils._rebuild_tensor_v2"


def _rebuild_tensor_v2(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    metadata: Any = None,
) -> Any:
    """``torch._utils._rebuild_tensor_v2`` for a plain CPU storage, a third of its cost.

    PyTorch's also restores a fake-tensor mode (there is none here) and is
    called once per tensor per read; anything but a plain storage, or tensor
    metadata, goes to PyTorch's own function.
    """
    import torch

    untyped = getattr(storage, "_untyped_storage", None)
    if metadata or type(storage) is not torch.storage.TypedStorage or untyped is None:
        return torch._utils._rebuild_tensor_v2(  # type: ignore[no-untyped-call]
            storage, offset, size, stride, requires_grad, backward_hooks, metadata
        )
    tensor = torch.empty((0,), dtype=storage.dtype, device=untyped.device)
    tensor.set_(untyped, offset, size, stride)
    if requires_grad:
        tensor.requires_grad = True
    tensor._backward_hooks = backward_hooks
    return tensor


# --------------------------------------------------------------------------- the fast path


class _CallOnly:
    """An allow-listed function or class as the fast path hands it out: callable, nothing more.

    The C unpickler would apply ``BUILD`` to whatever is on its stack, a global
    included (setting attributes on ``torch.Tensor`` itself, say); this
    stand-in refuses that. One left inside the result means the pickle stored
    a global as a value, which PyTorch's unpickler then answers for.
    """

    __slots__ = ("__weakref__", "_fn")

    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a pickle may call an allowed global, not change it")


#: What ``torch.save`` pickles for dense tensors, parameters and plain
#: containers; every other global (sparse, quantized, subclasses, globals a
#: user allowed) is left to PyTorch's unpickler.
_FAST_CALLABLES = (
    "collections.OrderedDict",
    "collections.Counter",
    "torch._utils._rebuild_tensor_v2",
    "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state",
    "torch.Size",
    "torch.device",
    "_codecs.encode",
    "builtins.bytearray",
    "builtins.set",
    "builtins.complex",
)
_DECLINED = object()


@functools.cache
def _marker() -> type[Any]:
    import torch

    class _StorageMarker(torch.serialization.StorageType):
        """``torch.FloatStorage`` and friends, as PyTorch's unpickler has them; never changed."""

        def __setstate__(self, state: Any) -> None:
            raise pickle.UnpicklingError("a pickle may name a storage type, not change it")

    return _StorageMarker


class _Declined(Exception):
    """The fast path leaves this pickle to PyTorch's unpickler."""


def _weights_only_fast(data: bytes, persistent_load: Callable[[Any], Any]) -> Any:
    """``data`` under the weights-only allow-list by the C unpickler, or ``_DECLINED``.

    Hands out only dtypes, fresh storage-type markers and :class:`_CallOnly`
    stand-ins; any error, a global outside :data:`_FAST_CALLABLES`, an
    opcode needing a real class (``NEWOBJ``), or a stand-in kept in the result
    declines, and PyTorch's unpickler reads the pickle from the start.
    """
    import torch

    allowed = _allowed_globals()
    handed: list[weakref.ref[_CallOnly]] = []
    marker = _marker()

    class _Fast(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            module, name = _python3(module, name)
            full = f"{module}.{name}"
            found = allowed.get(full)
            if isinstance(found, torch.dtype):
                return found  # immutable, and not callable
            if isinstance(found, torch.serialization.StorageType):
                return marker(name)  # this load's own
            if found is None or full not in _FAST_CALLABLES:
                raise _Declined
            stand_in = _CallOnly(_rebuild_tensor_v2 if full == _REBUILD_V2 else found)
            handed.append(weakref.ref(stand_in))
            return stand_in

    unpickler = _Fast(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    try:
        result = unpickler.load()
    except Exception:  # declined, damaged or refused: PyTorch's unpickler says which
        return _DECLINED
    finally:
        del unpickler  # its memo holds what it handed out
    if any(ref() is not None for ref in handed):
        return _DECLINED
    return result


# --------------------------------------------------------------------------- without torch


class InertStorage:
    """A storage a pickle refers to: which record, how many bytes. Nothing is read."""

    def __init__(self, key: str, nbytes: int) -> None:
        self.key = key
        self.nbytes = nbytes


class InertTensor:
    """A tensor as a pickle describes it (its storage and shape), without torch."""

    def __init__(self, storage: Any, shape: Any) -> None:
        self.storage = storage
        self.shape = tuple(shape) if isinstance(shape, (tuple, list)) else ()


class _StorageType:
    """``torch.FloatStorage`` and friends: only their element size is needed."""

    def __init__(self, itemsize: int) -> None:
        self.itemsize = itemsize


_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16, "UntypedStorage": 1,
}  # fmt: skip
_STORAGE_TYPES = {name: _StorageType(size) for name, size in _ITEMSIZE.items()}


def _rebuild_tensor(storage: Any, offset: Any, size: Any, *_rest: Any) -> InertTensor:
    return InertTensor(storage, size)


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    return data


_REBUILD = {
    "_rebuild_tensor_v2": _rebuild_tensor,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter,
}


class _InertUnpickler(pickle.Unpickler):
    """Plain containers and tensor *descriptions*; any other global stops the read.

    Every global it hands out is one of the inert stand-ins above (or
    ``OrderedDict``), all on PyTorch's weights-only allow-list, so a pickle
    this reads is one ``torch.load(weights_only=True)`` reads as well.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in _REBUILD:
            return _REBUILD[name]
        if module == "torch" and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise pickle.UnpicklingError(f"{module}.{name} is more than a stamp needs")


def inert(data: bytes, record_size: Callable[[str], int | None]) -> Any:
    """``data`` unpickled without torch and without running anything from it.

    Tensors come out as :class:`InertTensor`; each storage must have a record
    (``record_size(key)``, None when missing) at least as long as it says.
    Raises :class:`pickle.UnpicklingError` (or another error of a damaged
    pickle) for anything else: the caller then opens the file with torch.
    """

    def persistent_load(saved_id: Any) -> InertStorage:
        if not isinstance(saved_id, tuple) or len(saved_id) != 5 or saved_id[0] != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {saved_id!r}")
        _, kind, key, _location, numel = saved_id
        size = record_size(str(key))
        if not isinstance(kind, _StorageType) or not isinstance(numel, int) or size is None:
            raise pickle.UnpicklingError(f"storage {key!r} is missing")
        nbytes = numel * kind.itemsize
        if not 0 <= nbytes <= size:
            raise pickle.UnpicklingError(f"storage {key!r} is too short")
        return InertStorage(str(key), nbytes)

    unpickler = _InertUnpickler(io.BytesIO(data), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]
    return unpickler.load()
