"""A fault-injecting HTTP proxy for an S3 endpoint on loopback (standard library only).

Every request is forwarded to the upstream (moto) unchanged, except that, drawn from a seeded
generator at the configured rates, the proxy instead:

- ``error``: answers 500 InternalError or 503 SlowDown (S3's own error bodies) without
  forwarding;
- ``reset``: closes the connection without answering (a reset as the client sees it);
- ``stall``: waits ``stall_s`` before forwarding;
- ``truncate``: forwards, then sends the upstream's headers and only half its body, and closes
  (Content-Length says the whole: the client sees a short read);
- ``short``: forwards, then sends half the body under a Content-Length that matches the half (a
  lying server: nothing in HTTP tells the client).

``counts`` records what was done, by kind. Binds 127.0.0.1 only.
"""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

KINDS = ("error", "reset", "stall", "truncate", "short")
_ERRORS = ((500, "InternalError", "We encountered an internal error. Please try again."),
           (503, "SlowDown", "Please reduce your request rate."))
# Headers that describe one hop, not the message (RFC 9110 7.6.1), plus the length we set.
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te", "trailer",
        "content-length"}


@dataclass
class Faults:
    rates: dict[str, float]  # kind -> probability per request (their sum at most 1)
    seed: int = 0
    stall_s: float = 0.5
    methods: frozenset[str] = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})
    counts: Counter[str] = field(default_factory=Counter)
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        unknown = set(self.rates) - set(KINDS)
        if unknown or sum(self.rates.values()) > 1:
            raise ValueError(f"rates {self.rates}: kinds are {KINDS}, summing to at most 1")
        self._rng = random.Random(self.seed)

    def draw(self, method: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            u = self._rng.random()
            if method not in self.methods:
                return None
            for kind in KINDS:
                u -= self.rates.get(kind, 0.0)
                if u < 0:
                    self.counts[kind] += 1
                    return kind
            return None


class FaultProxy:
    """``with FaultProxy(upstream, Faults(...)) as url:`` — the proxy's endpoint URL."""

    def __init__(self, upstream: str, faults: Faults) -> None:
        up = urlsplit(upstream)
        assert up.hostname in ("127.0.0.1", "localhost"), "loopback only"
        self.faults = faults
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                kind = proxy.faults.draw(self.command)
                if kind == "reset":
                    self.close_connection = True
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                if kind == "error":
                    status, code, msg = _ERRORS[proxy.faults.counts["error"] % 2]
                    payload = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                               f"<Message>{msg}</Message></Error>").encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if kind == "stall":
                    time.sleep(proxy.faults.stall_s)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                try:
                    # Expect: 100-continue was answered here already (http.server does).
                    headers = {k: v for k, v in self.headers.items()
                               if k.lower() not in (_HOP - {"content-length"}) | {"expect"}}
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP]
                    head_length = resp.getheader("Content-Length", "0")
                    status = resp.status
                finally:
                    conn.close()
                cut = kind in ("truncate", "short") and self.command == "GET" and len(data) > 1
                sent = data[: len(data) // 2] if cut else data
                self.send_response(status)
                for k, v in out_headers:
                    self.send_header(k, v)
                if self.command == "HEAD":  # the object's length, no body
                    self.send_header("Content-Length", head_length)
                else:
                    self.send_header("Content-Length", str(len(sent) if kind == "short" else len(data)))
                if cut and kind == "truncate":
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(sent)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _relay

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                # A client that gave up on a stalled or cut answer: the fault working, not news.
                import sys

                if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
                    super().handle_error(request, client_address)  # type: ignore[arg-type]

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
