"""Exchange's FrontEnd and Hub transport as the simulated host speaks them: ESMTP with
STARTTLS (the host's certificate), PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES and
CHUNKING; recipients outside the accepted domains get Exchange's 5.7.54 unless a trusted
publishing tier vouched for the sender (XCLIENT LOGIN); each message goes to the store as
<service>/<queue-id>.eml with its sidecar, and the client gets Exchange's 2.6.0 answer."""

import email.utils
import hashlib
import itertools
import re
import ssl
import time

from . import smtp
from . import tls as tlsmod
from .jsonlog import now_iso
from .serve import Eof


class ExchangeTransport(smtp.SmtpSession):
    """One client connection of an smtp service (its role: frontend, hub) of the host."""

    dialect = smtp.EXCHANGE
    mail_params = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
    rcpt_params = frozenset({"NOTIFY", "ORCPT"})
    ids = itertools.count(1)
    internal_ids = itertools.count(int(time.time()) % 100000 * 1000 + 1)   # [InternalId=N]

    def __init__(self, host, service, sock, peer):
        super().__init__(sock, peer, host.max_message_size, host.stopping)
        self.host = host
        self.service = service
        self.login = None           # the user a trusted publishing tier vouched for (XCLIENT LOGIN)

    def log(self, event, **fields):
        obj = {"event": event, "time": now_iso(), "host": self.host.name, "service": self.service.name,
               "role": self.service.role, "conn": self.id, "peer": self.peer[0], "peer_port": self.peer[1]}
        obj.update(fields)
        self.host.log.write(obj)

    # -- what Exchange says

    def fqdn(self):
        return self.host.fqdn

    def banner(self):
        return "%s Microsoft ESMTP MAIL Service ready at %s" % (self.host.fqdn, email.utils.formatdate(localtime=True))

    def greeting(self):
        return "%s Hello [%s]" % (self.host.fqdn, self.peer[0])

    def extensions(self):
        out = ["SIZE %d" % self.max_size, "PIPELINING", "ENHANCEDSTATUSCODES"]
        if self.tls is None and self.host.tls_context is not None:
            out.append("STARTTLS")
        out += ["8BITMIME", "CHUNKING"]
        if self.peer[0] in self.host.xclient_from:
            out.append("XCLIENT LOGIN")
        return out

    def recipient_refusal(self, path):
        if "@" not in path:
            return 501, "5.1.3 Invalid address"
        domain = path.rsplit("@", 1)[1].strip().rstrip(".").lower()
        if domain in self.host.accepted_domains or self.login is not None:
            return None
        self.refused.append(path)
        self.host.stats.smtp_event(self.service.name, "rcpt_refused")
        self.log("smtp-rcpt-refused", mail_from=self.mail_from, rcpt=path, ehlo=self.ehlo)
        return 550, "5.7.54 SMTP; Unable to relay recipient in non-accepted domain"

    def deliver(self, body, too_big, via, longest):
        if too_big:
            self.log("smtp-message-refused", mail_from=self.mail_from, rcpts=self.rcpts, reason="too big")
            self.say("too_big")
            return
        qid, internal = self.host.store.new_id(), next(self.internal_ids)
        meta = {"queue_id": qid, "internal_id": internal, "mail_from": self.mail_from, "rcpts": list(self.rcpts),
                "rcpts_refused": list(self.refused), "mail_params": self.mail_args, "peer": self.peer[0],
                "peer_port": self.peer[1], "ehlo": self.ehlo, "tls": self.tls, "size": len(body),
                "sha256": hashlib.sha256(body).hexdigest(), "service": self.service.name,
                "role": self.service.role, "host": self.host.name, "conn": self.id, "time": now_iso(),
                "authenticated_as": self.login, "via": via}
        try:
            self.host.store.put(qid, body, meta, folder=self.service.name)
        except OSError as e:
            self.log("smtp-store-failed", error=str(e))
            self.reply(451, "4.3.0 Temporary server error. Please try again later")
            return
        self.host.stats.smtp_event(self.service.name, "messages")
        self.host.stats.smtp_event(self.service.name, "bytes", len(body))
        self.log("message", **meta)
        self.reply(250, "2.6.0 <%s@%s> [InternalId=%d] Queued mail for delivery" % (qid, self.host.fqdn, internal))

    def other_command(self, verb, arg):
        if verb == "STARTTLS":
            return self.starttls(arg)
        if verb == "AUTH":
            self.reply(504, "5.7.4 Unrecognized authentication type")
            return True
        if verb == "XCLIENT":
            return self.xclient(arg)
        return None

    def opened(self):
        self.host.stats.smtp_event(self.service.name, "sessions")

    def closing(self, reason):
        self.log("smtp-close", reason=reason)

    # -- STARTTLS and XCLIENT

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
            self.sock, self.tls, _ = tlsmod.handshake(self.sock, self.host.tls_context)
            self.sock.settimeout(self.idle_timeout)
        except (OSError, ssl.SSLError) as e:
            raise Eof("TLS handshake failed: %s" % e) from None
        self.ehlo = None
        self.reset()
        self.log("smtp-starttls", tls=self.tls)
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
                login = None if v in ("[UNAVAILABLE]", "[TEMPUNAVAIL]") else \
                    re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), v)
        self.login = login
        self.ehlo = None
        self.reset()
        self.log("smtp-xclient", login=login)
        self.reply(220, "%s Microsoft ESMTP MAIL Service ready" % self.host.fqdn)
        return True
