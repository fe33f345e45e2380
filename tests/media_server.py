"""A loopback HTTP server standing in for a media host / Label Studio's file endpoints."""

from __future__ import annotations

import http.server
import threading
import time
from pathlib import Path


class MediaServer:
    """Serves files from a directory.

    - ``/data/upload/...`` and ``/storage-data/uploaded/?filepath=...`` need
      ``Authorization: Token <token>`` (like Label Studio); others are public.
    - ``/slow/...`` waits ``slow_seconds`` first.
    """

    def __init__(self, root: Path, token: str = "secret-token", slow_seconds: float = 3.0):
        self.root, self.token, self.slow_seconds = Path(root), token, slow_seconds
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                path = self.path
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
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
