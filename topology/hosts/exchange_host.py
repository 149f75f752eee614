#!/usr/bin/env python3
"""The simulated Exchange host of the dmzproxy lab: one process per host.

    exchange_host.py --name NAME --address 127.x.y.z --cert PEM --key KEY --store DIR
                     --stats 127.0.0.1:PORT --log FILE.jsonl [--accepted-domain D]...
                     --service NAME:PROTOCOL:PORT[:ROLE]...
                     [--fqdn NAME] [--pending-period-ms MS] [--max-message-size BYTES]

`dmzproxy lab up` starts it (topology/src/lab.cpp) once per [hosts.*] entry of the
topology. Every service binds on --address; PROTOCOL is https, http or smtp; ROLE (smtp)
is e.g. `frontend` (FrontEnd transport, 25) or `hub` (Hub transport, 2525). The statistics
endpoint (GET /stats, JSON) binds on 127.0.0.1 only. SIGTERM or SIGINT ends the process
with status 0 within a fraction of a second. Python 3 standard library only.

The server's DNS name (in Autodiscover answers, SMTP banners and queue ids) is --fqdn, or
the first DNS name of the certificate's subjectAltName, or --name.

Web services (https/http): HTTP/1.1 with keep-alive, a thread per connection, TLS 1.2+.
  /owa                 GET/POST/HEAD: a page naming the host and showing the client
                       address it received (the first X-Forwarded-For entry if present,
                       else the peer), the peer, the Host and the user (NTLM-authenticated
                       connection, or Authorization: Basic, else "anonymous");
                       `?format=json` gives the same as JSON.
  /ecp                 a page saying it is the Exchange admin center.
  /Microsoft-Server-ActiveSync
                       OPTIONS: MS-ASProtocolVersions and MS-ASProtocolCommands.
                       POST Cmd=Ping: held for the heartbeat, then 200 (WBXML Status 1).
                       The heartbeat is `?HeartbeatInterval=N` or `X-Heartbeat: N` when
                       given (test overrides), else the HeartbeatInterval of the WBXML body,
                       else 60 s; at most 3540 s. A client that goes away ends the hold.
  /rpc/rpcproxy.dll    Outlook Anywhere RPC_IN_DATA / RPC_OUT_DATA channel pairs.
                       PAIRING RULE: the first 16 bytes of each channel's request body are
                       the pair cookie (in real MS-RPCH this is the virtual connection
                       cookie carried by the CONN/A1 and CONN/B1 RTS PDUs). RPC_OUT_DATA
                       carries a small body (e.g. Content-Length 76): right after its cookie
                       is read the OUT channel answers `200` with `Content-Length:
                       1073741824` and stays open (the rest of its body is ignored).
                       The bytes that arrive on an RPC_IN_DATA channel after its cookie
                       are echoed, as they arrive, on the OUT channel of the same cookie
                       (bytes that arrive before that OUT channel exists are kept, up to
                       8 MiB, and sent when it comes). The IN channel is answered (200,
                       Content-Length 0) only if its whole declared body arrives.
  /mapi/emsmdb, /mapi/nspi
                       POST: 200 chunked: `PROCESSING` at once, a `PENDING` chunk every
                       X-PendingPeriod ms (request header; default --pending-period-ms,
                       1000) `?pendings=N` times (default 3), then `DONE` and the last chunk.
  /EWS/Exchange.asmx   POST: a small SOAP response naming the host and the user;
                       GET: a short WSDL-like page.
  /autodiscover/autodiscover.xml   POST: an Autodiscover (POX) response naming the server.
  /autodiscover/autodiscover.json  GET: {"Protocol": P, "Url": "https://<fqdn>/..."}
                       (P from ?Protocol=, e.g. ActiveSync, EWS, AutodiscoverV1).
  /OAB/...             GET/HEAD: a small file (oab.xml, or a few bytes of "LZX" data).
  /powershell          a page (so tests can prove that it was, or was never, reached).
  /                    302 to /owa/; anything else 404.
NTLM emulation on the paths Exchange protects with Windows authentication (/EWS, /rpc,
/mapi, /autodiscover/autodiscover.xml, /OAB): connection-based like IIS. A type-1 message
gets 401 with a valid type-2 challenge; a type-3 on the same connection authenticates it
(any user and password: it is an emulation; the user, DOMAIN\\user, is recorded); a type-3
on a connection that was never challenged gets 401 "Unexpected NTLM message Type 3 in new
connection". `Authorization: Basic` is accepted there too (any password). Without
credentials: 401 with `WWW-Authenticate: NTLM` and `WWW-Authenticate: Basic realm="<name>"`.
/owa and ActiveSync demand nothing but record a Basic user when one is sent.

SMTP services: ESMTP with STARTTLS (same certificate), PIPELINING, SIZE, 8BITMIME,
ENHANCEDSTATUSCODES and CHUNKING (BDAT, as Exchange offers it). Only <CRLF>.<CRLF> ends
DATA (a bare LF never does), and a leading dot is removed (un-dot-stuffing); BDAT chunks
are taken as they are. Recipients outside the --accepted-domain domains get
`550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain`, as Exchange says.
Each accepted message is stored as DIR/<service-name>/<queue-id>.eml (the message as
received, un-dot-stuffed, without the final dot line) with a sidecar <queue-id>.json
(queue_id, internal_id, mail_from, rcpts, peer, peer_port, ehlo, tls, size, sha256,
service, role, time, via: DATA or BDAT), the sidecar first, each by an atomic rename. The client gets
`250 2.6.0 <queue-id@fqdn> [InternalId=N] Queued mail for delivery`.

Statistics, GET http://127.0.0.1:PORT/stats: JSON with `requests` per path prefix (owa,
ecp, activesync, rpc, mapi, ews, autodiscover, oab, powershell, other), `connections`
(connection id -> count, peer, service, user), `recent` (the last 200 requests: method,
path, target, peer, x_forwarded_for, host, user, conn, service, status),
`ntlm_handshakes`, `messages` (stored per SMTP service), `smtp` and `rpc` details.
Every request (when its response starts, or when it ends without one) and every message
is also appended as one JSON line to --log, flushed at once.
"""

import argparse
import base64
import collections
import email.utils
import hashlib
import html
import http.client
import http.server
import itertools
import json
import os
import re
import secrets
import select
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse

MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024 * 1024          # bodies read whole (everything but RPC_IN_DATA)
MAX_AUTH_DRAIN = 16 * 1024 * 1024    # a 401'd request body larger than this closes instead
IDLE_TIMEOUT = 120.0                 # IIS connectionTimeout
TLS_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_HEARTBEAT = 60
MAX_HEARTBEAT = 3540
RPC_OUT_LENGTH = 1073741824
RPC_QUEUE_LIMIT = 8 * 1024 * 1024
MAX_PENDINGS = 1000
RECENT = 200
MAX_TRACKED_CONNECTIONS = 5000
SMTP_MAX_SIZE = 37748736             # Exchange's default receive connector limit (36 MB)
SMTP_MAX_COMMAND = 4096
SMTP_MAX_RECIPIENTS = 5000
SMTP_IDLE_TIMEOUT = 300.0
SMTP_MAX_ERRORS = 20

AS_VERSIONS = "2.5,12.0,12.1,14.0,14.1,16.0,16.1"
AS_COMMANDS = ("Sync,SendMail,SmartForward,SmartReply,GetAttachment,GetHierarchy,CreateCollection,"
               "DeleteCollection,MoveCollection,FolderSync,FolderCreate,FolderDelete,FolderUpdate,MoveItems,"
               "GetItemEstimate,MeetingResponse,Search,Settings,Ping,ItemOperations,Provision,"
               "ResolveRecipients,ValidateCert")
CATEGORIES = ("owa", "ecp", "activesync", "rpc", "mapi", "ews", "autodiscover", "oab", "powershell", "other")
PREFIXES = (("/owa", "owa"), ("/ecp", "ecp"), ("/microsoft-server-activesync", "activesync"), ("/rpc", "rpc"),
            ("/mapi", "mapi"), ("/ews", "ews"), ("/autodiscover", "autodiscover"), ("/oab", "oab"),
            ("/powershell", "powershell"))

HEAD_END = re.compile(rb"\r?\n\r?\n")
STOP = False                          # set by the signal handler only


class Eof(Exception):
    """The peer closed (or reset) the connection, or it idled out."""


def now_iso():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


def category(path_lower):
    for prefix, name in PREFIXES:
        if path_lower == prefix or path_lower.startswith(prefix + "/"):
            return name
    return "other"


def protected(path_lower, cat):
    """The paths Exchange's IIS protects with Windows authentication."""
    if cat in ("ews", "rpc", "mapi", "oab"):
        return True
    return path_lower.startswith("/autodiscover/autodiscover.xml")


# ---------------------------------------------------------------- log and statistics

