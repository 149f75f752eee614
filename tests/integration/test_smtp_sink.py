"""The SMTP sink alone (no dmzproxy): what the SMTP tests rely on it to do.

Driven by swaks and raw sockets, like the proxy tests, so that a failure in test_smtp
points at the proxy and not at its fake Exchange. The client here binds the back-end's
Internal leg (127.30.0.20), as the last tier does.
"""

import os
import socket
import unittest

import harness as h
import smtp_support as s

SINK_HOST = h.ORIGIN          # the Exchange host stand-in (127.30.0.50, shifted)
SOURCE = h.BE_INTERNAL        # the back-end's Internal leg (127.30.0.20, shifted)


class SinkTest(unittest.TestCase):
    LINE_ENDS = "strict"
    MAX_SIZE = None

    def setUp(self):
        self.lab = h.Lab(prefix="dmz-sink-")
        self.addCleanup(self.lab.close)
        self.sink = s.start_sink(self.lab, "sink", SINK_HOST, line_ends=self.LINE_ENDS, max_size=self.MAX_SIZE)

    def client(self):
        c = s.SmtpClient.open(SINK_HOST, self.sink.port, source=SOURCE)
        self.addCleanup(c.close)
        b = c.banner()
        self.assertEqual(b.code, 220, b)
        return c

    def ready(self, c=None, name="be.test"):
        c = c or self.client()
        r = c.ehlo(name)
        self.assertEqual(r.code, 250, r)
        return c

    def swaks(self, *args):
        return s.swaks("-s", SINK_HOST, "-p", str(self.sink.port), "-li", SOURCE, *args)

    def diag(self):
        return self.sink.tail(40) + "\n" + self.lab.diagnostics()


