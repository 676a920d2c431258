"""An OpenAI-compatible HTTP server for one OpenELM model, on the standard library's `http.server`.

`ServerApp` holds the model's `Scheduler` (the one thread that runs MLX) and the
server's settings; `make_server` binds a `ThreadingHTTPServer` whose handler threads
parse requests (`api`), hand them to the scheduler and write its tokens back,
as one JSON body or as server-sent events. Endpoints: `GET /v1/models`, `GET /health`,
`POST /v1/chat/completions`, `POST /v1/completions`. Every request passes the Host and
Origin checks (`access`) and every connection the bounds of `limits`.
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import queue
import select
import socket
import threading
import time
from typing import Iterator, Optional
from urllib.parse import urlsplit

from ..batching import PREFILL_CHUNK
from ..constrain.native_tools import tool_parser
from ..constrain.tool_output import tool_finish, tool_reply
from ..generation import token_budget
from ..speculative import SpeculativeOptions
from . import api
from .access import AccessPolicy, is_json_content_type, is_loopback
from .limits import BoundedHTTPServer, BoundedRequestHandler, ServerLimits
from .scheduler import Failure, Job, Scheduler, Step

log = logging.getLogger("mlx_openelm.server")

POLL_SECONDS = 0.1  # how often a waiting handler checks that its client is still there
DRAIN_LIMIT = 64 << 20  # an oversized body up to this size is read and dropped, so the client sees the 413


class ServerApp:
    """One model behind the OpenAI API: settings, the scheduler, and the request handlers' logic."""

    def __init__(self, model, tokenizer, model_id: str, defaults: api.SamplingDefaults = api.SamplingDefaults(),
                 api_key: Optional[str] = None, max_request_bytes: int = 1 << 20, prompt_cache_size: int = 4,
                 speculative: Optional[SpeculativeOptions] = None, prefill_chunk: int = PREFILL_CHUNK):
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.defaults = defaults
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.context = model.args.max_context_length
        self.vocab_size = model.args.vocab_size
        self.created = int(time.time())
        self.scheduler = Scheduler(model, tokenizer, prompt_cache_size, speculative, prefill_chunk)

    def stop(self) -> None:
        """Make `serve` return (safe in a signal handler): running requests are cancelled."""
        self.scheduler.stop()

    def budget(self, request: api.ParsedRequest) -> int:
        """The most tokens `request` can generate: its max_tokens, within the room its prompt leaves
        (`generation.token_budget`, the rule generation itself follows)."""
        return token_budget(self.context, len(request.spec.prompt), request.spec.max_tokens)

    def parse(self, route: str, body) -> api.ParsedRequest:
        if route == "chat":
            return api.parse_chat(body, self.tokenizer, self.context, self.defaults)
        return api.parse_completion(body, self.tokenizer, self.context, self.vocab_size, self.defaults)

    def logprobs(self, request: api.ParsedRequest, steps: list[Step], offsets: list[int]) -> Optional[dict]:
        if request.spec.top_logprobs is None:
            return None
        if request.kind == "chat":
            return api.chat_logprobs(self.tokenizer, steps)
        return api.completion_logprobs(self.tokenizer, steps, offsets)


class OpenAIServer(BoundedHTTPServer):
    """The bound HTTP server: `app` answers, `access` says who may ask, `limits` bound what they hold."""

    def __init__(self, address, app: Optional[ServerApp], limits: ServerLimits, access: AccessPolicy):
        super().__init__(address, Handler, limits)
        self.app, self.access = app, access


def make_server(app: Optional[ServerApp], host: str = "127.0.0.1", port: int = 8080,
                limits: ServerLimits = ServerLimits(), access: Optional[AccessPolicy] = None) -> OpenAIServer:
    """Bind (port 0: any free port, see `server.server_address`); then `serve` it.

    `app` may be set later (`server.app = ...`, before `serve`): binding first lets a
    taken port fail before a model is loaded. `access` defaults to the Host and Origin
    rules for `host` alone.
    """
    return OpenAIServer((host, port), app, limits, access or AccessPolicy(bound_host=host))


def exposure_warning(host: str, api_key: Optional[str]) -> Optional[str]:
    """What to warn about when listening on `host`: None for loopback addresses (127.0.0.0/8, ::1,
    localhost), which only this machine reaches; any other address or name may be reachable."""
    if is_loopback(host):
        return None
    return (f"listening on {host}: anyone who can reach this machine can use the model"
            + ("" if api_key else " (set --api-key to require a key)"))


