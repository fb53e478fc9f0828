"""One JSON POST with a whole-call deadline: the HTTP client of the analyzer and of the retrieval server.

Why not `urllib` (or `httpx`): both time out per socket operation, so a server that trickles one
byte every 0.1 s holds a call with a 0.5 s timeout for as long as it likes (httpx's connect / read /
write / pool timeouts are per operation too; a total timeout is not part of it). Here a timer
shuts the socket down when the deadline passes, whatever phase the call is in (connecting, sending,
waiting for the status line, reading headers or body), and the call raises `DeadlineExceeded`.

Redirects: a 307/308 to the same origin (scheme, host, port) is followed, at most 3 times; any
other redirect is an error that names the target, so headers such as `Authorization` never reach
another host or go from https to http. `check_url` refuses plain http to a non-local host for a
caller that sends a key, unless it opts in.

Every failure is a `TransportError` whose `retryable` says whether trying again may help (a
connection error, a timeout, a cut or garbled reply, HTTP 5xx or 429: yes; HTTP 4xx, a redirect, a
bad address: no). Nothing else escapes `post_json`.
"""
from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
import threading
import time
from urllib.parse import urljoin, urlsplit

MAX_RESPONSE_BYTES = 8 * 1024 * 1024  # a reply larger than this is refused (a chat completion is KBs)
MAX_REDIRECTS = 3


class TransportError(RuntimeError):
    """The call failed; `retryable` says whether another try may succeed."""

    def __init__(self, message: str, retryable: bool = True, status: int | None = None):
        super().__init__(message)
        self.retryable, self.status = retryable, status


class DeadlineExceeded(TransportError):
    """No complete answer within the call's deadline."""


def is_local_host(host: str) -> bool:
    """localhost, a loopback address (127.0.0.0/8, ::1)."""
    host = (host or "").strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str, sends_key: bool = False, allow_insecure_http: bool = False, what: str = "URL") -> None:
    """Raise ValueError with one clear line when `url` cannot or should not be called."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} {url!r} is not an http(s)://host/... address")
    try:
        parts.port
    except ValueError as err:
        raise ValueError(f"{what} {url!r} has a bad port ({err})") from None
    if sends_key and parts.scheme == "http" and not is_local_host(parts.hostname) and not allow_insecure_http:
        raise ValueError(f"{what} {url!r} would send the API key over plain http to a non-local host; "
                         "use https, or allow it explicitly (--analyzer-allow-insecure-http)")


def origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)


def _abort(conn: http.client.HTTPConnection, fired: threading.Event) -> None:
    """Timer callback: unblock whatever the calling thread is waiting for on this socket."""
    fired.set()
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_body(response: http.client.HTTPResponse, max_bytes: int) -> bytes:
    length = response.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > max_bytes:
        raise TransportError(f"reply of {int(length)} bytes is over the {max_bytes}-byte limit", retryable=False)
    if response.length is not None:
        return response.read()  # raises IncompleteRead when the body is cut short
    chunks, size = [], 0
    while True:  # chunked or close-delimited: read in pieces, stop at the cap
        chunk = response.read(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > max_bytes:
            raise TransportError(f"reply over the {max_bytes}-byte limit", retryable=False)
        chunks.append(chunk)


def _post_once(url: str, data: bytes, headers: dict, deadline: float, max_bytes: int) -> tuple[int, str, bytes]:
    """(status, Location header, body) of one POST; the socket is shut at `deadline`."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed before the call")
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=remaining,
                                           context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=remaining)
    fired = threading.Event()
    timer = threading.Timer(remaining, _abort, (conn, fired))
    timer.daemon = True
    timer.start()
    try:
        conn.connect()
        if fired.is_set():  # the deadline passed while connecting, before there was a socket to shut
            raise DeadlineExceeded("no connection within the deadline")
        conn.request("POST", path, body=data, headers=headers)
        response = conn.getresponse()
        body = _read_body(response, max_bytes)
        return response.status, response.getheader("Location") or "", body
    except TransportError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:
        if fired.is_set() or isinstance(err, (TimeoutError, socket.timeout)):
            raise DeadlineExceeded(f"no complete answer within the deadline ({type(err).__name__})") from None
        raise TransportError(f"{type(err).__name__}: {err}") from None
    finally:
        timer.cancel()
        conn.close()


def post_json(url: str, payload, *, timeout: float, headers: dict | None = None,
              max_bytes: int = MAX_RESPONSE_BYTES):
    """POST `payload` as JSON and return the decoded JSON reply; the whole call ends by `timeout` s.

    Raises `TransportError` (or its `DeadlineExceeded`) and nothing else.
    """
    try:
        check_url(url)
        data = json.dumps(payload, ensure_ascii=True).encode("ascii")
    except (ValueError, TypeError) as err:
        raise TransportError(str(err), retryable=False) from None
    headers = {"Content-Type": "application/json", "Accept": "application/json", **(headers or {})}
    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _post_once(url, data, headers, deadline, max_bytes)
        if status in (307, 308) and location:
            target = urljoin(url, location)
            if origin(target) != origin(url):
                raise TransportError(f"{url} redirects to another origin ({target}); not followed, so no "
                                     "header reaches it: point the client at the final address", retryable=False)
            url = target
            continue
        if 300 <= status < 400:
            raise TransportError(f"{url} answered HTTP {status} (redirect to {location or '?'}); not followed",
                                 retryable=False, status=status)
        if status >= 400:
            text = body[:200].decode("utf-8", "replace")
            raise TransportError(f"{url} answered HTTP {status}: {text}", retryable=status >= 500 or status == 429,
                                 status=status)
        try:
            return json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise TransportError(f"{url} answered a body that is not JSON ({type(err).__name__})") from None
    raise TransportError(f"{url}: more than {MAX_REDIRECTS} redirects", retryable=False)
