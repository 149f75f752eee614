#!/usr/bin/env python3
"""The SMTP sink: a small ESMTP server standing in for Exchange's FrontEnd transport.

    smtp_sink.py --listen 127.30.0.50:PORT --store DIR [--log FILE.jsonl] [--name NAME]
                 [--max-size BYTES] [--line-ends strict|lf] [--no-pipelining] [--chunking]

Built on the simulated Exchange host's SMTP engine (topology/hosts/exchange_sim/smtp.py, one
thread per connection), speaking Postfix's words where the host speaks Exchange's. It speaks
EHLO (PIPELINING unless --no-pipelining, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, and CHUNKING
with --chunking), HELO, MAIL, RCPT, DATA, BDAT (with --chunking, as Exchange), RSET, NOOP,
VRFY and QUIT, and is strict like a real MTA:
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
  a message with the line "X-Sink-Refuse: yes" 554 5.7.1 refused by sink (at its end, nothing stored)
  a message bigger than --max-size             552 5.3.4 (at its end, nothing stored; a BDAT
                                               chunk announcing more gets 552 and the close)

With --log, one JSON line per event, flushed at once: "listen"; "connect"; "command"
(verb, line); "reply" (code, text: every line of the reply); "data" (the message of a DATA
or BDAT: size, sha256, bare_lf, bare_cr, longest_line, outcome); "stored" (queue_id);
"close". Every line has time, name, conn (a connection number, 1-based) and, but for
"listen", peer. So a test can prove what arrived, and what did not (that the sink never saw
a DATA). SIGTERM ends it with status 0.
"""

import argparse
import hashlib
import itertools
import os
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "topology", "hosts"))
from exchange_sim import serve, smtp  # noqa: E402  (the simulated Exchange host's package)
from exchange_sim.jsonlog import JsonLog  # noqa: E402
from exchange_sim.store import Store  # noqa: E402

DEFAULT_MAX_SIZE = 50 * 1024 * 1024


def local_part(path):
    """The local part of a mailbox as the sink judges it ("" for the null path)."""
    at = path.rfind("@")
    lp = path[:at] if at >= 0 else path
    if lp.startswith("@") and ":" in lp:      # a source route: @a,@b:user
        lp = lp.split(":", 1)[1]
    return lp.strip('"').lower()


class SinkSession(smtp.SmtpSession):
    dialect = smtp.POSTFIX
    max_errors = 50
    max_recipients = 1000            # Postfix's smtpd_recipient_limit
    ids = itertools.count(1)

    def __init__(self, sink, sock, peer):
        super().__init__(sock, peer, sink.max_size, sink.stopping)
        self.sink = sink
        if sink.line_ends == "lf":
            self.line_end = b"\n"

    def log(self, event, **fields):
        self.sink.event(event, conn=self.id, peer="%s:%d" % self.peer, **fields)

    def fqdn(self):
        return self.sink.hostname

    def banner(self):
        return "%s ESMTP smtp_sink (Exchange FrontEnd transport stand-in)" % self.sink.hostname

    def extensions(self):
        return (["PIPELINING"] if self.sink.pipelining else []) + super().extensions() + \
            (["CHUNKING"] if self.sink.chunking else [])

    def sender_refusal(self, path):
        return (451, "4.3.0 try again") if local_part(path).startswith("tempfail") else None

    def recipient_refusal(self, path):
        if local_part(path).startswith("reject"):
            return 550, "5.1.1 <%s>: Recipient address rejected: User unknown" % path
        return None

    def deliver(self, body, too_big, via, longest):
        info = {"size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                "bare_lf": body.count(b"\n") - body.count(b"\r\n"), "bare_cr": body.count(b"\r") - body.count(b"\r\n"),
                "longest_line": longest, "rcpts": list(self.rcpts), "mail_from": self.mail_from}
        if self.sink.line_ends == "lf":
            info["line_ends"] = "lf"
        if too_big:
            self.log("data", outcome="too-big", **info)
            self.say("too_big")
        elif any(line.rstrip(b" \t").lower() == b"x-sink-refuse: yes" for line in body.split(b"\r\n")):
            self.log("data", outcome="refused", **info)
            self.reply(554, "5.7.1 refused by sink")
        else:
            qid = self.sink.store.new_id()
            self.sink.store.put(qid, body, {
                "queue_id": qid, "mail_from": self.mail_from, "rcpts": list(self.rcpts), "mail_params": self.mail_args,
                "peer": self.peer[0], "peer_port": self.peer[1], "ehlo": self.ehlo, "ehlo_verb": self.ehlo_verb,
                "size": len(body), "sha256": info["sha256"], "conn": self.id, "sink": self.sink.name,
                "time": round(time.time(), 6), "via": via})
            self.log("data", outcome="stored", queue_id=qid, **info)
            self.log("stored", queue_id=qid)
            self.reply(250, "2.0.0 Ok: queued as %s" % qid)

    def opened(self):
        self.log("connect", local="%s:%d" % self.sock.getsockname()[:2])

    def command_received(self, verb, line):
        if verb is None:
            self.log("command", verb=None, line=None, too_long=True)
        else:
            self.log("command", verb=verb, line=line.decode("latin-1"))

    def replied(self, code, lines):
        self.log("reply", code=code, text=list(lines))

    def closing(self, reason):
        self.log("close", reason=reason)


class Sink:
    def __init__(self, args):
        self.name, self.hostname, self.max_size, self.line_ends = args.name, args.hostname, args.max_size, args.line_ends
        self.pipelining, self.chunking = not args.no_pipelining, args.chunking
        self.store = Store(args.store)
        self.log = JsonLog(args.log)
        self.stopping = threading.Event()

    def event(self, name, **fields):
        self.log.write(dict({"time": round(time.time(), 6), "name": self.name, "event": name}, **fields))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, type=serve.address_argument, help="HOST:PORT")
    ap.add_argument("--store", required=True, help="directory for <queue-id>.eml and .json")
    ap.add_argument("--log", help="JSON lines of every command and reply")
    ap.add_argument("--name", default="sink", help="the name in log lines and the sidecars")
    ap.add_argument("--hostname", default="ex01.corp.contoso.com", help="banner and EHLO name")
    ap.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="SIZE limit in bytes")
    ap.add_argument("--line-ends", choices=("strict", "lf"), default="strict",
                    help="strict: only CRLF ends a line; lf: a bare LF does too (smuggling-prone)")
    ap.add_argument("--no-pipelining", action="store_true", help="EHLO does not offer PIPELINING")
    ap.add_argument("--chunking", action="store_true", help="EHLO offers CHUNKING and BDAT is taken (as Exchange does)")
    args = ap.parse_args(argv)
    address, port = args.listen
    serve.hold_stop_signals()
    sink = Sink(args)
    sock = serve.listen(address, port)
    sink.event("listen", address="%s:%d" % sock.getsockname()[:2], store=sink.store.dir, line_ends=sink.line_ends,
               max_size=sink.max_size)
    serve.serve_until_stopped(sock, lambda s, peer: SinkSession(sink, s, peer).run(), sink.stopping)
    return 0


if __name__ == "__main__":
    sys.exit(main())
