"""A ``torch.save`` file's stamp without importing torch.

The stamp sits in ``data.pkl``: in the state dict's ``_metadata``, a plain
``OrderedDict`` attribute pickled with it. Reading it needs the zip's
directory and that one record (by ranges on a store, so a 1 GB file costs a
few kilobytes), and an unpickler that knows tensors only as descriptions
(:func:`.unpickle.inert`). Whatever that cannot read plainly (a pickle that
needs other globals, another byte order, the legacy format, a damaged file)
is left to the ordinary reader, which imports torch and says what is wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from . import keyspace
from .checkpoint import Header
from .container import locate_state_dict, wrapper_prefix
from .storage import open_blob
from .unpickle import inert
from .zip64 import BadZip, ZipReader

if TYPE_CHECKING:
    from .storage import CkptPath


def pickle_record(names: Iterable[str], where: object) -> str:
    """The one ``<prefix>/data.pkl`` record of a torch file."""
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise CheckpointError(
            f"{where} is not a readable PyTorch checkpoint (no data.pkl record)",
            hint="the file may be truncated or damaged; check it was copied completely",
        )
    return pkl[0]


def peek_torch(path: CkptPath, state_dict_key: str | None) -> Header | None:
    """The keys and per-module metadata of a torch zip file, or None to open it with torch.

    A file in the legacy format is no zip, and so also None: torch.load reads it.
    """
    blob = open_blob(path)
    try:
        # A local file's every record header is checked, as opening it checks them.
        reader = ZipReader.open(blob, check_all=isinstance(path, Path))
        pkl = pickle_record(list(reader.infos), path)
        prefix = pkl[: -len("data.pkl")]
        reader.prefetch([pkl, prefix + "byteorder"])
        order = prefix + "byteorder"
        if order in reader.infos and reader.read(order).decode("ascii", "replace") != sys.byteorder:
            return None

        def record_size(key: str) -> int | None:
            info = reader.infos.get(f"{prefix}data/{key}")
            return info.file_size if info is not None else None

        obj = inert(reader.read(pkl), record_size)
        state_path, sd = locate_state_dict(obj, state_dict_key, str(path))
    except (BadZip, CheckpointError):
        return None
    except Exception:  # a pickle inert() does not read plainly, or a damaged one
        return None
    finally:
        blob.close()
    wrapper = wrapper_prefix(list(sd))
    keys = tuple(k[len(wrapper) :] for k in sd)
    metadata = keyspace.metadata_under(getattr(sd, "_metadata", None), wrapper)
    return Header(path, keys, metadata, state_path or None, wrapper)
