"""ESMTP server sessions, a thread each: the command loop, EHLO, MAIL, RCPT, DATA, BDAT
(RFC 3030), RSET, NOOP, VRFY and QUIT. A server subclasses SmtpSession: it says what it
offers and whom it takes (the hooks at the end of the class) and which dialect it speaks.

Strict like a real MTA: commands are answered in order, whatever the client pipelined; only
CRLF ends a line (a subclass may set line_end to b"\\n" to play a receiver that takes a bare
LF as a line end); only <CRLF>.<CRLF> ends DATA, and a line starting with "." loses that
dot; BDAT octets are taken as they are, and read even when the chunk is refused, so that
they are never taken for commands.
"""

import re
import ssl

from .serve import Connection, Eof, receive

PATH_RE = re.compile(r"^(?P<kw>FROM|TO):\s*<(?P<path>[^<>]*)>(?P<params>(?: +\S+)*) *$", re.I)

EXCHANGE, POSTFIX = 0, 1
# Every reply the engine gives, by situation, in two dialects: Exchange's, as the simulated
# host speaks it, and Postfix's, as the test sink (a plain MTA) speaks it. The proxy must
# carry both (it reads queue ids from "<id@host>" and from "queued as id", for one).
REPLIES = {
    "line_too_long": ((500, "5.5.2 Line too long"), (500, "5.5.2 Error: line too long")),
    "too_many_errors": ((421, "4.7.0 Too many errors on this connection, closing transmission channel"),
                        (421, "4.7.0 {fqdn} Error: too many errors")),
    "timed_out": ((421, "4.4.1 Connection timed out"), (421, "4.4.2 {fqdn} Error: timeout exceeded")),
    "hello_syntax": ((501, "5.5.4 Invalid domain name"), (501, "5.5.4 Syntax: {verb} hostname")),
    "unknown": ((500, "5.3.3 Unrecognized command '{verb}'"), (502, "5.5.2 Error: command not recognized")),
    "empty": ((500, "5.3.3 Unrecognized command ''"), (500, "5.5.2 Error: bad syntax")),
    "rset": ((250, "2.0.0 Resetting"), (250, "2.0.0 Ok")),
    "noop": ((250, "2.0.0 OK"), (250, "2.0.0 Ok")),
    "vrfy": ((252, "2.1.5 Cannot VRFY user, but will accept message for delivery"),
             (252, "2.0.0 Send some mail, I'll try my best")),
    "quit": ((221, "2.0.0 Service closing transmission channel"), (221, "2.0.0 Bye")),
    "need_hello": ((503, "5.5.2 Send hello first"), (503, "5.5.1 Error: send HELO/EHLO first")),
    "nested_mail": ((503, "5.5.2 Sender already specified"), (503, "5.5.1 Error: nested MAIL command")),
    "mail_syntax": ((501, "5.5.4 Invalid arguments"), (501, "5.5.4 Syntax: MAIL FROM:<address>")),
    "unsupported_param": ((555, "5.5.4 Unsupported option: {param}"), (555, "5.5.4 Unsupported option: {param}")),
    "size_syntax": ((501, "5.5.4 Invalid arguments"), (501, "5.5.4 Bad message size syntax")),
    "size_exceeded": ((552, "5.3.4 Message size exceeds fixed maximum message size"),
                      (552, "5.3.4 Message size exceeds fixed limit")),
    "body_syntax": ((501, "5.5.4 Invalid arguments"), (501, "5.5.4 Bad BODY keyword value")),
    "mail_ok": ((250, "2.1.0 Sender OK"), (250, "2.1.0 Ok")),
    "need_mail": ((503, "5.5.2 Need mail command"), (503, "5.5.1 Error: need MAIL command")),
    "rcpt_syntax": ((501, "5.5.4 Invalid arguments"), (501, "5.5.4 Syntax: RCPT TO:<address>")),
    "too_many_recipients": ((452, "4.5.3 Too many recipients"), (452, "4.5.3 Error: too many recipients")),
    "rcpt_ok": ((250, "2.1.5 Recipient OK"), (250, "2.1.5 Ok")),
    "data_syntax": ((501, "5.5.4 Invalid arguments"), (501, "5.5.4 Syntax: DATA")),
    "data_need_mail": ((503, "5.5.2 Need mail command"), (503, "5.5.1 Error: need RCPT command")),
    "need_rcpt": ((503, "5.5.2 Need rcpt command"), (554, "5.5.1 Error: no valid recipients")),
    "data_go": ((354, "Start mail input; end with <CRLF>.<CRLF>"), (354, "End data with <CR><LF>.<CR><LF>")),
    "bdat_syntax": ((501, "5.5.4 Invalid arguments"), (501, "5.5.4 Syntax: BDAT size [LAST]")),
    "bdat_need_mail": ((503, "5.5.2 Need mail command"), (503, "5.5.1 Error: no valid recipients")),
    "chunk_ok": ((250, "2.0.0 CHUNK received OK, {size} octets"), (250, "2.0.0 {size} bytes received")),
    "too_big": ((552, "5.3.4 Message size exceeds fixed maximum message size"),
                (552, "5.3.4 Error: message file too big")),
}


