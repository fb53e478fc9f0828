"""A scripted HTTP server on 127.0.0.1 for fault tests: each answer is written at the socket level,
so it can be anything a broken or hostile server sends (a trickle, a garbled status line, a cut
body, a reset, a redirect). Bounded: it stops after `lifetime` seconds or on close(), and every
handler gives up when the client has gone."""
from __future__ import annotations

import json
import socket
import struct
import threading
import time


def read_request(conn: socket.socket) -> tuple[str, bytes]:
    """(request line + headers, body) of one request; ('', b'') when the client sent nothing."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return "", b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    head_text = head.decode("latin-1")
    length = 0
    for line in head_text.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head_text, body


def header(head: str, name: str) -> str | None:
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def completion(content: str) -> bytes:
    """A whole HTTP 200 answer carrying a chat completion whose message content is `content`."""
    body = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" \
        % len(body) + body


class FakeServer:
    """`reply(conn, head, body)` answers each request (in its own thread); `requests` records them."""

    def __init__(self, reply, lifetime: float = 30.0):
        self.reply, self.requests, self.lock = reply, [], threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self._stop, self._end = threading.Event(), time.monotonic() + lifetime
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _serve(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._end:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                break
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        self.sock.close()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(5.0)
        try:
            head, body = read_request(conn)
            if head:
                with self.lock:
                    self.requests.append((head, body))
                self.reply(conn, head, body)
        except OSError:  # the client went away: that is what several tests provoke
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- scripted answers ------------------------------------------------------------------------

def answer(content: str):
    return lambda conn, head, body: conn.sendall(completion(content))


def trickle(conn, head, body, every: float = 0.05, limit: int = 400) -> None:
    """Headers promising 1000 bytes, then one byte every `every` s: never a read timeout, never done."""
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(limit):
        time.sleep(every)
        conn.sendall(b" ")


def trickle_status_line(conn, head, body, every: float = 0.05, limit: int = 400) -> None:
    """The status line itself one byte at a time (a deadline must cover the headers too)."""
    for byte in (b"HTTP/1.1 200 OK" + b" " * limit)[:limit]:
        time.sleep(every)
        conn.sendall(bytes([byte]))


def bad_status_line(conn, head, body) -> None:
    conn.sendall(b"SURPRISE 42\r\n\r\n")


def incomplete_body(conn, head, body) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"choices\": [")


def reset(conn, head, body) -> None:
    """Close with SO_LINGER 0: the client sees a TCP reset."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def silent(conn, head, body) -> None:
    """Accept, read the request, never answer (until the client leaves, at most 10 s)."""
    conn.settimeout(10.0)
    try:
        conn.recv(1)
    except OSError:
        pass


def redirect_to(location: str, status: int = 307):
    def reply(conn, head, body):
        conn.sendall(b"HTTP/1.1 %d Redirect\r\nLocation: %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                     % (status, location.encode()))
    return reply
