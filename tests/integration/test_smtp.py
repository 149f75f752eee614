"""SMTP publishing through both tiers (issue 4, items 3 to 10): real processes on loopback.

    client 127.10.0.100 --smtp--> front-end 127.10.0.10 --smtp + PROXY v2 (from 127.20.0.10)-->
        back-end 127.20.0.20 --smtp (from 127.30.0.20)--> sink 127.30.0.50 (smtp_sink.py)

(the default lab's addresses: each module runs on them moved by its own shift, see harness.py)

Every test starts its own sink and both dmzproxy instances (`dmzproxy run`) on free ports
and stops them afterwards. It drives them with swaks, or with raw sockets where swaks
cannot send the bytes, and asserts on what the client got, on what the sink stored and
logged (what did and did not arrive) and on each tier's access log.

The sink stands in for Exchange's FrontEnd transport: it refuses recipients whose local
part starts with "reject" (550 5.1.1), senders starting with "tempfail" (451) and messages
with the line "X-Sink-Refuse: yes" (554 at end of DATA).

Environment: DMZPROXY, the dmzproxy binary (default: build/dmzproxy of this checkout);
SWAKS (default /usr/bin/swaks).
"""

import base64
import os
import secrets
import signal
import socket
import struct
import threading
import time
import unittest

import harness as h
import smtp_support as s

FE, BE = "front-end", "back-end"
FE_RULE, BE_RULE = "SMTP publishing", "SMTP to Exchange"
SINK = h.ORIGIN
RELAY_HOST = h.lab_address("127.10.0.101")        # listed in relay_from
UNTRUSTED = h.lab_address("127.20.0.99")          # on the Perimeter, not the front-end
PERIMETER_CLIENT = h.lab_address("127.20.0.98")   # on the Perimeter, allowed by a back-end rule of its own
MAX_MESSAGE = 1024 * 1024           # the front-end's limits.max_message_size ("1MiB")
NETWORKS = h.NETWORKS
SMTP_KEYS = {"protocol", "client", "original_client", "ehlo", "tls", "user", "mail_from", "rcpt_accepted",
             "rcpt_refused", "size", "upstream_reply", "queue_id", "rule", "duration_ms"}

PKI = None
PKI_LAB = None


def setUpModule():
    global PKI, PKI_LAB
    PKI_LAB = h.Lab(prefix="dmz-smtp-pki-")
    unittest.addModuleCleanup(PKI_LAB.close)   # also when setUpModule fails half-way
    pki = h.Pki(PKI_LAB.path("pki"))
    PKI = {"ca": pki.ca_cert, "mail": pki.leaf("mail", ["mail.contoso.com"])}


def message(subject, text=b"hello\r\n", extra_headers=b""):
    return (b"From: a@example.net\r\nTo: admin@contoso.com\r\nSubject: " + subject.encode() + b"\r\n" +
            extra_headers + b"\r\n" + text)


def proxy_v2(src, dst, src_port=40000, dst_port=25):
    """A PROXY protocol v2 header (PROXY command, TCP over IPv4)."""
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    addr = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", src_port, dst_port)
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addr)) + addr


class SmtpTiers(unittest.TestCase):
    """Starts the sink in setUp; each test calls up() (with its variations) to start the
    back-end and the front-end."""

    maxDiff = 4000
    SINK_LINE_ENDS = "strict"

    def setUp(self):
        self.lab = h.Lab(prefix="dmz-smtp-")
        self.addCleanup(self.lab.close)  # runs even when setUp fails half-way
        # Before lab.close: SIGTERM both tiers at once (each takes its shutdown grace).
        self.addCleanup(lambda: h.stop_together(self.lab.processes))
        self.ports = {"fe": h.free_port(h.FE_EXTERNAL), "be": h.free_port(h.BE_PERIMETER),
                      "sink": h.free_port(SINK)}
        self.sink = None
        self.fe = self.be = None

    def up(self, sink=True, fe_mode=None, fe_listener=None, be_listener=None, relay_fe=True, relay_be=True,
           fe_target=None, be_target=None, sink_pipelining=True, sink_chunking=False, sink_max_size=None):
        if sink:
            self.sink = s.start_sink(self.lab, "sink", SINK, self.ports["sink"], line_ends=self.SINK_LINE_ENDS,
                                     pipelining=sink_pipelining, chunking=sink_chunking, max_size=sink_max_size)
        else:   # a sink handle with nothing listening: its port stays free
            self.sink = s.Sink("sink", SINK, self.ports["sink"], self.lab.path("sink.store"),
                               self.lab.path("sink.jsonl"), None)

        def listener(address, port, extra):
            lst = {"name": "smtp", "protocol": "smtp", "bind": ["%s:%d" % (address, port)],
                   "public_name": h.PUBLIC_NAME,
                   "certificates": [{"names": [h.PUBLIC_NAME], "cert": PKI["mail"][0], "key": PKI["mail"][1]}]}
            lst.update(extra or {})
            return lst

        be_t = {"address": SINK, "port": self.ports["sink"], "source": h.BE_INTERNAL}
        be_t.update(be_target or {})
        be_rules = [{"name": BE_RULE, "kind": "server", "action": "allow", "listeners": ["smtp"], "from": ["External"],
                     "accepted_domains": ["contoso.com"], "relay_from": ["relay-hosts"] if relay_be else [],
                     "target": be_t},
                    {"name": "Perimeter test client", "kind": "server", "action": "allow", "listeners": ["smtp"],
                     "from": ["perimeter-client"], "accepted_domains": ["contoso.com"], "target": dict(be_t)}]
        be_text = h.instance_config(BE, "back-end", listener(h.BE_PERIMETER, self.ports["be"], be_listener), be_rules,
                                    networks=NETWORKS,
                                    address_sets={"fe": [h.FE_PERIMETER + "/32"], "relay-hosts": [RELAY_HOST + "/32"],
                                                  "perimeter-client": [PERIMETER_CLIENT + "/32"]},
                                    trust_forwarded_from=["fe"])
        fe_t = {"address": h.BE_PERIMETER, "port": self.ports["be"], "source": h.FE_PERIMETER, "proxy_protocol": True}
        if fe_mode:
            fe_t["mode"] = fe_mode
        fe_t.update(fe_target or {})
        fe_l = {"limits": {"max_message_size": "1MiB", "max_recipients": 100}}
        fe_l.update(fe_listener or {})
        fe_rules = [{"name": FE_RULE, "kind": "server", "action": "allow", "listeners": ["smtp"], "from": ["External"],
                     "accepted_domains": ["contoso.com"], "relay_from": ["relay-hosts"] if relay_fe else [],
                     "target": fe_t}]
        fe_text = h.instance_config(FE, "front-end", listener(h.FE_EXTERNAL, self.ports["fe"], fe_l), fe_rules,
                                    networks=NETWORKS, address_sets={"relay-hosts": [RELAY_HOST + "/32"]})
        self.be = self.lab.start_proxy(BE, be_text, h.BE_PERIMETER, self.ports["be"])
        self.fe = self.lab.start_proxy(FE, fe_text, h.FE_EXTERNAL, self.ports["fe"])

    # -- clients

    def client(self, source=h.CLIENT, host=None, port=None, banner=True, timeout=15.0):
        c = s.SmtpClient.open(host or h.FE_EXTERNAL, port or self.ports["fe"], source=source, timeout=timeout)
        self.addCleanup(c.close)
        if banner:
            b = c.banner()
            self.assertIsNotNone(b, "no banner\n" + self.diag())
            self.assertEqual(b.code, 220, "%r\n%s" % (b, self.diag()))
        return c

    def ready(self, source=h.CLIENT, name="client.example.net"):
        c = self.client(source)
        r = c.ehlo(name)
        self.assertEqual(r.code, 250, "%r\n%s" % (r, self.diag()))
        return c

    def swaks(self, *args, source=h.CLIENT, timeout=60):
        return s.swaks("-s", h.FE_EXTERNAL, "-p", str(self.ports["fe"]), "-li", source, *args, timeout=timeout)

    def transaction(self, c, rcpt="admin@contoso.com"):
        """MAIL and one RCPT, both accepted."""
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<%s>" % rcpt).code, 250)

    def tls_client(self, source=h.CLIENT):
        c = self.client(source)
        self.assertEqual(c.ehlo().code, 250)
        r = c.cmd("STARTTLS")
        self.assertEqual(r.code, 220, r)
        c.starttls(PKI["ca"])
        return c

    # -- what the processes saw

    def diag(self):
        parts = [self.lab.diagnostics()]
        if self.sink:
            parts.append(self.sink.tail(25))
        for p in (self.fe, self.be):
            if p:
                parts.append("--- %s access log ---\n%s" % (p.name, h.tail(p.access_log, 10)))
        return "\n".join(parts)

    def wait_access(self, proxy, count=1, timeout=5.0, pred=None):
        """The access-log lines (those matching `pred`) once there are at least `count`
        (the log is asynchronous and written when a transaction or session ends)."""
        def rows():
            return [r for r in proxy.access() if pred is None or pred(r)]
        h.wait_for(lambda: len(rows()) >= count, timeout)
        return rows()

    def settle(self, fe_lines=1):
        """After the client is done: wait (bounded) for the front-end's log lines, then for
        every sink connection to close, so that anything forwarded would have arrived."""
        self.wait_access(self.fe, fe_lines, timeout=10.0)
        if self.sink and self.sink.process:
            self.sink.wait_closed(timeout=10.0)

    def sink_rcpts(self):
        return [c["line"] for c in self.sink.commands("RCPT")]

    def assertNothingStored(self, msg=""):
        self.assertEqual(self.sink.count(), 0, "the sink must store nothing. " + msg + "\n" + self.diag())

    def assertSinkSawNoData(self, msg=""):
        self.assertEqual(self.sink.commands("DATA"), [], "the sink must see no DATA. " + msg + "\n" + self.diag())


