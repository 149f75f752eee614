#!/usr/bin/env python3
"""The SMTP sink: a small ESMTP server standing in for Exchange's FrontEnd transport.

    smtp_sink.py --listen 127.30.0.50:PORT --store DIR [--log FILE.jsonl] [--name NAME]
                 [--max-size BYTES] [--line-ends strict|lf] [--no-pipelining] [--chunking]

Raw sockets, one thread per connection. It speaks EHLO (PIPELINING unless --no-pipelining,
SIZE, 8BITMIME, ENHANCEDSTATUSCODES, and CHUNKING with --chunking), HELO, MAIL, RCPT, DATA,
BDAT (with --chunking, as Exchange), RSET, NOOP, VRFY and QUIT, and is strict like a real
MTA:
- commands are answered in order, whatever the client pipelined;
- only <CRLF>.<CRLF> ends DATA (`--line-ends lf` instead behaves like an MTA that takes a
  bare LF as a line end, so `\\n.\\n` ends DATA too: a receiver open to SMTP smuggling);
- a line starting with "." loses that dot (un-dot-stuffing).

Every accepted message is stored in DIR as one file `<queue-id>.eml`: the message exactly
as received, after un-dot-stuffing, without the final ".<CRLF>". Its sidecar
`<queue-id>.json` (written first; both appear by an atomic rename) holds mail_from, rcpts,
peer, peer_port, ehlo, size, sha256, mail_params and the connection id. The client gets
`250 2.0.0 Ok: queued as <queue-id>`.

Canned refusals, so that tests can make the "Exchange" say no:
  RCPT whose local part starts with "reject"  550 5.1.1 <addr>: Recipient address rejected: User unknown
  MAIL whose local part starts with "tempfail" 451 4.3.0 try again
  a message with the line "X-Sink-Refuse: yes" 554 5.7.1 refused by sink (at end of DATA, nothing stored)
  a message bigger than --max-size             552 5.3.4 (at end of DATA, nothing stored)

With --log, one JSON line per event, flushed at once: "listen"; "connect"; "command"
(verb, line); "reply" (code, text: every line of the reply); "data" (the body of a DATA:
size, sha256, bare_lf, bare_cr, longest_line, outcome); "stored" (queue_id); "close".
Every line has time, name, conn (a connection number, 1-based) and, but for "listen",
peer. So a test can prove what arrived, and what did not (that the sink never saw a DATA).

Python 3 standard library only.
"""

import argparse
import hashlib
import itertools
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time

MAX_COMMAND_LINE = 4096          # Postfix's line_length_limit is 2048; be generous, but bounded
DEFAULT_MAX_SIZE = 50 * 1024 * 1024
MAX_RECIPIENTS = 1000            # Postfix's smtpd_recipient_limit
IDLE_TIMEOUT = 300.0             # RFC 5321 4.5.3.2.7: 5 minutes between commands
MAX_ERRORS = 50


class Eof(Exception):
    """The peer closed (or reset) the connection, or it idled out."""


class Log:
    def __init__(self, path, name):
        self._f = open(path, "a", encoding="utf-8") if path else None
        self._lock = threading.Lock()
        self.name = name

    def write(self, event, **fields):
        if self._f is None:
            return
        obj = {"time": round(time.time(), 6), "name": self.name, "event": event}
        obj.update(fields)
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with self._lock:
            self._f.write(line)
            self._f.flush()