def longest_line(body):
    """The longest CRLF line of a message, its CRLF counted."""
    return max((len(line) + 2 for line in body.split(b"\r\n")), default=0)


class SmtpSession(Connection):
    """One client connection. Class attributes are the server's limits and dialect."""

    dialect = EXCHANGE
    max_command = 4096
    max_errors = 20
    max_recipients = 5000
    idle_timeout = 300.0            # RFC 5321 4.5.3.2.7: 5 minutes between commands
    line_end = b"\r\n"
    mail_params = frozenset({"SIZE", "BODY"})    # MAIL parameters taken; any other: 555
    rcpt_params = frozenset()

    def __init__(self, sock, peer, max_size, stopping=None):
        super().__init__(sock, peer, stopping)
        self.max_size = max_size
        self.pos = 0                    # where to look on for a line end (no rescans)
        self.ehlo = None
        self.ehlo_verb = None
        self.errors = 0
        self.reset()

    def reset(self):
        self.mail_from = None
        self.mail_args = []
        self.rcpts = []
        self.refused = []
        self.chunks = None              # the BDAT octets so far, once BDAT started

    # -- replies

    def reply(self, code, *lines):
        lines = lines or ("",)
        self.replied(code, lines)
        wire = "".join("%d%s%s\r\n" % (code, "-" if i < len(lines) - 1 else " ", t) for i, t in enumerate(lines))
        try:
            self.sock.sendall(wire.encode("utf-8"))
        except (OSError, ssl.SSLError) as e:
            raise Eof(str(e)) from None

    def text(self, situation, **values):
        code, text = REPLIES[situation][self.dialect]
        return code, text.format(fqdn=self.fqdn(), **values)

    def say(self, situation, **values):
        self.reply(*self.text(situation, **values))
        return True

    def refuse(self, situation, **values):
        """A reply that counts as the client's error (too many of them end the session)."""
        self.errors += 1
        return self.say(situation, **values)

    # -- input

    def fill(self):
        if self.stopping.is_set():
            raise Eof("stopping")
        self.buf += receive(self.sock, "closed by peer")

    def take_line(self, limit):
        """The next line without its line end, or None when it is longer than `limit` (the
        rest of that line is then skipped). With line_end b"\\n", a CR before the LF goes too."""
        end = self.line_end
        while True:
            i = self.buf.find(end, max(0, self.pos - len(end) + 1))
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + len(end)]
                self.pos = 0
                if end == b"\n" and line.endswith(b"\r"):
                    line = line[:-1]
                return line if len(line) <= limit else None
            self.pos = len(self.buf)
            if len(self.buf) > limit + 2:
                # Too long: drop what came, but a CR that may start the line end, and skip on.
                while True:
                    keep = 1 if self.buf.endswith(b"\r") else 0
                    del self.buf[:len(self.buf) - keep]
                    self.fill()
                    j = self.buf.find(end)
                    if j >= 0:
                        del self.buf[:j + len(end)]
                        self.pos = 0
                        return None
            self.fill()

    def read_data(self):
        """The message after a 354, up to the line "." alone, un-dot-stuffed, with CRLF line
        ends: (body, too_big, longest line as received). Past max_size the rest is read and
        dropped."""
        msg = bytearray()
        too_big = False
        longest = 0
        while True:
            line = self.take_line(self.max_size + 2)
            if line is None:
                too_big = True
                msg = bytearray()
                continue
            if line == b".":
                return (b"" if too_big else bytes(msg)), too_big, longest
            longest = max(longest, len(line) + 2)
            if line.startswith(b"."):
                line = line[1:]
            if not too_big:
                if len(msg) + len(line) + 2 > self.max_size:
                    too_big = True
                    msg = bytearray()
                else:
                    msg += line + b"\r\n"

    def read_octets(self, n):
        while len(self.buf) < n:
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.pos = 0
        return out

    # -- the loop

    def run(self):
        """Serves the connection until either side ends it; never raises."""
        reason = "quit"
        try:
            self.opened()
            self.sock.settimeout(self.idle_timeout)
            self.reply(220, self.banner())
            while True:
                line = self.take_line(self.max_command)
                if line is None:
                    self.command_received(None, None)
                    self.refuse("line_too_long")
                    continue
                verb, _, arg = line.decode("utf-8", errors="surrogateescape").partition(" ")
                verb = verb.upper()
                self.command_received(verb, line)
                if not self.dispatch(verb, arg):
                    break
                if self.errors >= self.max_errors:
                    self.say("too_many_errors")
                    reason = "too many errors"
                    break
        except Eof as e:
            reason = str(e)
            if reason == "idle timeout":
                try:
                    self.sock.sendall(("%d %s\r\n" % self.text("timed_out")).encode())
                except (OSError, ssl.SSLError):
                    pass
        except (OSError, ssl.SSLError) as e:
            reason = str(e)
        finally:
            self.closing(reason)
            try:
                self.sock.close()
            except OSError:
                pass

    def dispatch(self, verb, arg):
        """Answers one command; False to end the session."""
        if verb in ("EHLO", "HELO"):
            return self.hello(verb, arg)
        if verb == "MAIL":
            return self.mail(arg)
        if verb == "RCPT":
            return self.rcpt(arg)
        if verb == "DATA":
            return self.data(arg)
        if verb == "BDAT" and "CHUNKING" in self.extensions():
            return self.bdat(arg)
        if verb == "RSET":
            self.reset()
            return self.say("rset")
        if verb in ("NOOP", "VRFY"):
            return self.say(verb.lower())
        if verb == "QUIT":
            self.say("quit")
            return False
        handled = self.other_command(verb, arg)
        if handled is not None:
            return handled
        return self.refuse("unknown" if verb else "empty", verb=verb[:32].encode("ascii", "replace").decode())

    def hello(self, verb, arg):
        if not arg.strip():
            return self.refuse("hello_syntax", verb=verb)
        self.ehlo, self.ehlo_verb = arg.strip(), verb
        self.reset()
        if verb == "HELO":
            self.reply(250, self.greeting())
        else:
            self.reply(250, self.greeting(), *self.extensions())
        return True

    def mail(self, arg):
        if self.ehlo is None:
            return self.refuse("need_hello")
        if self.mail_from is not None:
            return self.refuse("nested_mail")
        m = PATH_RE.match(arg)
        if not m or m.group("kw").upper() != "FROM":
            return self.refuse("mail_syntax")
        params = m.group("params").split()
        for p in params:
            key, _, value = p.partition("=")
            key = key.upper()
            if key not in self.mail_params:
                return self.say("unsupported_param", param=p)
            if key == "SIZE" and not value.isdigit():
                return self.say("size_syntax")
            if key == "SIZE" and int(value) > self.max_size:
                return self.say("size_exceeded")
            if key == "BODY" and value.upper() not in ("7BIT", "8BITMIME"):
                return self.say("body_syntax")
        refusal = self.sender_refusal(m.group("path"))
        if refusal:
            self.reply(*refusal)
            return True
        self.mail_from, self.mail_args = m.group("path"), params
        return self.say("mail_ok")

    def rcpt(self, arg):
        if self.mail_from is None:
            return self.refuse("need_mail")
        m = PATH_RE.match(arg)
        if not m or m.group("kw").upper() != "TO" or not m.group("path"):
            return self.refuse("rcpt_syntax")
        for p in m.group("params").split():
            if p.partition("=")[0].upper() not in self.rcpt_params:
                return self.say("unsupported_param", param=p)
        if len(self.rcpts) >= self.max_recipients:
            return self.say("too_many_recipients")
        refusal = self.recipient_refusal(m.group("path"))
        if refusal:
            self.reply(*refusal)
            return True
        self.rcpts.append(m.group("path"))
        return self.say("rcpt_ok")

    def data(self, arg):
        if arg.strip():
            return self.refuse("data_syntax")
        if self.mail_from is None:
            return self.refuse("data_need_mail")
        if not self.rcpts:
            return self.refuse("need_rcpt")
        self.say("data_go")
        body, too_big, longest = self.read_data()
        self.deliver(body, too_big, "DATA", longest)
        self.reset()
        return True

    def bdat(self, arg):
        """BDAT <size> [LAST]: exactly <size> octets follow, read even when refused."""
        parts = arg.split()
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (len(parts) == 2 and parts[1].upper() != "LAST"):
            self.say("bdat_syntax")
            return False                # where the octets end is unknown: close
        size, last = int(parts[0]), len(parts) == 2
        if size > self.max_size:
            self.say("too_big")
            return False                # nobody reads that many octets to stay in step
        octets = self.read_octets(size)
        if self.mail_from is None:
            return self.refuse("bdat_need_mail")
        if not self.rcpts:
            return self.refuse("need_rcpt")
        self.chunks = (self.chunks or bytearray()) + octets
        too_big = len(self.chunks) > self.max_size
        if not last and not too_big:
            return self.say("chunk_ok", size=size)
        body = b"" if too_big else bytes(self.chunks)
        self.deliver(body, too_big, "BDAT", longest_line(body))
        self.reset()
        return True

    # -- what a server says and decides (hooks)

    def fqdn(self):
        return "localhost"

    def banner(self):
        return "%s ESMTP" % self.fqdn()

    def greeting(self):
        """The first line of the answer to EHLO and HELO."""
        return self.fqdn()

    def extensions(self):
        """The EHLO keywords (CHUNKING here makes BDAT a command)."""
        return ["SIZE %d" % self.max_size, "8BITMIME", "ENHANCEDSTATUSCODES"]

    def sender_refusal(self, path):
        """None to take MAIL FROM:<path>, else the (code, text) to refuse it with."""
        return None

    def recipient_refusal(self, path):
        """None to take RCPT TO:<path>, else the (code, text) to refuse it with."""
        return None

    def deliver(self, body, too_big, via, longest):
        """The end of a message (DATA or BDAT LAST): store it and say 250, or refuse it
        (`too_big`: say "too_big"). The transaction is reset afterwards."""
        raise NotImplementedError

    def other_command(self, verb, arg):
        """A command the engine does not know: None when the server does not either, else
        whether the session goes on."""
        return None

    def opened(self):
        """Called once, before the banner."""

    def command_received(self, verb, line):
        """Called for each command line (verb None: a line over max_command)."""

    def replied(self, code, lines):
        """Called for each reply, before it is sent."""

    def closing(self, reason):
        """Called once at the end, with why it ended."""