# ---------------------------------------------------------------- session: banner, EHLO, STARTTLS, AUTH

class Session(SmtpTiers):
    def setUp(self):
        super().setUp()
        self.up()

    def test_banner_and_ehlo_before_tls(self):
        c = self.client(banner=False)
        b = c.banner()
        self.assertEqual(b.code, 220, b)
        self.assertTrue(b.text.startswith(h.PUBLIC_NAME + " ESMTP"), b)
        r = c.ehlo("client.example.net")
        self.assertEqual(r.code, 250, r)
        self.assertTrue(r.lines[0].startswith(h.PUBLIC_NAME), r)
        kw = r.keywords()
        for k in ("SIZE", "PIPELINING", "8BITMIME", "STARTTLS", "CHUNKING"):
            self.assertIn(k, kw, r)
        self.assertNotIn("AUTH", kw, "no AUTH before TLS: %r" % r)
        self.assertIn("SIZE %d" % MAX_MESSAGE, r.lines, "SIZE is the listener's max_message_size")
        r = c.cmd("HELO client.example.net")
        self.assertEqual((r.code, len(r.lines)), (250, 1), r)
        self.assertEqual(c.cmd("NOOP").code, 250)
        self.assertEqual(c.cmd("QUIT").code, 221)
        self.assertTrue(c.closed_by_peer())

    def test_auth_before_tls_is_538(self):
        c = self.ready()
        r = c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode())
        self.assertEqual(r.code, 538, r)
        r = c.cmd("AUTH LOGIN")
        self.assertEqual(r.code, 538, r)

    def test_xclient_from_an_untrusted_client_is_refused(self):
        c = self.ready()
        r = c.cmd("XCLIENT LOGIN=administrator")
        self.assertEqual((r.code, r.lines[0][:5]), (550, "5.7.0"), r)
        self.assertNotIn("XCLIENT", c.ehlo("client.example.net").keywords())
        # Still anonymous: relaying is refused as before.
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        r = c.cmd("RCPT TO:<victim@fabrikam.com>")
        self.assertEqual(r.code, 550, r)

    def test_starttls_without_a_user_store_offers_no_auth_and_auth_is_535(self):
        c = self.tls_client()
        self.assertEqual(c.sock.version() in ("TLSv1.2", "TLSv1.3"), True)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 503, "EHLO is required again after TLS")
        r = c.ehlo("client.example.net")
        self.assertEqual(r.code, 250, r)
        kw = r.keywords()
        self.assertNotIn("STARTTLS", kw, r)
        auth = [l for l in r.lines[1:] if l.upper().startswith("AUTH")]
        self.assertEqual(auth, [], "no user store, so nothing to authenticate against (the lab's tests cover AUTH)")
        r = c.cmd("AUTH PLAIN " + base64.b64encode(b"\0alice\0secret").decode())
        self.assertEqual(r.code, 535, r)
        self.assertEqual(c.cmd("STARTTLS").code, 503, "TLS already active")
        # The session still delivers after the refused AUTH.
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], message("over tls"))
        self.assertEqual(rs[-1].code, 250, rs)
        self.assertEqual(self.sink.count(), 1)
        [row] = self.wait_access(self.fe, 1, pred=lambda r: r.get("queue_id"))
        self.assertIs(row["tls"], True, row)

    def test_swaks_starttls_delivery(self):
        data = message("swaks over starttls")
        res = self.swaks("--tls", "--tls-verify", "--tls-ca-path", PKI["ca"], "--tls-sni", h.PUBLIC_NAME,
                         "-f", "a@example.net", "-t", "admin@contoso.com",
                         "--data", s.swaks_data_file(self.lab, "m.eml", data), "-ndf")
        self.assertEqual(res.returncode, 0, "%r\n%s" % (res, self.diag()))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, data)
        [row] = self.wait_access(self.fe, 1, pred=lambda r: r.get("queue_id"))
        self.assertIs(row["tls"], True, row)

    def test_unknown_and_unimplemented_commands(self):
        c = self.ready()
        self.assertEqual(c.cmd("FROB").code, 500)
        self.assertEqual(c.cmd("EXPN staff").code, 502)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 503, "nested MAIL")
        self.assertEqual(c.cmd("RSET").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<admin@contoso.com>").code, 503, "RSET ended the transaction")
        self.assertEqual(c.cmd("DATA").code, 503)


# ---------------------------------------------------------------- delivery, queue id, access log

class Delivery(SmtpTiers):
    def setUp(self):
        super().setUp()
        self.up()

    def test_swaks_delivery_through_both_tiers(self):
        data = message("through both tiers", b"line one\r\n.leading dot\r\n..two dots\r\nlast\r\n")
        res = self.swaks("--ehlo", "client.example.net", "-f", "a@example.net", "-t", "admin@contoso.com",
                         "--data", s.swaks_data_file(self.lab, "m.eml", data), "-ndf")
        self.assertEqual(res.returncode, 0, "%r\n%s" % (res, self.diag()))
        self.assertEqual(self.sink.count(), 1, self.diag())
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, data, "the sink stores the body as the client sent it")
        self.assertEqual(meta["peer"], h.BE_INTERNAL, "Exchange sees the last tier as the client")
        self.assertEqual(meta["mail_from"], "a@example.net")
        self.assertEqual(meta["rcpts"], ["admin@contoso.com"])
        self.assertIn("250 2.0.0 Ok: queued as " + qid, res.server_lines(), "the sink's reply reaches the client")
        # The sink saw one clean transaction, no PROXY header (Exchange speaks none).
        verbs = [c["verb"] for c in self.sink.commands()]
        self.assertEqual(verbs[0], "EHLO", verbs)
        self.assertEqual(verbs.count("DATA"), 1, verbs)

        be_rows = self.wait_access(self.be, 1, pred=lambda r: r.get("queue_id"))
        fe_rows = self.wait_access(self.fe, 1, pred=lambda r: r.get("queue_id"))
        self.assertEqual(len(be_rows), 1, be_rows)
        self.assertEqual(len(fe_rows), 1, fe_rows)
        be, fe = be_rows[0], fe_rows[0]
        for row in (be, fe):
            self.assertLessEqual(SMTP_KEYS, set(row), "missing: %s" % (SMTP_KEYS - set(row)))
            self.assertEqual(row["protocol"], "smtp")
            self.assertEqual(row["queue_id"], qid, row)
            self.assertTrue(row["upstream_reply"].startswith("250"), row)
            self.assertEqual(row["mail_from"], "a@example.net")
            self.assertEqual(row["rcpt_accepted"], ["admin@contoso.com"])
            self.assertEqual(row["rcpt_refused"], [])
            self.assertIs(row["tls"], False)
            self.assertEqual(row["user"], "")
            self.assertIsInstance(row["duration_ms"], (int, float))
            self.assertEqual(row["original_client"], h.CLIENT, row)
        self.assertEqual(be["client"], h.FE_PERIMETER)
        self.assertEqual(be["rule"], BE_RULE)
        self.assertEqual(fe["client"], h.CLIENT)
        self.assertEqual(fe["rule"], FE_RULE)
        self.assertEqual(fe["ehlo"], "client.example.net")
        self.assertEqual(be["ehlo"], h.PUBLIC_NAME, "the back-end's client is the front-end")
        self.assertEqual(meta["ehlo"], h.PUBLIC_NAME)
        # size: the message as received (dot-stuffed wire form or not, within a few bytes).
        for row in (be, fe):
            self.assertTrue(len(data) <= row["size"] <= len(s.dot_stuff(data)), row)

    def test_swaks_pipelining(self):
        data = message("swaks pipeline")
        res = self.swaks("--pipeline", "-f", "a@example.net", "-t", "one@contoso.com,reject2@contoso.com,two@contoso.com",
                         "--data", s.swaks_data_file(self.lab, "m.eml", data), "-ndf")
        self.assertIn("550 5.1.1 <reject2@contoso.com>: Recipient address rejected: User unknown", res.server_lines(), res)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual((stored, meta["rcpts"]), (data, ["one@contoso.com", "two@contoso.com"]))
        self.assertIn("250 2.0.0 Ok: queued as " + qid, res.server_lines(), res)

    def test_raw_pipelined_transaction_replies_in_order(self):
        c = self.client()
        c.send("EHLO client.example.net\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<one@contoso.com>\r\n"
               "RCPT TO:<two@fabrikam.com>\r\nRCPT TO:<three@contoso.com>\r\nDATA\r\n")
        rs = c.replies(6)
        self.assertEqual([r.code for r in rs], [250, 250, 250, 550, 250, 354], rs)
        body = message("pipelined")
        c.send(s.dot_stuff(body) + b".\r\nQUIT\r\n")
        end, bye = c.replies(2)
        self.assertEqual((end.code, bye.code), (250, 221), (end, bye))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, body)
        self.assertEqual(meta["rcpts"], ["one@contoso.com", "three@contoso.com"])
        self.assertEqual(s.queued_id(end), qid)

    def test_dot_stuffing_and_8bit_preserved(self):
        body = (b"Subject: dots\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n.\r\n..\r\n.x\r\n"
                b"caf\xc3\xa9 \xff\xfe\x80\r\n. \r\nend\r\n")
        c = self.ready()
        r = c.cmd("MAIL FROM:<a@example.net> BODY=8BITMIME SIZE=%d" % len(body))
        self.assertEqual(r.code, 250, r)
        self.assertEqual(c.cmd("RCPT TO:<admin@contoso.com>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(s.dot_stuff(body) + b".\r\n")
        r = c.reply()
        self.assertEqual(r.code, 250, "%r\n%s" % (r, self.diag()))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, body)

    def test_several_messages_on_one_connection_one_log_line_each(self):
        c = self.ready()
        ids = []
        for i in range(3):
            rs = c.send_mail("a@example.net", ["admin@contoso.com"], message("n%d" % i))
            self.assertEqual(rs[-1].code, 250, rs)
            ids.append(s.queued_id(rs[-1]))
        self.assertEqual(c.cmd("QUIT").code, 221)
        self.assertEqual(sorted(ids), self.sink.ids())
        for p in (self.fe, self.be):
            rows = self.wait_access(p, 3, pred=lambda r: r.get("queue_id"))
            self.assertEqual([r["queue_id"] for r in rows], ids, "%s: one line per message" % p.name)

    def test_empty_message_and_null_sender(self):
        c = self.ready()
        rs = c.send_mail("", ["admin@contoso.com"], b"")
        self.assertEqual(rs[-1].code, 250, rs)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual((stored, meta["mail_from"]), (b"", ""))


# ---------------------------------------------------------------- relay policy

RELAY_TRICKS = [
    "user%fabrikam.com@contoso.com",
    "fabrikam.com!user@contoso.com",
    "@contoso.com:user@fabrikam.com",
    "@fabrikam.com:user@contoso.com",
    "@contoso.com,@fabrikam.com:user@contoso.com",
    '"user@fabrikam.com"@contoso.com',
    '"user%fabrikam.com"@contoso.com',
    "user@fabrikam.com@contoso.com",
    "user%fabrikam.com%contoso.com@contoso.com",
]


class Relay(SmtpTiers):
    def test_anonymous_external_relay_refused(self):
        self.up()
        res = self.swaks("-f", "a@example.net", "-t", "user@fabrikam.com")
        self.assertNotEqual(res.returncode, 0, res)
        refusal = [l for l in res.server_lines() if l.startswith("550")]
        self.assertEqual(len(refusal), 1, res)
        self.assertTrue(refusal[0].startswith("550 5.7.1 "), refusal)
        self.assertIn("rule '%s'" % FE_RULE, refusal[0], "the refusal names the rule")
        self.assertIn("fabrikam.com", refusal[0])
        # Raw: the refused recipient never goes upstream; the accepted one does.
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        r = c.cmd("RCPT TO:<user@fabrikam.com>")
        self.assertEqual(r.code, 550, r)
        self.assertTrue(r.text.startswith("5.7.1 "), r)
        self.assertEqual(c.cmd("RCPT TO:<admin@contoso.com>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(message("one refused") + b".\r\n")
        self.assertEqual(c.reply().code, 250)
        self.assertEqual(c.cmd("QUIT").code, 221)
        self.settle(2)
        self.assertEqual(self.sink_rcpts(), ["RCPT TO:<admin@contoso.com>"], self.diag())
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(meta["rcpts"], ["admin@contoso.com"])
        row = self.wait_access(self.fe, 1, pred=lambda r: r.get("queue_id"))[0]
        self.assertEqual([x["rcpt"] for x in row["rcpt_refused"]], ["user@fabrikam.com"], row)
        self.assertTrue(row["rcpt_refused"][0]["reply"].startswith("550 5.7.1"), row)

    def test_relay_allowed_for_listed_address(self):
        self.up()
        data = message("relayed")
        res = self.swaks("-f", "a@example.net", "-t", "user@fabrikam.com", "--data",
                         s.swaks_data_file(self.lab, "m.eml", data), "-ndf", source=RELAY_HOST)
        self.assertEqual(res.returncode, 0, "%r\n%s" % (res, self.diag()))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual((stored, meta["rcpts"]), (data, ["user@fabrikam.com"]))
        be = self.wait_access(self.be, 1, pred=lambda r: r.get("queue_id"))[0]
        self.assertEqual(be["original_client"], RELAY_HOST)
        # The same from an address that is not listed: refused, nothing more stored.
        res = self.swaks("-f", "a@example.net", "-t", "user@fabrikam.com", source=h.CLIENT)
        self.assertNotEqual(res.returncode, 0, res)
        self.assertTrue(any(l.startswith("550 5.7.1") for l in res.server_lines()), res)
        self.settle(2)
        self.assertEqual(self.sink.count(), 1)
        self.assertEqual(self.sink_rcpts(), ["RCPT TO:<user@fabrikam.com>"])

    def test_relay_listed_only_at_front_end_is_refused_by_back_end(self):
        """The back-end judges the real client (PROXY v2): listing it on the front-end
        alone lets the RCPT through the front-end and the back-end refuses it."""
        self.up(relay_be=False)
        c = self.ready(source=RELAY_HOST)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        r = c.cmd("RCPT TO:<user@fabrikam.com>")
        self.assertEqual(r.code, 550, r)
        self.assertTrue(r.text.startswith("5.7.1"), r)
        self.assertIn("rule '%s'" % BE_RULE, r.text, "the back-end's refusal reaches the client: %r" % r)
        self.assertIn(RELAY_HOST, r.text, "the back-end judged the real client: %r" % r)
        c.cmd("QUIT")
        self.settle()
        self.assertEqual(self.sink_rcpts(), [])

    def check_tricks(self, source):
        c = self.ready(source=source)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        bad = []
        for addr in RELAY_TRICKS:
            r = c.cmd("RCPT TO:<%s>" % addr)
            if r is None or r.code != 550 or not r.text.startswith("5.7.1") or "rule '" not in r.text:
                bad.append((addr, r))
        self.assertEqual(c.cmd("QUIT").code, 221)
        self.settle()
        self.assertEqual(bad, [], "every relay trick is refused with 550 5.7.1 naming the rule\n" + self.diag())
        self.assertEqual(self.sink_rcpts(), [], "no trick reaches the sink")

    def test_relay_tricks_refused_for_anonymous_client(self):
        self.up()
        self.check_tricks(h.CLIENT)

    def test_relay_tricks_refused_even_for_listed_relay_client(self):
        self.up()
        self.check_tricks(RELAY_HOST)

    def test_relay_tricks_refused_by_back_end_in_tcp_mode(self):
        """With the front-end a byte pipe, the back-end alone applies the policy."""
        self.up(fe_mode="tcp")
        self.check_tricks(h.CLIENT)


# ---------------------------------------------------------------- SMTP smuggling

class Smuggling(SmtpTiers):
    """Every end-of-data look-alike in a message with a smuggled second transaction: the
    proxy refuses the message (554 5.6.0) and the sink stores nothing, never two."""

    def setUp(self):
        super().setUp()
        self.up()

    def check_variant(self, variant):
        c = self.ready()
        self.transaction(c)
        self.assertEqual(c.cmd("DATA").code, 354)
        for w in s.smuggling_writes(variant):
            c.send(w)
        r = c.reply()
        problems = []
        if r is None or r.code != 554 or not r.text.startswith("5.6.0"):
            problems.append("end of DATA answered %r, not 554 5.6.0" % (r,))
        # The session stays in step: the next command gets exactly one answer.
        q = c.cmd("QUIT") if r is not None else None
        if q is None or q.code != 221:
            problems.append("QUIT after the refusal answered %r, not 221 (a smuggled reply left over?)" % (q,))
        self.settle()
        if self.sink.count():
            problems.append("the sink stored %d message(s)" % self.sink.count())
        if self.sink.commands("DATA"):
            problems.append("the sink saw DATA")
        if any("ceo@contoso.com" in (x["line"] or "") for x in self.sink.commands()):
            problems.append("the smuggled MAIL reached the sink")
        if problems:
            self.fail("; ".join(problems) + "\nsent %r\n%s" % (s.smuggling_writes(variant), self.diag()))

    def test_control_same_message_with_crlf_is_one_message(self):
        c = self.ready()
        writes = s.smuggling_writes(b"\r\n")
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], b"".join(writes)[:-3])
        self.assertEqual(rs[-1].code, 250, rs)
        self.assertEqual(c.cmd("QUIT").code, 221)
        self.settle()
        self.assertEqual(self.sink.count(), 1, self.diag())
        [(qid, stored, meta)] = self.sink.messages()
        self.assertIn(b"\r\nMAIL FROM:<ceo@contoso.com>\r\n", stored, "the 'smuggled' block is just text")
        self.assertEqual(len(self.sink.commands("MAIL")), 1)


def _smuggling_test(variant):
    def test(self):
        self.check_variant(variant)
    return test


for _name, _variant in s.SMUGGLING_VARIANTS.items():
    setattr(Smuggling, "test_" + _name, _smuggling_test(_variant))


class SmugglingToLenientReceiver(Smuggling):
    """The same with a sink that takes a bare LF as a line end (a receiver open to
    smuggling, like an unpatched MTA): the proxy still lets nothing through."""

    SINK_LINE_ENDS = "lf"


class SmugglingInTcpMode(SmtpTiers):
    """A byte-pipe front-end forwards the bytes; the back-end in smtp mode refuses."""

    def test_lf_dot_lf_through_tcp_front_end(self):
        self.up(fe_mode="tcp")
        Smuggling.check_variant(self, s.SMUGGLING_VARIANTS["lf_dot_lf"])

    def test_crlf_dot_lf_split_through_tcp_front_end(self):
        self.up(fe_mode="tcp")
        Smuggling.check_variant(self, s.SMUGGLING_VARIANTS["crlf_dot_lf_split"])


# ---------------------------------------------------------------- STARTTLS injection

class StartTlsInjection(SmtpTiers):
    def setUp(self):
        super().setUp()
        self.up()

    def inject(self, plaintext):
        """STARTTLS and `plaintext` in one write, then the TLS handshake. Returns the client
        after the handshake, having checked no plaintext reply came after the 220."""
        c = self.client()
        self.assertEqual(c.ehlo().code, 250)
        c.send(b"STARTTLS\r\n" + plaintext)
        r = c.reply()
        self.assertEqual(r.code, 220, r)
        self.assertEqual(bytes(c.buf), b"", "a plaintext reply after 220 to STARTTLS")
        c.starttls(PKI["ca"])
        return c

    def test_injected_ehlo_is_not_answered_inside_tls(self):
        c = self.inject(b"EHLO evil.example.net\r\n")
        r = c.ehlo("good.example.net")
        self.assertEqual(r.code, 250, r)
        self.assertIn("good.example.net", r.lines[0], "the first reply inside TLS answers our EHLO: %r" % r)
        self.assertNotIn("evil", r.text)
        self.assertEqual(c.cmd("NOOP").code, 250)
        self.assertEqual(c.pending(0.3), b"", "no reply to the injected command arrives later")

    def test_injected_rset_then_mail_before_ehlo_is_503(self):
        c = self.inject(b"RSET\r\n")
        r = c.cmd("MAIL FROM:<a@example.net>")
        self.assertEqual(r.code, 503, "the first reply inside TLS is to our MAIL (no EHLO yet): %r" % r)
        self.assertEqual(c.ehlo().code, 250)
        self.assertEqual(c.pending(0.3), b"")

    def test_injected_transaction_is_discarded(self):
        c = self.inject(b"EHLO evil.example.net\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@contoso.com>\r\n")
        r = c.cmd("RCPT TO:<admin@contoso.com>")
        self.assertEqual(r.code, 503, "no EHLO, no MAIL inside TLS: %r" % r)
        self.assertEqual(c.ehlo().code, 250)
        self.assertEqual(c.cmd("RCPT TO:<admin@contoso.com>").code, 503, "the injected MAIL did not count")
        rs = c.send_mail("good@example.net", ["admin@contoso.com"], message("after injection"))
        self.assertEqual(rs[-1].code, 250, rs)
        c.cmd("QUIT")
        self.settle()
        self.assertEqual([m[2]["mail_from"] for m in self.sink.messages()], ["good@example.net"])
        self.assertFalse([x for x in self.sink.commands() if "evil" in (x["line"] or "")], self.diag())


# ---------------------------------------------------------------- RFC 5321 limits and size

class Limits(SmtpTiers):
    def setUp(self):
        super().setUp()
        self.up()

    def test_command_line_over_512_octets_is_500(self):
        c = self.ready()
        ok = "NOOP " + "x" * (512 - 2 - 5)               # 512 octets with its CRLF
        self.assertEqual(len(ok) + 2, 512)
        r = c.cmd(ok)
        self.assertEqual(r.code, 250, "a 512-octet line is allowed: %r" % r)
        r = c.cmd("NOOP " + "x" * 600)
        self.assertEqual(r.code, 500, r)
        r = c.cmd("MAIL FROM:<a@example.net> " + "X" * 600)
        self.assertEqual(r.code, 500, r)
        self.assertEqual(c.cmd("NOOP").code, 250, "the session goes on after a long line")
        self.assertEqual(self.sink.commands("MAIL"), [])

    def data_with(self, body):
        c = self.ready()
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], body)
        self.assertEqual(c.cmd("QUIT").code, 221, "the session stays in step after the refusal")
        self.settle()
        return rs[-1]

    def test_text_line_over_1000_octets_refused_at_end_of_data(self):
        r = self.data_with(message("long line", b"x" * 999 + b"\r\n"))    # 1001 octets with CRLF
        self.assertEqual(r.code, 554, r)
        self.assertNothingStored()
        self.assertSinkSawNoData()

    def test_text_line_of_1000_octets_accepted(self):
        body = message("line of 1000", b"x" * 998 + b"\r\n")
        r = self.data_with(body)
        self.assertEqual(r.code, 250, r)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, body)

    def test_local_part_over_64_octets_is_553(self):
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        r = c.cmd("RCPT TO:<%s@contoso.com>" % ("a" * 65))
        self.assertEqual(r.code, 553, r)
        r = c.cmd("RCPT TO:<%s@contoso.com>" % ("b" * 64))
        self.assertEqual(r.code, 250, "64 octets are allowed: %r" % r)
        c.cmd("RSET")
        r = c.cmd("MAIL FROM:<%s@example.net>" % ("c" * 65))
        self.assertEqual(r.code, 553, r)
        c.cmd("QUIT")
        self.settle()
        self.assertEqual(self.sink_rcpts(), ["RCPT TO:<%s@contoso.com>" % ("b" * 64)])

    def test_domain_over_255_octets_is_553(self):
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        domain = ".".join(["d" * 61] * 4) + ".contoso.com"                   # 259 octets
        self.assertGreater(len(domain), 255)
        r = c.cmd("RCPT TO:<u@%s>" % domain)
        self.assertEqual(r.code, 553, r)

    def test_size_parameter_above_limit_is_552(self):
        c = self.ready()
        r = c.cmd("MAIL FROM:<a@example.net> SIZE=%d" % (MAX_MESSAGE + 1))
        self.assertEqual(r.code, 552, r)
        r = c.cmd("MAIL FROM:<a@example.net> SIZE=%d" % MAX_MESSAGE)
        self.assertEqual(r.code, 250, r)
        self.assertEqual(c.cmd("RCPT TO:<admin@contoso.com>").code, 250)
        c.cmd("QUIT")
        self.settle()
        self.assertEqual([x["line"] for x in self.sink.commands("MAIL")], ["MAIL FROM:<a@example.net> SIZE=%d" % MAX_MESSAGE],
                         "the refused MAIL did not go upstream; the accepted one did, with its SIZE")

    def test_message_over_max_message_size_is_552_and_not_stored(self):
        line = b"y" * 78 + b"\r\n"
        body = message("big", line * (MAX_MESSAGE // len(line) + 10))
        self.assertGreater(len(body), MAX_MESSAGE)
        r = self.data_with(body)
        self.assertEqual(r.code, 552, r)
        self.assertNothingStored()
        self.assertSinkSawNoData()

    def test_message_just_under_max_message_size_is_stored(self):
        line = b"z" * 78 + b"\r\n"
        head = message("just under", b"")
        body = head + line * ((MAX_MESSAGE - len(head) - 1000) // len(line))
        r = self.data_with(body)
        self.assertEqual(r.code, 250, r)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(s.sha256(stored), s.sha256(body))

    def test_100_recipients_accepted_and_the_101st_is_452(self):
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        codes = [c.cmd("RCPT TO:<user%03d@contoso.com>" % i).code for i in range(100)]
        self.assertEqual(codes, [250] * 100)
        r = c.cmd("RCPT TO:<user100@contoso.com>")
        self.assertEqual(r.code, 452, r)
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(message("hundred") + b".\r\n")
        self.assertEqual(c.reply().code, 250)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(len(meta["rcpts"]), 100)
        self.assertNotIn("user100@contoso.com", meta["rcpts"])


# ---------------------------------------------------------------- no mail lost

class NoMailLost(SmtpTiers):
    def test_recipient_refused_by_sink_reaches_client(self):
        self.up()
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<ok@contoso.com>").code, 250)
        r = c.cmd("RCPT TO:<reject1@contoso.com>")
        self.assertEqual((r.code, r.text), (550, "5.1.1 <reject1@contoso.com>: Recipient address rejected: User unknown"),
                         "the sink's refusal, relayed as is")
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(message("partly refused") + b".\r\n")
        self.assertEqual(c.reply().code, 250)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(meta["rcpts"], ["ok@contoso.com"])
        for p in (self.fe, self.be):
            row = self.wait_access(p, 1, pred=lambda r: r.get("queue_id"))[0]
            self.assertEqual(row["rcpt_accepted"], ["ok@contoso.com"], row)
            self.assertEqual([x["rcpt"] for x in row["rcpt_refused"]], ["reject1@contoso.com"], row)
            self.assertTrue(row["rcpt_refused"][0]["reply"].startswith("550 5.1.1"), row)

    def test_message_refused_by_sink_gives_client_554(self):
        self.up()
        c = self.ready()
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], message("refuse me", extra_headers=b"X-Sink-Refuse: yes\r\n"))
        self.assertEqual((rs[-1].code, rs[-1].text), (554, "5.7.1 refused by sink"), rs)
        self.assertNothingStored()
        for p in (self.fe, self.be):
            rows = self.wait_access(p, 1, pred=lambda r: r.get("upstream_reply"))
            self.assertTrue(rows and rows[0]["upstream_reply"].startswith("554"), rows)
            self.assertEqual(rows[0]["queue_id"], "", rows)
        # The next message on the same session is delivered.
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], message("fine"))
        self.assertEqual(rs[-1].code, 250, rs)
        self.assertEqual(self.sink.count(), 1)

    def test_sender_tempfailed_by_sink_gives_client_451(self):
        self.up()
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<tempfail@example.net>").code, 250, "MAIL is answered by the front-end")
        r = c.cmd("RCPT TO:<admin@contoso.com>")
        self.assertEqual((r.code, r.text), (451, "4.3.0 try again"), "the sink's answer to MAIL, at the first RCPT")

    def test_sink_down_gives_421_naming_back_end(self):
        self.up(sink=False)
        c = self.client(banner=False)
        b = c.banner()
        self.assertIsNotNone(b, self.diag())
        self.assertEqual(b.code, 421, b)
        self.assertTrue(b.text.startswith("4.4.1"), b)
        self.assertIn(BE, b.text, "names the tier that could not reach its upstream: %r" % b)
        self.assertTrue(c.closed_by_peer(), "closed after 421")
        res = self.swaks("-f", "a@example.net", "-t", "admin@contoso.com")
        self.assertNotEqual(res.returncode, 0, res)
        self.assertFalse([l for l in res.server_lines() if l.startswith("250")], res)
        self.assertTrue(res.server_lines() and res.server_lines()[0].startswith("421 4.4.1"), res)

    def test_back_end_down_gives_421_naming_front_end(self):
        dead = h.free_port(h.BE_PERIMETER)
        self.up(fe_target={"port": dead})
        c = self.client(banner=False)
        b = c.banner()
        self.assertEqual(b.code, 421, b)
        self.assertTrue(b.text.startswith("4.4.1"), b)
        self.assertIn(FE, b.text, b)

    def test_sink_gone_mid_session_is_421_and_close(self):
        self.up()
        c = self.ready()
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], message("before"))
        self.assertEqual(rs[-1].code, 250)
        self.sink.process.stop()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250, "MAIL is answered by the front-end")
        r = c.cmd("RCPT TO:<admin@contoso.com>")
        self.assertIsNotNone(r, "closed without a reply\n" + self.diag())
        self.assertEqual(r.code, 421, r)
        self.assertTrue(r.text.startswith("4."), r)
        self.assertIn(BE, r.text, "names the tier that lost its upstream: %r" % r)
        if not c.closed_by_peer(3.0):
            later = [c.cmd("NOOP"), c.cmd("MAIL FROM:<a@example.net>")]
            self.fail("a 421 closes the transmission channel (RFC 5321 3.8, 4.2.2): after relaying the back-end's "
                      "%r the front-end kept the client's session open; NOOP and MAIL then got %r\n%s"
                      % (r.text, later, self.diag()))
        self.assertEqual(self.sink.count(), 1)

    def test_swaks_after_sink_stopped_never_250(self):
        self.up()
        self.sink.process.stop()
        res = self.swaks("-f", "a@example.net", "-t", "admin@contoso.com")
        self.assertNotEqual(res.returncode, 0, res)
        self.assertFalse([l for l in res.server_lines() if l.startswith("250")], res)
        self.assertTrue(res.server_lines()[0].startswith("421 4.4.1"), res)