def serve(httpd: OpenAIServer, drain_seconds: float = 5.0) -> None:
    """Serve until `httpd.app.stop()`; must be called from the main thread.

    HTTP runs in a background thread and generation on this one (see `Scheduler`). On
    stop, running requests get an error, their handlers get up to `drain_seconds` to
    send it, and the socket is closed.
    """
    http = threading.Thread(target=httpd.serve_forever, name="mlx-openelm-http", daemon=True)
    http.start()
    try:
        httpd.app.scheduler.run()
    finally:
        httpd.app.scheduler.stop()
        httpd.in_flight.wait_idle(drain_seconds)
        httpd.shutdown()
        httpd.server_close()


class ClientGone(Exception):
    """The client closed the connection; its generation is cancelled."""


ROUTES = {
    ("GET", "/v1/models"): "models",
    ("GET", "/health"): "health",
    ("POST", "/v1/chat/completions"): "chat",
    ("POST", "/v1/completions"): "completion",
}


class Handler(BoundedRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx-openelm"
    disable_nagle_algorithm = True  # each streamed token goes out at once
    server: OpenAIServer

    def send_error(self, code, message=None, explain=None):
        """http.server's own refusals (bad request line, HTTP version...) in OpenAI's JSON, not HTML."""
        self.close_connection = True
        self._headers_sent = self._body_read = False
        self._send_error(api.APIError(code, explain or message or "bad request"))

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_other(self):  # any other method: OpenAI's JSON 404, not http.server's HTML 501
        self._dispatch(self.command)

    do_PUT = do_DELETE = do_PATCH = do_other

    def do_OPTIONS(self):  # a browser's CORS preflight, answered for an allowed Origin
        self._dispatch("OPTIONS")

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        self._body_read = self._headers_sent = False
        app = self.server.app
        try:
            self._check_access()
            path = urlsplit(self.path).path.rstrip("/")
            if method == "OPTIONS" and self.headers.get("Origin") and any(p == path for _, p in ROUTES):
                return self._preflight()
            route = ROUTES.get((method, path))
            if route is None:
                raise api.APIError(404, f"Invalid URL ({method} {self.path})", code="unknown_url")
            if route == "health":
                return self._send_json(200, {"status": "ok", "model": app.model_id, **app.scheduler.snapshot()})
            self._authorize(app.api_key)
            if route == "models":
                return self._send_json(200, api.models_body(app.model_id, app.created))
            request = app.parse(route, self._read_json(app.max_request_bytes))
            self._generate(app, request)
        except api.APIError as e:
            self._send_error(e)
        except ClientGone:
            self.close_connection = True
        except Exception:  # noqa: BLE001 - log it here; the client gets no stack trace
            log.exception("request failed: %s %s", method, self.path)
            self._send_error(api.APIError(500, "internal server error", kind="server_error"))

    def _check_access(self) -> None:
        access = self.server.access
        refusal = access.host_refusal(self.headers.get("Host")) or access.origin_refusal(self.headers.get("Origin"))
        if refusal:
            raise api.APIError(*refusal, code="forbidden" if refusal[0] == 403 else None)

    def _preflight(self) -> None:
        self.send_response(204)
        self._send_cors_headers()
        self.send_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
        self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
        self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self._headers_sent = True

    def _send_cors_headers(self) -> None:
        origin = self.headers.get("Origin") if self.headers is not None else None
        if origin and self.server.access.origin_allowed(origin):  # _check_access let only allowed ones through
            self.send_header("Access-Control-Allow-Origin", origin)
            self.send_header("Vary", "Origin")

    def _authorize(self, key: Optional[str]) -> None:
        if key is None:
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise api.APIError(401, "Incorrect API key provided (send it as 'Authorization: Bearer KEY').",
                               code="invalid_api_key")

    def _read_json(self, limit: int):
        content_type = self.headers.get("Content-Type")
        if not is_json_content_type(content_type):
            raise api.APIError(415, f"the request body must be JSON sent as 'Content-Type: application/json' "
                                    f"(got {content_type!r})", code="unsupported_media_type")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise api.APIError(411, "chunked request bodies are not supported: send a Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise api.APIError(411, "a Content-Length header is required") from None
        if length < 0:
            raise api.APIError(400, f"Content-Length must be a number of bytes, got {length}")
        try:
            with self.reader.within(self.server.limits.read_timeout):
                if length > limit:
                    if length <= DRAIN_LIMIT:
                        self._drain(length)
                    raise api.APIError(413, f"the request body has {length} bytes, over this server's limit of "
                                            f"{limit} (--max-request-bytes)", code="request_too_large")
                raw = self.rfile.read(length)
        except TimeoutError:
            raise api.APIError(408, "the request body did not arrive in time (--read-timeout)") from None
        self._body_read = len(raw) == length
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # undecodable bytes, bad JSON, a 5000-digit number, deep nesting
            raise api.APIError(400, f"the request body is not valid JSON: {e}") from None

    def _drain(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 16))
            if not chunk:
                return
            length -= len(chunk)
        self._body_read = True

    # ---- generation ---------------------------------------------------------------------

    def _generate(self, app: ServerApp, request: api.ParsedRequest) -> None:
        with self.server.in_flight.admit(app.budget(request)):
            self._run_job(app, request)

    def _run_job(self, app: ServerApp, request: api.ParsedRequest) -> None:
        job = app.scheduler.submit(request.spec)
        try:
            events = self._events(job)
            first = next(events)  # errors before the first token get a plain JSON error response
            if isinstance(first, Failure):
                raise api.APIError(first.status, first.message, kind=_error_kind(first.status))
            if request.stream:
                self._stream(app, request, itertools.chain([first], events))
            else:
                self._respond(app, request, itertools.chain([first], events))
        finally:
            job.cancel()  # a no-op for a finished job; otherwise the worker stops it

    def _events(self, job: Job) -> Iterator[Step | Failure]:
        check_at = time.monotonic() + POLL_SECONDS
        while True:
            try:
                event = job.events.get(timeout=POLL_SECONDS)
            except queue.Empty:
                event = None
            if time.monotonic() >= check_at:  # also while tokens flow: a non-streamed reply writes nothing
                if self._client_gone():
                    raise ClientGone()
                check_at = time.monotonic() + POLL_SECONDS
            if event is None:
                continue
            yield event
            if isinstance(event, Failure) or event.finish_reason:
                return

    def _respond(self, app: ServerApp, request: api.ParsedRequest, events) -> None:
        steps, texts, offsets, length = [], [], [], 0
        for event in events:
            if isinstance(event, Failure):
                raise api.APIError(event.status, event.message, kind=_error_kind(event.status))
            steps.append(event)
            offsets.append(length)
            texts.append(event.text)
            length += len(event.text)
        last, text, calls, finish = steps[-1], "".join(texts), None, steps[-1].finish_reason
        if request.tools is not None:  # the tool format's reply as content or tool_calls
            text, calls, finish = tool_reply(text, finish, tool_parser(request.tools))
        usage = api.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
        body = api.response_body(request, app.model_id, text, finish, app.logprobs(request, steps, offsets), usage,
                                 calls)
        self._send_json(200, body)

    def _stream(self, app: ServerApp, request: api.ParsedRequest, events) -> None:
        self._start_events()
        if request.kind == "chat":
            self._send_event(api.chunk_body(request, app.model_id, None, None, None, role=True))
        length, last, tools = 0, None, tool_parser(request.tools) if request.tools is not None else None
        for event in events:
            if isinstance(event, Failure):
                self._send_event(api.APIError(event.status, event.message, kind=_error_kind(event.status)).body())
                return
            if tools is not None:  # deltas with content or tool_calls, then the finish
                for delta in tools.feed(event.text):
                    self._send_event(api.chunk_body(request, app.model_id, None, None, None, delta=delta))
                if event.finish_reason:
                    finish = tool_finish(tools, event.finish_reason)
                    self._send_event(api.chunk_body(request, app.model_id, None, finish, None, delta={}))
                last = event
                continue
            logprobs = app.logprobs(request, [event], [length])
            if event.text or logprobs or event.finish_reason:
                self._send_event(api.chunk_body(request, app.model_id, event.text, event.finish_reason, logprobs))
            length += len(event.text)
            last = event
        if request.include_usage:
            usage = api.usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
            self._send_event(api.usage_chunk(request, app.model_id, usage))
        self._write(b"data: [DONE]\n\n")

    # ---- writing ------------------------------------------------------------------------

    def _client_gone(self) -> bool:
        """True when the peer has closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            raise ClientGone() from None

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream's end is the connection's end
        self._send_cors_headers()
        self.end_headers()
        self._headers_sent = True
        self.close_connection = True

    def _send_event(self, body: dict) -> None:
        self._write(b"data: " + json.dumps(body).encode() + b"\n\n")

    def _send_json(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self._send_cors_headers()
        if not self._body_read and self.command == "POST":
            self.send_header("Connection", "close")  # an unread body would be taken for the next request
            self.close_connection = True
        self.end_headers()
        self._headers_sent = True
        self._write(data)

    def _send_error(self, error: api.APIError) -> None:
        if self._headers_sent:  # mid-stream: nothing sensible can follow
            self.close_connection = True
            return
        try:
            self._send_json(error.status, error.body(), getattr(error, "headers", None))
        except ClientGone:
            self.close_connection = True


def _error_kind(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"