class JsonLog:
    def __init__(self, path):
        self._f = open(path, "a", encoding="utf-8") if path else None
        self._lock = threading.Lock()

    def write(self, obj):
        if self._f is None:
            return
        line = json.dumps(obj, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            try:
                self._f.write(line)
                self._f.flush()
            except (OSError, ValueError):
                pass

    def close(self):
        with self._lock:
            if self._f:
                try:
                    self._f.flush()
                    self._f.close()
                except OSError:
                    pass
                self._f = None


class Stats:
    def __init__(self, host):
        self.host = host
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests = {c: 0 for c in CATEGORIES}
        self.connections = collections.OrderedDict()
        self.recent = collections.deque(maxlen=RECENT)
        self.ntlm_handshakes = 0
        self.messages = {}
        self.smtp = {}

    def connection(self, conn_id, service, peer, tls):
        with self.lock:
            self.connections[str(conn_id)] = {"count": 0, "peer": "%s:%d" % peer, "service": service,
                                              "tls": tls, "user": None, "opened": now_iso(), "open": True}
            while len(self.connections) > MAX_TRACKED_CONNECTIONS:
                self.connections.popitem(last=False)

    def connection_closed(self, conn_id):
        with self.lock:
            c = self.connections.get(str(conn_id))
            if c:
                c["open"] = False

    def request(self, conn, req, cat):
        rec = {"time": now_iso(), "conn": conn.id, "service": conn.service.name, "method": req.method,
               "path": req.path, "target": req.target, "peer": conn.peer[0], "peer_port": conn.peer[1],
               "x_forwarded_for": req.header("x-forwarded-for"), "host": req.header("host"),
               "user": None, "category": cat, "status": None}
        with self.lock:
            self.requests[cat] += 1
            c = self.connections.get(str(conn.id))
            if c:
                c["count"] += 1
            self.recent.append(rec)
        return rec

    def update(self, rec, **fields):
        with self.lock:
            rec.update(fields)

    def set_user(self, conn, rec, user):
        with self.lock:
            rec["user"] = user
            c = self.connections.get(str(conn.id))
            if c and user:
                c["user"] = user

    def ntlm_done(self):
        with self.lock:
            self.ntlm_handshakes += 1

    def smtp_event(self, service, key, n=1):
        with self.lock:
            s = self.smtp.setdefault(service, {"sessions": 0, "messages": 0, "rcpt_refused": 0, "bytes": 0})
            s[key] += n
            if key == "messages":
                self.messages[service] = self.messages.get(service, 0) + n

    def snapshot(self):
        h = self.host
        with self.lock:
            return json.dumps({
                "name": h.name, "fqdn": h.fqdn, "address": h.address, "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "uptime_s": round(time.time() - self.started, 3),
                "services": [{"name": s.name, "protocol": s.protocol, "port": s.port, "role": s.role}
                             for s in h.services],
                "accepted_domains": h.accepted_domains,
                "requests": dict(self.requests),
                "requests_total": sum(self.requests.values()),
                "connections": self.connections,
                "recent": list(self.recent),
                "ntlm_handshakes": self.ntlm_handshakes,
                "messages": dict(self.messages),
                "smtp": self.smtp,
                "rpc": h.rpc.snapshot(),
            }, indent=1, default=str)


# ---------------------------------------------------------------- NTLM (NTLMSSP) messages

NTLMSSP = b"NTLMSSP\x00"
NEG_UNICODE = 0x00000001
NEG_OEM = 0x00000002
REQUEST_TARGET = 0x00000004
NEG_NTLM = 0x00000200
NEG_ALWAYS_SIGN = 0x00008000
TARGET_TYPE_DOMAIN = 0x00010000
NEG_EXTENDED_SESSION_SECURITY = 0x00080000
NEG_TARGET_INFO = 0x00800000
NEG_VERSION = 0x02000000
NEG_128 = 0x20000000
NEG_56 = 0x80000000


def ntlm_type(token):
    """(message type, raw bytes) of a base64 NTLMSSP token, or (None, None)."""
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (ValueError, TypeError):
        return None, None
    if len(raw) < 12 or raw[:8] != NTLMSSP:
        return None, None
    return struct.unpack_from("<I", raw, 8)[0], raw


def ntlm_type2(type1_flags, netbios_domain, netbios_host, dns_domain, dns_host):
    """A valid NTLMSSP CHALLENGE message (target name, target info, version)."""
    unicode = not type1_flags or bool(type1_flags & NEG_UNICODE)
    enc = (lambda s: s.encode("utf-16-le")) if unicode else (lambda s: s.encode("ascii", "replace"))
    target = enc(netbios_domain)

    def av(av_id, value):
        data = value.encode("utf-16-le")
        return struct.pack("<HH", av_id, len(data)) + data

    info = av(2, netbios_domain) + av(1, netbios_host) + av(4, dns_domain) + av(3, dns_host)
    info += struct.pack("<HH", 7, 8) + struct.pack("<Q", int((time.time() + 11644473600) * 10000000))
    info += struct.pack("<HH", 0, 0)  # MsvAvEOL
    flags = (NEG_UNICODE if unicode else NEG_OEM) | REQUEST_TARGET | NEG_NTLM | NEG_ALWAYS_SIGN | \
        TARGET_TYPE_DOMAIN | NEG_EXTENDED_SESSION_SECURITY | NEG_TARGET_INFO | NEG_VERSION | \
        (type1_flags & (NEG_128 | NEG_56))
    header_len = 56
    msg = NTLMSSP + struct.pack("<I", 2)
    msg += struct.pack("<HHI", len(target), len(target), header_len)
    msg += struct.pack("<I", flags)
    msg += secrets.token_bytes(8)
    msg += b"\x00" * 8
    msg += struct.pack("<HHI", len(info), len(info), header_len + len(target))
    msg += bytes([10, 0]) + struct.pack("<H", 17763) + b"\x00\x00\x00\x0f"  # 10.0.17763, NTLM revision 15
    return base64.b64encode(msg + target + info).decode("ascii")


def ntlm_type3_identity(raw):
    """(user, domain) from an NTLMSSP AUTHENTICATE message, or (None, None)."""
    if len(raw) < 64:
        return None, None

    def field(offset):
        length, _, off = struct.unpack_from("<HHI", raw, offset)
        return raw[off:off + length]

    flags = struct.unpack_from("<I", raw, 60)[0]
    domain, user = field(28), field(36)
    if flags & NEG_UNICODE:
        return user.decode("utf-16-le", "replace"), domain.decode("utf-16-le", "replace")
    return user.decode("latin-1"), domain.decode("latin-1")


def basic_user(token):
    """The user of an `Authorization: Basic` token (any password), or None."""
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8", "replace")
    except (ValueError, TypeError):
        return None
    user, sep, _ = text.partition(":")
    return user if sep and user else None


# ---------------------------------------------------------------- Outlook Anywhere pairs

class OutChannel:
    """The OUT side of a pair: its connection thread alone writes to the socket; IN
    channels hand it bytes through a queue and a wake-up socket."""

    def __init__(self):
        self.queue = collections.deque()
        self.queued = 0
        self.closed = False
        self.pair = None
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    def wake(self):
        try:
            self.wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def close(self):
        for s in (self.wake_r, self.wake_w):
            try:
                s.close()
            except OSError:
                pass


class RpcPair:
    def __init__(self, cookie):
        self.cookie = cookie
        self.cond = threading.Condition()
        self.out = None
        self.ins = 0
        self.pending = collections.deque()
        self.pending_bytes = 0
        self.dropped = 0

    def push(self, data, stopping):
        """Hands IN-channel bytes to the OUT channel (waiting while it is far behind)."""
        with self.cond:
            while self.out is not None and not self.out.closed and self.out.queued > RPC_QUEUE_LIMIT:
                if stopping.is_set():
                    return
                self.cond.wait(0.5)
            out = self.out
            if out is not None and not out.closed:
                out.queue.append(data)
                out.queued += len(data)
                out.wake()
            elif self.pending_bytes + len(data) <= RPC_QUEUE_LIMIT:
                self.pending.append(data)
                self.pending_bytes += len(data)
            else:
                self.dropped += len(data)

    def take(self, chan):
        with self.cond:
            items = list(chan.queue)
            chan.queue.clear()
            chan.queued = 0
            self.cond.notify_all()
            return items


class RpcRegistry:
    def __init__(self):
        self.lock = threading.Lock()
        self.pairs = {}
        self.out_channels = 0
        self.in_channels = 0
        self.bytes_echoed = 0

    def attach_out(self, cookie, chan):
        with self.lock:
            self.out_channels += 1
            pair = self.pairs.get(cookie)
            if pair is None:
                pair = self.pairs[cookie] = RpcPair(cookie)
        with pair.cond:
            old = pair.out
            pair.out = chan
            chan.pair = pair
            while pair.pending:
                d = pair.pending.popleft()
                chan.queue.append(d)
                chan.queued += len(d)
            pair.pending_bytes = 0
            if old is not None:
                old.closed = True       # replaced: it gets nothing more
                old.wake()
            chan.wake()
        return pair

    def detach_out(self, chan):
        pair = chan.pair
        if pair is None:
            return
        with self.lock:
            with pair.cond:
                if pair.out is chan:
                    pair.out = None
                chan.closed = True
                pair.cond.notify_all()
                if pair.out is None and pair.ins == 0 and self.pairs.get(pair.cookie) is pair:
                    del self.pairs[pair.cookie]

    def attach_in(self, cookie):
        with self.lock:
            self.in_channels += 1
            pair = self.pairs.get(cookie)
            if pair is None:
                pair = self.pairs[cookie] = RpcPair(cookie)
            with pair.cond:
                pair.ins += 1
        return pair

    def detach_in(self, pair):
        with self.lock:
            with pair.cond:
                pair.ins -= 1
                if pair.out is None and pair.ins == 0 and self.pairs.get(pair.cookie) is pair:
                    del self.pairs[pair.cookie]

    def echoed(self, n):
        with self.lock:
            self.bytes_echoed += n

    def snapshot(self):
        with self.lock:
            return {"pairs_open": len(self.pairs), "out_channels": self.out_channels,
                    "in_channels": self.in_channels, "bytes_echoed": self.bytes_echoed,
                    "pairs": [{"cookie": p.cookie.hex(), "out": p.out is not None, "ins": p.ins,
                               "pending_bytes": p.pending_bytes} for p in list(self.pairs.values())[:50]]}


# ---------------------------------------------------------------- HTTP

class Request:
    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.path = urllib.parse.unquote(target.split("?", 1)[0]) if not target.startswith("http") else \
            urllib.parse.unquote(urllib.parse.urlsplit(target).path or "/")
        self.lower = self.path.lower()
        query = target.split("?", 1)[1] if "?" in target else ""
        self.query = {}
        for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
            self.query.setdefault(k.lower(), v)
        self.user = None
        self.rec = None
        self.logged = False
        self.continued = False
        self.body_bytes = 0
        self.complete = False

    def header(self, name):
        name = name.lower()
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None

    def header_all(self, name):
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    @property
    def keep_alive(self):
        tokens = {t.strip().lower() for v in self.header_all("connection") for t in v.split(",")}
        if self.version == "HTTP/1.1":
            return "close" not in tokens
        return "keep-alive" in tokens


class HttpConnection:
    ids = itertools.count(1)
    ids_lock = threading.Lock()

    def __init__(self, host, service, sock, peer):
        with HttpConnection.ids_lock:
            self.id = next(HttpConnection.ids)
        self.host = host
        self.service = service
        self.sock = sock
        self.peer = peer[:2]
        self.buf = bytearray()
        self.requests = 0
        self.tls = None
        self.sni = None
        self.ntlm_state = None      # None | "challenged" | "authenticated"
        self.ntlm_user = None

    # -- input

    def _recv(self):
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise Eof("idle timeout") from None
        except (ConnectionError, ssl.SSLError, OSError) as e:
            raise Eof(str(e)) from None
        if not data:
            raise Eof("closed")
        self.buf += data

    def read_head(self):
        """The head up to the blank line, or None on a clean close before any byte."""
        start = 0
        while True:
            m = HEAD_END.search(self.buf, max(0, start - 3))
            if m:
                head = bytes(self.buf[:m.start()])
                del self.buf[:m.end()]
                return head
            if len(self.buf) > MAX_HEAD:
                raise ValueError("request head over %d bytes" % MAX_HEAD)
            start = len(self.buf)
            try:
                self._recv()
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
            if len(self.buf) > 65536:
                raise ValueError("chunk line too long")
            self._recv()

    def body_framing(self, req):
        """(kind, length): ("none", 0), ("length", n) or ("chunked", None); ValueError if bad."""
        te = req.header_all("transfer-encoding")
        cl = req.header_all("content-length")
        if te and cl:
            raise ValueError("both Content-Length and Transfer-Encoding")
        if te:
            codings = [c.strip().lower() for c in ",".join(te).split(",") if c.strip()]
            if codings != ["chunked"]:
                raise ValueError("unsupported transfer-encoding %r" % ",".join(te))
            return "chunked", None
        if cl:
            values = {v.strip() for v in ",".join(cl).split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise ValueError("bad content-length %r" % cl)
            n = int(next(iter(values)))
            return ("length", n) if n else ("none", 0)
        return "none", 0

    def body_iter(self, req):
        """The body's bytes as they arrive (never more than one read held)."""
        kind, length = req.framing
        if kind == "none":
            req.complete = True
            return
        if not req.continued and (req.header("expect") or "").lower() == "100-continue":
            req.continued = True
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

        def take(n):
            left = n
            while left > 0:
                if not self.buf:
                    self._recv()
                part = bytes(self.buf[:left])
                del self.buf[:len(part)]
                left -= len(part)
                req.body_bytes += len(part)
                yield part

        if kind == "length":
            yield from take(length)
        else:
            while True:
                line = self.read_line()
                size_text = line.split(b";", 1)[0].strip()
                if not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size_text):
                    raise ValueError("bad chunk size")
                size = int(size_text, 16)
                if size == 0:
                    while self.read_line():
                        pass
                    break
                yield from take(size)
                if self.read_line():
                    raise ValueError("missing CRLF after chunk data")
        req.complete = True

    def read_body(self, req, limit=MAX_BODY):
        out = bytearray()
        for part in self.body_iter(req):
            if len(out) + len(part) > limit:
                raise OverflowError("body over %d bytes" % limit)
            out += part
        return bytes(out)

    def drain_body(self, req):
        for _ in self.body_iter(req):
            pass

    def wait_peer(self, seconds):
        """Waits `seconds`; False early when the peer closed or the host stops. Bytes the
        peer sends meanwhile (a pipelined request) are kept for later."""
        deadline = time.monotonic() + max(0.0, seconds)
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            if self.host.stopping.is_set():
                return False
            if len(self.buf) > MAX_HEAD:     # a client pipelining a lot: just wait
                time.sleep(min(left, 0.5))
                continue
            try:
                events = poller.poll(int(min(left, 0.5) * 1000) + 1)
            except OSError:
                return False
            if not events:
                continue
            alive = self._peek_input()
            if not alive:
                return False

    def _peek_input(self):
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
                self.sock.settimeout(IDLE_TIMEOUT)
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

    def log_request(self, req, status, error=None, **extra):
        if req.logged:
            return
        req.logged = True
        self.host.stats.update(req.rec, status=status)
        obj = {"event": "request", "time": now_iso(), "host": self.host.name, "service": self.service.name,
               "conn": self.id, "req": self.requests, "peer": self.peer[0], "peer_port": self.peer[1],
               "tls": self.tls, "sni": self.sni, "method": req.method, "target": req.target, "path": req.path,
               "category": req.rec["category"], "host_header": req.header("host"),
               "x_forwarded_for": req.header("x-forwarded-for"), "via": req.header("via"),
               "user": req.user, "status": status, "body_bytes": req.body_bytes}
        if error:
            obj["error"] = error
        obj.update(extra)
        self.host.log.write(obj)

    def head_bytes(self, req, status, reason, headers, keep_alive):
        lines = ["HTTP/1.1 %d %s" % (status, reason or http.client.responses.get(status, "Status")),
                 "Date: " + email.utils.formatdate(usegmt=True),
                 "Server: Microsoft-IIS/10.0",
                 "X-FEServer: " + self.host.name.upper(),
                 "X-Powered-By: ASP.NET"]
        lines += ["%s: %s" % h for h in headers]
        if not keep_alive:
            lines.append("Connection: close")
        elif req is not None and req.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def respond(self, req, status, headers=(), body=b"", keep_alive=True, reason=None, **log_extra):
        if isinstance(body, str):
            body = body.encode("utf-8")
        headers = list(headers) + [("Content-Length", str(len(body)))]
        self.log_request(req, status, **log_extra)
        data = self.head_bytes(req, status, reason, headers, keep_alive)
        if req.method != "HEAD":
            data += body
        self.send(data)
        return keep_alive

    def page(self, req, status, title, inner, keep_alive, headers=()):
        body = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title></head>\n<body>\n%s\n"
                "<p><small>Simulated Exchange host <b>%s</b> (dmzproxy lab)</small></p>\n</body></html>\n") % (
            html.escape(title), inner, html.escape(self.host.name))
        return self.respond(req, status, [("Content-Type", "text/html; charset=utf-8")] + list(headers),
                            body, keep_alive)

    # -- the loop

    def run(self):
        try:
            if self.service.protocol == "https":
                self.sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
                self.sock = self.host.tls_context.wrap_socket(self.sock, server_side=True)
                self.tls = self.sock.version()
                self.sni = getattr(self.sock, "dmz_sni", None)
            self.sock.settimeout(IDLE_TIMEOUT)
            self.host.stats.connection(self.id, self.service.name, self.peer, self.tls)
            while not self.host.stopping.is_set() and self.serve_one():
                pass
        except (Eof, ConnectionError, ssl.SSLError, OSError, socket.timeout):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            self.host.stats.connection_closed(self.id)

    def parse(self, head):
        lines = re.split(r"\r?\n", head.decode("latin-1"))
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not parts[0] or not parts[1]:
            return None
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                return None
            headers.append((name, value.strip(" \t")))
        return Request(parts[0], parts[1], parts[2], headers)

    def serve_one(self):
        try:
            head = self.read_head()
        except ValueError:
            self.send(self.head_bytes(None, 431, None, [("Content-Length", "0")], False))
            return False
        if head is None:
            return False
        req = self.parse(head)
        self.requests += 1
        if req is None:
            self.host.log.write({"event": "bad-request", "time": now_iso(), "host": self.host.name,
                                 "conn": self.id, "peer": self.peer[0], "head": head[:200].decode("latin-1")})
            self.send(self.head_bytes(None, 400, None, [("Content-Type", "text/plain"), ("Content-Length", "12")],
                                      False) + b"Bad Request\n")
            return False
        cat = category(req.lower)
        req.rec = self.host.stats.request(self, req, cat)
        try:
            req.framing = self.body_framing(req)
        except ValueError as e:
            req.framing = ("none", 0)
            return self.respond(req, 400, [("Content-Type", "text/plain")], str(e) + "\n", False, error=str(e))
        try:
            return self.dispatch(req, cat)
        except Eof as e:
            self.log_request(req, None, error="connection ended: %s" % e, complete=req.complete)
            return False
        except OverflowError as e:
            return self.respond(req, 413, [("Content-Type", "text/plain")], str(e) + "\n", False, error=str(e))
        except ValueError as e:
            return self.respond(req, 400, [("Content-Type", "text/plain")], str(e) + "\n", False, error=str(e))

    # -- authentication

    def authenticate(self, req):
        """None when the request may go on (req.user set), else (headers, body) of a 401."""
        name = self.host.name
        challenge = [("WWW-Authenticate", "NTLM"), ("WWW-Authenticate", 'Basic realm="%s"' % name)]
        auth = (req.header("authorization") or "").strip()
        scheme, _, token = auth.partition(" ")
        s = scheme.lower()
        if s == "basic":
            user = basic_user(token)
            if user:
                req.user = user
                return None
            return challenge, "401 - Unauthorized: malformed Basic credentials\n"
        if s in ("ntlm", "negotiate") and token.strip():
            kind, raw = ntlm_type(token)
            if kind == 1:
                flags = struct.unpack_from("<I", raw, 12)[0] if len(raw) >= 16 else 0
                self.ntlm_state = "challenged"
                self.ntlm_user = None
                nb_host = self.host.name.upper()[:15]
                dns_host = self.host.fqdn
                dns_domain = dns_host.split(".", 1)[1] if "." in dns_host else dns_host
                nb_domain = dns_domain.split(".", 1)[0].upper()[:15]
                t2 = ntlm_type2(flags, nb_domain, nb_host, dns_domain, dns_host)
                return [("WWW-Authenticate", ("Negotiate " if s == "negotiate" else "NTLM ") + t2)], \
                    "401 - Unauthorized: NTLM challenge\n"
            if kind == 3:
                if self.ntlm_state != "challenged":
                    return challenge, "Unexpected NTLM message Type 3 in new connection"
                user, domain = ntlm_type3_identity(raw)
                if not user:
                    self.ntlm_state = None
                    return challenge, "401 - Unauthorized: NTLM message Type 3 without a user\n"
                self.ntlm_user = "%s\\%s" % (domain, user) if domain else user
                self.ntlm_state = "authenticated"
                self.host.stats.ntlm_done()
                self.host.log.write({"event": "ntlm", "time": now_iso(), "host": self.host.name,
                                     "conn": self.id, "peer": self.peer[0], "user": self.ntlm_user})
                req.user = self.ntlm_user
                return None
            return challenge, "401 - Unauthorized: not an NTLM message\n"
        if self.ntlm_state == "authenticated":
            req.user = self.ntlm_user
            return None
        return challenge, "401 - Unauthorized: Access is denied due to invalid credentials.\n"

    def passive_user(self, req):
        auth = (req.header("authorization") or "").strip()
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "basic":
            req.user = basic_user(token)
        if not req.user and self.ntlm_state == "authenticated":
            req.user = self.ntlm_user

    # -- dispatch

    def dispatch(self, req, cat):
        keep = req.keep_alive
        if protected(req.lower, cat):
            refusal = self.authenticate(req)
        else:
            refusal = None
            self.passive_user(req)
        self.host.stats.set_user(self, req.rec, req.user)
        if refusal is not None:
            headers, text = refusal
            kind, length = req.framing
            expect = (req.header("expect") or "").lower() == "100-continue"
            if kind != "none" and (expect or kind == "chunked" or length > MAX_AUTH_DRAIN):
                keep = False          # answer at once and close, as IIS does for a big upload
            elif kind != "none":
                self.drain_body(req)
            return self.respond(req, 401, [("Content-Type", "text/html")] + headers, text, keep)

        m = req.method
        if cat == "owa":
            if m not in ("GET", "POST", "HEAD"):
                self.read_body(req)
                return self.respond(req, 405, [("Allow", "GET, POST, HEAD")], b"", keep)
            self.read_body(req)
            return self.owa(req, keep)
        if cat == "ecp":
            self.read_body(req)
            return self.page(req, 200, "Exchange admin center",
                             "<h1>Exchange admin center</h1>\n<p id=\"ecp\">The Exchange admin center (/ecp) of "
                             "host %s was reached by %s.</p>" % (html.escape(self.host.name),
                                                                  html.escape(self.client_address(req))), keep)
        if cat == "activesync":
            return self.activesync(req, keep)
        if cat == "rpc":
            if req.lower.rstrip("/") != "/rpc/rpcproxy.dll":
                self.read_body(req)
                return self.page(req, 404, "Not found", "<h1>404 - File or directory not found.</h1>", keep)
            if m == "RPC_OUT_DATA":
                return self.rpc_out(req)
            if m == "RPC_IN_DATA":
                return self.rpc_in(req, keep)
            self.read_body(req)
            return self.respond(req, 405, [("Allow", "RPC_IN_DATA, RPC_OUT_DATA")], b"", keep)
        if cat == "mapi":
            self.read_body(req)
            if m == "POST" and (req.lower.startswith("/mapi/emsmdb") or req.lower.startswith("/mapi/nspi")):
                return self.mapi(req, keep)
            if m in ("GET", "HEAD"):
                return self.page(req, 200, "MAPI over HTTP",
                                 "<h1>Exchange MAPI/HTTP Connectivity Endpoint</h1>\n<p>User: %s</p>" %
                                 html.escape(req.user or "anonymous"), keep)
            return self.respond(req, 405, [("Allow", "POST, GET")], b"", keep)
        if cat == "ews":
            body = self.read_body(req)
            return self.ews(req, body, keep)
        if cat == "autodiscover":
            body = self.read_body(req)
            return self.autodiscover(req, body, keep)
        if cat == "oab":
            self.read_body(req)
            return self.oab(req, keep)
        if cat == "powershell":
            self.read_body(req)
            return self.page(req, 200, "Remote PowerShell",
                             "<h1>Exchange Remote PowerShell</h1>\n<p id=\"powershell\">/powershell of host %s "
                             "was reached.</p>" % html.escape(self.host.name), keep)
        self.read_body(req)
        if req.lower == "/":
            return self.respond(req, 302, [("Location", "/owa/"), ("Content-Type", "text/html")],
                                b"<a href=\"/owa/\">/owa/</a>\n", keep)
        return self.page(req, 404, "Not found", "<h1>404 - File or directory not found.</h1>", keep)

    def client_address(self, req):
        xff = req.header("x-forwarded-for")
        if xff:
            first = xff.split(",")[0].strip()
            if first:
                return first
        return self.peer[0]

    # -- /owa

    def owa(self, req, keep):
        info = collections.OrderedDict([
            ("host", self.host.name), ("server", self.host.fqdn),
            ("client_address", self.client_address(req)), ("peer_address", self.peer[0]),
            ("peer_port", self.peer[1]), ("x_forwarded_for", req.header("x-forwarded-for")),
            ("x_forwarded_proto", req.header("x-forwarded-proto")), ("via", req.header("via")),
            ("host_header", req.header("host")), ("user", req.user or "anonymous"),
            ("method", req.method), ("path", req.path), ("conn", self.id), ("request_on_conn", self.requests),
            ("tls", self.tls), ("sni", self.sni), ("service", self.service.name)])
        if req.query.get("format") == "json":
            return self.respond(req, 200, [("Content-Type", "application/json")], json.dumps(info) + "\n", keep)
        rows = "\n".join("<tr><th>%s</th><td id=\"%s\">%s</td></tr>" % (
            html.escape(k.replace("_", " ")), html.escape(k.replace("_", "-")),
            html.escape("" if v is None else str(v))) for k, v in info.items())
        inner = ("<h1>Outlook on the web</h1>\n<p>Served by the simulated Exchange host <b id=\"host-name\">%s</b> "
                 "to client <b>%s</b> (peer %s), user <b>%s</b>.</p>\n<table>\n%s\n</table>") % (
            html.escape(self.host.name), html.escape(info["client_address"]), html.escape(self.peer[0]),
            html.escape(info["user"]), rows)
        return self.page(req, 200, "Outlook - %s" % self.host.name, inner, keep)

    # -- ActiveSync

    def activesync(self, req, keep):
        m = req.method
        base = [("MS-Server-ActiveSync", "15.20"), ("Cache-Control", "private")]
        if m == "OPTIONS":
            self.read_body(req)
            return self.respond(req, 200, base + [("Allow", "OPTIONS,POST"), ("MS-ASProtocolVersions", AS_VERSIONS),
                                                  ("MS-ASProtocolCommands", AS_COMMANDS),
                                                  ("Public", "OPTIONS,POST")], b"", keep)
        if m != "POST":
            self.read_body(req)
            return self.respond(req, 501, [("Content-Type", "text/plain")], b"Not implemented\n", keep)
        body = self.read_body(req, 10 * 1024 * 1024)
        cmd = req.query.get("cmd", "")
        if cmd.lower() != "ping":
            return self.respond(req, 200, base + [("Content-Type", "application/vnd.ms-sync.wbxml")], b"", keep,
                                command=cmd)
        heartbeat, source = DEFAULT_HEARTBEAT, "default"
        override = req.query.get("heartbeatinterval") or req.header("x-heartbeat")
        if override is not None and override.strip().isdigit():
            heartbeat, source = int(override.strip()), "override"
        else:
            mm = re.search(rb"\x48\x03(\d{1,5})\x00", body) if b"\x00\x0d" in body else None
            if mm:
                heartbeat, source = int(mm.group(1)), "wbxml"
        heartbeat = max(0, min(heartbeat, MAX_HEARTBEAT))
        self.host.log.write({"event": "ping-hold", "time": now_iso(), "host": self.host.name, "conn": self.id,
                             "peer": self.peer[0], "user": req.user, "heartbeat": heartbeat, "source": source})
        started = time.monotonic()
        if not self.wait_peer(heartbeat):
            self.log_request(req, None, error="client left during the Ping hold", command="Ping",
                             heartbeat=heartbeat, held_s=round(time.monotonic() - started, 3))
            return False
        # Ping response: Status 1 (the heartbeat expired, nothing changed).
        wbxml = bytes([0x03, 0x01, 0x6A, 0x00, 0x00, 0x0D, 0x45, 0x47, 0x03]) + b"1" + bytes([0x00, 0x01, 0x01])
        return self.respond(req, 200, base + [("Content-Type", "application/vnd.ms-sync.wbxml")], wbxml, keep,
                            command="Ping", heartbeat=heartbeat, held_s=round(time.monotonic() - started, 3))

    # -- Outlook Anywhere

    def rpc_out(self, req):
        cookie = b""
        for part in self.body_iter(req):       # answered as soon as the cookie is in
            cookie += part[:16 - len(cookie)]
            if len(cookie) == 16:
                break
        if len(cookie) < 16:
            return self.respond(req, 400, [("Content-Type", "text/plain")],
                                b"RPC_OUT_DATA: the body must start with the 16-byte channel cookie\n", False)
        self.buf.clear()                        # the rest of the small body is not used
        self.log_request(req, 200, channel="out", cookie=cookie.hex())
        self.send(self.head_bytes(req, 200, "Success", [("Content-Type", "application/rpc"),
                                                          ("Content-Length", str(RPC_OUT_LENGTH))], True))
        rpc = self.host.rpc
        chan = OutChannel()
        pair = rpc.attach_out(cookie, chan)
        sent = 0
        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            poller.register(chan.wake_r.fileno(), select.POLLIN)
            while not self.host.stopping.is_set() and not chan.closed:
                events = dict(poller.poll(500))
                if chan.wake_r.fileno() in events:
                    try:
                        while chan.wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                if self.sock.fileno() in events:
                    if not self._peek_input():
                        break
                    self.buf.clear()       # nothing is expected from the client on OUT
                for data in pair.take(chan):
                    data = data[:RPC_OUT_LENGTH - sent]
                    if data:
                        self.send(data)
                        sent += len(data)
                        rpc.echoed(len(data))
                if sent >= RPC_OUT_LENGTH:
                    break
        finally:
            rpc.detach_out(chan)
            chan.close()
            self.host.log.write({"event": "rpc-out-closed", "time": now_iso(), "host": self.host.name,
                                 "conn": self.id, "cookie": cookie.hex(), "bytes_echoed": sent})
        return False

    def rpc_in(self, req, keep):
        rpc = self.host.rpc
        cookie = bytearray()
        pair = None
        forwarded = 0
        try:
            for part in self.body_iter(req):
                if pair is None:
                    need = 16 - len(cookie)
                    cookie += part[:need]
                    part = part[need:]
                    if len(cookie) == 16:
                        pair = rpc.attach_in(bytes(cookie))
                if part and pair is not None:
                    pair.push(part, self.host.stopping)
                    forwarded += len(part)
        except Eof as e:
            self.log_request(req, None, error="connection ended inside the IN channel body: %s" % e,
                             channel="in", cookie=bytes(cookie).hex(), forwarded=forwarded, complete=False)
            return False
        finally:
            if pair is not None:
                rpc.detach_in(pair)
        return self.respond(req, 200, [("Content-Type", "application/rpc")], b"", keep, reason="Success",
                            channel="in", cookie=bytes(cookie).hex(), forwarded=forwarded, complete=True)

    # -- MAPI over HTTP

    def mapi(self, req, keep):
        try:
            period_ms = int((req.header("x-pendingperiod") or "").strip() or self.host.pending_period_ms)
        except ValueError:
            period_ms = self.host.pending_period_ms
        period_ms = max(10, min(period_ms, 60000))
        try:
            pendings = int(req.query.get("pendings", "3"))
        except ValueError:
            pendings = 3
        pendings = max(0, min(pendings, MAX_PENDINGS))
        request_type = req.header("x-requesttype") or "Execute"
        started = time.monotonic()
        headers = [("Content-Type", "application/mapi-http"), ("Transfer-Encoding", "chunked"),
                   ("Cache-Control", "private"), ("X-RequestType", request_type), ("X-ResponseCode", "0"),
                   ("X-PendingPeriod", str(period_ms)), ("X-ServerApplication", "Exchange/15.02.1544.004")]
        if req.header("x-requestid"):
            headers.append(("X-RequestId", req.header("x-requestid")))
        self.log_request(req, 200, pendings=pendings, pending_period_ms=period_ms)

        def chunk(data):
            return b"%x\r\n%s\r\n" % (len(data), data)

        self.send(self.head_bytes(req, 200, None, headers, keep) + chunk(b"PROCESSING\r\n"))
        for _ in range(pendings):
            if not self.wait_peer(period_ms / 1000.0):
                return False
            self.send(chunk(b"PENDING\r\n"))
        if not self.wait_peer(period_ms / 1000.0):
            return False
        elapsed = int((time.monotonic() - started) * 1000)
        done = ("DONE\r\nX-ResponseCode: 0\r\nX-ElapsedTime: %d\r\nX-StartTime: %s\r\n\r\n" % (
            elapsed, email.utils.formatdate(usegmt=True))).encode()
        self.send(chunk(done) + b"0\r\n\r\n")
        return keep

    # -- EWS, Autodiscover, OAB

    def ews(self, req, body, keep):
        user = req.user or "anonymous"
        if req.method == "POST":
            soap = (
                '<?xml version="1.0" encoding="utf-8"?>\n'
                '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
                '<s:Header><h:ServerVersionInfo MajorVersion="15" MinorVersion="2" MajorBuildNumber="1544" '
                'MinorBuildNumber="4" Version="V2017_07_11" '
                'xmlns:h="http://schemas.microsoft.com/exchange/services/2006/types"/>'
                '<lab:Lab xmlns:lab="urn:dmzproxy:lab" Host="%s" User="%s" Client="%s" Peer="%s"/></s:Header>'
                '<s:Body><m:GetFolderResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">'
                '<m:ResponseMessages><m:GetFolderResponseMessage ResponseClass="Success">'
                '<m:ResponseCode>NoError</m:ResponseCode></m:GetFolderResponseMessage></m:ResponseMessages>'
                '</m:GetFolderResponse></s:Body></s:Envelope>\n') % tuple(
                html.escape(x, quote=True) for x in (self.host.name, user, self.client_address(req), self.peer[0]))
            return self.respond(req, 200, [("Content-Type", "text/xml; charset=utf-8")], soap, keep)
        if req.method in ("GET", "HEAD"):
            wsdl = ('<?xml version="1.0" encoding="utf-8"?>\n<wsdl:definitions '
                    'xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/" '
                    'targetNamespace="http://schemas.microsoft.com/exchange/services/2006/messages">\n'
                    '<!-- Exchange Web Services of the simulated host %s; user %s -->\n'
                    '<wsdl:service name="ExchangeServices"><wsdl:port name="ExchangeServicePort">'
                    '<soap:address xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/" '
                    'location="https://%s/EWS/Exchange.asmx"/></wsdl:port></wsdl:service>\n'
                    '</wsdl:definitions>\n') % (html.escape(self.host.name), html.escape(user),
                                                html.escape(self.host.fqdn))
            return self.respond(req, 200, [("Content-Type", "text/xml; charset=utf-8")], wsdl, keep)
        return self.respond(req, 405, [("Allow", "GET, POST")], b"", keep)

    def autodiscover(self, req, body, keep):
        fqdn = self.host.fqdn
        if req.lower.startswith("/autodiscover/autodiscover.json"):
            if req.method not in ("GET", "HEAD"):
                return self.respond(req, 405, [("Allow", "GET")], b"", keep)
            protocol = req.query.get("protocol", "")
            urls = {"activesync": ("ActiveSync", "/Microsoft-Server-ActiveSync"),
                    "ews": ("EWS", "/EWS/Exchange.asmx"),
                    "autodiscoverv1": ("AutodiscoverV1", "/Autodiscover/Autodiscover.xml"),
                    "rest": ("Rest", "/api")}
            if protocol.lower() not in urls:
                return self.respond(req, 400, [("Content-Type", "application/json")], json.dumps({
                    "ErrorCode": "InvalidProtocol",
                    "ErrorMessage": "The given protocol value '%s' is invalid. Supported values are "
                                    "'ActiveSync,AutodiscoverV1,Ews,Rest'." % protocol}), keep)
            name, path = urls[protocol.lower()]
            return self.respond(req, 200, [("Content-Type", "application/json; charset=utf-8")],
                                json.dumps({"Protocol": name, "Url": "https://%s%s" % (fqdn, path)}), keep)
        if req.lower.startswith("/autodiscover/autodiscover.xml"):
            if req.method != "POST":
                err = ('<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover '
                       'xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">'
                       '<Response><Error Time="%s" Id="%d"><ErrorCode>600</ErrorCode>'
                       '<Message>Invalid Request</Message><DebugData /></Error></Response></Autodiscover>\n') % (
                    time.strftime("%H:%M:%S"), secrets.randbits(31))
                return self.respond(req, 200, [("Content-Type", "text/xml; charset=utf-8")], err, keep)
            text = body.decode("utf-8", "replace")
            mm = re.search(r"<EMailAddress>\s*([^<\s]+)\s*</EMailAddress>", text, re.I)
            address = mm.group(1) if mm else (req.user or "user").split("\\")[-1] + "@" + self.host.domain
            esc = html.escape
            if "mobilesync" in text.lower():
                xml = ('<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover '
                       'xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">'
                       '<Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/mobilesync/'
                       'responseschema/2006"><Culture>en:us</Culture><User><EMailAddress>%s</EMailAddress></User>'
                       '<Action><Settings><Server><Type>MobileSync</Type><Url>https://%s/Microsoft-Server-ActiveSync'
                       '</Url><Name>https://%s/Microsoft-Server-ActiveSync</Name></Server></Settings></Action>'
                       '</Response></Autodiscover>\n') % (esc(address), esc(fqdn), esc(fqdn))
            else:
                xml = ('<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover '
                       'xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">'
                       '<Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/'
                       'responseschema/2006a"><User><DisplayName>%s</DisplayName>'
                       '<AutoDiscoverSMTPAddress>%s</AutoDiscoverSMTPAddress></User>'
                       '<Account><AccountType>email</AccountType><Action>settings</Action>'
                       '<MicrosoftOnline>False</MicrosoftOnline>'
                       '<Protocol><Type>EXHTTP</Type><Server>%s</Server><SSL>On</SSL><AuthPackage>Ntlm</AuthPackage>'
                       '<ASUrl>https://%s/EWS/Exchange.asmx</ASUrl><EwsUrl>https://%s/EWS/Exchange.asmx</EwsUrl>'
                       '<OABUrl>https://%s/OAB/</OABUrl></Protocol>'
                       '<Protocol Type="mapiHttp" Version="1"><MailStore><ExternalUrl>https://%s/mapi/emsmdb/'
                       '?MailboxId=%s</ExternalUrl></MailStore><AddressBook><ExternalUrl>https://%s/mapi/nspi/'
                       '?MailboxId=%s</ExternalUrl></AddressBook></Protocol>'
                       '<Protocol><Type>WEB</Type><External><OWAUrl AuthenticationMethod="Fba">https://%s/owa/'
                       '</OWAUrl></External></Protocol></Account>'
                       '<!-- simulated Exchange host %s -->'
                       '</Response></Autodiscover>\n') % (
                    esc(req.user or address), esc(address), esc(fqdn), esc(fqdn), esc(fqdn), esc(fqdn), esc(fqdn),
                    esc(address), esc(fqdn), esc(address), esc(fqdn), esc(self.host.name))
            return self.respond(req, 200, [("Content-Type", "text/xml; charset=utf-8")], xml, keep)
        return self.page(req, 404, "Not found", "<h1>404 - File or directory not found.</h1>", keep)

    def oab(self, req, keep):
        if req.method not in ("GET", "HEAD"):
            return self.respond(req, 405, [("Allow", "GET, HEAD")], b"", keep)
        if req.lower.endswith(".xml") or req.lower.rstrip("/") in ("/oab",) or req.lower.endswith("/"):
            xml = ('<?xml version="1.0" encoding="utf-8"?>\n<OAB><OAL id="lab-oal" dn="/" name="\\Default Offline '
                   'Address Book"><Full seq="1" ver="32" size="64" uncompressedsize="128" SHA="%s">lab-full.lzx'
                   '</Full></OAL><!-- simulated Exchange host %s --></OAB>\n') % (
                hashlib.sha1(self.host.name.encode()).hexdigest(), html.escape(self.host.name))
            return self.respond(req, 200, [("Content-Type", "text/xml")], xml, keep)
        data = (b"LZX\x00" + hashlib.sha256(req.path.encode()).digest()) * 2
        return self.respond(req, 200, [("Content-Type", "application/octet-stream")], data, keep)


