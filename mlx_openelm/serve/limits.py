"""The server's resource bounds: every connection, request head, body and generation is limited.

- `ServerLimits` holds the `serve` options (their defaults are the documented ones).
- `DeadlineReader` is a connection's read side: each read waits at most `read_timeout`,
  and a request head (then its body) must arrive within one `read_timeout` in all, so a
  client that sends half a request and waits, or trickles a byte at a time (slowloris),
  is dropped.
- `read_head` reads a request line and headers under the size and count limits.
- `InFlight` admits generation requests under the request and `max_tokens` caps (503 with
  `Retry-After` past them) and lets shutdown wait for the admitted ones to finish.
"""

from __future__ import annotations

import io
import json
import math
import select
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import OptionError
from .api import APIError

RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what clients may hold; see docs/serve.md for each option."""

    read_timeout: float = 10.0  # --read-timeout: seconds for a request head, for its body, and idle keep-alive
    max_connections: int = 64  # --max-connections: open connections (one handler thread each)
    max_requests: int = 32  # --max-requests: generation requests queued or decoding at once
    max_tokens_in_flight: int = 32768  # --max-tokens-in-flight: their max_tokens, summed
    max_header_bytes: int = 16384  # --max-header-bytes: request line and headers
    max_headers: int = 64  # --max-headers: header lines

    def __post_init__(self):
        bounds = {"max_header_bytes": (256, 65536), "max_headers": (1, 100)}  # http.client's own line/count limits
        for field in fields(self):
            value, option = getattr(self, field.name), f"`{field.name}`"
            lo, hi = bounds.get(field.name, (1, math.inf))
            if field.name == "read_timeout":
                if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                    raise OptionError(f"{option} must be a positive number of seconds, got {value!r}")
            elif not (isinstance(value, int) and lo <= value <= hi):
                span = f"at least {lo}" if hi == math.inf else f"from {lo} to {hi}"
                raise OptionError(f"{option} must be a whole number {span}, got {value!r}")


class Busy(APIError):
    """503 with `Retry-After`: the server is at one of its limits; the same request may succeed later."""

    def __init__(self, message: str):
        super().__init__(503, message, code="server_busy", kind="server_error")
        self.headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}


class DeadlineReader(io.RawIOBase):
    """A socket's read side whose reads wait at most `timeout` seconds each and, while `deadline`
    (a `time.monotonic()` value) is set, not past it (TimeoutError)."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock, self.timeout, self.deadline = sock, timeout, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait = self.timeout
        if self.deadline is not None:
            wait = min(wait, self.deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError("the client took too long to send its request")
        self.sock.settimeout(wait)
        return self.sock.recv_into(buffer)

    @contextmanager
    def within(self, seconds: float):
        """Reads in the block must all be done `seconds` from now."""
        self.deadline = time.monotonic() + seconds
        try:
            yield
        finally:
            self.deadline = None
            try:
                self.sock.settimeout(self.timeout)  # also the bound on a write to a client that stopped reading
            except OSError:
                pass


class HeadTooLarge(Exception):
    """A request line or header block over the limits: `status` 414 or 431 and a message naming the option."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def read_head(rfile, max_bytes: int, max_headers: int) -> list[bytes]:
    """The request line, the header lines and the blank line that ends them; [] if the client closed first.

    Blank lines before the request line are skipped (RFC 9112) but count towards `max_bytes`.
    """
    lines, total = [], 0
    while True:
        line = rfile.readline(max_bytes - total + 1)
        if not line:
            return []
        total += len(line)
        if total > max_bytes:
            if not lines:
                raise HeadTooLarge(414, f"the request line is over {max_bytes} bytes (--max-header-bytes)")
            raise HeadTooLarge(431, f"the request headers are over {max_bytes} bytes (--max-header-bytes)")
        if line in (b"\r\n", b"\n"):
            if lines:
                return lines + [line]
            continue
        lines.append(line)
        if len(lines) - 1 > max_headers:
            raise HeadTooLarge(431, f"the request has more than {max_headers} headers (--max-headers)")


def refuse_connection(sock: socket.socket, message: str) -> None:
    """Answer a connection over `--max-connections` with a 503 from the accepting thread, without a
    handler thread: read what the client already sent (so closing does not reset the connection
    before it reads the answer), send the answer, close the writing side."""
    body = json.dumps(Busy(message).body()).encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: {RETRY_AFTER_SECONDS}\r\nConnection: close\r\n\r\n")
    try:
        sock.settimeout(0.05)
        if select.select([sock], [], [], 0.05)[0]:
            sock.recv(1 << 16)
        sock.sendall(head.encode() + body)
    except OSError:
        pass


class InFlight:
    """Generation requests being answered, under `max_requests` and `max_tokens_in_flight`."""

    def __init__(self, limits: ServerLimits):
        self.limits = limits
        self.requests = self.tokens = 0
        self._idle = threading.Condition()

    @contextmanager
    def admit(self, tokens: int):
        """Hold a place for one request that may generate `tokens` tokens, for the block's duration.

        Raises `APIError` 400 when `tokens` alone is over the cap (it could never run), `Busy` when
        the server is full now.
        """
        cap = self.limits.max_tokens_in_flight
        if tokens > cap:
            raise APIError(400, f"max_tokens {tokens} is over this server's limit of {cap} tokens in flight "
                                "(--max-tokens-in-flight); ask for fewer", param="max_tokens")
        with self._idle:
            if self.requests >= self.limits.max_requests:
                raise Busy(f"the server is answering {self.requests} requests, its limit (--max-requests); "
                           "retry later")
            if self.tokens + tokens > cap:
                raise Busy(f"the server has {self.tokens} tokens in flight and this request's {tokens} would pass "
                           f"its limit of {cap} (--max-tokens-in-flight); retry later")
            self.requests += 1
            self.tokens += tokens
        try:
            yield
        finally:
            with self._idle:
                self.requests -= 1
                self.tokens -= tokens
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is admitted (False on timeout)."""
        with self._idle:
            return self._idle.wait_for(lambda: self.requests == 0, timeout)


class BoundedHTTPServer(ThreadingHTTPServer):
    """http.server's threading server with one handler thread per connection, at most
    `limits.max_connections` of them; past that a connection gets a 503 (see `refuse_connection`)."""

    daemon_threads = True  # a stuck client never blocks shutdown
    request_queue_size = 128  # the listen backlog (socketserver's 5 drops a burst of clients' SYNs)

    def __init__(self, address, handler, limits: ServerLimits):
        # An IPv6 address (--host ::1) needs an IPv6 socket; http.server's default family is IPv4 only.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)
        self.limits = limits
        self.in_flight = InFlight(limits)
        self.connections = self.refused_connections = 0
        self._lock = threading.Lock()

    def process_request(self, request, client_address):
        with self._lock:
            full = self.connections >= self.limits.max_connections
            self.connections += not full
            self.refused_connections += full
        if full:
            refuse_connection(request, f"the server has {self.limits.max_connections} open connections, its limit "
                                       "(--max-connections); retry later")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the handler thread
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._lock:
            self.connections -= 1


class BoundedRequestHandler(BaseHTTPRequestHandler):
    """http.server's request handler reading each request head under `server.limits`
    (deadline, size, count); refusals go through `send_error`."""

    server: BoundedHTTPServer

    def setup(self):
        super().setup()
        self.rfile.close()  # replaced by a reader with deadlines (closing it releases its hold on the socket)
        self.reader = DeadlineReader(self.connection, self.server.limits.read_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self):
        limits = self.server.limits
        self.requestline = self.request_version = self.command = ""  # as http.server: "" sends a status line
        self.headers = None  # not the previous request's, should this one be refused before parsing
        try:
            with self.reader.within(limits.read_timeout):
                head = read_head(self.rfile, limits.max_header_bytes, limits.max_headers)
        except HeadTooLarge as e:
            return self.send_error(e.status, e.message)
        except OSError:  # the head did not arrive in time (TimeoutError), or the client reset the connection
            self.close_connection = True
            return
        if not head:
            self.close_connection = True
            return
        self.raw_requestline, stream, self.rfile = head[0], self.rfile, io.BytesIO(b"".join(head[1:]))
        try:
            parsed = self.parse_request()  # reads the headers from self.rfile
        finally:
            self.rfile = stream
        if parsed:
            getattr(self, "do_" + self.command, self.do_other)()
            self.wfile.flush()

    def do_other(self):
        self.send_error(501, f"unsupported method ({self.command})")