class Store:
    """One file per message; queue ids unique within the process (random + counter)."""

    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self._counter = itertools.count(1)
        self._prefix = secrets.token_hex(3).upper()
        self._lock = threading.Lock()

    def new_id(self):
        with self._lock:
            n = next(self._counter)
        return "%s%06X" % (self._prefix, n)

    def _atomic_write(self, name, data):
        tmp = os.path.join(self.dir, ".tmp-" + name)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, name))

    def put(self, queue_id, message, meta):
        # The sidecar first, so that whoever sees the .eml also finds its .json.
        self._atomic_write(queue_id + ".json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode("utf-8"))
        self._atomic_write(queue_id + ".eml", message)


def local_part(path):
    """The local part of a mailbox as the sink judges it ("" for the null path)."""
    at = path.rfind("@")
    lp = path[:at] if at >= 0 else path
    if lp.startswith("@") and ":" in lp:      # a source route: @a,@b:user
        lp = lp.split(":", 1)[1]
    return lp.strip('"').lower()


PATH_RE = re.compile(r"^(?P<kw>FROM|TO):\s*<(?P<path>[^<>]*)>(?P<params>(?: +\S+)*) *$", re.I)


class Session:
    def __init__(self, server, sock, peer, conn_id):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.conn = conn_id
        self.buf = bytearray()
        self.pos = 0                 # scan position in buf (avoid rescanning on partial lines)
        self.ehlo = None
        self.ehlo_verb = None
        self.errors = 0
        self.reset()

    def reset(self):
        self.mail_from = None
        self.mail_params = []
        self.rcpts = []
        self.chunks = None   # the BDAT octets so far (a bytearray) once BDAT started

    # ---- plumbing

    def log(self, event, **fields):
        self.server.log.write(event, conn=self.conn, peer="%s:%d" % self.peer, **fields)

    def reply(self, code, *lines):
        lines = lines or ("",)
        wire = "".join("%d%s%s\r\n" % (code, "-" if i < len(lines) - 1 else " ", t) for i, t in enumerate(lines))
        self.log("reply", code=code, text=list(lines))
        try:
            self.sock.sendall(wire.encode("utf-8"))
        except OSError as e:
            raise Eof(str(e)) from None

    def fill(self):
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise Eof("idle timeout") from None
        except OSError as e:
            raise Eof(str(e)) from None
        if not data:
            raise Eof("closed by peer")
        self.buf += data

    def take_line(self, limit):
        """The next line without its terminator, or None when it is longer than `limit`
        (the rest of that line is then skipped). Strict: only CRLF ends a line (lf mode:
        LF, with an optional CR before it)."""
        lf_mode = self.server.line_ends == "lf"
        while True:
            if lf_mode:
                i = self.buf.find(b"\n", self.pos)
                if i >= 0:
                    end = i - 1 if i > 0 and self.buf[i - 1] == 0x0D else i
                    line = bytes(self.buf[:end])
                    del self.buf[:i + 1]
                    self.pos = 0
                    return line if len(line) <= limit else None
            else:
                i = self.buf.find(b"\r\n", max(0, self.pos - 1))
                if i >= 0:
                    line = bytes(self.buf[:i])
                    del self.buf[:i + 2]
                    self.pos = 0
                    return line if len(line) <= limit else None
            self.pos = len(self.buf)
            if len(self.buf) > limit + 2:
                # Too long: drop what we have, keep a trailing CR, and skip to the line end.
                keep = 1 if self.buf.endswith(b"\r") else 0
                del self.buf[:len(self.buf) - keep]
                self.pos = len(self.buf)
                while True:
                    self.fill()
                    j = self.buf.find(b"\n" if lf_mode else b"\r\n")
                    if j >= 0:
                        del self.buf[:j + (1 if lf_mode else 2)]
                        self.pos = 0
                        return None
                    keep = 1 if self.buf.endswith(b"\r") else 0
                    del self.buf[:len(self.buf) - keep]
            self.fill()

    # ---- the session

    def run(self):
        self.log("connect", local="%s:%d" % self.sock.getsockname()[:2])
        reason = "quit"
        try:
            self.reply(220, "%s ESMTP smtp_sink (Exchange FrontEnd transport stand-in)" % self.server.hostname)
            while True:
                line = self.take_line(MAX_COMMAND_LINE)
                if line is None:
                    self.log("command", verb=None, line=None, too_long=True)
                    self.reply(500, "5.5.2 Error: line too long")
                    continue
                text = line.decode("utf-8", errors="surrogateescape")
                verb, _, arg = text.partition(" ")
                verb = verb.upper()
                self.log("command", verb=verb, line=line.decode("latin-1"))
                if not self.dispatch(verb, arg):
                    break
                if self.errors >= MAX_ERRORS:
                    self.reply(421, "4.7.0 %s Error: too many errors" % self.server.hostname)
                    reason = "too many errors"
                    break
        except Eof as e:
            reason = str(e)
            if reason == "idle timeout":
                try:
                    self.sock.sendall(b"421 4.4.2 %s Error: timeout exceeded\r\n" % self.server.hostname.encode())
                except OSError:
                    pass
        finally:
            self.log("close", reason=reason)
            try:
                self.sock.close()
            except OSError:
                pass

    def dispatch(self, verb, arg):
        """Returns False to end the session."""
        host = self.server.hostname
        if verb in ("EHLO", "HELO"):
            if not arg.strip():
                self.errors += 1
                self.reply(501, "5.5.4 Syntax: %s hostname" % verb)
                return True
            self.ehlo = arg.strip()
            self.ehlo_verb = verb
            self.reset()
            if verb == "EHLO":
                self.reply(250, host, *(["PIPELINING"] if self.server.pipelining else []),
                           "SIZE %d" % self.server.max_size, "8BITMIME", "ENHANCEDSTATUSCODES",
                           *(["CHUNKING"] if self.server.chunking else []))
            else:
                self.reply(250, host)
            return True
        if verb == "MAIL":
            return self.mail(arg)
        if verb == "RCPT":
            return self.rcpt(arg)
        if verb == "DATA":
            return self.data(arg)
        if verb == "BDAT" and self.server.chunking:
            return self.bdat(arg)
        if verb == "RSET":
            self.reset()
            self.reply(250, "2.0.0 Ok")
            return True
        if verb == "NOOP":
            self.reply(250, "2.0.0 Ok")
            return True
        if verb == "VRFY":
            self.reply(252, "2.0.0 Send some mail, I'll try my best")
            return True
        if verb == "QUIT":
            self.reply(221, "2.0.0 Bye")
            return False
        self.errors += 1
        if not verb:
            self.reply(500, "5.5.2 Error: bad syntax")
            return True
        self.reply(502, "5.5.2 Error: command not recognized")
        return True

    def mail(self, arg):
        if self.ehlo is None:
            self.errors += 1
            self.reply(503, "5.5.1 Error: send HELO/EHLO first")
            return True
        if self.mail_from is not None:
            self.errors += 1
            self.reply(503, "5.5.1 Error: nested MAIL command")
            return True
        m = PATH_RE.match(arg)
        if not m or m.group("kw").upper() != "FROM":
            self.errors += 1
            self.reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
            return True
        path = m.group("path")
        params = m.group("params").split()
        for p in params:
            k, _, v = p.partition("=")
            k = k.upper()
            if k == "SIZE":
                if not v.isdigit():
                    self.reply(501, "5.5.4 Bad message size syntax")
                    return True
                if int(v) > self.server.max_size:
                    self.reply(552, "5.3.4 Message size exceeds fixed limit")
                    return True
            elif k == "BODY":
                if v.upper() not in ("7BIT", "8BITMIME"):
                    self.reply(501, "5.5.4 Bad BODY keyword value")
                    return True
            else:
                self.reply(555, "5.5.4 Unsupported option: %s" % p)
                return True
        if local_part(path).startswith("tempfail"):
            self.reply(451, "4.3.0 try again")
            return True
        self.mail_from = path
        self.mail_params = params
        self.reply(250, "2.1.0 Ok")
        return True

    def rcpt(self, arg):
        if self.mail_from is None:
            self.errors += 1
            self.reply(503, "5.5.1 Error: need MAIL command")
            return True
        m = PATH_RE.match(arg)
        if not m or m.group("kw").upper() != "TO" or not m.group("path"):
            self.errors += 1
            self.reply(501, "5.5.4 Syntax: RCPT TO:<address>")
            return True
        if m.group("params").strip():
            self.reply(555, "5.5.4 Unsupported option: %s" % m.group("params").strip())
            return True
        path = m.group("path")
        if len(self.rcpts) >= MAX_RECIPIENTS:
            self.reply(452, "4.5.3 Error: too many recipients")
            return True
        if local_part(path).startswith("reject"):
            self.reply(550, "5.1.1 <%s>: Recipient address rejected: User unknown" % path)
            return True
        self.rcpts.append(path)
        self.reply(250, "2.1.5 Ok")
        return True

    def data(self, arg):
        if arg.strip():
            self.errors += 1
            self.reply(501, "5.5.4 Syntax: DATA")
            return True
        if self.mail_from is None:
            self.errors += 1
            self.reply(503, "5.5.1 Error: need RCPT command")
            return True
        if not self.rcpts:
            self.reply(554, "5.5.1 Error: no valid recipients")
            return True
        self.reply(354, "End data with <CR><LF>.<CR><LF>")
        msg = bytearray()
        too_big = False
        refuse = False
        longest = 0
        lf_mode = self.server.line_ends == "lf"
        while True:
            line = self.take_line(self.server.max_size + 2)   # any text line up to the size limit
            if line is None:
                too_big = True
                msg = bytearray()
                continue
            if line == b".":
                break
            longest = max(longest, len(line) + 2)
            if line.startswith(b"."):
                line = line[1:]
            if line.rstrip(b" \t").lower() == b"x-sink-refuse: yes":
                refuse = True
            if not too_big:
                if len(msg) + len(line) + 2 > self.server.max_size:
                    too_big = True
                    msg = bytearray()
                else:
                    msg += line
                    msg += b"\r\n"
        self.finish(bytes(msg), too_big, refuse, longest)
        return True

    def bdat(self, arg):
        """BDAT <size> [LAST] (RFC 3030): the octets follow the command; stored as they come."""
        parts = arg.split()
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            self.reply(501, "5.5.4 Syntax: BDAT size [LAST]")
            return False   # the octets that follow cannot be found: end the session
        size, last = int(parts[0]), len(parts) == 2
        while len(self.buf) < size:
            self.fill()
        chunk = bytes(self.buf[:size])
        del self.buf[:size]
        self.pos = 0
        if not self.rcpts:
            self.reply(503 if self.mail_from is None else 554, "5.5.1 Error: no valid recipients")
            return True
        if self.chunks is None:
            self.chunks = bytearray()
        self.chunks += chunk
        if not last:
            self.reply(250, "2.0.0 %d bytes received" % size)
            return True
        body = bytes(self.chunks)
        too_big = len(body) > self.server.max_size
        refuse = any(l.rstrip(b" \t").lower() == b"x-sink-refuse: yes" for l in body.split(b"\r\n"))
        longest = max((len(l) + 2 for l in body.split(b"\r\n")), default=0)
        self.finish(b"" if too_big else body, too_big, refuse, longest)
        return True

    def finish(self, body, too_big, refuse, longest):
        """The end of a message (DATA or BDAT LAST): store it, or refuse it, and reset."""
        lf_mode = self.server.line_ends == "lf"
        info = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(), "bare_lf": body.count(b"\n") -
                body.count(b"\r\n"), "bare_cr": body.count(b"\r") - body.count(b"\r\n"), "longest_line": longest,
                "rcpts": list(self.rcpts), "mail_from": self.mail_from}
        if lf_mode:
            info["line_ends"] = "lf"
        if too_big:
            self.log("data", outcome="too-big", **info)
            self.reply(552, "5.3.4 Error: message file too big")
        elif refuse:
            self.log("data", outcome="refused", **info)
            self.reply(554, "5.7.1 refused by sink")
        else:
            qid = self.server.store.new_id()
            meta = {"queue_id": qid, "mail_from": self.mail_from, "rcpts": list(self.rcpts),
                    "mail_params": self.mail_params, "peer": self.peer[0], "peer_port": self.peer[1],
                    "ehlo": self.ehlo, "ehlo_verb": self.ehlo_verb, "size": len(body), "sha256": info["sha256"],
                    "conn": self.conn, "sink": self.server.log.name, "time": round(time.time(), 6)}
            self.server.store.put(qid, body, meta)
            self.log("data", outcome="stored", queue_id=qid, **info)
            self.log("stored", queue_id=qid)
            self.reply(250, "2.0.0 Ok: queued as %s" % qid)
        self.reset()


