"""SMTP helpers for the integration tests: start the shipped sink (smtp_sink.py), read what
it stored and logged, run swaks, and a raw-socket SMTP client for what swaks cannot send.

Every read is bounded by a deadline; Python 3 standard library only. Processes are
started through harness.Lab, so Lab.close() stops them.
"""

import glob
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time

import harness as h

SINK_PY = os.path.join(h.HERE, "smtp_sink.py")
SWAKS = os.environ.get("SWAKS") or "/usr/bin/swaks"


# ---------------------------------------------------------------- the sink

class Sink:
    """A running smtp_sink.py: where it listens, what it stored, what it logged."""

    def __init__(self, name, host, port, store, log, process):
        self.name, self.host, self.port, self.store, self.log, self.process = name, host, port, store, log, process

    def entries(self, event=None):
        return [r for r in h.read_jsonl(self.log) if event is None or r.get("event") == event]

    def commands(self, verb=None):
        """The command lines the sink received (verb upper case), in order."""
        return [r for r in self.entries("command") if verb is None or r.get("verb") == verb]

    def replies(self):
        return self.entries("reply")

    def ids(self):
        return sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(self.store, "*.eml")))

    def count(self):
        return len(self.ids())

    def message(self, queue_id):
        """(the stored bytes, the sidecar dict)."""
        with open(os.path.join(self.store, queue_id + ".eml"), "rb") as f:
            body = f.read()
        with open(os.path.join(self.store, queue_id + ".json"), encoding="utf-8") as f:
            meta = json.load(f)
        return body, meta

    def messages(self):
        return [(qid,) + self.message(qid) for qid in self.ids()]

    def wait_count(self, n, timeout=10.0):
        """Polls until at least `n` messages are stored; returns the count."""
        h.wait_for(lambda: self.count() >= n, timeout, interval=0.02)
        return self.count()

    def wait_closed(self, connections=None, timeout=5.0):
        """Polls until every connection the sink accepted has been closed (so its log is
        complete); returns the number of open ones (0 when settled)."""
        def open_count():
            opened = {r["conn"] for r in self.entries("connect")}
            closed = {r["conn"] for r in self.entries("close")}
            if connections is not None and len(opened) < connections:
                return None
            return len(opened - closed)
        value = h.wait_for(lambda: open_count() == 0, timeout, interval=0.02)
        return 0 if value else open_count()

    def tail(self, n=30):
        return "--- %s log ---\n%s" % (self.name, h.tail(self.log, n))


def start_sink(lab, name, host, port=None, line_ends="strict", max_size=None, hostname=None, pipelining=True,
               chunking=False):
    port = port or h.free_port(host)
    store = lab.path(name + ".store")
    log = lab.path(name + ".jsonl")
    argv = [sys.executable, SINK_PY, "--listen", "%s:%d" % (host, port), "--store", store, "--log", log,
            "--name", name, "--line-ends", line_ends]
    if max_size is not None:
        argv += ["--max-size", str(max_size)]
    if hostname:
        argv += ["--hostname", hostname]
    if not pipelining:
        argv.append("--no-pipelining")
    if chunking:
        argv.append("--chunking")
    return Sink(name, host, port, store, log, lab.start(name, argv, host, port))


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- swaks

class SwaksResult:
    def __init__(self, res):
        self.returncode = res.returncode
        self.stdout = res.stdout
        self.stderr = res.stderr

    def server_lines(self):
        """The lines swaks received from the server (swaks prints them with ' <- ' or
        ' <** ' for errors, '<~ ' inside TLS)."""
        out = []
        for line in self.stdout.splitlines():
            m = re.match(r"^\s*<(?:-|\*\*|~|~\*\*)\s+(.*)$", line)
            if m:
                out.append(m.group(1))
        return out

    def codes(self):
        return [l[:3] for l in self.server_lines()]

    def __repr__(self):
        return "<swaks rc=%s>\n%s\n%s" % (self.returncode, self.stdout[-4000:], self.stderr[-2000:])


