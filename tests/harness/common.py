"""What the tests and the harness programs share: revision files, small projects,
checkpoints, and comparing what was read back.

Imported both by the pytest tests and by the harness programs they start
(``python -m tests.harness.crash``, ``python -m tests.harness.fuzz``), so it
needs nothing from pytest.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

TMP_SUFFIX = ".ckptmigrate-tmp"

#: The lineage every harness uses: A (base) -> B, where B transforms tensors.
REV_A = "aaaa00000001"
REV_B = "bbbb00000002"


def revision_source(
    rev: str,
    down: object,
    up: str = "pass",
    down_body: str = "pass",
    *,
    doc: str | None = None,
    header: str = "",
) -> str:
    """A revision file's text: ``doc`` (default: the id) is its message, ``header``
    comes before its imports; the bodies are Python source, indented or not."""

    def body(code: str) -> str:
        return textwrap.indent(textwrap.dedent(code), "    ")

    return (
        f'"""{rev if doc is None else doc}"""\n{header}import torch\nfrom ckptmigrate import op\n\n'
        f"revision = {rev!r}\ndown_revision = {down!r}\nbranch_labels = None\n"
        f"depends_on = None\n\n\ndef upgrade() -> None:\n{body(up)}\n\n\n"
        f"def downgrade() -> None:\n{body(down_body)}\n"
    )


def write_revision(
    versions: Path, rev: str, down: object, up: str = "pass", down_body: str = "pass", **kw: Any
) -> Path:
    """``versions/<rev>.py`` (see :func:`revision_source`)."""
    versions.mkdir(parents=True, exist_ok=True)
    path = versions / f"{rev}.py"
    path.write_text(revision_source(rev, down, up, down_body, **kw), encoding="utf-8")
    return path


def write_project(root: Path, revisions: Sequence[tuple[str, str | None, str, str]]) -> Path:
    """``alembic_style.ini`` and ``migrations/versions/<rev>.py`` for each
    (revision, down_revision, upgrade body, downgrade body). Returns the ini path."""
    ini = root / "alembic_style.ini"
    ini.write_text("[ckptmigrate]\nscript_location = %(here)s/migrations\n", encoding="utf-8")
    (root / "migrations" / "versions").mkdir(parents=True, exist_ok=True)
    for rev, down, up, down_body in revisions:
        write_revision(
            root / "migrations" / "versions", rev, down, up, down_body, doc=f"step {rev}"
        )
    return ini


#: Revision B: a rename (bytes copied in the kernel), a scaled tensor, a
#: transposed one, a cast and a new tensor (all computed while writing).
UPGRADE_B = """\
    op.rename_key("w0", "renamed0")
    op.map_tensor("w1", lambda t: t * 2)
    op.transpose("w2", 0, 1)
    op.cast("w3", torch.float64)
    op.add_tensor("new", shape=(256, 256), init="normal", std=0.02)"""

DOWNGRADE_B = """\
    op.drop_key("new")
    op.cast("w3", torch.float32)
    op.transpose("w2", 0, 1)
    op.map_tensor("w1", lambda t: t / 2)
    op.rename_key("renamed0", "w0")"""


def standard_project(root: Path) -> Path:
    return write_project(
        root, [(REV_A, None, "    pass", "    pass"), (REV_B, REV_A, UPGRADE_B, DOWNGRADE_B)]
    )


def same(a: Any, b: Any) -> bool:
    """Bit-identical: tensors in shape, dtype and every value; dicts (in order) and
    sequences item by item; anything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bool(torch.equal(a, b))
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files ckptmigrate left in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX))


def tmp_files_of(folder: Path, pid: int) -> list[Path]:
    mark = f".{pid}@"
    return [p for p in folder.iterdir() if p.name.endswith(TMP_SUFFIX) and mark in p.name]


def cli_child(argv: list[str], done_fd: int = -1) -> None:
    """In a forked child: run the command line quietly, report when the work ended, exit."""
    import time

    from ckptmigrate.cli import main as cli_main

    quiet_fds()
    code = 1
    try:
        cli_main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        code = 99
    if done_fd >= 0:
        os.write(done_fd, repr(time.perf_counter()).encode())
    os._exit(code)


def quiet_fds() -> None:
    """Send this process's stdout/stderr to /dev/null (forked children)."""
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)


def stamp_state_dict(sd: Any, revision: str) -> Any:
    """Record ``revision`` in a state dict's ``_metadata``, as ckptmigrate does."""
    from collections import OrderedDict

    from ckptmigrate.formats.stamp import write_stamp

    meta = getattr(sd, "_metadata", None)
    if meta is None:
        meta = OrderedDict()
        sd._metadata = meta
    write_stamp(meta.setdefault("", {}), (revision,))
    return sd


def torch_zip_file(
    path: Path,
    pickle_bytes: bytes,
    storages: dict[str, bytes] | None = None,
    byteorder: str = "little",
) -> None:
    """A zip laid out as ``torch.save`` lays it out, with any ``data.pkl``."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pickle_bytes)
        zf.writestr("archive/byteorder", byteorder)
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")


def fork_cli(
    argv: Sequence[str],
    stderr: Path,
    *,
    before: Any = None,
    env: dict[str, str] | None = None,
) -> int:
    """Run the command line in a forked child (torch already imported): its exit status.

    ``stderr`` gets what the child writes there; ``before`` runs in the child
    first (e.g. to drop privileges), ``env`` is added to its environment.
    """
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            import sys

            fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 2)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 (pytest replaced them)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            os.environ.update(env or {})
            if before is not None:
                before()
            from ckptmigrate.cli import main

            try:
                main(list(argv))
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stderr.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def write_shards(folder: Path, parts: list[dict[str, torch.Tensor]], fmt: str) -> Path:
    """A sharded checkpoint in Hugging Face's layout (``fmt``: safetensors or torch) in
    ``folder``, one shard per dict of ``parts``; returns its index."""
    from safetensors.torch import save_file

    weight_map = {}
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    for i, part in enumerate(parts, start=1):
        name = f"{stem}-{i:05d}-of-{len(parts):05d}.{ext}"
        if fmt == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map.update((k, name) for k in part)
    index = folder / f"{stem}.{ext}.index.json"
    total = sum(v.numel() * v.element_size() for p in parts for v in p.values())
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return index
