"""The explorer on a real socket: slow and half-sent requests are cut off, smuggling is refused.

The server here is the one ``vaelab explore`` runs (uvicorn with ``server_config``), in a thread
of this process, on a free port of 127.0.0.1. The hostile connections run side by side, so the
whole file waits about one ``REQUEST_TIMEOUT`` (5 s) in all.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import uvicorn
from starlette.testclient import TestClient

from synthetic import uniform_noise, write_synthetic
from vaelab.config import resolve_config
from vaelab.explore import REQUEST_TIMEOUT, create_app
from vaelab.explore.server import KEEP_ALIVE, MAX_HEADER, server_config
from vaelab.training import train

BODY = b'{"z": [0.5, -1.0]}'


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("explore-timeouts")
    data = write_synthetic(root / "data", uniform_noise, 160, 40, seed=0)
    cfg = resolve_config("smoke", dataset=f"idx:{data}", val_size=32)
    train(cfg, root / "vae", progress=False)
    return create_app([root / "vae"])


@pytest.fixture(scope="module")
def port(app) -> Iterator[int]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(server_config(app))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


def head(method: str, path: str, *lines: str) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
        f"{line}\r\n" for line in lines) + "\r\n").encode()


def decode_request(body: bytes = BODY) -> bytes:
    return head("POST", "/api/runs/0/decode", "Content-Type: application/json",
                f"Content-Length: {len(body)}") + body


def read_until_closed(conn: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took
    (``limit`` if it never closes)."""
    start = time.monotonic()
    conn.settimeout(0.2)
    got = b""
    while time.monotonic() - start < limit:
        try:
            block = conn.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not block:
            break
        got += block
    return got, time.monotonic() - start


def statuses(raw: bytes) -> list[int]:
    """The status of each response in ``raw`` (a response follows the last one's body)."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


# --------------------------------------------------------------------------------------------
# The hostile clients, each on its own connection: (what the server sent, seconds to close)
# --------------------------------------------------------------------------------------------
def _half_a_head(conn: socket.socket) -> tuple[bytes, float]:
    conn.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nAcc")
    return read_until_closed(conn, 4 * REQUEST_TIMEOUT)


def _head_and_half_a_body(conn: socket.socket) -> tuple[bytes, float]:
    conn.sendall(decode_request()[:-5])
    return read_until_closed(conn, 4 * REQUEST_TIMEOUT)


def _one_byte_a_second(conn: socket.socket) -> tuple[bytes, float]:
    """Each byte arrives well inside any per-read timeout; only a deadline stops it."""
    start = time.monotonic()
    conn.settimeout(1.0)
    for byte in head("GET", "/api/runs", "X-Slow: " + "a" * 60):
        try:
            conn.sendall(bytes([byte]))
            if conn.recv(65536, socket.MSG_PEEK):
                break  # the server answered (the 408)
        except TimeoutError:
            continue
        except OSError:
            break
    got, _ = read_until_closed(conn, 4 * REQUEST_TIMEOUT)
    return got, time.monotonic() - start


def _nothing_at_all(conn: socket.socket) -> tuple[bytes, float]:
    return read_until_closed(conn, 4 * REQUEST_TIMEOUT)


def _one_request_then_idle(conn: socket.socket) -> tuple[bytes, float]:
    conn.sendall(head("GET", "/api/runs/0"))
    return read_until_closed(conn, 4 * REQUEST_TIMEOUT)


HOSTILE: list[tuple[Callable[[socket.socket], tuple[bytes, float]], list[int], float]] = [
    (_half_a_head, [408], REQUEST_TIMEOUT),
    (_head_and_half_a_body, [408], REQUEST_TIMEOUT),
    (_one_byte_a_second, [408], REQUEST_TIMEOUT),
    (_nothing_at_all, [], REQUEST_TIMEOUT),
    (_one_request_then_idle, [200], KEEP_ALIVE),
]


def _slow_but_whole(port: int) -> list[int]:
    """Two requests on one connection, each well inside its own deadline: both answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        request = decode_request()
        conn.sendall(request[:40])
        time.sleep(REQUEST_TIMEOUT / 2)
        conn.sendall(request[40:])
        time.sleep(REQUEST_TIMEOUT * 0.7)  # a fresh deadline starts after each response
        conn.sendall(head("GET", "/api/runs/0", "Connection: close"))
        got, _ = read_until_closed(conn, 2 * REQUEST_TIMEOUT)
    return statuses(got)


