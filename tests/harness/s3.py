"""A real S3-compatible server on localhost (moto in server mode), counting what it serves.

The tests and the transfer benchmark talk to it over HTTP exactly as to S3:
``ckptmigrate`` reaches it through fsspec/s3fs with ``AWS_ENDPOINT_URL``.
Every request is recorded (method, key, query, status, response bytes), so a
test can say how many bytes ``current`` fetched, or act when the Nth part of
an upload arrives, without any timing guess.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server


@dataclass
class Request:
    method: str
    key: str  # "bucket/key"
    query: dict[str, list[str]]
    status: int = 0
    sent: int = 0  # response body bytes

    @property
    def is_part(self) -> bool:
        return self.method == "PUT" and "partNumber" in self.query


class _Quiet(MotoRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


#: Called with every request before the server sees it; True drops the request (the
#: server answers 503 and does nothing), as if its sender had died before sending it.
Hook = Callable[[Request], "bool | None"]


class S3Server:
    """moto's S3 on 127.0.0.1 (a free port) in a thread of this process."""

    def __init__(self) -> None:
        self.app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[Request] = []
        self.lock = threading.Condition()
        self.hooks: list[Hook] = []
        self.server = make_server(
            "127.0.0.1", 0, self._counting, threaded=True, request_handler=_Quiet
        )
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this server as its S3."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def _counting(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        path = unquote(environ.get("PATH_INFO", "")).lstrip("/")
        request = Request(
            environ["REQUEST_METHOD"], path, parse_qs(environ.get("QUERY_STRING", ""))
        )
        dropped = False
        for hook in list(self.hooks):
            dropped = bool(hook(request)) or dropped

        def start(status: str, headers: Any, *args: Any) -> Any:
            request.status = int(status.split()[0])
            return start_response(status, headers, *args)

        if dropped:
            start("503 Service Unavailable", [("Content-Length", "0")])
            body: Iterable[bytes] = []
        else:
            body = self.app(environ, start)
        try:
            for chunk in body:
                request.sent += len(chunk)
                yield chunk
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()
            with self.lock:
                self.requests.append(request)
                self.lock.notify_all()

    def mark(self) -> int:
        """A point in the request log: :meth:`since` counts from here."""
        with self.lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Request]:
        with self.lock:
            return list(self.requests[mark:])

    def bytes_sent(self, mark: int) -> int:
        return sum(r.sent for r in self.since(mark))

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()