def swaks(*args, timeout=60):
    """Runs swaks with `args` (a list of strings); never raises on a non-zero exit."""
    res = subprocess.run([SWAKS, "--timeout", str(max(5, timeout - 10)), *args], capture_output=True, text=True,
                         timeout=timeout, check=False, errors="replace")
    return SwaksResult(res)


def swaks_data_file(lab, name, body):
    """`--data` argument for `swaks -ndf` that sends `body` (CRLF lines) exactly: swaks
    sends the file as is plus one CRLF, so the file holds the dot-stuffed body and the
    final dot without its CRLF."""
    path = lab.path(name)
    with open(path, "wb") as f:
        f.write(dot_stuff(body) + b".")
    return "@" + path


# ---------------------------------------------------------------- raw SMTP client

class Reply:
    def __init__(self, code, lines, raw):
        self.code, self.lines, self.raw = code, lines, raw

    @property
    def text(self):
        return " / ".join(self.lines)

    def keywords(self):
        """EHLO keywords (upper case), without the first (greeting) line."""
        return [l.split(" ")[0].upper() for l in self.lines[1:]]

    def __repr__(self):
        return "<Reply %s %r>" % (self.code, self.lines)


class SmtpClient:
    """One SMTP connection over a raw socket (upgradable to TLS), from `source`."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    @classmethod
    def open(cls, host, port, source=h.CLIENT, timeout=10.0):
        return cls(h.connect(host, port, source=source, timeout=timeout))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("latin-1")
        self.sock.sendall(data)

    def _fill(self, deadline):
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no reply before the deadline; buffered %r" % bytes(self.buf[:200]))
        self.sock.settimeout(min(left, 30.0))
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except ssl.SSLError as e:
            if "EOF" in str(e).upper() or "SHUTDOWN" in str(e).upper():
                data = b""
            else:
                raise
        except socket.timeout:
            raise TimeoutError("no reply for %.1f s; buffered %r" % (left, bytes(self.buf[:200]))) from None
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def reply(self, timeout=10.0):
        """The next (possibly multi-line) reply, or None when the server closed first."""
        deadline = time.monotonic() + timeout
        lines, raw = [], bytearray()
        while True:
            i = self.buf.find(b"\r\n")
            if i < 0:
                if not self._fill(deadline):
                    return None
                continue
            line = bytes(self.buf[:i])
            del self.buf[:i + 2]
            raw += line + b"\r\n"
            m = re.match(rb"^(\d{3})([ -]?)(.*)$", line)
            if not m:
                raise ValueError("not an SMTP reply line: %r" % line[:200])
            lines.append(m.group(3).decode("utf-8", errors="replace"))
            if m.group(2) != b"-":
                return Reply(int(m.group(1)), lines, bytes(raw))

    def replies(self, n, timeout=10.0):
        return [self.reply(timeout) for _ in range(n)]

    def cmd(self, line, timeout=10.0):
        self.send(line + "\r\n")
        return self.reply(timeout)

    def banner(self, timeout=10.0):
        return self.reply(timeout)

    def ehlo(self, name="client.example.net", timeout=10.0):
        return self.cmd("EHLO " + name, timeout)

    def starttls(self, ca_file, server_name=h.PUBLIC_NAME, timeout=10.0):
        """Wraps the socket in TLS (after a 220 to STARTTLS). Bytes already buffered in
        the clear are an error (they would be a reply the server sent before TLS)."""
        if self.buf:
            raise AssertionError("plaintext bytes after the STARTTLS reply: %r" % bytes(self.buf))
        self.sock.settimeout(timeout)
        self.sock = h.tls_client_context(ca_file).wrap_socket(self.sock, server_hostname=server_name)

    def pending(self, wait=0.3):
        """Whatever the server sends within `wait` seconds (b"" if nothing)."""
        deadline = time.monotonic() + wait
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def closed_by_peer(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        except OSError:
            return True
        return True

    def send_mail(self, mail_from, rcpts, body, timeout=15.0, pipelined=False):
        """MAIL, RCPT..., DATA and the dot-stuffed body (`body` must use CRLF line ends and
        end with CRLF, or be empty). Returns the replies: [mail, rcpt..., data(, end)]."""
        stuffed = dot_stuff(body)
        if pipelined:
            head = "MAIL FROM:<%s>\r\n" % mail_from + "".join("RCPT TO:<%s>\r\n" % r for r in rcpts) + "DATA\r\n"
            self.send(head)
            out = [self.reply(timeout) for _ in range(len(rcpts) + 2)]
            if out[-1] is None or out[-1].code != 354:
                return out
            self.send(stuffed + b".\r\n")
            out.append(self.reply(timeout))
            return out
        out = [self.cmd("MAIL FROM:<%s>" % mail_from, timeout)]
        for r in rcpts:
            out.append(self.cmd("RCPT TO:<%s>" % r, timeout))
        d = self.cmd("DATA", timeout)
        out.append(d)
        if d is None or d.code != 354:
            return out
        self.send(stuffed + b".\r\n")
        out.append(self.reply(timeout))
        return out


def dot_stuff(body):
    """RFC 5321 4.5.2 transparency: a line starting with '.' gets one more."""
    if body.startswith(b"."):
        body = b"." + body
    return body.replace(b"\r\n.", b"\r\n..")


def queued_id(reply):
    """The queue id in '250 2.0.0 Ok: queued as <id>' or None."""
    m = re.search(r"queued as (\S+)", reply.text if reply else "")
    return m.group(1) if m else None


# ---------------------------------------------------------------- SMTP smuggling

# End-of-data look-alikes (SEC Consult, "SMTP smuggling", 2023, and the variants Postfix,
# Sendmail, Exim and Exchange were found to accept). Each is embedded after a first line of
# text and followed by a second, smuggled transaction; only the final CRLF.CRLF is real.
# A tuple is one variant sent in several writes (the split falls inside it).
SMUGGLING_VARIANTS = {
    "lf_dot_lf": b"\n.\n",
    "cr_dot_cr": b"\r.\r",
    "crlf_dot_lf": b"\r\n.\n",
    "lf_dot_crlf": b"\n.\r\n",
    "cr_dot_crlf": b"\r.\r\n",
    "crlf_dot_cr": b"\r\n.\r",
    "lf_dot_cr": b"\n.\r",
    "cr_dot_lf": b"\r.\n",
    "crlf_dot_cr_crlf": b"\r\n.\r\r\n",
    "crlf_dot_lf_split": (b"\r\n.", b"\n"),
    "lf_dot_then_crlf_split": (b"\n.", b"\r\n"),
    "lf_then_dot_crlf_split": (b"\n", b".\r\n"),
    # At the very start of DATA (a line start right after the 354): a dict marks it.
    "dot_lf_at_data_start": {"start": b".\n"},
    "dot_cr_at_data_start": {"start": b".\r"},
}

SMUGGLED_BLOCK = (b"MAIL FROM:<ceo@contoso.com>\r\n"
                  b"RCPT TO:<victim@contoso.com>\r\n"
                  b"DATA\r\n"
                  b"From: ceo@contoso.com\r\n"
                  b"Subject: smuggled\r\n"
                  b"\r\n"
                  b"this message was smuggled\r\n")


def smuggling_writes(variant, first_subject="first"):
    """The DATA bytes (after the 354) as a list of writes: a first message's text, the
    variant, the smuggled transaction, and the only real end, CRLF.CRLF."""
    head = b"From: a@example.net\r\nSubject: " + first_subject.encode() + b"\r\n\r\nlegitimate text"
    if isinstance(variant, dict):
        head, variant = b"", variant["start"]
    parts = variant if isinstance(variant, tuple) else (variant,)
    writes = [head + parts[0]] + list(parts[1:])
    writes[-1] = writes[-1] + SMUGGLED_BLOCK + b".\r\n"
    return writes


def undot_strict(data):
    """What a strict receiver stores for DATA bytes `data` (final '.CRLF' excluded): CRLF
    lines, each losing one leading dot."""
    assert data.endswith(b"\r\n") or not data
    lines = data[:-2].split(b"\r\n") if data else []
    return b"".join((l[1:] if l.startswith(b".") else l) + b"\r\n" for l in lines)