# ---------------------------------------------------------------- MAIL goes upstream with the first RCPT

class DeferredMail(SmtpTiers):
    """Each tier answers MAIL itself and sends it upstream with the first RCPT it lets
    through, pipelined when the upstream offers PIPELINING (else one after the other)."""

    def check_refused_sender(self, pipelining):
        self.up(sink_pipelining=pipelining)
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<tempfail@example.net>").code, 250)
        for rcpt in ("admin@contoso.com", "other@contoso.com"):
            r = c.cmd("RCPT TO:<%s>" % rcpt)
            self.assertEqual((r.code, r.text), (451, "4.3.0 try again"), "each RCPT tries MAIL again\n" + self.diag())
        self.assertEqual(c.cmd("DATA").code, 554, "no recipient was accepted")
        self.assertEqual(c.cmd("RSET").code, 250)
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], message("after a refused sender"))
        self.assertEqual([r.code for r in rs], [250, 250, 354, 250], rs)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual((meta["mail_from"], meta["rcpts"]), ("a@example.net", ["admin@contoso.com"]))
        mails = [x["line"] for x in self.sink.commands("MAIL")]
        self.assertEqual(mails, ["MAIL FROM:<tempfail@example.net>"] * 2 + ["MAIL FROM:<a@example.net>"], self.diag())
        # Pipelined, the sink also heard (and refused with 503) the RCPT behind each refused
        # MAIL; one after the other, a refused MAIL stops there.
        self.assertEqual(len(self.sink.commands("RCPT")), 3 if pipelining else 1, self.diag())
        # The back-end's upstream refused the sender: its log line says so. The front-end's
        # upstream (the back-end) took MAIL and refused the recipients.
        be = self.wait_access(self.be, 1, pred=lambda r: r.get("mail_from") == "tempfail@example.net")[0]
        self.assertEqual([(x["rcpt"], x["reply"]) for x in be["rcpt_refused"]],
                         [("admin@contoso.com", "451 4.3.0 try again"), ("other@contoso.com", "451 4.3.0 try again")], be)
        self.assertIn("the upstream refused MAIL FROM: 451 4.3.0 try again", be.get("detail", ""), be)
        fe = self.wait_access(self.fe, 1, pred=lambda r: r.get("mail_from") == "tempfail@example.net")[0]
        self.assertEqual([x["reply"][:3] for x in fe["rcpt_refused"]], ["451", "451"], fe)

    def test_refused_sender_pipelined_upstream(self):
        self.check_refused_sender(True)

    def test_refused_sender_upstream_without_pipelining(self):
        self.check_refused_sender(False)

    def test_delivery_upstream_without_pipelining(self):
        self.up(sink_pipelining=False)
        c = self.ready()
        rs = c.send_mail("a@example.net", ["admin@contoso.com", "reject2@contoso.com", "b@contoso.com"], message("one by one"))
        self.assertEqual([r.code for r in rs], [250, 250, 550, 250, 354, 250], rs)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(meta["rcpts"], ["admin@contoso.com", "b@contoso.com"])

    def test_transaction_refused_here_never_reaches_upstream(self):
        self.up()
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<user@fabrikam.com>").code, 550, "relaying is refused at the front-end")
        self.assertEqual(c.cmd("RSET").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<b@example.net>").code, 250)
        self.assertEqual(c.cmd("RSET").code, 250)
        self.assertEqual(c.cmd("QUIT").code, 221)
        self.settle(2)
        self.assertEqual([x["verb"] for x in self.sink.commands() if x["verb"] in ("MAIL", "RCPT", "RSET", "DATA")], [],
                         "the sink heard nothing of either transaction\n" + self.diag())

    def test_size_refused_by_the_sink_is_a_permanent_refusal_at_rcpt(self):
        self.up(sink_max_size=1000)
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net> SIZE=5000").code, 250, "within the front-end's limit")
        r = c.cmd("RCPT TO:<admin@contoso.com>")
        # The sink's 552 to MAIL would read as "try later" at RCPT (RFC 5321 4.5.3.1.10).
        self.assertEqual((r.code, r.text), (550, "5.3.4 Message size exceeds fixed limit"), "%r\n%s" % (r, self.diag()))

    def test_starttls_inside_a_transaction_is_503(self):
        self.up()
        c = self.ready()
        self.transaction(c)
        r = c.cmd("STARTTLS")
        self.assertEqual(r.code, 503, r)
        self.assertEqual(c.cmd("RSET").code, 250)
        self.assertEqual(c.cmd("STARTTLS").code, 220, "after RSET it is fine")

    def test_ehlo_mid_transaction_resets_it_upstream_too(self):
        self.up()
        c = self.ready()
        self.transaction(c, "first@contoso.com")
        self.assertEqual(c.ehlo().code, 250)
        rs = c.send_mail("b@example.net", ["second@contoso.com"], message("after EHLO"))
        self.assertEqual([r.code for r in rs], [250, 250, 354, 250], "%r\n%s" % (rs, self.diag()))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual((meta["mail_from"], meta["rcpts"]), ("b@example.net", ["second@contoso.com"]))
        self.assertIn("RSET", [x["verb"] for x in self.sink.commands()], self.diag())


# ---------------------------------------------------------------- BDAT and CHUNKING (RFC 3030)

# A message whose lines need dot-stuffing by DATA: "." alone, "..x" and ".x".
RAW = b"Subject: chunks\r\n\r\n.\r\n..x\r\n.x\r\nlast line\r\n"


def bdat(chunk, last=False):
    return b"BDAT %d%s\r\n" % (len(chunk), b" LAST" if last else b"") + chunk


class Chunking(SmtpTiers):
    """Each tier takes BDAT and offers CHUNKING; between tiers the message goes by BDAT (no
    354 round trip), and to an upstream without CHUNKING by DATA, dot-stuffed."""

    def test_bdat_chunks_reach_a_data_only_sink_intact(self):
        self.up()
        c = self.ready()
        self.transaction(c)
        c.send(bdat(RAW[:21]))   # the split falls between the CR and the LF of the "." line
        r = c.reply()
        self.assertEqual((r.code, r.text), (250, "2.0.0 21 octets received"), r)
        c.send(bdat(RAW[21:], last=True))
        r = c.reply()
        self.assertEqual(r.code, 250, "%r\n%s" % (r, self.diag()))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, RAW, "the sink un-dot-stuffed what the back-end dot-stuffed")
        self.assertIn(qid, r.text)
        self.assertEqual([x["verb"] for x in self.sink.commands() if x["verb"] in ("DATA", "BDAT")], ["DATA"])
        for p in (self.fe, self.be):
            row = self.wait_access(p, 1, pred=lambda x: x.get("queue_id"))[0]
            self.assertEqual(row["size"], len(RAW), row)

    def test_data_client_reaches_a_chunking_sink_by_bdat(self):
        self.up(sink_chunking=True)
        c = self.ready()
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], RAW)   # send_mail dot-stuffs
        self.assertEqual([r.code for r in rs], [250, 250, 354, 250], "%r\n%s" % (rs, self.diag()))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, RAW)
        self.assertEqual([x["line"] for x in self.sink.commands() if x["verb"] in ("DATA", "BDAT")],
                         ["BDAT %d LAST" % len(RAW)], "one BDAT carries the whole message, unstuffed")

    def test_pipelined_bdat_to_a_chunking_sink(self):
        self.up(sink_chunking=True)
        c = self.ready()
        c.send(b"MAIL FROM:<a@example.net>\r\nRCPT TO:<admin@contoso.com>\r\nRCPT TO:<reject9@contoso.com>\r\n" +
               bdat(RAW[:7]) + bdat(RAW[7:30]) + bdat(RAW[30:], last=True) + b"QUIT\r\n")
        rs = c.replies(7)
        self.assertEqual([r.code for r in rs], [250, 250, 550, 250, 250, 250, 221], "%r\n%s" % (rs, self.diag()))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual((stored, meta["rcpts"]), (RAW, ["admin@contoso.com"]))

    def test_chunk_bytes_of_a_refused_bdat_are_never_commands(self):
        self.up()
        c = self.ready()
        inner = b"RSET\r\nMAIL FROM:<evil@example.net>\r\nRCPT TO:<victim@contoso.com>\r\n"
        c.send(bdat(inner, last=True))
        r = c.reply()
        self.assertEqual((r.code, r.text), (503, "5.5.1 Need MAIL before BDAT"), r)
        self.assertEqual(c.pending(), b"", "the chunk's octets were dropped, not answered as commands")
        self.assertEqual(c.cmd("NOOP").code, 250, "the session is still in step")
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<reject1@contoso.com>").code, 550)
        c.send(bdat(inner, last=True))
        r = c.reply()
        self.assertEqual((r.code, r.text), (554, "5.5.1 No valid recipients"), r)
        self.assertEqual(c.cmd("QUIT").code, 221)
        self.settle(2)
        self.assertEqual([x["line"] for x in self.sink.commands() if "evil" in x["line"] or "victim" in x["line"]], [],
                         "nothing of the chunk reached the sink\n" + self.diag())
        self.assertSinkSawNoData()

    def test_bare_lf_in_bdat_is_refused_and_never_forwarded(self):
        self.up(sink_chunking=True)
        c = self.ready()
        self.transaction(c)
        c.send(bdat(b"Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@x>\r\n", last=True))
        r = c.reply()
        self.assertEqual(r.code, 554, r)
        self.assertTrue(r.text.startswith("5.6.0") and "bare LF" in r.text, r)
        # The session goes on: a clean message right after is delivered.
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], b"Subject: fine\r\n\r\nok\r\n")
        self.assertEqual(rs[-1].code, 250, rs)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, b"Subject: fine\r\n\r\nok\r\n")
        self.assertEqual(len(self.sink.commands("BDAT")), 1, "only the clean message went upstream\n" + self.diag())
        row = self.wait_access(self.fe, 1, pred=lambda x: "bare LF" in x.get("detail", ""))[0]
        self.assertEqual(row["fault"], "bad-request", row)

    def test_bdat_over_max_message_size_is_552_and_the_transaction_needs_rset(self):
        self.up()
        c = self.ready()
        self.transaction(c)
        line = b"y" * 998 + b"\r\n"
        chunk = line * (MAX_MESSAGE // len(line) // 2 + 1)   # two of them are over the limit
        c.send(bdat(chunk))
        self.assertEqual(c.reply().code, 250)
        c.send(bdat(chunk))
        r = c.reply()
        self.assertEqual(r.code, 552, r)
        c.send(bdat(b"more\r\n", last=True))
        r = c.reply()
        self.assertEqual(r.code, 503, "a chunk after a refused one is refused too: %r" % r)
        self.assertEqual(c.cmd("RSET").code, 250)
        rs = c.send_mail("a@example.net", ["admin@contoso.com"], b"Subject: small\r\n\r\nok\r\n")
        self.assertEqual(rs[-1].code, 250, rs)
        self.assertEqual(self.sink.count(), 1)

    def test_only_bdat_rset_or_quit_while_chunks_are_held(self):
        self.up()
        c = self.ready()
        self.transaction(c)
        c.send(bdat(b"Subject: x\r\n"))
        self.assertEqual(c.reply().code, 250)
        for cmd in ("NOOP", "MAIL FROM:<b@example.net>", "EHLO again.example"):
            r = c.cmd(cmd)
            self.assertEqual(r.code, 503, "%s: %r" % (cmd, r))
        c.send(bdat(b"\r\nbody\r\n", last=True))
        r = c.reply()
        self.assertEqual(r.code, 250, r)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(c.cmd("NOOP").code, 250, "the message is done")

    def test_chunk_over_max_message_size_closes_at_once(self):
        self.up()
        c = self.ready()
        self.transaction(c)
        r = c.cmd("BDAT %d" % (10 ** 15))
        self.assertEqual(r.code, 552, r)
        self.assertTrue(c.closed_by_peer(), "nobody reads a petabyte to stay in step")

    def test_bdat_lines_that_do_not_parse_close_the_session(self):
        self.up()
        for line in (b"BDAT\t5", b"BDAT " + b"9" * 600 + b" LAST"):
            c = self.ready()
            self.transaction(c)
            c.send(line + b"\r\nRSET\r\n")
            r = c.reply()
            self.assertIn(r.code, (500, 501), r)
            self.assertIn("closing", r.text, r)
            self.assertTrue(c.closed_by_peer(), "the octets after a BDAT line are not commands: %r" % line[:20])

    def test_data_after_bdat_and_malformed_bdat(self):
        self.up()
        c = self.ready()
        self.transaction(c)
        c.send(bdat(b"Subject: x\r\n"))
        self.assertEqual(c.reply().code, 250)
        r = c.cmd("DATA")
        self.assertEqual(r.code, 503, r)
        self.assertIn("BDAT", r.text, r)
        r = c.cmd("BDAT twelve LAST")
        self.assertEqual(r.code, 501, r)
        self.assertTrue(c.closed_by_peer(), "how many octets follow is unknown: the session ends")
        self.settle(1)
        self.assertSinkSawNoData()
        self.assertEqual(self.sink.commands("BDAT"), [])


# ---------------------------------------------------------------- PROXY v2 between tiers

class ProxyProtocol(SmtpTiers):
    def setUp(self):
        super().setUp()
        self.up()

    def test_untrusted_direct_client_judged_by_its_own_address(self):
        c = self.client(source=UNTRUSTED, host=h.BE_PERIMETER, port=self.ports["be"], banner=False)
        b = c.banner()
        self.assertEqual(b.code, 554, b)
        self.assertTrue(b.text.startswith("5.7.1"), b)
        self.assertIn(UNTRUSTED, b.text, b)
        self.assertTrue(c.closed_by_peer())
        [row] = self.wait_access(self.be, 1)
        self.assertEqual((row["client"], row["original_client"], row["action"]), (UNTRUSTED, UNTRUSTED, "deny"), row)
        self.assertEqual(self.sink.entries("connect"), [], "the back-end did not connect to the sink for it")

    def test_forged_v2_header_from_untrusted_is_garbage(self):
        c = self.client(source=PERIMETER_CLIENT, host=h.BE_PERIMETER, port=self.ports["be"], banner=False)
        c.send(proxy_v2(RELAY_HOST, h.BE_PERIMETER))
        b = c.banner()
        self.assertEqual(b.code, 220, "judged by its own address, allowed by its own rule: %r" % b)
        r = c.reply()
        self.assertIsNotNone(r, "the header bytes get an answer")
        self.assertEqual(r.code, 500, r)
        replies = [r]
        while not c.eof:
            try:
                x = c.reply(timeout=2.0)
            except TimeoutError:
                break
            if x is None:
                break
            replies.append(x)
        self.assertTrue(all(x.code == 500 for x in replies), replies)
        if not c.eof:
            r = c.ehlo()
            self.assertIn("[%s]" % PERIMETER_CLIENT, r.lines[0], r)
        # A session without a transaction may leave no access-log line; any line it left
        # names the peer itself as the client.
        rows = self.wait_access(self.be, 1, timeout=1.0)
        self.assertTrue(all(x["original_client"] == PERIMETER_CLIENT for x in rows), rows)
        self.settle(0)
        self.assertEqual(self.sink_rcpts(), [])

    def test_forged_v1_header_from_untrusted_is_not_believed(self):
        c = self.client(source=PERIMETER_CLIENT, host=h.BE_PERIMETER, port=self.ports["be"])
        r = c.cmd("PROXY TCP4 %s %s 40000 25" % (RELAY_HOST, h.BE_PERIMETER))
        self.assertEqual(r.code, 500, r)
        r = c.ehlo()
        self.assertIn("[%s]" % PERIMETER_CLIENT, r.lines[0], r)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        r = c.cmd("RCPT TO:<user@fabrikam.com>")
        self.assertEqual(r.code, 550, "the forged relay host was not believed: %r" % r)
        c.cmd("QUIT")
        self.settle(0)
        self.assertEqual(self.sink_rcpts(), [])

    def test_trusted_tier_without_header_is_refused(self):
        c = self.client(source=h.FE_PERIMETER, host=h.BE_PERIMETER, port=self.ports["be"], banner=False)
        c.send("EHLO sneaky.example.net\r\n")
        r = c.reply()
        self.assertIsNotNone(r)
        self.assertEqual(r.code, 421, r)
        self.assertIn("PROXY", r.text, r)
        self.assertTrue(c.closed_by_peer())
        self.assertEqual(self.sink.entries("connect"), [])

    def test_trusted_tier_header_is_believed(self):
        c = self.client(source=h.FE_PERIMETER, host=h.BE_PERIMETER, port=self.ports["be"], banner=False)
        c.send(proxy_v2(RELAY_HOST, h.BE_PERIMETER))
        self.assertEqual(c.banner().code, 220)
        r = c.ehlo()
        self.assertIn("[%s]" % RELAY_HOST, r.lines[0], r)
        rs = c.send_mail("a@example.net", ["user@fabrikam.com"], message("relay via header"))
        self.assertEqual(rs[-1].code, 250, "the back-end relays for the client in the header: %r" % rs)
        row = self.wait_access(self.be, 1, pred=lambda r: r.get("queue_id"))[0]
        self.assertEqual((row["client"], row["original_client"]), (h.FE_PERIMETER, RELAY_HOST), row)


# ---------------------------------------------------------------- tcp mode

class TcpMode(SmtpTiers):
    def setUp(self):
        super().setUp()
        self.up(fe_mode="tcp")

    def test_swaks_delivery_through_tcp_front_end(self):
        data = message("tcp mode")
        res = self.swaks("-f", "a@example.net", "-t", "admin@contoso.com",
                         "--data", s.swaks_data_file(self.lab, "m.eml", data), "-ndf")
        self.assertEqual(res.returncode, 0, "%r\n%s" % (res, self.diag()))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, data)
        self.assertEqual(meta["peer"], h.BE_INTERNAL)
        be = self.wait_access(self.be, 1, pred=lambda r: r.get("queue_id"))[0]
        self.assertEqual((be["client"], be["original_client"], be["queue_id"]), (h.FE_PERIMETER, h.CLIENT, qid), be)
        fe = self.wait_access(self.fe, 1)
        self.assertEqual(fe[0]["original_client"], h.CLIENT, fe)

    def test_back_end_judges_real_client_through_tcp_front_end(self):
        c = self.ready()
        self.assertIn("[%s]" % h.CLIENT, c.ehlo().lines[0], "the back-end greets the real client")
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        r = c.cmd("RCPT TO:<user@fabrikam.com>")
        self.assertEqual(r.code, 550, r)
        self.assertIn("rule '%s'" % BE_RULE, r.text, r)
        c.cmd("QUIT")
        res = self.swaks("-f", "a@example.net", "-t", "user@fabrikam.com", source=RELAY_HOST)
        self.assertEqual(res.returncode, 0, "%r\n%s" % (res, self.diag()))
        self.assertEqual([m[2]["rcpts"] for m in self.sink.messages()], [["user@fabrikam.com"]])


