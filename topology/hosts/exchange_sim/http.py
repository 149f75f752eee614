"""HTTP/1.1 server connections, a thread each: the request head, its framing, the body as it
arrives, and responses. A server subclasses HttpConnection and answers in serve_one().

Lenient where a test needs to see what a proxy forwarded (a request line or field line that
does not parse is kept in Request.malformed, not dropped); the server decides whether that
is a 400. Every read is bounded by the socket's timeout and by size limits.
"""

import email.utils
import http.client
import re
import select
import socket
import ssl
import time
import urllib.parse

from . import tls as tlsmod
from .serve import Connection, Eof, receive

HEAD_END = re.compile(rb"\r?\n\r?\n")
MAX_LINE = 65536
VERSIONS = ("HTTP/1.0", "HTTP/1.1")


class Request:
    """One request head, as received: fields in order, names as sent."""

    def __init__(self, method, target, version, headers, malformed):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers          # [[name, value], ...]
        self.malformed = malformed      # lines that are neither a request line nor a field line
        self.framing = ("none", 0)
        self.body_bytes = 0
        self.complete = False           # the whole body has been read
        self.continued = False          # 100 Continue was sent

    def header(self, name):
        """The first field `name` (any case), or None."""
        return next(iter(self.header_all(name)), None)

    def header_all(self, name):
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    @property
    def well_formed(self):
        return not self.malformed and bool(self.method) and bool(self.target) and self.version in VERSIONS

    @property
    def keep_alive(self):
        tokens = {t.strip().lower() for v in self.header_all("connection") for t in v.split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens

    @property
    def expects_continue(self):
        return (self.header("expect") or "").lower() == "100-continue"

    @property
    def raw_path(self):
        """The target's path as sent (no query, no decoding); an absolute-form target's path."""
        if self.target.startswith("http"):
            return urllib.parse.urlsplit(self.target).path or "/"
        return self.target.split("?", 1)[0]

    @property
    def query_text(self):
        return self.target.split("?", 1)[1] if "?" in self.target else ""


def parse_head(head, request_class=Request):
    """A request from its head bytes (without the blank line)."""
    lines = re.split(r"\r?\n", head.decode("latin-1"))
    parts = lines[0].split(" ")
    malformed = []
    if len(parts) == 3:
        method, target, version = parts
    else:
        method, target, version = parts[0], " ".join(parts[1:]), ""
        malformed.append(lines[0])
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            malformed.append(line)
            continue
        headers.append([name, value.strip(" \t")])
    return request_class(method, target, version, headers, malformed)


def framing(req, strict):
    """How the body is delimited: ("none", 0), ("length", n) or ("chunked", None); ValueError
    when it cannot be told. `strict` also refuses Content-Length beside Transfer-Encoding and
    any coding but chunked; otherwise chunked has to come last, and Transfer-Encoding wins."""
    te = req.header_all("transfer-encoding")
    cl = req.header_all("content-length")
    if te:
        codings = [c.strip().lower() for c in ",".join(te).split(",") if c.strip()]
        if strict and cl:
            raise ValueError("both Content-Length and Transfer-Encoding")
        if codings[-1:] != ["chunked"] or (strict and codings != ["chunked"]):
            raise ValueError("unsupported transfer-encoding %r" % ",".join(te))
        return "chunked", None
    if cl:
        values = {v.strip() for v in ",".join(cl).split(",")}
        if len(values) != 1 or not next(iter(values)).isdigit():
            raise ValueError("bad content-length %r" % cl)
        n = int(next(iter(values)))
        return ("length", n) if n else ("none", 0)
    return "none", 0


def chunk(data):
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


class HttpConnection(Connection):
    """One client connection. Subclasses set the class attributes and answer in serve_one()."""

    max_head = 64 * 1024
    idle_timeout = None             # seconds between reads; None: no limit
    server_fields = (("Server", "exchange-sim"),)

    def __init__(self, sock, peer, tls_context=None, stopping=None):
        super().__init__(sock, peer, stopping)
        self.tls_context = tls_context
        self.requests = 0
        self.sni = None

    # -- input

    def recv_more(self):
        self.buf += receive(self.sock)

    def read_head(self):
        """The next head up to the blank line; None when the connection ended cleanly before
        one started. Eof when it ended inside a head (what came is left in self.buf);
        ValueError when the head is over max_head."""
        start = 0
        while True:
            m = HEAD_END.search(self.buf, max(0, start - 3))
            if m:
                head = bytes(self.buf[:m.start()])
                del self.buf[:m.end()]
                return head
            if len(self.buf) > self.max_head:
                raise ValueError("request head over %d bytes" % self.max_head)
            start = len(self.buf)
            try:
                self.recv_more()
            except Eof:
                if self.buf.strip():
                    raise
                return None

    def read_line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line.rstrip(b"\r\n")
            if len(self.buf) > MAX_LINE:
                raise ValueError("line over %d bytes" % MAX_LINE)
            self.recv_more()

    def send_continue(self, req):
        if req.expects_continue and not req.continued:
            req.continued = True
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def body_parts(self, req):
        """The body's bytes as they arrive, never more than one read held (req.framing says
        how it is delimited); 100 Continue first when the client waits for it."""
        kind, length = req.framing
        if kind == "none":
            req.complete = True
            return
        self.send_continue(req)

        def take(n):
            left = n
            while left > 0:
                if not self.buf:
                    self.recv_more()
                part = bytes(self.buf[:left])
                del self.buf[:len(part)]
                left -= len(part)
                req.body_bytes += len(part)
                yield part

        if kind == "length":
            yield from take(length)
        else:
            while True:
                size_text = self.read_line().split(b";", 1)[0].strip()
                if not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size_text):
                    raise ValueError("bad chunk size %r" % size_text[:40])
                size = int(size_text, 16)
                if size == 0:
                    while self.read_line():
                        pass                    # trailer fields
                    break
                yield from take(size)
                if self.read_line():
                    raise ValueError("missing CRLF after chunk data")
        req.complete = True

    def read_body(self, req, limit):
        out = bytearray()
        for part in self.body_parts(req):
            if len(out) + len(part) > limit:
                raise OverflowError("body over %d bytes" % limit)
            out += part
        return bytes(out)

    def drain_body(self, req):
        for _ in self.body_parts(req):
            pass

    def wait_peer(self, seconds):
        """Waits `seconds`; False early when the peer closed or the server stops. Bytes the
        peer sends meanwhile (a pipelined request) are kept for later."""
        deadline = time.monotonic() + max(0.0, seconds)
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if self.stopping.is_set():
                return False
            if len(self.buf) > self.max_head:       # a client pipelining a lot: just wait
                time.sleep(min(left, 0.5))
                continue
            try:
                events = poller.poll(int(min(left, 0.5) * 1000) + 1)
            except OSError:
                return False
            if events and not self.peek_input():
                return False

    def peek_input(self):
        """Reads what the peer sent without blocking; False when it has closed."""
        try:
            self.sock.settimeout(0)
            data = self.sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            return True
        except (ConnectionError, ssl.SSLError, OSError):
            return False
        finally:
            try:
                self.sock.settimeout(self.idle_timeout)
            except OSError:
                pass
        if not data:
            return False
        self.buf += data
        return True

    # -- output

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (ConnectionError, ssl.SSLError, OSError) as e:
            raise Eof(str(e)) from None

    def head_bytes(self, req, status, reason, fields, keep_alive):
        """A response head: status line, the server's own fields, `fields`, and Connection
        as the request's version and `keep_alive` want it."""
        lines = ["HTTP/1.1 %d %s" % (status, reason or http.client.responses.get(status, "Status"))]
        lines += ["%s: %s" % f for f in self.server_fields]
        lines += ["%s: %s" % f for f in fields]
        if not keep_alive:
            lines.append("Connection: close")
        elif req is not None and req.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def respond(self, req, status, fields=(), body=b"", keep_alive=True, reason=None):
        """A whole response with Content-Length (no body bytes for HEAD); returns keep_alive."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        head = self.head_bytes(req, status, reason, list(fields) + [("Content-Length", str(len(body)))], keep_alive)
        self.send(head if req is not None and req.method == "HEAD" else head + body)
        return keep_alive

    @staticmethod
    def http_date():
        return email.utils.formatdate(usegmt=True)

    # -- the loop

    def run(self):
        """Serves the connection until either side ends it; never raises."""
        try:
            if self.tls_context is not None:
                self.sock, self.tls, self.sni = tlsmod.handshake(self.sock, self.tls_context)
            self.sock.settimeout(self.idle_timeout)
            self.opened()
            if self.tls is None and not self.looks_like_http():
                return
            while not self.stopping.is_set() and self.serve_one():
                pass
        except (Eof, ConnectionError, ssl.SSLError, OSError, socket.timeout):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            self.closed()

    def looks_like_http(self):
        """On a plain listener, a connection that opens with a TLS handshake record gets
        "400 Bad Request" and is closed at once, as IIS's http.sys answers it."""
        try:
            self.recv_more()
        except Eof:
            return False
        if self.buf[:1] != b"\x16":
            return True
        self.not_http()
        try:
            self.send(b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n"
                      b"Connection: close\r\n\r\nBad Request\n")
        except Eof:
            pass
        return False

    def opened(self):
        """Called once the connection is ready (after the TLS handshake)."""

    def not_http(self):
        """Called when a plain connection opened with a TLS handshake (before the 400)."""

    def closed(self):
        """Called when the connection has ended."""

    def serve_one(self):
        """Reads and answers one request; False when the connection is to end."""
        raise NotImplementedError