class Server:
    def __init__(self, host, port, store, log, hostname, max_size, line_ends):
        self.store = store
        self.log = log
        self.hostname = hostname
        self.max_size = max_size
        self.line_ends = line_ends
        self.pipelining = True
        self.chunking = False
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self._conns = itertools.count(1)

    def serve(self):
        self.log.write("listen", address="%s:%d" % self.sock.getsockname()[:2], store=self.store.dir,
                       line_ends=self.line_ends, max_size=self.max_size)
        while True:
            sock, peer = self.sock.accept()
            sock.settimeout(IDLE_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s = Session(self, sock, peer[:2], next(self._conns))
            threading.Thread(target=s.run, daemon=True).start()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT")
    ap.add_argument("--store", required=True, help="directory for <queue-id>.eml and .json")
    ap.add_argument("--log", help="JSON lines of every command and reply")
    ap.add_argument("--name", default="sink", help="the name in log lines and the sidecars")
    ap.add_argument("--hostname", default="ex01.corp.contoso.com", help="banner and EHLO name")
    ap.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="SIZE limit in bytes")
    ap.add_argument("--line-ends", choices=("strict", "lf"), default="strict",
                    help="strict: only CRLF ends a line; lf: a bare LF does too (smuggling-prone)")
    ap.add_argument("--no-pipelining", action="store_true", help="EHLO does not offer PIPELINING")
    ap.add_argument("--chunking", action="store_true", help="EHLO offers CHUNKING and BDAT is taken (as Exchange does)")
    a = ap.parse_args(argv)
    host, _, port = a.listen.rpartition(":")
    host = host.strip("[]")
    server = Server(host, int(port), Store(a.store), Log(a.log, a.name), a.hostname, a.max_size, a.line_ends)
    server.pipelining = not a.no_pipelining
    server.chunking = a.chunking
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
