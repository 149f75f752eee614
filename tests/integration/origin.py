#!/usr/bin/env python3
"""The test origin: a small HTTP/1.1 server standing in for Exchange's web services.

    origin.py --listen 127.30.0.50:PORT [--cert CERT --key KEY] --log FILE.jsonl

Built on the simulated Exchange host's HTTP engine (topology/hosts/exchange_sim: one thread
per connection, optional TLS, IIS's connection-based NTLM); what is here is what only tests
need. It appends one JSON line per request it receives to the log and flushes at once, so a
test can prove what did and did not arrive. Every line has an "event": "request" for a
request (written when the request has been read, or when the connection ended in the middle
of it, with "complete": false), "first-body-byte" / "body-progress" while an RPC_IN_DATA body
streams in, and "close" when a connection that carried requests ends.

Behaviour by path (case-insensitive prefix):
  default                      200 application/json echo of what was received
  /ntlm/ (and /EWS/, /rpc/ when the request carries Authorization: NTLM)
                               IIS-like connection-based NTLM (401 / challenge / 200 user)
  /hold?seconds=N              wait N seconds (less if the client leaves), then the echo
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
"not-http", not as a request). SIGTERM ends it with status 0.
"""

import argparse
import hashlib
import itertools
import json
import os
import socket
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "topology", "hosts"))
from exchange_sim import http, serve  # noqa: E402  (the simulated Exchange host's package)
from exchange_sim import tls as tlsmod  # noqa: E402
from exchange_sim.jsonlog import JsonLog  # noqa: E402
from exchange_sim.ntlm import IisNtlm  # noqa: E402
from exchange_sim.serve import Eof  # noqa: E402