# ---------------------------------------------------------------- SMTP

PATH_RE = re.compile(r"^(?P<kw>FROM|TO):\s*<(?P<path>[^<>]*)>(?P<params>(?: +\S+)*) *$", re.I)
MAIL_PARAMS = {"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"}
RCPT_PARAMS = {"NOTIFY", "ORCPT"}


class Store:
    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.counter = itertools.count(1)
        self.prefix = secrets.token_hex(5).upper()
        self.internal = itertools.count(int(time.time()) % 100000 * 1000 + 1)
        self.lock = threading.Lock()

    def new_ids(self):
        with self.lock:
            return "%s%06X" % (self.prefix, next(self.counter)), next(self.internal)

    def put(self, service, queue_id, message, meta):
        d = os.path.join(self.dir, service)
        os.makedirs(d, exist_ok=True)
        for name, data in ((queue_id + ".json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()),
                           (queue_id + ".eml", message)):
            tmp = os.path.join(d, ".tmp-" + name)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(d, name))


class SmtpSession:
    ids = itertools.count(1)
    ids_lock = threading.Lock()

    def __init__(self, host, service, sock, peer):
        with SmtpSession.ids_lock:
            self.id = next(SmtpSession.ids)
        self.host = host
        self.service = service
        self.sock = sock
        self.peer = peer[:2]
        self.buf = bytearray()
        self.pos = 0
        self.tls = None
        self.ehlo = None
        self.errors = 0
        self.login = None        # the user a trusted proxy vouched for (XCLIENT LOGIN)
        self.reset()

    def reset(self):
        self.mail_from = None
        self.mail_params = []
        self.rcpts = []
        self.refused = []
        self.chunks = None   # BDAT octets so far (a bytearray) once BDAT started

    def log(self, event, **fields):
        obj = {"event": event, "time": now_iso(), "host": self.host.name, "service": self.service.name,
               "role": self.service.role, "conn": self.id, "peer": self.peer[0], "peer_port": self.peer[1]}
        obj.update(fields)
        self.host.log.write(obj)

    def reply(self, code, *lines):
        lines = lines or ("",)
        wire = "".join("%d%s%s\r\n" % (code, "-" if i < len(lines) - 1 else " ", t) for i, t in enumerate(lines))
        try:
            self.sock.sendall(wire.encode("utf-8"))
        except (OSError, ssl.SSLError) as e:
            raise Eof(str(e)) from None

    def fill(self):
        if self.host.stopping.is_set():
            raise Eof("stopping")
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise Eof("idle timeout") from None
        except (OSError, ssl.SSLError) as e:
            raise Eof(str(e)) from None
        if not data:
            raise Eof("closed by peer")
        self.buf += data

    def take_line(self, limit):
        """The next line without its CRLF (only CRLF ends a line), or None when it is longer
        than `limit` (the rest of that line is skipped)."""
        while True:
            i = self.buf.find(b"\r\n", max(0, self.pos - 1))
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                self.pos = 0
                return line if len(line) <= limit else None
            self.pos = len(self.buf)
            if len(self.buf) > limit + 2:
                while True:
                    keep = 1 if self.buf.endswith(b"\r") else 0
                    del self.buf[:len(self.buf) - keep]
                    self.fill()
                    j = self.buf.find(b"\r\n")
                    if j >= 0:
                        del self.buf[:j + 2]
                        self.pos = 0
                        return None
            self.fill()

    def run(self):
        self.host.stats.smtp_event(self.service.name, "sessions")
        reason = "quit"
        try:
            self.sock.settimeout(SMTP_IDLE_TIMEOUT)
            self.reply(220, "%s Microsoft ESMTP MAIL Service ready at %s" % (
                self.host.fqdn, email.utils.formatdate(localtime=True)))
            while True:
                line = self.take_line(SMTP_MAX_COMMAND)
                if line is None:
                    self.errors += 1
                    self.reply(500, "5.5.2 Line too long")
                    continue
                text = line.decode("utf-8", errors="surrogateescape")
                verb, _, arg = text.partition(" ")
                if not self.dispatch(verb.upper(), arg):
                    break
                if self.errors >= SMTP_MAX_ERRORS:
                    self.reply(421, "4.7.0 Too many errors on this connection, closing transmission channel")
                    reason = "too many errors"
                    break
        except Eof as e:
            reason = str(e)
            if reason == "idle timeout":
                try:
                    self.sock.sendall(b"421 4.4.1 Connection timed out\r\n")
                except (OSError, ssl.SSLError):
                    pass
        finally:
            self.log("smtp-close", reason=reason)
            try:
                self.sock.close()
            except OSError:
                pass

    def dispatch(self, verb, arg):
        fqdn = self.host.fqdn
        if verb in ("EHLO", "HELO"):
            if not arg.strip():
                self.errors += 1
                self.reply(501, "5.5.4 Invalid domain name")
                return True
            self.ehlo = arg.strip()
            self.reset()
            if verb == "HELO":
                self.reply(250, "%s Hello [%s]" % (fqdn, self.peer[0]))
                return True
            lines = ["%s Hello [%s]" % (fqdn, self.peer[0]), "SIZE %d" % self.host.max_message_size, "PIPELINING",
                     "ENHANCEDSTATUSCODES"]
            if self.tls is None and self.host.tls_context is not None:
                lines.append("STARTTLS")
            lines.append("8BITMIME")
            lines.append("CHUNKING")
            if self.peer[0] in self.host.xclient_from:
                lines.append("XCLIENT LOGIN")
            self.reply(250, *lines)
            return True
        if verb == "STARTTLS":
            return self.starttls(arg)
        if verb == "MAIL":
            return self.mail(arg)
        if verb == "RCPT":
            return self.rcpt(arg)
        if verb == "DATA":
            return self.data(arg)
        if verb == "BDAT":
            return self.bdat(arg)
        if verb == "RSET":
            self.reset()
            self.reply(250, "2.0.0 Resetting")
            return True
        if verb == "NOOP":
            self.reply(250, "2.0.0 OK")
            return True
        if verb == "VRFY":
            self.reply(252, "2.1.5 Cannot VRFY user, but will accept message for delivery")
            return True
        if verb == "AUTH":
            self.reply(504, "5.7.4 Unrecognized authentication type")
            return True
        if verb == "XCLIENT":
            return self.xclient(arg)
        if verb == "QUIT":
            self.reply(221, "2.0.0 Service closing transmission channel")
            return False
        self.errors += 1
        self.reply(500, "5.3.3 Unrecognized command '%s'" % verb[:32].encode("ascii", "replace").decode())
        return True

    def xclient(self, arg):
        """XCLIENT LOGIN=<xtext> from a trusted publishing tier: the session is treated as
        authenticated (an Exchange receive connector with Externally Secured permissions
        for that tier relays for it; here the user is also named in the stored message)."""
        if self.peer[0] not in self.host.xclient_from:
            self.errors += 1
            self.reply(550, "5.7.0 XCLIENT denied")
            return True
        if self.mail_from is not None:
            self.reply(503, "5.5.1 Mail transaction in progress")
            return True
        login = self.login
        for tok in arg.split():
            k, eq, v = tok.partition("=")
            if not eq:
                self.reply(501, "5.5.4 Bad XCLIENT attribute")
                return True
            if k.upper() == "LOGIN":
                if v in ("[UNAVAILABLE]", "[TEMPUNAVAIL]"):
                    login = None
                else:
                    try:
                        login = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), v)
                    except ValueError:
                        self.reply(501, "5.5.4 Bad XCLIENT LOGIN value")
                        return True
        self.login = login
        self.ehlo = None
        self.reset()
        self.log("smtp-xclient", login=login)
        self.reply(220, "%s Microsoft ESMTP MAIL Service ready" % self.host.fqdn)
        return True

    def starttls(self, arg):
        if self.host.tls_context is None or self.tls is not None:
            self.errors += 1
            self.reply(503, "5.5.1 Bad sequence of commands" if self.tls else "5.5.1 STARTTLS not offered")
            return True
        if arg.strip():
            self.errors += 1
            self.reply(501, "5.5.4 Invalid arguments")
            return True
        self.reply(220, "2.0.0 SMTP server ready")
        self.buf.clear()                   # anything pipelined in plaintext is not part of TLS
        self.pos = 0
        try:
            self.sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
            self.sock = self.host.tls_context.wrap_socket(self.sock, server_side=True)
            self.sock.settimeout(SMTP_IDLE_TIMEOUT)
        except (OSError, ssl.SSLError) as e:
            raise Eof("TLS handshake failed: %s" % e) from None
        self.tls = self.sock.version()
        self.ehlo = None
        self.reset()
        self.log("smtp-starttls", tls=self.tls)
        return True

    def mail(self, arg):
        if self.ehlo is None:
            self.errors += 1
            self.reply(503, "5.5.2 Send hello first")
            return True
        if self.mail_from is not None:
            self.errors += 1
            self.reply(503, "5.5.2 Sender already specified")
            return True
        m = PATH_RE.match(arg)
        if not m or m.group("kw").upper() != "FROM":
            self.errors += 1
            self.reply(501, "5.5.4 Invalid arguments")
            return True
        params = m.group("params").split()
        for p in params:
            k, _, v = p.partition("=")
            k = k.upper()
            if k not in MAIL_PARAMS:
                self.reply(555, "5.5.4 Unsupported option: %s" % p)
                return True
            if k == "SIZE":
                if not v.isdigit():
                    self.reply(501, "5.5.4 Invalid arguments")
                    return True
                if int(v) > self.host.max_message_size:
                    self.reply(552, "5.3.4 Message size exceeds fixed maximum message size")
                    return True
            if k == "BODY" and v.upper() not in ("7BIT", "8BITMIME"):
                self.reply(501, "5.5.4 Invalid arguments")
                return True
        self.mail_from = m.group("path")
        self.mail_params = params
        self.reply(250, "2.1.0 Sender OK")
        return True

    def rcpt(self, arg):
        if self.mail_from is None:
            self.errors += 1
            self.reply(503, "5.5.2 Need mail command")
            return True
        m = PATH_RE.match(arg)
        if not m or m.group("kw").upper() != "TO" or not m.group("path"):
            self.errors += 1
            self.reply(501, "5.5.4 Invalid arguments")
            return True
        for p in m.group("params").split():
            if p.partition("=")[0].upper() not in RCPT_PARAMS:
                self.reply(555, "5.5.4 Unsupported option: %s" % p)
                return True
        path = m.group("path")
        if "@" not in path:
            self.reply(501, "5.1.3 Invalid address")
            return True
        if len(self.rcpts) >= SMTP_MAX_RECIPIENTS:
            self.reply(452, "4.5.3 Too many recipients")
            return True
        domain = path.rsplit("@", 1)[1].strip().rstrip(".").lower()
        if domain not in self.host.accepted_domains and self.login is None:
            self.refused.append(path)
            self.host.stats.smtp_event(self.service.name, "rcpt_refused")
            self.log("smtp-rcpt-refused", mail_from=self.mail_from, rcpt=path, ehlo=self.ehlo)
            self.reply(550, "5.7.54 SMTP; Unable to relay recipient in non-accepted domain")
            return True
        self.rcpts.append(path)
        self.reply(250, "2.1.5 Recipient OK")
        return True

    def data(self, arg):
        if arg.strip():
            self.errors += 1
            self.reply(501, "5.5.4 Invalid arguments")
            return True
        if self.mail_from is None:
            self.errors += 1
            self.reply(503, "5.5.2 Need mail command")
            return True
        if not self.rcpts:
            self.errors += 1
            self.reply(503, "5.5.2 Need rcpt command")
            return True
        self.reply(354, "Start mail input; end with <CRLF>.<CRLF>")
        limit = self.host.max_message_size
        msg = bytearray()
        too_big = False
        while True:
            line = self.take_line(limit + 2)
            if line is None:
                too_big = True
                msg = bytearray()
                continue
            if line == b".":
                break
            if line.startswith(b"."):
                line = line[1:]
            if not too_big:
                if len(msg) + len(line) + 2 > limit:
                    too_big = True
                    msg = bytearray()
                else:
                    msg += line + b"\r\n"
        self.finish(b"" if too_big else bytes(msg), too_big, "DATA")
        return True

    def bdat(self, arg):
        """BDAT <size> [LAST] (RFC 3030): exactly <size> octets follow, read even when refused."""
        parts = arg.split()
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            self.reply(501, "5.5.4 Invalid arguments")
            return False   # where the octets end is unknown: close
        size, last = int(parts[0]), len(parts) == 2
        limit = self.host.max_message_size
        if size > limit:
            self.reply(552, "5.3.4 Message size exceeds fixed maximum message size")
            return False
        while len(self.buf) < size:
            self.fill()
        chunk = bytes(self.buf[:size])
        del self.buf[:size]
        self.pos = 0
        if self.mail_from is None or not self.rcpts:
            self.errors += 1
            self.reply(503, "5.5.2 Need rcpt command" if self.mail_from is not None else "5.5.2 Need mail command")
            return True
        if self.chunks is None:
            self.chunks = bytearray()
        self.chunks += chunk
        too_big = len(self.chunks) > limit
        if too_big:
            self.chunks = bytearray()
        if not last and not too_big:
            self.reply(250, "2.0.0 CHUNK received OK, %d octets" % size)
            return True
        self.finish(b"" if too_big else bytes(self.chunks), too_big, "BDAT")
        return True

    def finish(self, body, too_big, via):
        """The end of a message (DATA or BDAT LAST): store it and say 250, or refuse it."""
        if too_big:
            self.log("smtp-message-refused", mail_from=self.mail_from, rcpts=self.rcpts, reason="too big")
            self.reply(552, "5.3.4 Message size exceeds fixed maximum message size")
            self.reset()
            return
        qid, internal = self.host.store.new_ids()
        meta = {"queue_id": qid, "internal_id": internal, "mail_from": self.mail_from, "rcpts": list(self.rcpts),
                "rcpts_refused": list(self.refused), "mail_params": self.mail_params, "peer": self.peer[0],
                "peer_port": self.peer[1], "ehlo": self.ehlo, "tls": self.tls, "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(), "service": self.service.name,
                "role": self.service.role, "host": self.host.name, "conn": self.id, "time": now_iso(),
                "authenticated_as": self.login, "via": via}
        try:
            self.host.store.put(self.service.name, qid, body, meta)
        except OSError as e:
            self.log("smtp-store-failed", error=str(e))
            self.reply(451, "4.3.0 Temporary server error. Please try again later")
            self.reset()
            return
        self.host.stats.smtp_event(self.service.name, "messages")
        self.host.stats.smtp_event(self.service.name, "bytes", len(body))
        self.log("message", **meta)
        self.reply(250, "2.6.0 <%s@%s> [InternalId=%d] Queued mail for delivery" % (qid, self.host.fqdn, internal))
        self.reset()