class Basics(SinkTest):
    def test_swaks_delivery_stores_one_file_with_sidecar(self):
        body = b"From: a@example.net\r\nTo: admin@contoso.com\r\nSubject: hello\r\n\r\n.leading dot\r\n..two dots\r\n" \
               b"last line\r\n"
        res = self.swaks("--ehlo", "be.test", "-f", "a@example.net", "-t", "admin@contoso.com,bob@contoso.com",
                         "--data", s.swaks_data_file(self.lab, "msg.eml", body), "-ndf")
        self.assertEqual(res.returncode, 0, res)
        self.assertEqual(self.sink.count(), 1, self.diag())
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, body, "stored exactly as sent, after un-dot-stuffing")
        self.assertIn("250 2.0.0 Ok: queued as " + qid, res.server_lines())
        self.assertEqual(meta["queue_id"], qid)
        self.assertEqual(meta["mail_from"], "a@example.net")
        self.assertEqual(meta["rcpts"], ["admin@contoso.com", "bob@contoso.com"])
        self.assertEqual(meta["peer"], SOURCE)
        self.assertEqual(meta["ehlo"], "be.test")
        self.assertEqual(meta["size"], len(body))
        self.assertEqual(meta["sha256"], s.sha256(body))
        self.assertEqual([c["verb"] for c in self.sink.commands()], ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"])
        self.assertEqual(res.codes()[-1], "221", res)
        self.assertFalse([n for n in os.listdir(self.sink.store) if n.startswith(".tmp")], "no temp files left")

    def test_swaks_default_message(self):
        res = self.swaks("-f", "a@example.net", "-t", "admin@contoso.com")
        self.assertEqual(res.returncode, 0, res)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertIn(b"To: admin@contoso.com\r\n", stored)
        self.assertTrue(stored.endswith(b"\r\n"))

    def test_banner_ehlo_helo(self):
        c = self.client()
        r = c.ehlo("be.test")
        self.assertEqual(r.code, 250)
        kw = r.keywords()
        for k in ("PIPELINING", "SIZE", "8BITMIME"):
            self.assertIn(k, kw, r)
        self.assertNotIn("STARTTLS", kw)
        self.assertIn("SIZE %d" % (50 * 1024 * 1024), r.lines)
        r = c.cmd("HELO be2.test")
        self.assertEqual((r.code, len(r.lines)), (250, 1), r)
        self.assertEqual(c.cmd("NOOP").code, 250)
        self.assertEqual(c.cmd("VRFY admin").code, 252)
        self.assertEqual(c.cmd("STARTTLS").code, 502)
        self.assertEqual(c.cmd("QUIT").code, 221)
        self.assertTrue(c.closed_by_peer())

    def test_sequence_errors(self):
        c = self.client()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 503, "MAIL before EHLO")
        self.ready(c)
        self.assertEqual(c.cmd("RCPT TO:<b@contoso.com>").code, 503, "RCPT before MAIL")
        self.assertEqual(c.cmd("DATA").code, 503, "DATA before MAIL")
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 503, "nested MAIL")
        self.assertEqual(c.cmd("DATA").code, 554, "DATA with no recipient")
        self.assertEqual(c.cmd("RSET").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<b@contoso.com>").code, 503, "RSET ended the transaction")
        self.assertEqual(c.cmd("MAIL FROM:a@example.net").code, 501, "path without brackets")
        self.assertEqual(c.cmd("FROB").code, 502)
        self.assertEqual(c.cmd("MAIL FROM:<> SIZE=10").code, 250, "null sender")
        self.assertEqual(c.cmd("RCPT TO:<>").code, 501)
        self.assertEqual(self.sink.count(), 0)

    def test_null_sender_and_empty_message(self):
        c = self.ready()
        r = c.send_mail("", ["b@contoso.com"], b"")
        self.assertEqual([x.code for x in r], [250, 250, 354, 250], r)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual((stored, meta["mail_from"]), (b"", ""))

    def test_dot_stuffing_is_undone(self):
        body = b".\r\n..\r\n.x\r\nend\r\n. \r\n"
        c = self.ready()
        r = c.send_mail("a@example.net", ["b@contoso.com"], body)
        self.assertEqual(r[-1].code, 250, r)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, body)

    def test_pipelined_commands_answered_in_order(self):
        c = self.client()
        c.send("EHLO be.test\r\nMAIL FROM:<a@example.net>\r\nRCPT TO:<one@contoso.com>\r\n"
               "RCPT TO:<reject7@contoso.com>\r\nRCPT TO:<two@contoso.com>\r\nDATA\r\n")
        rs = c.replies(6)
        self.assertEqual([r.code for r in rs], [250, 250, 250, 550, 250, 354], rs)
        c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        end, bye = c.replies(2)
        self.assertEqual((end.code, bye.code), (250, 221))
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(meta["rcpts"], ["one@contoso.com", "two@contoso.com"])
        self.assertEqual(s.queued_id(end), qid)

    def test_canned_refusals(self):
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        r = c.cmd("RCPT TO:<reject1@contoso.com>")
        self.assertEqual((r.code, r.text), (550, "5.1.1 <reject1@contoso.com>: Recipient address rejected: User unknown"))
        self.assertEqual(c.cmd("RSET").code, 250)
        r = c.cmd("MAIL FROM:<tempfail@example.net>")
        self.assertEqual((r.code, r.text), (451, "4.3.0 try again"))
        r = c.send_mail("a@example.net", ["b@contoso.com"], b"Subject: x\r\nX-Sink-Refuse: yes\r\n\r\nbody\r\n")
        self.assertEqual((r[-1].code, r[-1].text), (554, "5.7.1 refused by sink"))
        self.assertEqual(self.sink.count(), 0, "a refused message is not stored")
        [d] = self.sink.entries("data")
        self.assertEqual(d["outcome"], "refused")
        # The session goes on: the next message is stored.
        r = c.send_mail("a@example.net", ["b@contoso.com"], b"Subject: y\r\n\r\nbody\r\n")
        self.assertEqual(r[-1].code, 250, r)
        self.assertEqual(self.sink.count(), 1)

    def test_long_command_line_refused_and_session_goes_on(self):
        c = self.ready()
        r = c.cmd("NOOP " + "x" * 6000)
        self.assertEqual(r.code, 500, r)
        self.assertEqual(c.cmd("NOOP").code, 250)

    def test_bare_lf_does_not_end_a_command(self):
        c = self.ready()
        c.send("NOOP\nNOOP\r\n")
        r = c.reply()
        self.assertEqual(r.code, 502, "one line 'NOOP<LF>NOOP', not two commands: %r" % r)
        self.assertEqual(c.cmd("NOOP").code, 250, "exactly one reply to it")

    def test_connections_served_at_once(self):
        clients = [self.client() for _ in range(5)]      # five banners before any mail
        for c in clients:
            self.ready(c)
        for i, c in reversed(list(enumerate(clients))):
            r = c.send_mail("a@example.net", ["b@contoso.com"], b"Subject: %d\r\n\r\nbody\r\n" % i)
            self.assertEqual(r[-1].code, 250, r)
        self.assertEqual(self.sink.count(), 5)
        self.assertEqual(len({m[2]["conn"] for m in self.sink.messages()}), 5)

    def test_log_has_every_command_and_reply(self):
        c = self.ready()
        c.send_mail("a@example.net", ["b@contoso.com"], b"Subject: x\r\n\r\nbody\r\n")
        c.cmd("QUIT")
        self.assertEqual(self.sink.wait_closed(1, timeout=10), 0, self.diag())
        events = [e["event"] for e in self.sink.entries()]
        self.assertEqual(events[:3], ["listen", "connect", "reply"])
        self.assertEqual(events[-1], "close")
        cmds = [(c_["verb"], c_["line"]) for c_ in self.sink.commands()]
        self.assertEqual(cmds, [("EHLO", "EHLO be.test"), ("MAIL", "MAIL FROM:<a@example.net>"),
                                ("RCPT", "RCPT TO:<b@contoso.com>"), ("DATA", "DATA"), ("QUIT", "QUIT")])
        codes = [r["code"] for r in self.sink.replies()]
        self.assertEqual(codes, [220, 250, 250, 250, 354, 250, 221])
        [d] = self.sink.entries("data")
        self.assertEqual((d["outcome"], d["sha256"]), ("stored", s.sha256(b"Subject: x\r\n\r\nbody\r\n")))
        self.assertTrue(all(e.get("peer", "").startswith(SOURCE + ":") for e in self.sink.entries()
                            if e["event"] != "listen"))

    def test_queue_ids_unique(self):
        c = self.ready()
        ids = set()
        for i in range(20):
            r = c.send_mail("a@example.net", ["b@contoso.com"], b"n %d\r\n" % i)
            ids.add(s.queued_id(r[-1]))
        self.assertEqual(len(ids), 20)
        self.assertEqual(set(self.sink.ids()), ids)
        for qid, stored, meta in self.sink.messages():
            self.assertEqual(meta["sha256"], s.sha256(stored))

    def test_sigterm_stops_it(self):
        self.assertEqual(self.sink.process.stop(), 0)


