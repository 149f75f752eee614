#!/usr/bin/env python3
"""The test origin: a small HTTP/1.1 server standing in for Exchange's web services.

    origin.py --listen 127.30.0.50:PORT [--cert CERT --key KEY] --log FILE.jsonl

Raw sockets, one thread per connection, optional TLS. It appends one JSON line per
request it receives to the log and flushes at once, so a test can prove what did and did
not arrive. Every line has an "event": "request" for a request (written when the request
has been read, or when the connection ended in the middle of it, with "complete": false),
"first-body-byte" / "body-progress" while an RPC_IN_DATA body streams in, and "close" when
a connection that carried requests ends.

Behaviour by path (case-insensitive prefix):
  default                      200 application/json echo of what was received
  /ntlm/ (and /EWS/, /rpc/ when the request carries Authorization: NTLM)
                               IIS-like connection-based NTLM (401 / challenge / 200 user)
  /hold?seconds=N              wait N seconds, then the echo
  /silent                      read the request, never answer
  /close                       close the connection without answering
  /bad-framing                 a response with both Content-Length and chunked
  /rpc/rpcproxy.dll            RPC_IN_DATA: stream the (1 GiB) body in, logging first byte;
                               RPC_OUT_DATA: 200 with Content-Length 1 GiB, a few blocks, hold
  /mapi/emsmdb (POST)          chunked PENDING keep-alives every 0.5 s (?pendings=N), DONE
  /Microsoft-Server-ActiveSync OPTIONS: protocol versions and commands
  /bigdownload?mib=N (GET)     200 with Content-Length N MiB, streamed 1 MiB at a time
                               (block i starts with "block %010d\n"); a "response" line
                               logs the bytes sent, their SHA-256 and whether all went out
On a plain (non-TLS) listener, a connection that opens with a TLS handshake record gets
"400 Bad Request" and is closed at once, as IIS's http.sys answers it (logged as
"not-http", not as a request).
Python 3 standard library only.
"""

import argparse
import base64
import hashlib
import itertools
import json
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.parse