# ---------------------------------------------------------------- the host

class Service:
    def __init__(self, spec):
        parts = spec.split(":")
        if len(parts) not in (3, 4) or not parts[0] or parts[1] not in ("https", "http", "smtp") or \
                not parts[2].isdigit() or not 0 < int(parts[2]) < 65536:
            raise ValueError("--service wants NAME:PROTOCOL:PORT[:ROLE] with PROTOCOL https, http or smtp, "
                             "got %r" % spec)
        self.name, self.protocol, self.port = parts[0], parts[1], int(parts[2])
        self.role = parts[3] if len(parts) == 4 and parts[3] else None
        self.sock = None


class Host:
    def __init__(self, args, services, tls_context):
        self.name = args.name
        self.address = args.address
        self.services = services
        self.accepted_domains = [d.strip().rstrip(".").lower() for d in args.accepted_domain if d.strip()]
        self.xclient_from = set(args.xclient_from)
        self.tls_context = tls_context
        names = cert_dns_names(args.cert)
        self.fqdn = args.fqdn or (names[0] if names else args.name)
        self.domain = self.accepted_domains[0] if self.accepted_domains else (
            self.fqdn.split(".", 1)[1] if "." in self.fqdn else self.fqdn)
        self.pending_period_ms = args.pending_period_ms
        self.max_message_size = args.max_message_size
        self.log = JsonLog(args.log)
        self.store = Store(args.store)
        self.rpc = RpcRegistry()
        self.stats = Stats(self)
        self.stopping = threading.Event()

    def accept_loop(self, service):
        while not self.stopping.is_set():
            try:
                sock, peer = service.sock.accept()
            except InterruptedError:
                continue
            except OSError:
                if self.stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if service.protocol == "smtp":
                session = SmtpSession(self, service, sock, peer)
            else:
                session = HttpConnection(self, service, sock, peer)
            threading.Thread(target=session.run, daemon=True, name="%s-%d" % (service.name, session.id)).start()