class Limits(SinkTest):
    MAX_SIZE = 1000

    def test_size_parameter_over_limit(self):
        c = self.ready()
        self.assertIn("SIZE 1000", c.ehlo().lines)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net> SIZE=1001").code, 552)
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net> SIZE=1000").code, 250)

    def test_message_over_limit_not_stored(self):
        c = self.ready()
        r = c.send_mail("a@example.net", ["b@contoso.com"], b"x" * 990 + b"\r\n" + b"y\r\n" * 10)
        self.assertEqual(r[-1].code, 552, r)
        r = c.send_mail("a@example.net", ["b@contoso.com"], b"z" * 5000 + b"\r\n")
        self.assertEqual(r[-1].code, 552, "one line longer than the limit: %r" % r)
        self.assertEqual(self.sink.count(), 0)
        r = c.send_mail("a@example.net", ["b@contoso.com"], b"x" * 900 + b"\r\n")
        self.assertEqual(r[-1].code, 250, r)
        self.assertEqual(self.sink.count(), 1)


class StrictEndOfData(SinkTest):
    """Only CRLF.CRLF ends DATA: every smuggling variant gives ONE message holding the
    smuggled text (a strict MTA's behaviour, which the proxy tests rely on)."""

    def check_variant(self, variant):
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<b@contoso.com>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        writes = s.smuggling_writes(variant)
        for w in writes:
            c.send(w)
        r = c.reply()
        self.assertEqual(r.code, 250, r)
        self.assertEqual(c.cmd("QUIT").code, 221, "no reply was left over from a second transaction")
        self.assertEqual(self.sink.count(), 1, self.diag())
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, s.undot_strict(b"".join(writes)[:-3]))
        self.assertIn(b"this message was smuggled", stored)
        self.assertEqual(len(self.sink.commands("MAIL")), 1, "the smuggled MAIL is text, not a command")