# ---------------------------------------------------------------- timeouts and shutdown

class Timeouts(SmtpTiers):
    def test_idle_client_gets_421_and_is_closed(self):
        self.up(fe_listener={"timeouts": {"command": "2s"}})
        c = self.ready()
        t0 = time.monotonic()
        r = c.reply(timeout=15.0)
        elapsed = time.monotonic() - t0
        self.assertIsNotNone(r, "closed without a 421\n" + self.diag())
        self.assertEqual(r.code, 421, r)
        self.assertTrue(r.text.startswith("4.4.2"), r)
        self.assertTrue(c.closed_by_peer(), "the connection is closed after the 421")
        self.assertGreater(elapsed, 1.5)
        self.assertLess(elapsed, 10.0)

    def test_idle_in_transaction_nothing_stored(self):
        self.up(fe_listener={"timeouts": {"command": "2s"}})
        c = self.ready()
        self.transaction(c)
        self.assertEqual(c.cmd("DATA").code, 354)
        c.send(b"Subject: half\r\n\r\nhalf a message\r\n")
        r = c.reply(timeout=15.0)
        self.assertTrue(r is None or r.code == 421, r)
        self.assertTrue(c.closed_by_peer())
        self.settle()
        self.assertNothingStored()
        self.assertSinkSawNoData()