def test_slow_and_half_sent_requests_are_cut_off_and_whole_ones_answered(port: int) -> None:
    def hostile(client: Callable[[socket.socket], tuple[bytes, float]]) -> tuple[bytes, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            return client(conn)

    with ThreadPoolExecutor(len(HOSTILE) + 1) as pool:
        held = [pool.submit(hostile, client) for client, _, _ in HOSTILE]
        slow = pool.submit(_slow_but_whole, port)
        time.sleep(1.0)  # the hostile clients hold their connections: others are still served
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            start = time.monotonic()
            conn.sendall(head("GET", "/api/runs", "Connection: close"))
            got, _ = read_until_closed(conn, 10)
            assert statuses(got) == [200] and time.monotonic() - start < 3
        for (client, expected, limit), future in zip(HOSTILE, held, strict=True):
            got, seconds = future.result()
            name = client.__name__
            assert statuses(got) == expected, (name, got[:200])
            assert limit - 0.5 <= seconds <= limit + 3, (name, seconds)
            if expected == [408]:
                error = json.loads(got.split(b"\r\n\r\n", 1)[1])["error"]
                assert error == f"the request did not arrive whole within {REQUEST_TIMEOUT:g} s"
        assert slow.result() == [200, 200]


def test_content_length_with_transfer_encoding_is_400_and_the_connection_closed(
    port: int,
) -> None:
    """Request smuggling: the second request hidden after the chunked body is never answered."""
    chunked = f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
    smuggled = head("GET", "/api/runs")
    request = head("POST", "/api/runs/0/decode", "Content-Type: application/json",
                   f"Content-Length: {len(chunked)}", "Transfer-Encoding: chunked")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request + chunked + smuggled)
        got, seconds = read_until_closed(conn, 2 * REQUEST_TIMEOUT)
    assert statuses(got) == [400], got[:300]
    assert b"connection: close" in got.lower()
    assert json.loads(got.split(b"\r\n\r\n", 1)[1]) == {
        "error": "a request may not carry both Content-Length and Transfer-Encoding"}
    assert seconds < 2  # closed at once, not by a timeout


def test_a_head_that_keeps_growing_is_refused_at_max_header(port: int) -> None:
    """A head with no end is not buffered past MAX_HEADER bytes: a 400 at once, not a wait."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
                     + b"a" * (MAX_HEADER + 1024))
        got, seconds = read_until_closed(conn, 2 * REQUEST_TIMEOUT)
    assert statuses(got) == [400] and seconds < 2, (got[:200], seconds)


def test_either_framing_alone_is_answered(port: int) -> None:
    """The control: Content-Length alone, and chunked alone, decode the same image."""
    chunked = f"{len(BODY):x}\r\n".encode() + BODY + b"\r\n0\r\n\r\n"
    answers = []
    for request in (head("POST", "/api/runs/0/decode", "Content-Type: application/json",
                         f"Content-Length: {len(BODY)}", "Connection: close") + BODY,
                    head("POST", "/api/runs/0/decode", "Content-Type: application/json",
                         "Transfer-Encoding: chunked", "Connection: close") + chunked):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(request)
            got, _ = read_until_closed(conn, 10)
        assert statuses(got) == [200], got[:300]
        answers.append(json.loads(got.split(b"\r\n\r\n", 1)[1])["image"])
    assert answers[0] == answers[1]


def test_both_framings_are_refused_in_process_too(app) -> None:
    """The refusal is the app's (an ASGI middleware), so it holds behind any server."""
    with TestClient(app) as client:
        r = client.post("/api/runs/0/decode", content=BODY, headers={
            "content-type": "application/json", "content-length": str(len(BODY)),
            "transfer-encoding": "chunked"})
    assert r.status_code == 400 and r.headers["connection"] == "close"
    assert "Transfer-Encoding" in r.json()["error"]


def test_serve_uses_the_timed_protocol() -> None:
    """``vaelab explore`` runs exactly this configuration (not uvicorn's plain defaults)."""
    import inspect

    from vaelab.explore import server

    source = inspect.getsource(server.serve)
    assert "server_config(app)" in source and "uvicorn.Config(" not in source
    config = server_config(lambda scope, receive, send: None)
    assert config.timeout_keep_alive == KEEP_ALIVE
    assert config.http.__name__ == "_TimedH11Protocol" and config.ws == "none"