def _variant_test(variant):
    def test(self):
        self.check_variant(variant)
    return test


for _name, _variant in s.SMUGGLING_VARIANTS.items():
    setattr(StrictEndOfData, "test_" + _name, _variant_test(_variant))


class LfLineEnds(SinkTest):
    """--line-ends lf: a receiver that takes a bare LF as a line end, so `\\n.\\n` ends
    DATA. It shows what a smuggling attempt does to such a receiver (two messages), which
    is what the proxy must never let through."""

    LINE_ENDS = "lf"

    def test_lf_dot_lf_splits_the_message(self):
        c = self.ready()
        self.assertEqual(c.cmd("MAIL FROM:<a@example.net>").code, 250)
        self.assertEqual(c.cmd("RCPT TO:<b@contoso.com>").code, 250)
        self.assertEqual(c.cmd("DATA").code, 354)
        for w in s.smuggling_writes(s.SMUGGLING_VARIANTS["lf_dot_lf"]):
            c.send(w)
        rs = c.replies(5)
        self.assertEqual([r.code for r in rs], [250, 250, 250, 354, 250], rs)
        self.assertEqual(self.sink.count(), 2)
        subjects = sorted(m[1].split(b"\r\n")[1] for m in self.sink.messages())
        self.assertEqual(subjects, [b"Subject: first", b"Subject: smuggled"])

    def test_crlf_still_works(self):
        c = self.ready()
        r = c.send_mail("a@example.net", ["b@contoso.com"], b"Subject: x\r\n\r\n..dots\r\n")
        self.assertEqual(r[-1].code, 250)
        [(qid, stored, meta)] = self.sink.messages()
        self.assertEqual(stored, b"Subject: x\r\n\r\n..dots\r\n")


class IdleTimeout(unittest.TestCase):
    def test_raw_socket_close_mid_data_stores_nothing(self):
        lab = h.Lab(prefix="dmz-sink-")
        self.addCleanup(lab.close)
        sink = s.start_sink(lab, "sink", SINK_HOST)
        with s.SmtpClient.open(SINK_HOST, sink.port, source=SOURCE) as c:
            c.banner()
            c.ehlo()
            c.cmd("MAIL FROM:<a@example.net>")
            c.cmd("RCPT TO:<b@contoso.com>")
            c.cmd("DATA")
            c.send(b"Subject: cut\r\n\r\nhalf a message\r\n")
            c.sock.shutdown(socket.SHUT_RDWR)
        self.assertEqual(sink.wait_closed(1, timeout=10), 0)
        self.assertEqual(sink.count(), 0)
        [close] = sink.entries("close")
        self.assertEqual(close["reason"], "closed by peer")


if __name__ == "__main__":
    unittest.main()