def cert_dns_names(path):
    """The DNS names of the certificate's subjectAltName, in order (empty if unreadable)."""
    if not path:
        return []
    try:
        decoded = ssl._ssl._test_decode_cert(path)  # pylint: disable=protected-access
    except Exception:  # noqa: BLE001 - any failure: no names
        return []
    return [v for k, v in decoded.get("subjectAltName", ()) if k == "DNS"]


def make_stats_server(host, address, port):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "exchange-host-stats"

        def do_GET(self):  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/stats":
                body = host.stats.snapshot().encode()
                ctype = "application/json"
                status = 200
            elif path == "":
                body = ("simulated Exchange host %s: GET /stats\n" % host.name).encode()
                ctype, status = "text/plain", 200
            else:
                body, ctype, status = b"not found\n", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    return Server((address, port), Handler)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="the host's name in the topology")
    ap.add_argument("--address", required=True, help="the address every service binds on")
    ap.add_argument("--cert", help="PEM certificate (chain) for HTTPS and STARTTLS")
    ap.add_argument("--key", help="PEM private key")
    ap.add_argument("--store", required=True, help="mail store: DIR/<service>/<queue-id>.eml and .json")
    ap.add_argument("--stats", required=True, help="127.0.0.1:PORT for GET /stats")
    ap.add_argument("--log", help="JSON lines, appended")
    ap.add_argument("--accepted-domain", action="append", default=[], help="a domain mail is accepted for")
    ap.add_argument("--xclient-from", action="append", default=[],
                    help="an address whose XCLIENT LOGIN is believed (a publishing tier that authenticated the sender)")
    ap.add_argument("--service", action="append", default=[], help="NAME:PROTOCOL:PORT[:ROLE]")
    ap.add_argument("--fqdn", help="the server's DNS name (default: the certificate's first DNS name)")
    ap.add_argument("--pending-period-ms", type=int, default=1000, help="MAPI PENDING period (default 1000)")
    ap.add_argument("--max-message-size", type=int, default=SMTP_MAX_SIZE, help="SMTP SIZE limit in bytes")
    args = ap.parse_args(argv)
    try:
        services = [Service(s) for s in args.service]
    except ValueError as e:
        ap.error(str(e))
    if not services:
        ap.error("at least one --service is needed")
    if bool(args.cert) != bool(args.key):
        ap.error("--cert and --key go together")
    stats_host, _, stats_port = args.stats.rpartition(":")
    if not stats_port.isdigit():
        ap.error("--stats wants ADDRESS:PORT")
    stats_host = stats_host.strip("[]") or "127.0.0.1"
    if stats_host not in ("127.0.0.1", "localhost"):
        ap.error("--stats binds on loopback only (127.0.0.1)")
    tls_context = None
    if args.cert:
        try:
            tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls_context.minimum_version = ssl.TLSVersion.TLSv1_2
            tls_context.load_cert_chain(args.cert, args.key)
        except (OSError, ssl.SSLError) as e:
            print("exchange_host %s: cannot load certificate %s / key %s: %s" % (args.name, args.cert, args.key, e),
                  file=sys.stderr, flush=True)
            return 1

        def remember_sni(sslsock, name, _ctx):
            sslsock.dmz_sni = name

        tls_context.sni_callback = remember_sni
    elif any(s.protocol == "https" for s in services):
        ap.error("an https service needs --cert and --key")

    host = Host(args, services, tls_context)
    for s in services:
        try:
            sock = socket.socket(socket.AF_INET6 if ":" in args.address else socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((args.address, s.port))
            sock.listen(256)
            s.sock = sock
        except OSError as e:
            print("exchange_host %s: service %s: cannot bind %s:%d: %s" % (args.name, s.name, args.address, s.port,
                                                                           e.strerror or e), file=sys.stderr,
                  flush=True)
            return 1
    try:
        stats_server = make_stats_server(host, "127.0.0.1", int(stats_port))
    except OSError as e:
        print("exchange_host %s: statistics: cannot bind 127.0.0.1:%s: %s" % (args.name, stats_port, e.strerror or e),
              file=sys.stderr, flush=True)
        return 1

    def on_signal(*_):
        global STOP
        STOP = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    threading.Thread(target=stats_server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                     name="stats").start()
    for s in services:
        threading.Thread(target=host.accept_loop, args=(s,), daemon=True, name="accept-" + s.name).start()
    host.log.write({"event": "start", "time": now_iso(), "host": host.name, "fqdn": host.fqdn, "pid": os.getpid(),
                    "address": host.address, "stats": "http://127.0.0.1:%s/stats" % stats_port,
                    "services": [{"name": s.name, "protocol": s.protocol, "port": s.port, "role": s.role}
                                 for s in services], "accepted_domains": host.accepted_domains})
    print("exchange host %s (%s) pid %d: %s; stats http://127.0.0.1:%s/stats" % (
        host.name, host.fqdn, os.getpid(),
        ", ".join("%s %s %s:%d%s" % (s.name, s.protocol, args.address, s.port, " (%s)" % s.role if s.role else "")
                  for s in services), stats_port), flush=True)

    while not STOP:
        time.sleep(0.05)
    host.stopping.set()
    host.log.write({"event": "stop", "time": now_iso(), "host": host.name, "pid": os.getpid()})
    for s in services:
        try:
            s.sock.close()
        except OSError:
            pass
    try:
        stats_server.socket.close()
    except OSError:
        pass
    host.log.close()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(0)  # daemon threads may sit in blocking calls: end now, everything is flushed


if __name__ == "__main__":
    sys.exit(main())
