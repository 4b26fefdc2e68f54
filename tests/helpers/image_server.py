"""A local HTTP image server on 127.0.0.1 for the image-URL tests: some paths serve images, some stall, some fail.

- ``/images/NAME``: the bytes registered under ``NAME`` (``200``);
- ``/stall/NAME``: waits ``stall_seconds`` before answering (longer than the client's timeout);
- ``/flaky/NAME``: ``503`` for the first ``flaky_failures`` requests of that path, then the image;
- anything else: ``404``.

Every request's path is recorded in ``requests`` (a list, in arrival order), so tests can count the attempts.
"""

import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Handler(BaseHTTPRequestHandler):
    server: "ImageServer"

    def do_GET(self):  # noqa: N802 (the http.server API)
        server = self.server
        with server.lock:
            server.requests.append(self.path)
            count = server.requests.count(self.path)
        kind, _, name = self.path.lstrip("/").partition("/")
        if kind == "stall":
            time.sleep(server.stall_seconds)
        if kind == "flaky" and count <= server.flaky_failures:
            self.send_error(503)
            return
        body = server.images.get(name) if kind in ("images", "stall", "flaky") else None
        if body is None:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            pass

    def log_message(self, format, *args):  # noqa: A002 (the http.server API): keep the test output quiet
        pass


class ImageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, images: dict[str, bytes], stall_seconds: float = 3.0, flaky_failures: int = 1):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.images, self.stall_seconds, self.flaky_failures = images, stall_seconds, flaky_failures
        self.requests: list[str] = []
        self.lock = threading.Lock()

    def url(self, kind: str, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{kind}/{name}"


@contextmanager
def image_server(images: dict[str, bytes], **options):
    """Serve ``images`` (name -> bytes) on a free loopback port in a background thread; yield the server."""
    server = ImageServer(images, **options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
