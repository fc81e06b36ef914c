"""Real servers on 127.0.0.1 for the remote-data tests and ``benchmarks/remote_data.py``.

- :class:`RangeHTTPServer`: serves a folder over HTTP/1.1 with ``Range`` requests (``http.server`` alone answers
  every request with the whole file) and folder listings; counts the requests it answered.
- :func:`moto_s3`: moto's S3 server (``python -m moto.server``, a real HTTP S3 API) in a subprocess on a free port,
  with the AWS environment variables that point boto at it (``AWS_ENDPOINT_URL``, dummy credentials).
- :class:`FaultProxy`: an HTTP proxy in front of either that answers a share of requests with 503, drops a share of
  connections without an answer, delays a share, and answers 503 to every request for chosen paths (a shard that
  stays unreachable); it counts what it did. Test code only: production code has no fault hooks.

Each runs until ``close()`` (or the end of its ``with`` block); a server thread is a daemon, the moto process is
terminated, so nothing outlives the test session.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["FaultProxy", "RangeHTTPServer", "free_port", "moto_s3", "s3_env", "upload_tree"]

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # a loader opens a batch's connections at once; socketserver's 5 drops SYNs (1 s stalls)


class _RangeHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers and aiohttp expect

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def send_head(self):  # noqa: ANN201 - http.server's own protocol
        self.server.count(self.command, self.path)  # type: ignore[attr-defined]
        path = self.translate_path(self.path)
        match = _RANGE.match(self.headers.get("Range", "").strip())
        if os.path.isdir(path) or match is None:
            return super().send_head()
        try:
            f = open(path, "rb")  # noqa: SIM115 - handed to copyfile, closed by http.server
        except OSError:
            self.send_error(404, "File not found")
            return None
        size = os.fstat(f.fileno()).st_size
        first, last = match.group(1), match.group(2)
        start = int(first) if first else max(0, size - int(last))
        end = min(size - 1, int(last)) if first and last else size - 1
        if start >= size or start > end:
            f.close()
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        self.send_response(206)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        f.seek(start)
        self._remaining = end - start + 1
        return f

    def copyfile(self, source, outputfile) -> None:  # noqa: ANN001
        remaining = getattr(self, "_remaining", None)
        if remaining is None:
            shutil.copyfileobj(source, outputfile)
            return
        while remaining > 0:
            chunk = source.read(min(remaining, 1 << 20))
            if not chunk:
                break
            outputfile.write(chunk)
            remaining -= len(chunk)
        self._remaining = None


class RangeHTTPServer:
    """``folder`` over HTTP on 127.0.0.1 (``url``), answering ``Range`` requests with 206 and exact bytes.

    ``ranges=False`` serves like ``http.server`` alone: the whole file for every request (a server that ignores
    ``Range``).
    """

    def __init__(self, folder: str | os.PathLike, ranges: bool = True, port: int = 0):
        folder = str(folder)
        base = _RangeHandler if ranges else SimpleHTTPRequestHandler

        class Handler(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=folder, **kwargs)

            def log_message(self, *args: object) -> None:
                pass

            if not ranges:

                def send_head(self):  # noqa: ANN202
                    self.server.count(self.command, self.path)
                    return super().send_head()

        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.server = _Server(("127.0.0.1", port), Handler)
        self.server.count = self._count  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _count(self, method: str, path: str) -> None:
        with self._lock:
            self.requests[method] += 1

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> RangeHTTPServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------- S3


def s3_env(endpoint: str) -> dict[str, str]:
    """AWS environment that points boto (and so s3fs) at ``endpoint`` with dummy credentials, as a user of an
    S3-compatible store sets it."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextlib.contextmanager
def moto_s3(port: int | None = None, procs: list[subprocess.Popen] | None = None) -> Iterator[str]:
    """moto's S3 server in a subprocess on 127.0.0.1; yields its endpoint URL (``procs`` gets the process)."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    if procs is not None:
        procs.append(proc)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port} (exit {proc.poll()})") from None
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def upload_tree(endpoint: str, local: str | os.PathLike, url: str) -> None:
    """Copies the local folder ``local`` to ``url`` (``s3://bucket/prefix``), creating the bucket if needed."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, key="testing", secret="testing")
    bucket = url.removeprefix("s3://").split("/")[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    root = Path(local)
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{url.rstrip('/')}/{path.relative_to(root).as_posix()}")


# ------------------------------------------------------------------------------------------------------- faults


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 (``url``) to ``upstream`` that injects faults by request number.

    Request ``n`` (1, 2, ... over all requests) is answered 503 when ``n % fail_every == 0``, dropped (the connection
    closed without an answer) when ``n % drop_every == 0``, and delayed by ``delay_s`` when ``n % delay_every == 0``;
    a request whose path contains one of ``unreachable`` is always answered 503. 0 turns a kind off. ``counts`` says
    how many of each it did (``forwarded``, ``failed``, ``dropped``, ``delayed``, ``unreachable``), ``ranged`` how
    many forwarded requests asked for a byte range.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fail_every: int = 0,
        drop_every: int = 0,
        delay_every: int = 0,
        delay_s: float = 0.2,
        unreachable: tuple[str, ...] = (),
    ):
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        self.upstream = (host, int(port))
        self.fail_every, self.drop_every, self.delay_every, self.delay_s = fail_every, drop_every, delay_every, delay_s
        self.unreachable = unreachable
        self.counts: Counter[str] = Counter()
        self._n = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def decide(self, path: str) -> str:
        """What to do with the next request: ``forward``, ``fail``, ``drop``, ``delay`` or ``unreachable``."""
        with self._lock:
            self._n += 1
            n = self._n
            if any(part in path for part in self.unreachable):
                what = "unreachable"
            elif self.fail_every and n % self.fail_every == 0:
                what = "fail"
            elif self.drop_every and n % self.drop_every == 0:
                what = "drop"
            elif self.delay_every and n % self.delay_every == 0:
                what = "delay"
            else:
                what = "forward"
            self.counts[what] += 1
        return what

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ProxyHandler(SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def log_message(self, *args: object) -> None:
        pass

    def _proxy(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        what = owner.decide(self.path)
        if what in ("fail", "unreachable"):
            payload = b"<Error><Code>ServiceUnavailable</Code><Message>injected</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        if what == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if what == "delay":
            time.sleep(owner.delay_s)
        if "Range" in self.headers:
            with owner._lock:
                owner.counts["ranged"] += 1
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        conn = http.client.HTTPConnection(*owner.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status, resp.reason)
        head = self.command == "HEAD"  # a HEAD answer has no body but says the object's length
        for k, v in resp.getheaders():
            if k.lower() not in _HOP_BY_HOP and (head or k.lower() != "content-length"):
                self.send_header(k, v)
        if not head:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _proxy


if __name__ == "__main__":  # `python tests/remote_servers.py http FOLDER PORT`: the range server in its own process
    kind, folder, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    assert kind == "http", "usage: remote_servers.py http FOLDER PORT"
    RangeHTTPServer(folder, port=port)
    while True:
        time.sleep(3600)