MAX_HEAD = 1024 * 1024
MAX_HOLD = 700.0
PROGRESS_STEP = 1024 * 1024
MIB = 1024 * 1024
MAX_DOWNLOAD_MIB = 4096
DOWNLOAD_BASE = bytes(range(256)) * (MIB // 256)
NTLM_CHALLENGE = bytes.fromhex("0123456789abcdef")


class Eof(Exception):
    """The peer closed (or reset) the connection."""


class Log:
    def __init__(self, path):
        self._f = open(path, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, obj):
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()


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


def ntlm_type(token):
    """(message type, raw bytes) of a base64 NTLMSSP token, or (None, None)."""
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (ValueError, TypeError):
        return None, None
    if len(raw) < 12 or raw[:8] != NTLMSSP:
        return None, None
    return struct.unpack_from("<I", raw, 8)[0], raw


def ntlm_type2(type1_flags=0):
    """A valid minimal NTLMSSP CHALLENGE message (target name and target info)."""
    unicode = not type1_flags or bool(type1_flags & NEG_UNICODE)
    enc = (lambda s: s.encode("utf-16-le")) if unicode else (lambda s: s.encode("ascii"))
    target = enc("CONTOSO")

    def av(av_id, value):
        data = value.encode("utf-16-le")
        return struct.pack("<HH", av_id, len(data)) + data

    info = av(2, "CONTOSO") + av(1, "EX01") + av(4, "corp.contoso.com") + av(3, "ex01.corp.contoso.com")
    info += struct.pack("<HH", 0, 0)  # MsvAvEOL
    flags = (NEG_UNICODE if unicode else NEG_OEM) | REQUEST_TARGET | NEG_NTLM | NEG_ALWAYS_SIGN | \
        TARGET_TYPE_DOMAIN | NEG_EXTENDED_SESSION_SECURITY | NEG_TARGET_INFO
    header_len = 56  # signature, type, target secbuf, flags, challenge, context, info secbuf, version
    target_off = header_len
    info_off = target_off + len(target)
    msg = NTLMSSP + struct.pack("<I", 2)
    msg += struct.pack("<HHI", len(target), len(target), target_off)
    msg += struct.pack("<I", flags)
    msg += NTLM_CHALLENGE
    msg += b"\x00" * 8
    msg += struct.pack("<HHI", len(info), len(info), info_off)
    msg += bytes([10, 0]) + struct.pack("<H", 17763) + b"\x00\x00\x00\x0f"  # version 10.0.17763, NTLM rev 15
    assert len(msg) == header_len
    return base64.b64encode(msg + target + info).decode("ascii")


def ntlm_type3_identity(raw):
    """(user, domain) from an NTLMSSP AUTHENTICATE message."""
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


# ---------------------------------------------------------------- one connection

class Request:
    def __init__(self):
        self.method = ""
        self.target = ""
        self.version = ""
        self.headers = []
        self.malformed = []
        self.head_time = None
        self.first_body_byte_time = None
        self.complete_time = None
        self.body_bytes = 0
        self.sha = hashlib.sha256()
        self.complete = False
        self.error = None

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
    def path(self):
        return self.target.split("?", 1)[0]

    @property
    def query(self):
        return urllib.parse.parse_qs(self.target.split("?", 1)[1]) if "?" in self.target else {}


class Connection:
    ids = itertools.count(1)
    ids_lock = threading.Lock()

    def __init__(self, server, sock, peer):
        with Connection.ids_lock:
            self.id = next(Connection.ids)
        self.server = server
        self.sock = sock
        self.peer = "%s:%d" % peer[:2]
        self.buf = bytearray()
        self.requests = 0
        self.tls = False
        self.sni = None
        self.ntlm_state = None  # None | "challenged" | "authenticated"
        self.user = None

    # -- input

    def _recv(self):
        try:
            data = self.sock.recv(65536)
        except (ConnectionError, ssl.SSLError, OSError) as e:
            raise Eof(str(e)) from None
        if not data:
            raise Eof("closed")
        self.buf += data
        return len(data)

    def read_head(self):
        """The head bytes up to (excluding) the blank line; lenient about bare LF so that
        anything a proxy forwards shows up in the log."""
        while True:
            m = re.search(rb"\r?\n\r?\n", self.buf)
            if m:
                head = bytes(self.buf[:m.start()])
                del self.buf[:m.end()]
                return head
            if len(self.buf) > MAX_HEAD:
                raise ValueError("head too large")
            self._recv()

    def read_line(self):
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line.rstrip(b"\r\n")
            if len(self.buf) > 65536:
                raise ValueError("line too long")
            self._recv()

    def take_body(self, req, n, on_data=None):
        """Consume n body bytes (never holding more than one read in memory)."""
        left = n
        while left > 0:
            if not self.buf:
                self._recv()
            part = bytes(self.buf[:left])
            del self.buf[:len(part)]
            left -= len(part)
            if req.first_body_byte_time is None:
                req.first_body_byte_time = time.time()
            req.body_bytes += len(part)
            req.sha.update(part)
            if on_data:
                on_data(len(part))

    def read_body(self, req, on_data=None):
        te = req.header_all("transfer-encoding")
        cl = req.header_all("content-length")
        if te:
            codings = [c.strip().lower() for c in ",".join(te).split(",") if c.strip()]
            if not codings or codings[-1] != "chunked":
                raise ValueError("transfer-encoding without final chunked")
            while True:
                line = self.read_line()
                size_text = line.split(b";", 1)[0].strip()
                if not re.fullmatch(rb"[0-9a-fA-F]{1,15}", size_text):
                    raise ValueError("bad chunk size %r" % size_text[:40])
                size = int(size_text, 16)
                if size == 0:
                    while self.read_line():
                        pass  # trailers
                    break
                self.take_body(req, size, on_data)
                if self.read_line():
                    raise ValueError("missing CRLF after chunk data")
        elif cl:
            values = {v.strip() for v in ",".join(cl).split(",")}
            if len(values) != 1 or not next(iter(values)).isdigit():
                raise ValueError("bad content-length %r" % cl)
            self.take_body(req, int(next(iter(values))), on_data)
        req.complete = True
        req.complete_time = time.time()

    # -- output

    def send(self, data):
        self.sock.sendall(data)

    def respond(self, req, status, reason, headers=(), body=b"", keep_alive=True):
        lines = ["HTTP/1.1 %d %s" % (status, reason)]
        lines.append("Server: dmz-test-origin")
        lines += ["%s: %s" % h for h in headers]
        lines.append("Content-Length: %d" % len(body))
        if not keep_alive:
            lines.append("Connection: close")
        elif req.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if req.method != "HEAD":
            data += body
        self.send(data)

    def echo(self, req, keep_alive, status=200, reason="OK", extra_headers=()):
        body = json.dumps({
            "method": req.method, "target": req.target, "version": req.version,
            "headers": req.headers, "conn": self.id, "req": self.requests,
            "body_bytes": req.body_bytes, "peer": self.peer, "tls": self.tls, "sni": self.sni,
            "user": self.user, "origin": self.server.name,
        }).encode()
        self.respond(req, status, reason, [("Content-Type", "application/json")] + list(extra_headers),
                     body, keep_alive)

    def log_request(self, req):
        self.server.log.write({
            "event": "request", "time": time.time(), "origin": self.server.name,
            "conn": self.id, "req": self.requests, "peer": self.peer, "tls": self.tls, "sni": self.sni,
            "method": req.method, "target": req.target, "version": req.version,
            "headers": req.headers, "malformed": req.malformed,
            "body_bytes": req.body_bytes, "body_sha256": req.sha.hexdigest() if req.body_bytes else None,
            "head_time": req.head_time, "first_body_byte_time": req.first_body_byte_time,
            "complete_time": req.complete_time, "complete": req.complete, "error": req.error,
            "user": self.user,
        })

    # -- the loop

    def run(self):
        try:
            if self.server.tls_context is not None:
                self.sock.settimeout(10)
                self.sock = self.server.tls_context.wrap_socket(self.sock, server_side=True)
                self.sock.settimeout(None)
                self.tls = True
                self.sni = getattr(self.sock, "dmz_sni", None)
            while self.serve_one():
                pass
        except (Eof, ConnectionError, ssl.SSLError, OSError, socket.timeout):
            pass
        finally:
            try:
                self.sock.close()
            except OSError:
                pass
            if self.requests:
                self.server.log.write({"event": "close", "time": time.time(), "origin": self.server.name,
                                       "conn": self.id, "requests": self.requests, "peer": self.peer,
                                       "user": self.user})

    def parse_head(self, head, req):
        text = head.decode("latin-1")
        lines = re.split(r"\r?\n", text)
        parts = lines[0].split(" ")
        if len(parts) == 3:
            req.method, req.target, req.version = parts
        else:
            req.method, req.target = parts[0], " ".join(parts[1:])
            req.malformed.append(lines[0])
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                req.malformed.append(line)
                continue
            req.headers.append([name, value.strip(" \t")])

    def not_http(self):
        """A TLS ClientHello on a plain listener: 400 and close, as http.sys does."""
        self.server.log.write({"event": "not-http", "time": time.time(), "origin": self.server.name,
                               "conn": self.id, "peer": self.peer, "first_bytes": bytes(self.buf[:16]).hex()})
        try:
            self.send(b"HTTP/1.1 400 Bad Request\r\nServer: dmz-test-origin\r\nContent-Type: text/plain\r\n"
                      b"Content-Length: 12\r\nConnection: close\r\n\r\nBad Request\n")
        except OSError:
            pass

    def serve_one(self):
        """Read and answer one request; False when the connection is to end."""
        req = Request()
        if not self.tls and self.requests == 0:
            if not self.buf:
                try:
                    self._recv()
                except Eof:
                    return False
            if self.buf[:1] == b"\x16":
                self.not_http()
                return False
        try:
            head = self.read_head()
        except Eof:
            if self.buf:  # a partial head arrived: log it, so a test sees it
                self.requests += 1
                req.method = "?"
                req.target = bytes(self.buf[:200]).decode("latin-1")
                req.error = "connection ended inside the head"
                self.log_request(req)
            return False
        self.requests += 1
        req.head_time = time.time()
        self.parse_head(head, req)

        version_ok = req.version in ("HTTP/1.0", "HTTP/1.1")
        conn_tokens = {t.strip().lower() for v in req.header_all("connection") for t in v.split(",")}
        if req.version == "HTTP/1.1":
            keep_alive = "close" not in conn_tokens
        else:
            keep_alive = "keep-alive" in conn_tokens
        path = req.path.lower()
        method = req.method

        if not version_ok or req.malformed:
            req.error = "malformed head"
            self.log_request(req)
            self.respond(req, 400, "Bad Request", body=b"malformed head\n", keep_alive=False)
            return False

        # What the answer will be decided before the body, as IIS does for auth.
        auth = req.header("authorization") or ""
        scheme, _, token = auth.partition(" ")
        ntlm_auth = scheme.lower() in ("ntlm", "negotiate") and token.strip() != ""
        wants_ntlm = path.startswith("/ntlm") or (
            ntlm_auth and (path.startswith("/ews/") or path.startswith("/rpc/")))
        ntlm_reply = self.ntlm(req, scheme, token, ntlm_auth) if wants_ntlm else None

        expect = (req.header("expect") or "").lower() == "100-continue"
        has_body = bool(req.header_all("transfer-encoding")) or any(
            v.strip() not in ("", "0") for v in req.header_all("content-length"))
        if expect and has_body:
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

        is_rpc = path.startswith("/rpc/rpcproxy.dll")
        if is_rpc and method == "RPC_IN_DATA" and ntlm_reply is None:
            return self.rpc_in_data(req, keep_alive)

        if ntlm_reply is not None and has_body and self.declared_length(req) > 16 * 1024 * 1024:
            # A 401 to a channel declaring a huge body: answer and close, as IIS does.
            self.log_request(req)
            status, reason, headers, body = ntlm_reply
            self.respond(req, status, reason, headers, body, keep_alive=False)
            return False

        try:
            self.read_body(req)
        except ValueError as e:
            req.error = str(e)
            self.log_request(req)
            self.respond(req, 400, "Bad Request", body=(str(e) + "\n").encode(), keep_alive=False)
            return False
        except Eof:
            req.error = "connection ended inside the body"
            self.log_request(req)
            return False
        self.log_request(req)

        if ntlm_reply is not None:
            status, reason, headers, body = ntlm_reply
            if status != 200:
                self.respond(req, status, reason, headers, body, keep_alive)
                return keep_alive

        if path.startswith("/hold"):
            try:
                seconds = float(req.query.get("seconds", ["1"])[0])
            except ValueError:
                seconds = 1.0
            time.sleep(max(0.0, min(seconds, MAX_HOLD)))
            self.echo(req, keep_alive)
            return keep_alive
        if path.startswith("/silent"):
            self.wait_for_close()
            return False
        if path.startswith("/close"):
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        if path.startswith("/bad-framing"):
            self.send(b"HTTP/1.1 200 OK\r\nServer: dmz-test-origin\r\nContent-Length: 5\r\n"
                      b"Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
                      b"5\r\nhello\r\n0\r\n\r\n")
            return False
        if is_rpc and method == "RPC_OUT_DATA":
            return self.rpc_out_data(req)
        if path.startswith("/bigdownload") and method in ("GET", "HEAD"):
            return self.big_download(req, keep_alive)
        if path.startswith("/mapi/emsmdb") and method == "POST":
            return self.mapi(req, keep_alive)
        if path.startswith("/microsoft-server-activesync") and method == "OPTIONS":
            self.respond(req, 200, "OK", [
                ("Allow", "OPTIONS,POST"),
                ("MS-Server-ActiveSync", "15.20"),
                ("MS-ASProtocolVersions", "14.1,16.0"),
                ("MS-ASProtocolCommands", "Sync,SendMail,SmartForward,SmartReply,GetAttachment,"
                 "GetHierarchy,CreateCollection,DeleteCollection,MoveCollection,FolderSync,FolderCreate,"
                 "FolderDelete,FolderUpdate,MoveItems,GetItemEstimate,MeetingResponse,Search,Settings,"
                 "Ping,ItemOperations,Provision,ResolveRecipients,ValidateCert,Find"),
            ], b"", keep_alive)
            return keep_alive
        self.echo(req, keep_alive)
        return keep_alive

    @staticmethod
    def declared_length(req):
        try:
            return int((req.header("content-length") or "0").strip())
        except ValueError:
            return 0

    def ntlm(self, req, scheme, token, ntlm_auth):
        """(status, reason, headers, body) as IIS would answer; status 200 lets the request through."""
        challenge = [("WWW-Authenticate", "NTLM")]
        if not ntlm_auth:
            if self.ntlm_state == "authenticated":
                return 200, "OK", [], b""
            return 401, "Unauthorized", challenge, b"401 - Unauthorized: Access is denied\n"
        kind, raw = ntlm_type(token)
        scheme_name = "Negotiate" if scheme.lower() == "negotiate" else "NTLM"
        if kind == 1:
            flags = struct.unpack_from("<I", raw, 12)[0] if len(raw) >= 16 else 0
            self.ntlm_state = "challenged"
            self.user = None
            return 401, "Unauthorized", [("WWW-Authenticate", scheme_name + " " + ntlm_type2(flags))], \
                b"401 - Unauthorized: challenge\n"
        if kind == 3:
            if self.ntlm_state != "challenged":
                return 401, "Unauthorized", challenge, b"Unexpected NTLM message Type 3 in new connection"
            user, domain = ntlm_type3_identity(raw)
            self.user = user if not domain else domain + "\\" + user
            self.ntlm_state = "authenticated"
            return 200, "OK", [], b""
        return 401, "Unauthorized", challenge, b"401 - Unauthorized: not an NTLM message\n"

    def wait_for_close(self, limit=3600.0):
        deadline = time.monotonic() + limit
        self.sock.settimeout(5)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return
            except socket.timeout:
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                return

    def rpc_in_data(self, req, keep_alive):
        """Outlook Anywhere's IN channel: log the body as it streams in."""
        progress = {"next": PROGRESS_STEP}

        def on_data(_n):
            if req.body_bytes == _n:  # the first bytes of the body
                self.server.log.write({
                    "event": "first-body-byte", "time": time.time(), "origin": self.server.name,
                    "conn": self.id, "req": self.requests, "method": req.method, "target": req.target,
                    "body_bytes": req.body_bytes, "first_body_byte_time": req.first_body_byte_time,
                })
            while req.body_bytes >= progress["next"]:
                self.server.log.write({
                    "event": "body-progress", "time": time.time(), "origin": self.server.name,
                    "conn": self.id, "req": self.requests, "method": req.method, "target": req.target,
                    "body_bytes": req.body_bytes,
                })
                progress["next"] += PROGRESS_STEP

        try:
            self.read_body(req, on_data)
        except Eof:
            req.error = "connection ended inside the body"
            self.log_request(req)
            return False
        except ValueError as e:
            req.error = str(e)
            self.log_request(req)
            self.respond(req, 400, "Bad Request", body=(str(e) + "\n").encode(), keep_alive=False)
            return False
        self.log_request(req)
        self.respond(req, 200, "Success", [("Content-Type", "application/rpc")], b"", keep_alive)
        return keep_alive

    def rpc_out_data(self, req):
        """Outlook Anywhere's OUT channel: a 1 GiB response produced a little at a time."""
        try:
            blocks = max(1, min(int(req.query.get("blocks", ["5"])[0]), 100))
        except ValueError:
            blocks = 5
        self.send(b"HTTP/1.1 200 Success\r\nServer: dmz-test-origin\r\nContent-Type: application/rpc\r\n"
                  b"Content-Length: 1073741824\r\n\r\n")
        for i in range(blocks):
            if i:
                time.sleep(0.2)
            self.send(("block %d at %.3f\n" % (i, time.time())).encode().ljust(64, b"."))
        self.wait_for_close()
        return False

    def big_download(self, req, keep_alive):
        """N MiB with Content-Length, produced and sent 1 MiB at a time (never held whole)."""
        try:
            mib = max(0, min(int(req.query.get("mib", ["1"])[0]), MAX_DOWNLOAD_MIB))
        except ValueError:
            mib = 1
        head = ("HTTP/1.1 200 OK\r\nServer: dmz-test-origin\r\nContent-Type: application/octet-stream\r\n"
                "Content-Length: %d\r\n" % (mib * MIB))
        if not keep_alive:
            head += "Connection: close\r\n"
        elif req.version == "HTTP/1.0":
            head += "Connection: keep-alive\r\n"
        sha = hashlib.sha256()
        sent = 0
        error = None
        try:
            self.send((head + "\r\n").encode("latin-1"))
            if req.method != "HEAD":
                for i in range(mib):
                    marker = b"block %010d\n" % i
                    block = marker + DOWNLOAD_BASE[len(marker):]
                    self.send(block)
                    sha.update(block)
                    sent += len(block)
        except (OSError, ssl.SSLError) as e:
            error = str(e) or type(e).__name__
        complete = error is None
        self.server.log.write({
            "event": "response", "time": time.time(), "origin": self.server.name, "conn": self.id,
            "req": self.requests, "method": req.method, "target": req.target, "status": 200,
            "content_length": mib * MIB, "body_bytes": sent, "body_sha256": sha.hexdigest(),
            "complete": complete, "error": error,
        })
        return keep_alive and complete

    def mapi(self, req, keep_alive):
        """MAPI over HTTP: chunked PENDING keep-alives while the 'server' works, then DONE."""
        try:
            pendings = max(0, min(int(req.query.get("pendings", ["3"])[0]), 100))
        except ValueError:
            pendings = 3
        self.send(b"HTTP/1.1 200 OK\r\nServer: dmz-test-origin\r\nContent-Type: application/mapi-http\r\n"
                  b"X-RequestType: Execute\r\nX-ResponseCode: 0\r\nTransfer-Encoding: chunked\r\n" +
                  (b"" if keep_alive else b"Connection: close\r\n") + b"\r\n")

        def chunk(data):
            return b"%x\r\n%s\r\n" % (len(data), data)

        for i in range(pendings):
            if i:
                time.sleep(0.5)
            self.send(chunk(b"PENDING\n"))
        time.sleep(0.5)
        self.send(chunk(b"DONE\n") + b"0\r\n\r\n")
        return keep_alive


# ---------------------------------------------------------------- the server

class Server:
    def __init__(self, host, port, log, tls_context, name):
        self.log = log
        self.tls_context = tls_context
        self.name = name
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)

    def serve(self):
        while True:
            try:
                s, peer = self.sock.accept()
            except InterruptedError:
                continue
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Connection(self, s, peer)
            threading.Thread(target=conn.run, daemon=True, name="conn-%d" % conn.id).start()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="ADDRESS:PORT, e.g. 127.30.0.50:8443")
    ap.add_argument("--cert", help="PEM certificate (chain) for TLS")
    ap.add_argument("--key", help="PEM private key for TLS")
    ap.add_argument("--log", required=True, help="JSON lines file, appended")
    ap.add_argument("--name", default="origin", help="a name put in every log line and echo")
    args = ap.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        ap.error("--listen wants ADDRESS:PORT")
    if bool(args.cert) != bool(args.key):
        ap.error("--cert and --key go together")
    ctx = None
    if args.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(args.cert, args.key)

        def remember_sni(sslsock, name, _ctx):
            sslsock.dmz_sni = name

        ctx.sni_callback = remember_sni
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = Server(host.strip("[]"), int(port), Log(args.log), ctx, args.name)
    print("origin %s listening on %s:%s%s" % (args.name, host, port, " (TLS)" if ctx else ""), flush=True)
    try:
        server.serve()
    except (KeyboardInterrupt, SystemExit):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
