"""The local web page for the human-review pass (stdlib HTTP only).

Routes: ``GET /`` (the page), ``GET /api/items`` (items, their decisions and the summary),
``POST /api/decision`` with ``{"id": ..., "decision": ...}`` (answers ``{id, decision, summary}``;
an unknown id or decision is a 400).

Access: bound to a loopback address, the server answers requests whose ``Host`` is a loopback
name (a guard against DNS rebinding). Bound to any other address, every request needs
``?token=...``, a random token made at start, printed in the URL and never written to disk; a
request without it gets 403. A POST must be ``Content-Type: application/json``, which a
cross-site form cannot send. Model text travels as JSON with ``<``, ``>`` and ``&`` escaped and
the page only ever sets it as text, never as HTML.

Example::

    server = make_review_server("runs/quick", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.url  # "http://127.0.0.1:54321/"
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, urlsplit

from torsion.errors import TorsionError
from torsion.review.decisions import CLEAR, REVIEW_FILE, read_decisions, record_decision, review_set, summarize

logger = logging.getLogger(__name__)

DEFAULT_PORT = 8765
MAX_BODY_BYTES = 64 * 1024
NONCE_PLACEHOLDER = "__CSP_NONCE__"
LOOPBACK_NAMES = ("localhost",)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def json_bytes(body: Any) -> bytes:
    """JSON with ``<``, ``>`` and ``&`` escaped, so no byte of it can open a tag if sniffed as HTML."""
    text = json.dumps(body, ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("utf-8")


class ReviewServer(ThreadingHTTPServer):
    """A bound review server for one run directory. ``token`` is None on a loopback address."""

    daemon_threads = True

    def __init__(self, run_dir: Path | str, address: tuple[str, int]) -> None:
        self.run_dir = Path(run_dir)
        self.reviewed_set = review_set(self.run_dir)
        read_decisions(self.run_dir)  # a malformed review.jsonl fails now, not on the first request
        self.page = files("torsion.review").joinpath("page.html").read_text(encoding="utf-8")
        self._lock = threading.Lock()
        super().__init__(address, _Handler)
        self.token = None if _is_loopback(self.server_address[0]) else secrets.token_urlsafe(24)

    @property
    def url(self) -> str:
        """The page's URL, with ``?token=...`` when one is needed."""
        host, port = self.server_address[:2]
        shown = socket.gethostname() if host == "0.0.0.0" else host
        return f"http://{shown}:{port}/" + (f"?token={self.token}" if self.token else "")

    def summary(self) -> dict[str, Any]:
        with self._lock:
            return summarize(self.reviewed_set, read_decisions(self.run_dir))

    def items(self) -> dict[str, Any]:
        """Every item with its current decision (None when pending), and the summary."""
        with self._lock:
            decisions = read_decisions(self.run_dir)
            return {"run": self.run_dir.resolve().name,
                    "items": [{**item.to_dict(), "decision": decisions.get(item.id)}
                              for item in self.reviewed_set.items],
                    "summary": summarize(self.reviewed_set, decisions)}

    def decide(self, item_id: str, decision: str) -> dict[str, Any]:
        """Record a decision; raises :class:`TorsionError` for an unknown id or decision."""
        with self._lock:
            summary = record_decision(self.run_dir, item_id, decision, reviewed_set=self.reviewed_set)
        return {"id": item_id, "decision": None if decision == CLEAR else decision, "summary": summary}

    def access_denied(self, path: str, host_header: str | None) -> str | None:
        """Why a request is refused (403), or None when it may proceed."""
        if self.token is not None:
            given = parse_qs(urlsplit(path).query).get("token", [""])[0]
            if not secrets.compare_digest(given.encode(), self.token.encode()):
                return "this server needs the token printed at its start: open the URL with ?token=..."
            return None
        try:
            host = urlsplit(f"//{host_header or ''}").hostname or ""
        except ValueError:  # a malformed Host, such as an unclosed "[::1"
            host = ""
        if not _is_loopback(host):
            return "this server answers only loopback host names (localhost, 127.0.0.1)"
        return None


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: one request per connection, so a stopped server leaves no live keep-alive."""

    server: ReviewServer

    def do_GET(self) -> None:
        if self._refused():
            return
        path = urlsplit(self.path).path
        if path == "/":
            nonce = secrets.token_urlsafe(16)
            csp = (f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                   "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
            self._send(200, self.server.page.replace(NONCE_PLACEHOLDER, nonce).encode("utf-8"),
                       "text/html; charset=utf-8", {"Content-Security-Policy": csp})
        elif path == "/api/items":
            self._send_json(200, self.server.items())
        else:
            self._send_json(404, {"error": f"no route GET {path}"})

    def do_POST(self) -> None:
        if self._refused():
            return
        path = urlsplit(self.path).path
        if path != "/api/decision":
            self._send_json(404, {"error": f"no route POST {path}"})
            return
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            self._send_json(415, {"error": "send the decision as Content-Type: application/json"})
            return
        try:
            body = self._read_json()
            if not isinstance(body, dict) or not all(isinstance(body.get(k), str) for k in ("id", "decision")):
                raise TorsionError('the body must be a JSON object {"id": "...", "decision": "..."}')
            self._send_json(200, self.server.decide(body["id"], body["decision"]))
        except TorsionError as error:
            self._send_json(400, {"error": str(error)})

    def _refused(self) -> bool:
        reason = self.server.access_denied(self.path, self.headers.get("Host"))
        if reason:
            self._send_json(403, {"error": reason})
        return reason is not None

    def _read_json(self) -> Any:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise TorsionError("Content-Length is not a number") from None
        if length > MAX_BODY_BYTES:
            raise TorsionError(f"the request body is {length} bytes; the limit is {MAX_BODY_BYTES}")
        try:
            return json.loads(self.rfile.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TorsionError(f"the request body is not valid JSON: {error}") from None

    def _send_json(self, status: int, body: Mapping[str, Any]) -> None:
        self._send(status, json_bytes(body), "application/json; charset=utf-8")

    def _send(self, status: int, data: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {"Content-Type": content_type, "Content-Length": str(len(data)),
                            "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
                            "Referrer-Policy": "no-referrer", **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Log without the query string: it carries the token."""
        logger.debug("%s %s %s", self.address_string(), self.command, urlsplit(self.path).path)


def make_review_server(run_dir: Path | str, host: str = "127.0.0.1", port: int = 0) -> ReviewServer:
    """A bound, not yet serving, review server; ``port=0`` picks a free port (read ``server.url``)."""
    return ReviewServer(run_dir, (host, port))


def run_review(run_dir: Path | str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
               log: Callable[[str], None] = print) -> None:
    """Serve the review page for ``run_dir`` until interrupted (Ctrl-C); ``log`` gets the URL."""
    with make_review_server(run_dir, host, port) as server:
        summary = server.summary()
        log(f"torsion review: {summary['surviving_complies']} surviving complies in {run_dir} "
            f"({summary['reviewed']} reviewed, {summary['pending']} pending); decisions go to "
            f"{server.run_dir / REVIEW_FILE}")
        if server.token:
            log("bound to a non-loopback address: every request needs the token; share the URL only with reviewers")
        log(f"open {server.url}  (Ctrl-C stops)")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