class Shutdown(SmtpTiers):
    def test_sigterm_answers_421_at_next_command(self):
        self.up()
        c = self.ready()
        os.kill(self.fe.process.proc.pid, signal.SIGTERM)
        codes = []
        for _ in range(40):                               # until the signal has been handled
            r = c.cmd("NOOP")
            if r is None:
                break
            codes.append(r.code)
            if r.code != 250:
                break
            time.sleep(0.05)
        self.assertTrue(codes and codes[-1] == 421, "NOOP answers after SIGTERM: %r\n%s" % (codes, self.diag()))
        self.assertTrue(set(codes[:-1]) <= {250}, codes)
        self.assertTrue(c.closed_by_peer())
        # Its last connection gone, the draining front-end ends by itself (another SIGTERM
        # now could land after its handlers are gone, while it exits).
        self.assertEqual(self.fe.process.proc.wait(timeout=30), 0, self.diag())


# ---------------------------------------------------------------- volume

class Volume(SmtpTiers):
    CONNECTIONS = 10
    PER_CONNECTION = 100
    DEADLINE = 120.0

    def test_1000_messages_sent_1000_stored_identical(self):
        self.up()
        deadline = time.monotonic() + self.DEADLINE
        sent = {}            # sha256 -> body
        replies = {}         # sha256 -> queue id from the client's 250
        errors = []
        lock = threading.Lock()

        def worker(n):
            try:
                c = s.SmtpClient.open(h.FE_EXTERNAL, self.ports["fe"], timeout=30.0)
                try:
                    if c.banner().code != 220 or c.ehlo("load%d.example.net" % n).code != 250:
                        raise AssertionError("no session")
                    for i in range(self.PER_CONNECTION):
                        if time.monotonic() > deadline:
                            raise AssertionError("deadline passed at message %d" % i)
                        text = b"".join(b"%d/%d line %d %s\r\n" % (n, i, k, secrets.token_hex(24).encode())
                                        for k in range(1 + (i * 7 + n) % 40))
                        if i % 10 == 0:
                            text += b".leading dot\r\n"
                        body = message("load %d/%d" % (n, i), text)
                        rs = c.send_mail("load%d@example.net" % n, ["admin@contoso.com"], body, timeout=30.0,
                                         pipelined=bool(i % 2))
                        if rs[-1] is None or rs[-1].code != 250:
                            raise AssertionError("message %d/%d: %r" % (n, i, rs))
                        digest = s.sha256(body)
                        with lock:
                            sent[digest] = body
                            replies[digest] = s.queued_id(rs[-1])
                    c.cmd("QUIT")
                finally:
                    c.close()
            except Exception as e:  # reported below
                with lock:
                    errors.append("connection %d: %r" % (n, e))

        t0 = time.monotonic()
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(self.CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic()))
        elapsed = time.monotonic() - t0
        self.assertFalse([t for t in threads if t.is_alive()], "threads still running after the deadline")
        self.assertEqual(errors, [], self.diag())
        total = self.CONNECTIONS * self.PER_CONNECTION
        self.assertEqual(len(sent), total)
        self.assertEqual(self.sink.wait_count(total, timeout=10.0), total, self.diag())
        stored = {}
        for qid, data, meta in self.sink.messages():
            stored[s.sha256(data)] = qid
        self.assertEqual(set(stored), set(sent), "the stored contents are exactly the sent ones")
        self.assertEqual({d: stored[d] for d in sent}, replies, "each client's queue id names its own message")
        be_rows = self.wait_access(self.be, total, timeout=10.0, pred=lambda r: r.get("queue_id"))
        self.assertEqual(len(be_rows), total)
        self.assertEqual({r["queue_id"] for r in be_rows}, set(replies.values()))
        print("\n%d messages over %d connections in %.1f s" % (total, self.CONNECTIONS, elapsed))


if __name__ == "__main__":
    unittest.main()
