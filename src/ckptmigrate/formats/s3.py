"""S3 (and S3-compatible servers) through s3fs's client: atomic, conditional, multipart.

S3 has no rename, but an object appears only when its upload completes: a
``PutObject`` or a ``CompleteMultipartUpload``. So a new file is uploaded
straight under the target's name, part by part while it is written, and
becomes the checkpoint in that one request; a run that fails or is killed
leaves the old object (and at most an incomplete upload, which is never
visible, and which the next writer of the name aborts).

Writers are kept apart in two ways, both S3 conditional writes:

* a lock object beside the target (``.<name>.ckptmigrate-lock``), created
  with ``If-None-Match: *`` and held as a lease: its holder rewrites it
  every few seconds (``If-Match`` its own ETag), a waiter takes it over when
  its holder's process is gone (same host) or it went unrefreshed for
  :data:`LEASE` seconds, and deletes it only if it is unchanged
  (``DeleteObject`` with ``If-Match``);
* the commit itself is conditional on the version that was read
  (``If-Match: <ETag>``, or ``If-None-Match: *`` for a new name), and the
  ETag is compared once more just before, so a writer that does not take
  the lock (another tool) makes this run fail rather than lose its update.

Reads are ranged GETs with ``If-Match`` on the ETag first seen, so an object
replaced while it is read is an error, never a mix of two versions.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import CheckpointError, WriteError
from .remote import Store, Upload, error_code, explain

#: Size of each uploaded part; S3 wants at least 5 MiB (but for the last) and at most 10,000.
PART_SIZE = int(os.environ.get("CKPTMIGRATE_S3_PART_SIZE", 32 << 20))
#: Parts sent at once, so memory stays bounded by (this + 1) parts.
PARTS_IN_FLIGHT = 4
#: A lock not refreshed for this long (seconds) belongs to a writer that is gone.
LEASE = float(os.environ.get("CKPTMIGRATE_S3_LEASE", 60.0))
LOCK_SUFFIX = ".ckptmigrate-lock"
_TENSOR_FILES = (".safetensors", ".bin", ".pt", ".pth")
#: A folder's data files, by the name of the file its writers lock (DCP's ``.metadata``).
_FOLDER_DATA = {".metadata": (".distcp",)}


def _precondition_failed(exc: BaseException) -> bool:
    return error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict") or isinstance(
        exc, FileExistsError
    )


def _condition(expect: str | None) -> dict[str, str]:
    """Replace exactly the version read, or create only where nothing is."""
    return {"IfMatch": expect} if expect is not None else {"IfNoneMatch": "*"}


class S3Store(Store):
    """An S3 bucket, reached through the s3fs file system fsspec made for the URL."""

    def _call(self, method: str, **kwargs: Any) -> Any:
        return self.fs.call_s3(method, **kwargs)

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _version = self.fs.split_path(path)
        return bucket, key

    def _changed(self, path: str) -> WriteError:
        return WriteError(
            f"{self.url(path)} was replaced by another writer while this run worked; "
            "nothing was written",
            hint="run the command again on the new version",
        )

    def version_of(self, info: dict[str, Any]) -> str | None:
        etag = info.get("ETag")
        return str(etag) if etag is not None else None

    def read(self, path: str, start: int, end: int, version: str | None) -> bytes:
        from fsspec.asyn import sync

        bucket, key = self._split(path)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{end - 1}"}
        if version is not None:
            kwargs["IfMatch"] = version

        async def get() -> bytes:
            response = await self.fs._call_s3("get_object", **kwargs)
            body = response["Body"]
            try:
                data: bytes = await body.read()
            finally:
                body.close()
            return data

        try:
            return sync(self.fs.loop, get)  # type: ignore[no-any-return]
        except Exception as exc:
            if _precondition_failed(exc):
                raise CheckpointError(
                    f"{self.url(path)} was replaced while it was being read",
                    hint="run the command again; nothing was written",
                ) from None
            raise explain(self.url(path), exc) from exc

    def upload(self, path: str, shadow: Any, *, expect: str | None) -> Upload:
        return MultipartUpload(self, path, shadow, expect)

    def put(self, path: str, data: bytes, *, expect: str | None) -> None:
        bucket, key = self._split(path)
        try:
            self._call("put_object", Bucket=bucket, Key=key, Body=data, **_condition(expect))
        except Exception as exc:
            if _precondition_failed(exc):
                raise self._changed(path) from None
            raise explain(self.url(path), exc, "write") from exc
        finally:
            self.fs.invalidate_cache(path)

    def remove(self, path: str) -> None:
        bucket, key = self._split(path)
        try:
            self._call("delete_object", Bucket=bucket, Key=key)
        finally:
            self.fs.invalidate_cache(path)

    def makedirs(self, path: str) -> None:
        """Folders need not exist on S3 (the bucket must)."""

    # ------------------------------------------------------------------ stale uploads

    def pending_uploads(self, path: str) -> list[dict[str, Any]]:
        """Incomplete multipart uploads under ``path`` (a key, or a folder ending in ``/``)."""
        bucket, key = self._split(path)
        found: list[dict[str, Any]] = []
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key}
        while True:
            page = self._call("list_multipart_uploads", **kwargs)
            found.extend(page.get("Uploads", []))
            if not page.get("IsTruncated"):
                return found
            kwargs["KeyMarker"] = page.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = page.get("NextUploadIdMarker")

    def abort_uploads(self, path: str, keep: Callable[[str], bool]) -> int:
        """Abort the incomplete uploads of a checkpoint whose writer is gone (we hold its lock)."""
        bucket, _ = self._split(path)
        aborted = 0
        for upload in self.pending_uploads(path):
            if keep(upload["Key"]):
                continue
            with contextlib.suppress(Exception):
                self._call(
                    "abort_multipart_upload",
                    Bucket=bucket,
                    Key=upload["Key"],
                    UploadId=upload["UploadId"],
                )
                aborted += 1
        return aborted

    def _clean_after_lock(self, path: str) -> None:
        """Uploads killed writers of this checkpoint left: its key, a folder's data files
        (a sharded folder's shards, a DCP folder's ``.distcp`` files)."""
        bucket, key = self._split(path)
        self.abort_uploads(path, keep=lambda k: k != key)
        data = _FOLDER_DATA.get(posixpath.basename(key)) or (
            _TENSOR_FILES if key.endswith(".index.json") else None
        )
        if data is not None:
            folder = posixpath.dirname(key)
            prefix = f"{folder}/" if folder else ""
            suffixes = data

            def foreign(k: str) -> bool:
                rest = k[len(prefix) :]
                return "/" in rest or not rest.endswith(suffixes)

            self.abort_uploads(f"{bucket}/{prefix}", keep=foreign)

    # ------------------------------------------------------------------ the lock

    @contextlib.contextmanager
    def locked(
        self, path: str, notify: Callable[[str], None] | None = None, timeout: float = 600.0
    ) -> Iterator[None]:
        """Hold the lease lock of ``path``; then abort the uploads its killed writers left."""
        lock = _Lease(self, posixpath.join(*posixpath.split(path)[:-1], _lock_name(path)))
        lock.acquire(path, timeout, notify)
        try:
            self._clean_after_lock(path)
            yield
        finally:
            lock.release()


def _lock_name(path: str) -> str:
    return f".{posixpath.basename(path)}{LOCK_SUFFIX}"


class _Lease:
    """The lock object: created only where none is, refreshed while held, taken over when stale."""

    def __init__(self, store: S3Store, path: str) -> None:
        self.store = store
        self.path = path
        self.bucket, self.key = store._split(path)
        self.etag: str | None = None
        self.owner = {"host": socket.gethostname(), "pid": os.getpid()}
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({**self.owner, "at": time.time()}).encode()

    def _put(self, condition: dict[str, str]) -> str:
        response = self.store._call(
            "put_object", Bucket=self.bucket, Key=self.key, Body=self._body(), **condition
        )
        return str(response["ETag"])

    def _holder(self) -> tuple[str, dict[str, Any]] | None:
        """(ETag, content) of the lock there now; None when there is none."""
        try:
            response = self.store._call("head_object", Bucket=self.bucket, Key=self.key)
            data = self.store.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            owner = json.loads(data)
        except ValueError:
            owner = {}
        return str(response["ETag"]), owner if isinstance(owner, dict) else {}

    def acquire(self, target: str, timeout: float, notify: Callable[[str], None] | None) -> None:
        deadline = time.monotonic() + timeout
        seen: tuple[str, float] | None = None
        told = False
        while True:
            try:
                self.etag = self._put({"IfNoneMatch": "*"})
                break
            except Exception as exc:
                if not _precondition_failed(exc):
                    raise explain(self.store.url(target), exc, "write") from exc
            holder = self._holder()
            if holder is None:
                continue  # released meanwhile
            etag, owner = holder
            now = time.monotonic()
            if seen is None or seen[0] != etag:
                seen = (etag, now)
            if _gone(owner) or now - seen[1] > LEASE:
                self._take_over(etag)
                continue
            if now >= deadline:
                who = f" (host {owner.get('host')}, pid {owner.get('pid')})" if owner else ""
                raise WriteError(
                    f"{self.store.url(target)} is being written by another ckptmigrate "
                    f"process{who}",
                    hint="wait for it to finish and run the command again",
                )
            if not told and notify is not None:
                notify(
                    f"Waiting for another ckptmigrate process writing {self.store.url(target)} ..."
                )
                told = True
            time.sleep(0.2)
        self._refresher = threading.Thread(target=self._refresh, daemon=True)
        self._refresher.start()

    def _take_over(self, etag: str) -> None:
        """Remove a stale lock, unless it changed since it was judged stale.

        A store that refuses conditional deletes gets a plain one: two waiters
        may then both go ahead, and the conditional commit lets one of them write.
        """
        try:
            self.store._call("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except Exception as exc:
            if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                return  # refreshed or released meanwhile: look again
            with contextlib.suppress(Exception):
                self.store._call("delete_object", Bucket=self.bucket, Key=self.key)

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE / 4):
            try:
                assert self.etag is not None
                self.etag = self._put({"IfMatch": self.etag})
            except Exception:
                return  # lost: the conditional commit still guards the object

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        if self.etag is not None:
            with contextlib.suppress(Exception):
                self.store._call(
                    "delete_object", Bucket=self.bucket, Key=self.key, IfMatch=self.etag
                )


def _gone(owner: dict[str, Any]) -> bool:
    """The lock's holder ran on this host and its process no longer exists."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    pid = int(owner["pid"])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class MultipartUpload(Upload):
    """Parts sent while the file is written; the object appears on the conditional commit."""

    def __init__(self, store: S3Store, path: str, shadow: Any, expect: str | None) -> None:
        super().__init__(shadow)
        self.store = store
        self.path = path
        self.bucket, self.key = store._split(path)
        self.expect = expect
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Future[dict[str, Any]]] = []
        self.pool: ThreadPoolExecutor | None = None

    def send(self, data: bytes | bytearray | memoryview) -> None:
        self.buffer += data
        while len(self.buffer) >= PART_SIZE:
            part = bytes(self.buffer[:PART_SIZE])
            del self.buffer[:PART_SIZE]
            self._send_part(part)

    def _send_part(self, body: bytes) -> None:
        if self.upload_id is None:
            self._abort_stale()
            try:
                created = self.store._call(
                    "create_multipart_upload", Bucket=self.bucket, Key=self.key
                )
            except Exception as exc:
                raise explain(self.store.url(self.path), exc, "write") from exc
            self.upload_id = str(created["UploadId"])
            self.pool = ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT)
        in_flight = [f for f in self.parts if not f.done()]
        if len(in_flight) >= PARTS_IN_FLIGHT:
            in_flight[0].result()
        for done in (f for f in self.parts if f.done()):
            done.result()  # an error in an earlier part stops the upload now
        number = len(self.parts) + 1
        assert self.pool is not None
        self.parts.append(self.pool.submit(self._upload_part, number, body))

    def _upload_part(self, number: int, body: bytes) -> dict[str, Any]:
        try:
            response = self.store._call(
                "upload_part",
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=body,
            )
        except Exception as exc:
            raise explain(self.store.url(self.path), exc, "write") from exc
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _abort_stale(self) -> None:
        """Uploads to this name left by killed writers (the caller holds the lock)."""
        with contextlib.suppress(Exception):
            self.store.abort_uploads(self.path, keep=lambda k: k != self.key)

    def _check_unchanged(self) -> None:
        """The target is still the version read: the last check before the commit."""
        try:
            head = self.store._call("head_object", Bucket=self.bucket, Key=self.key)
            now: str | None = str(head["ETag"])
        except FileNotFoundError:
            now = None
        except Exception as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                now = None
            else:
                raise explain(self.store.url(self.path), exc, "write") from exc
        if now != self.expect:
            raise self.store._changed(self.path)

    def commit(self) -> None:
        try:
            if self.upload_id is None:  # smaller than one part: a single conditional PUT
                self._check_unchanged()
                self.store.put(self.path, bytes(self.buffer), expect=self.expect)
                return
            if self.buffer or not self.parts:
                self._send_part(bytes(self.buffer))
                self.buffer.clear()
            parts = [f.result() for f in self.parts]
            self._check_unchanged()
            try:
                self.store._call(
                    "complete_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                    MultipartUpload={"Parts": parts},
                    **_condition(self.expect),
                )
            except Exception as exc:
                if _precondition_failed(exc):
                    raise self.store._changed(self.path) from None
                raise explain(self.store.url(self.path), exc, "write") from exc
            self.upload_id = None
        finally:
            self._shutdown()
            self.store.fs.invalidate_cache(self.path)

    def abort(self) -> None:
        self._shutdown()
        if self.upload_id is not None:
            with contextlib.suppress(Exception):
                self.store._call(
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=self.key,
                    UploadId=self.upload_id,
                )
            self.upload_id = None

    def _shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
