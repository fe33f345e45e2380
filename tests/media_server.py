"""A loopback HTTP server standing in for a media host / Label Studio's file endpoints."""

from __future__ import annotations

import contextlib
import http.server
import threading
import urllib.parse
import time
from pathlib import Path


class MediaServer:
    """Serves files from a directory.

    - ``/data/upload/...`` and ``/storage-data/uploaded/?filepath=...`` need
      ``Authorization: Token <token>`` (like Label Studio); others are public.
    - ``/slow/...`` waits ``slow_seconds`` first.
    - ``/redirect?to=URL`` answers 302 to ``URL``.
    - ``/huge`` announces a ``Content-Length`` of ``huge_bytes`` (and sends a little).
    - ``/endless`` sends a chunked body that never ends (until the client hangs up).
    """

    def __init__(self, root: Path, token: str = "secret-token", slow_seconds: float = 3.0,
                 huge_bytes: int = 200 * 1024 * 1024):
        self.root, self.token, self.slow_seconds, self.huge_bytes = Path(root), token, slow_seconds, huge_bytes
        self.endless_bytes = 0  # sent by /endless so far
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                path = self.path
                if path.startswith("/redirect?to="):
                    self.send_response(302)
                    self.send_header("Location", urllib.parse.unquote(path.split("to=", 1)[1]))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if path == "/huge":
                    self.send_response(200)
                    self.send_header("Content-Length", str(server.huge_bytes))
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        self.wfile.write(b"\0" * 65536)
                    return
                if path == "/endless":
                    return self._send_endless()
                if path.startswith("/slow/"):
                    time.sleep(server.slow_seconds)
                    path = path[len("/slow"):]
                if path.startswith("/storage-data/uploaded/?filepath="):
                    path = "/data/" + path.split("filepath=", 1)[1]
                if path.startswith("/data/"):
                    if self.headers.get("Authorization") != f"Token {server.token}":
                        return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
                    path = path[len("/data"):]
                file = server.root / path.lstrip("/")
                if not file.is_file():
                    return self._send(404, b"not found")
                self._send(200, file.read_bytes())

            def _send_endless(self):
                self.protocol_version = "HTTP/1.1"  # chunked needs it
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
                try:
                    while True:
                        self.wfile.write(chunk)
                        server.endless_bytes += 65536
                except OSError:  # the client stopped reading
                    self.close_connection = True

            def _send(self, status, body):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