MAX_HOLD = 700.0
SILENCE = 3600.0
PROGRESS_STEP = 1024 * 1024
MIB = 1024 * 1024
MAX_DOWNLOAD_MIB = 4096
DOWNLOAD_BASE = bytes(range(256)) * (MIB // 256)
BIG_CHANNEL = 16 * 1024 * 1024       # a 401 to a channel declaring more closes, as IIS does
PENDING_PERIOD = 0.5
AS_COMMANDS = ("Sync,SendMail,SmartForward,SmartReply,GetAttachment,GetHierarchy,CreateCollection,"
               "DeleteCollection,MoveCollection,FolderSync,FolderCreate,FolderDelete,FolderUpdate,MoveItems,"
               "GetItemEstimate,MeetingResponse,Search,Settings,Ping,ItemOperations,Provision,"
               "ResolveRecipients,ValidateCert,Find")


class OriginRequest(http.Request):
    def __init__(self, *args):
        super().__init__(*args)
        self.head_time = time.time()
        self.first_body_byte_time = None
        self.complete_time = None
        self.sha = hashlib.sha256()
        self.error = None

    @property
    def path(self):
        return self.target.split("?", 1)[0]

    @property
    def query(self):
        return urllib.parse.parse_qs(self.query_text)

    def number(self, name, default, low, high):
        try:
            value = float(self.query.get(name, [default])[0])
        except ValueError:
            value = default
        return max(low, min(value, high))


class Connection(http.HttpConnection):
    max_head = 1024 * 1024
    server_fields = (("Server", "dmz-test-origin"),)
    ids = itertools.count(1)

    def __init__(self, server, sock, peer):
        super().__init__(sock, peer, server.tls_context, server.stopping)
        self.server = server
        self.where = "%s:%d" % peer
        self.ntlm = IisNtlm("ex01.corp.contoso.com")

    def event(self, name, **fields):
        self.server.log.write(dict({"event": name, "time": time.time(), "origin": self.server.name, "conn": self.id},
                                   **fields))

    def log_request(self, req):
        self.event("request", req=self.requests, peer=self.where, tls=self.tls is not None, sni=self.sni,
                   method=req.method, target=req.target, version=req.version, headers=req.headers,
                   malformed=req.malformed, body_bytes=req.body_bytes,
                   body_sha256=req.sha.hexdigest() if req.body_bytes else None, head_time=req.head_time,
                   first_body_byte_time=req.first_body_byte_time, complete_time=req.complete_time,
                   complete=req.complete, error=req.error, user=self.ntlm.user)

    def read_body(self, req, on_part=None):
        """Reads the body (never held whole), hashing it and noting when bytes arrive."""
        for part in self.body_parts(req):
            if req.first_body_byte_time is None:
                req.first_body_byte_time = time.time()
            req.sha.update(part)
            if on_part:
                on_part(len(part))
        req.complete_time = time.time()

    def refuse(self, req, status, error):
        """Logs the request with `error` and answers `status` with that text, closing."""
        req.error = error
        self.log_request(req)
        self.respond(req, status, body=(error + "\n").encode(), keep_alive=False)
        return False

    def echo(self, req, keep_alive):
        body = json.dumps({
            "method": req.method, "target": req.target, "version": req.version, "headers": req.headers,
            "conn": self.id, "req": self.requests, "body_bytes": req.body_bytes, "peer": self.where,
            "tls": self.tls is not None, "sni": self.sni, "user": self.ntlm.user, "origin": self.server.name,
        }).encode()
        return self.respond(req, 200, [("Content-Type", "application/json")], body, keep_alive)

    # -- the loop

    def not_http(self):
        self.event("not-http", peer=self.where, first_bytes=bytes(self.buf[:16]).hex())

    def closed(self):
        if self.requests:
            self.event("close", requests=self.requests, peer=self.where, user=self.ntlm.user)

    def serve_one(self):
        try:
            head = self.read_head()
        except Eof:
            # A partial head: logged, so that a test sees what came.
            self.requests += 1
            req = OriginRequest("?", bytes(self.buf[:200]).decode("latin-1"), "", [], [])
            req.error = "connection ended inside the head"
            self.log_request(req)
            return False
        except ValueError as e:
            self.requests += 1
            return self.refuse(OriginRequest("?", bytes(self.buf[:200]).decode("latin-1"), "", [], []), 431, str(e))
        if head is None:
            return False
        self.requests += 1
        req = http.parse_head(head, OriginRequest)
        if not req.well_formed:
            return self.refuse(req, 400, "malformed head")
        path = req.path.lower()
        # What the answer will be is decided before the body, as IIS does for authentication.
        scheme, _, token = (req.header("authorization") or "").partition(" ")
        ntlm_auth = scheme.lower() in ("ntlm", "negotiate") and token.strip() != ""
        refusal = None
        if path.startswith("/ntlm") or (ntlm_auth and path.startswith(("/ews/", "/rpc/"))):
            answer = self.ntlm.answer(scheme, token)
            refusal = answer if isinstance(answer, tuple) else None
        try:
            req.framing = http.framing(req, strict=False)
        except ValueError as e:
            return self.refuse(req, 400, str(e))
        if req.framing[0] != "none":
            self.send_continue(req)
        is_rpc = path.startswith("/rpc/rpcproxy.dll")
        if is_rpc and req.method == "RPC_IN_DATA" and refusal is None:
            return self.rpc_in_data(req, req.keep_alive)
        if refusal is not None and req.framing[1] is not None and req.framing[1] > BIG_CHANNEL:
            self.log_request(req)
            return self.respond(req, 401, refusal[0], refusal[1], keep_alive=False)
        try:
            self.read_body(req)
        except ValueError as e:
            return self.refuse(req, 400, str(e))
        except Eof:
            req.error = "connection ended inside the body"
            self.log_request(req)
            return False
        self.log_request(req)
        if refusal is not None:
            return self.respond(req, 401, refusal[0], refusal[1], req.keep_alive)
        return self.answer(req, path, is_rpc)

    def answer(self, req, path, is_rpc):
        keep_alive = req.keep_alive
        if path.startswith("/hold"):
            if not self.wait_peer(req.number("seconds", 1.0, 0.0, MAX_HOLD)):
                return False
            return self.echo(req, keep_alive)
        if path.startswith("/silent"):
            self.wait_peer(SILENCE)
            return False
        if path.startswith("/close"):
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        if path.startswith("/bad-framing"):
            self.send(b"HTTP/1.1 200 OK\r\nServer: dmz-test-origin\r\nContent-Length: 5\r\n"
                      b"Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
            return False
        if is_rpc and req.method == "RPC_OUT_DATA":
            return self.rpc_out_data(req)
        if path.startswith("/bigdownload") and req.method in ("GET", "HEAD"):
            return self.big_download(req, keep_alive)
        if path.startswith("/mapi/emsmdb") and req.method == "POST":
            return self.mapi(req, keep_alive)
        if path.startswith("/microsoft-server-activesync") and req.method == "OPTIONS":
            return self.respond(req, 200, [("Allow", "OPTIONS,POST"), ("MS-Server-ActiveSync", "15.20"),
                                           ("MS-ASProtocolVersions", "14.1,16.0"),
                                           ("MS-ASProtocolCommands", AS_COMMANDS)], b"", keep_alive)
        return self.echo(req, keep_alive)

    # -- streams

    def rpc_in_data(self, req, keep_alive):
        """Outlook Anywhere's IN channel: the body is logged as it streams in."""
        progress = {"next": PROGRESS_STEP}

        def on_part(n):
            if req.body_bytes == n:            # the first bytes of the body
                self.event("first-body-byte", req=self.requests, method=req.method, target=req.target,
                           body_bytes=req.body_bytes, first_body_byte_time=req.first_body_byte_time)
            while req.body_bytes >= progress["next"]:
                self.event("body-progress", req=self.requests, method=req.method, target=req.target,
                           body_bytes=req.body_bytes)
                progress["next"] += PROGRESS_STEP

        try:
            self.read_body(req, on_part)
        except Eof:
            req.error = "connection ended inside the body"
            self.log_request(req)
            return False
        except ValueError as e:
            return self.refuse(req, 400, str(e))
        self.log_request(req)
        return self.respond(req, 200, [("Content-Type", "application/rpc")], b"", keep_alive, reason="Success")

    def rpc_out_data(self, req):
        """Outlook Anywhere's OUT channel: a 1 GiB response produced a little at a time."""
        blocks = int(req.number("blocks", 5, 1, 100))
        self.send(b"HTTP/1.1 200 Success\r\nServer: dmz-test-origin\r\nContent-Type: application/rpc\r\n"
                  b"Content-Length: 1073741824\r\n\r\n")
        for i in range(blocks):
            if i and not self.wait_peer(0.2):
                return False
            self.send(("block %d at %.3f\n" % (i, time.time())).encode().ljust(64, b"."))
        self.wait_peer(SILENCE)
        return False

    def big_download(self, req, keep_alive):
        """N MiB with Content-Length, produced and sent 1 MiB at a time (never held whole)."""
        mib = int(req.number("mib", 1, 0, MAX_DOWNLOAD_MIB))
        sha = hashlib.sha256()
        sent = 0
        error = None
        try:
            self.send(self.head_bytes(req, 200, None, [("Content-Type", "application/octet-stream"),
                                                       ("Content-Length", str(mib * MIB))], keep_alive))
            for i in range(mib if req.method != "HEAD" else 0):
                marker = b"block %010d\n" % i
                block = marker + DOWNLOAD_BASE[len(marker):]
                self.send(block)
                sha.update(block)
                sent += len(block)
        except Eof as e:
            error = str(e) or "connection ended"
        self.event("response", req=self.requests, method=req.method, target=req.target, status=200,
                   content_length=mib * MIB, body_bytes=sent, body_sha256=sha.hexdigest(), complete=error is None,
                   error=error)
        return keep_alive and error is None

    def mapi(self, req, keep_alive):
        """MAPI over HTTP: chunked PENDING keep-alives while the 'server' works, then DONE."""
        pendings = int(req.number("pendings", 3, 0, 100))
        self.send(self.head_bytes(req, 200, None, [("Content-Type", "application/mapi-http"),
                                                   ("X-RequestType", "Execute"), ("X-ResponseCode", "0"),
                                                   ("Transfer-Encoding", "chunked")], keep_alive))
        for i in range(pendings):
            if i and not self.wait_peer(PENDING_PERIOD):
                return False
            self.send(http.chunk(b"PENDING\n"))
        if not self.wait_peer(PENDING_PERIOD):
            return False
        self.send(http.chunk(b"DONE\n") + http.LAST_CHUNK)
        return keep_alive


class Server:
    def __init__(self, name, log, tls_context):
        self.name, self.log, self.tls_context = name, log, tls_context
        self.stopping = threading.Event()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, type=serve.address_argument, help="ADDRESS:PORT, e.g. 127.30.0.50:8443")
    ap.add_argument("--cert", help="PEM certificate (chain) for TLS")
    ap.add_argument("--key", help="PEM private key for TLS")
    ap.add_argument("--log", required=True, help="JSON lines file, appended")
    ap.add_argument("--name", default="origin", help="a name put in every log line and echo")
    args = ap.parse_args(argv)
    address, port = args.listen
    if bool(args.cert) != bool(args.key):
        ap.error("--cert and --key go together")
    serve.hold_stop_signals()
    server = Server(args.name, JsonLog(args.log), tlsmod.server_context(args.cert, args.key) if args.cert else None)
    sock = serve.listen(address, port, backlog=128)
    print("origin %s listening on %s:%d%s" % (args.name, address, port, " (TLS)" if args.cert else ""), flush=True)
    serve.serve_until_stopped(sock, lambda s, peer: Connection(server, s, peer).run(), server.stopping)
    return 0


if __name__ == "__main__":
    sys.exit(main())
