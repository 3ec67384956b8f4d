"""A real HTTP(S) server on loopback that serves videos for ingest tests, with the misbehaviour a
source can show: redirects (chains, to other schemes or hosts), error statuses, a stalled body, a
Content-Length over the limit, a web page instead of a video."""

from __future__ import annotations

import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit


class MediaServer:
    """``/files/NAME`` serves ``files[NAME]`` (bytes, or a Path read as it is sent); see
    :meth:`_Handler.do_GET` for the other routes.
    With ``cert``/``key`` it speaks HTTPS. ``requests`` counts the GETs it answered."""

    def __init__(self, *, cert: Path | None = None, key: Path | None = None) -> None:
        self.files: dict[str, bytes | Path] = {}
        self.requests = 0
        self.hosts: list[str] = []
        server = self

        class Handler(_Handler):
            media = server

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        if cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(cert), str(key))
            self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str, host: str = "localhost") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def __enter__(self) -> "MediaServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    media: MediaServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.media.requests += 1
        self.media.hosts.append(self.headers.get("Host", ""))
        parts = urlsplit(self.path)
        route, _, rest = parts.path.lstrip("/").partition("/")
        if route == "files" and rest in self.media.files:
            body = self.media.files[rest]
            return self._send_file(body) if isinstance(body, Path) else self._send(200, body)
        if route == "redirect":  # /redirect/N/NAME: N hops, then /files/NAME
            hops, _, name = rest.partition("/")
            target = f"/files/{name}" if int(hops) <= 1 else f"/redirect/{int(hops) - 1}/{name}"
            return self._send(302, b"", location=target)
        if route == "to":  # /to?url=U: one redirect to anywhere
            return self._send(302, b"", location=parse_qs(parts.query)["url"][0])
        if route == "status":
            return self._send(int(rest), b"no")
        if route == "page":
            return self._send(200, b"<!doctype html><html><body>" + b"hello " * 2000 + b"</body></html>",
                              content_type="text/html")
        if route == "huge":  # says it is 1 TB; sends a little
            return self._send(200, b"x" * 1000, length=10**12)
        if route == "stall":  # /stall/NAME: half the file, then nothing
            data = self.media.files[rest]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            time.sleep(30)
            return None
        return self._send(404, b"not here")

    def _send_file(self, path: Path) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "video/mp4")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        try:
            with open(path, "rb") as f:
                while block := f.read(1024 * 1024):
                    self.wfile.write(block)
        except OSError:
            pass

    def _send(self, code: int, body: bytes, *, location: str = "", content_type: str = "video/mp4",
              length: int | None = None) -> None:
        self.send_response(code)
        if location:
            self.send_header("Location", location)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass
