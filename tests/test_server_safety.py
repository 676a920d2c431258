"""`mlx-openelm serve` against an attacker on the same machine: forged Host/Origin/Content-Type headers
(cross-site and DNS-rebinding requests) and clients that hold resources (slowloris, floods, huge heads).

Everything talks to a real server subprocess over real sockets (http.client and raw sockets), as a
browser or an attacker's script would.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time

import pytest

from serving import KEY, start_server


@pytest.fixture(scope="module")
def server(hf_checkpoint):
    s = start_server(hf_checkpoint, "--max-tokens", "8", "--read-timeout", "1", "--max-connections", "6",
                     "--max-requests", "2", "--max-tokens-in-flight", "2000", "--max-header-bytes", "2048",
                     "--max-headers", "20", "--allowed-origins", "https://app.example, http://tool.test:3000")
    yield s
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=20) == 0, "".join(s.log)


def send(server, method, path, body=None, headers=None, content_type="application/json"):
    """(status, headers, decoded JSON body or None) of one request with exactly these headers."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    sent = {"Host": f"127.0.0.1:{server.port}", **({"Content-Type": content_type} if content_type else {}),
            **(headers or {})}
    if data is not None:
        sent["Content-Length"] = str(len(data))
    for name, value in sent.items():
        if value is not None:
            connection.putheader(name, value)
    connection.endheaders(data)
    response = connection.getresponse()
    raw = response.read()
    connection.close()
    return response.status, response.headers, json.loads(raw) if raw else None


COMPLETION = {"prompt": "Once upon a time", "max_tokens": 3}


def test_the_reported_attack_is_refused_and_generates_nothing(server):
    """The issue's finding: a cross-site text/plain POST for evil.example (DNS rebinding) was a 200."""
    before = send(server, "GET", "/health")[2]["generated_tokens"]
    status, _, body = send(server, "POST", "/v1/completions", COMPLETION, content_type="text/plain",
                           headers={"Host": "evil.example.com", "Origin": "http://evil.example.com"})
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert set(body["error"]) == {"message", "type", "param", "code"} and "evil.example.com" in body["error"]["message"]
    assert send(server, "GET", "/health")[2]["generated_tokens"] == before


@pytest.mark.parametrize("host", ["evil.example.com", "evil.example.com:8080", "127.0.0.1.nip.io", "[2001:db8::1]:80",
                                  "192.168.1.20", "localhost.evil.com"])
@pytest.mark.parametrize("method, path", [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")])
def test_a_foreign_host_is_refused_on_every_endpoint(server, host, method, path):
    status, _, body = send(server, method, path, COMPLETION if method == "POST" else None,
                           headers={"Host": host, "Authorization": f"Bearer {KEY}"})
    assert (status, body["error"]["code"], body["error"]["type"]) == (403, "forbidden", "invalid_request_error")
    assert "--allowed-hosts" in body["error"]["message"]


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8080", "localhost.", "127.0.0.1", "127.0.0.2:1",
                                  "[::1]", "[::1]:8080", "app.localhost:80", "[::ffff:127.0.0.1]:9"])
def test_loopback_hosts_in_every_form_are_served(server, host):
    status, _, body = send(server, "GET", "/health", headers={"Host": host})
    assert (status, body["status"]) == (200, "ok")


@pytest.mark.parametrize("host, status", [(None, 400), ("", 400), ("a b", 400), ("[::1", 400), ("x:y", 400)])
def test_a_missing_or_malformed_host_is_a_bad_request(server, host, status):
    assert send(server, "GET", "/health", headers={"Host": host})[0] == status


@pytest.mark.parametrize("origin, allowed", [
    ("http://evil.example.com", False), ("null", False), ("https://app.example.evil", False),
    ("http://app.example", False),  # the scheme is part of the origin
    ("http://tool.test:3001", False), ("file://", False),
    ("https://app.example", True), ("HTTPS://APP.EXAMPLE", True), ("http://tool.test:3000", True),
    ("http://localhost:5173", True), ("http://127.0.0.1", True), ("https://[::1]:8443", True),
])
def test_origins_other_than_loopback_and_the_allowed_ones_are_refused(server, origin, allowed):
    status, headers, body = send(server, "GET", "/health", headers={"Origin": origin})
    assert status == (200 if allowed else 403)
    if allowed:  # a page from an allowed origin may also read the answer
        assert headers["Access-Control-Allow-Origin"] == origin and headers["Vary"] == "Origin"
    else:
        assert "Access-Control-Allow-Origin" not in headers and "--allowed-origins" in body["error"]["message"]


def test_an_allowed_origin_gets_a_cors_preflight_and_streams(server):
    status, headers, _ = send(server, "OPTIONS", "/v1/chat/completions", content_type=None,
                              headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "content-type"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "content-type" in headers["Access-Control-Allow-Headers"].lower()
    assert send(server, "OPTIONS", "/v1/chat/completions", content_type=None,
                headers={"Origin": "https://evil.example"})[0] == 403
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", body=json.dumps({**COMPLETION, "stream": True}),
                       headers={"Content-Type": "application/json", "Origin": "https://app.example"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("Access-Control-Allow-Origin") == "https://app.example"
    assert response.read().endswith(b"data: [DONE]\n\n")
    connection.close()


@pytest.mark.parametrize("content_type, status", [
    ("text/plain", 415), ("application/x-www-form-urlencoded", 415), ("multipart/form-data; boundary=x", 415),
    (None, 415), ("application/jsonp", 415),
    ("application/json", 200), ("application/json; charset=utf-8", 200), ("Application/JSON ; charset=UTF-8", 200),
])
def test_bodies_must_be_declared_json(server, content_type, status):
    got, _, body = send(server, "POST", "/v1/completions", COMPLETION, content_type=content_type)
    assert got == status
    if status == 415:
        assert body["error"]["code"] == "unsupported_media_type" and "application/json" in body["error"]["message"]
    else:
        assert body["usage"]["completion_tokens"] == 3


def test_a_non_loopback_bind_allows_its_own_address_and_the_listed_hosts(hf_checkpoint):
    """Bound to every address (0.0.0.0): IP literals name this machine; names must be listed."""
    s = start_server(hf_checkpoint, "--host", "0.0.0.0", "--allowed-hosts", "my-mac.local")
    try:
        assert any("warning: listening on 0.0.0.0" in line for line in s.log)
        for host, status in [("10.1.2.3:8080", 200), ("my-mac.local:8080", 200), ("MY-MAC.LOCAL", 200),
                             ("other.local", 403), ("evil.example", 403)]:
            assert send(s, "GET", "/health", headers={"Host": host})[0] == status, host
    finally:
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=20) == 0


# ---- bounded resources --------------------------------------------------------------------------


def raw_socket(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def seconds_until_closed(sock: socket.socket, trickle: bytes = b"", every: float = 0.25) -> float:
    """Send `trickle` every `every` seconds (or nothing) until the server closes the connection."""
    start = time.monotonic()
    sock.settimeout(every)
    while time.monotonic() - start < 10:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - start
        except socket.timeout:
            try:
                sock.sendall(trickle)
            except OSError:  # reset by the server: closed too
                return time.monotonic() - start
        except ConnectionResetError:
            return time.monotonic() - start
    raise AssertionError("the server kept the connection open for 10 s")


@pytest.mark.parametrize("sent, trickle", [
    (b"POST /v1/comp", b""),  # half a request line, then silence
    (b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-A: b", b""),  # half a header
    (b"GET /health HTTP/1.1\r\n", b"X-Slow: loris\r\n"),  # a header line every 0.25 s (slowloris)
    (b"GET /health HTTP/1.1\r\nHost: localho", b"s"),  # a byte at a time
])
def test_a_slow_client_is_dropped_after_the_read_timeout(server, sent, trickle):
    """--read-timeout 1: the whole head must arrive within 1 s, however it trickles in."""
    with raw_socket(server) as sock:
        sock.sendall(sent)
        assert 0.8 < seconds_until_closed(sock, trickle) < 3
    assert send(server, "GET", "/health")[0] == 200


def test_an_idle_kept_alive_connection_is_closed(server):
    with raw_socket(server) as sock:
        sock.sendall(f"GET /health HTTP/1.1\r\nHost: localhost:{server.port}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            reply += sock.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200")
        assert 0.8 < seconds_until_closed(sock) < 3


def test_a_body_that_does_not_arrive_is_a_408(server):
    with raw_socket(server) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        sock.settimeout(5)
        reply = b""
        while chunk := sock.recv(4096):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408") and b"--read-timeout" in reply


def test_header_size_and_count_limits(server):
    status, _, body = send(server, "GET", "/health", headers={"X-Big": "x" * 2100})  # --max-header-bytes 2048
    assert (status, "--max-header-bytes" in body["error"]["message"]) == (431, True)
    status, _, body = send(server, "GET", "/health?" + "q" * 2100)
    assert (status, "--max-header-bytes" in body["error"]["message"]) == (414, True)
    many = {f"X-{i}": "1" for i in range(21)}  # --max-headers 20 (with Host, 22 lines)
    status, _, body = send(server, "GET", "/health", headers=many)
    assert (status, "--max-headers" in body["error"]["message"]) == (431, True)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert send(server, "GET", "/health", headers={f"X-{i}": "1" for i in range(15)})[0] == 200


def test_connections_past_the_cap_get_503_with_retry_after(server):
    """--max-connections 6: six idle connections hold every handler; the seventh is refused at once."""
    held = [raw_socket(server) for _ in range(6)]
    try:
        time.sleep(0.1)
        status, headers, body = send(server, "GET", "/health")
        assert (status, headers["Retry-After"], body["error"]["code"]) == (503, "1", "server_busy")
        assert "--max-connections" in body["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while send(server, "GET", "/health")[0] == 503:  # the handlers notice the closed sockets
        assert time.monotonic() < deadline
        time.sleep(0.05)


def open_stream(server, max_tokens):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", headers={"Content-Type": "application/json"},
                       body=json.dumps({"prompt": "Once", "max_tokens": max_tokens, "stream": True,
                                        "repetition_penalty": 1.0}))  # (1.2 meets EOS after ~400 tokens)
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    return response  # (holds the socket: the connection hands it over for a streamed reply)


def test_requests_past_the_caps_get_503_and_one_over_the_token_cap_alone_400(server):
    """--max-requests 2, --max-tokens-in-flight 2000."""
    streams = [open_stream(server, 990)]
    try:
        status, headers, body = send(server, "POST", "/v1/completions", {"prompt": "Once", "max_tokens": 1100})
        assert (status, headers["Retry-After"], body["error"]["code"]) == (503, "1", "server_busy")
        assert "--max-tokens-in-flight" in body["error"]["message"] and "990" in body["error"]["message"]
        streams.append(open_stream(server, 990))
        status, headers, body = send(server, "POST", "/v1/completions", COMPLETION)
        assert (status, headers["Retry-After"]) == (503, "1") and "--max-requests" in body["error"]["message"]
    finally:
        for response in streams:
            response.close()
    status, _, body = send(server, "POST", "/v1/completions", {"prompt": "Once", "max_tokens": 2040})
    assert (status, body["error"]["param"]) == (400, "max_tokens") and "--max-tokens-in-flight" in body["error"]["message"]
    deadline = time.monotonic() + 10
    while (got := send(server, "POST", "/v1/completions", COMPLETION))[0] == 503:  # the streams' places come back
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert got[2]["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("option, value, message", [
    ("--allowed-hosts", "evil.com:80", "--allowed-hosts: 'evil.com:80' is not a host name or IP address"),
    ("--allowed-hosts", "http://evil.com", "--allowed-hosts: 'http://evil.com' is not a host name"),
    ("--allowed-origins", "evil.com", "--allowed-origins: 'evil.com' is not a web origin"),
    ("--allowed-origins", "http://a.com/path", "--allowed-origins: 'http://a.com/path' is not a web origin"),
    ("--allowed-origins", "http://a.com:x", "--allowed-origins: 'http://a.com:x' is not a web origin"),
    ("--read-timeout", "0", "--read-timeout must be a positive number of seconds, got 0.0"),
    ("--read-timeout", "nan", "--read-timeout must be a positive number of seconds, got nan"),
    ("--max-connections", "0", "--max-connections must be a whole number at least 1, got 0"),
    ("--max-headers", "101", "--max-headers must be a whole number from 1 to 100, got 101"),
    ("--max-header-bytes", "100", "--max-header-bytes must be a whole number from 256 to 65536, got 100"),
])
def test_bad_access_and_limit_options_are_one_line_errors(tmp_path, option, value, message, invoke_cli):
    result = invoke_cli("serve", "--model", str(tmp_path / "absent"), "--port", "0", option, value)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith(f"Error: {message}")
