"""The test origin alone (no dmzproxy): what the web tests rely on it to do.

Driven by curl and raw sockets over TLS, like the proxy tests, so that a failure in
test_web points at the proxy and not at its fake Exchange.
"""

import hashlib
import time
import unittest

import harness as h


class Origin(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pki_lab = h.Lab(prefix="dmz-origin-pki-")
        cls.addClassCleanup(cls.pki_lab.close)     # also when setUpClass fails half-way
        pki = h.Pki(cls.pki_lab.path("pki"))
        cls.ca = pki.ca_cert
        cls.cert = pki.leaf("mail", ["mail.contoso.com"])

    def setUp(self):
        self.lab = h.Lab(prefix="dmz-origin-")
        self.addCleanup(self.lab.close)
        self.tls = self.lab.start_origin("origin", h.ORIGIN, cert=self.cert[0], key=self.cert[1])
        self.plain = self.lab.start_origin("plain", h.ORIGIN2)

    def curl(self, path, *args, timeout=30):
        base = ["--resolve", "mail.contoso.com:%d:%s" % (self.tls.port, self.tls.host), "--cacert", self.ca,
                "--interface", h.CLIENT]
        return h.curl(base + list(args) + ["https://mail.contoso.com:%d%s" % (self.tls.port, path)], timeout)

    def conn(self):
        return h.HttpConnection.open(self.tls.host, self.tls.port, ca_file=self.ca)

    def test_echo_over_http_and_https(self):
        r, res = h.curl(["--interface", h.CLIENT, "http://%s:%d/owa/x?y=1" % (self.plain.host, self.plain.port)])
        self.assertEqual(r.status, 200, res.stderr)
        self.assertEqual(r.json()["target"], "/owa/x?y=1")
        self.assertEqual(r.json()["peer"].split(":")[0], h.CLIENT)
        r, res = self.curl("/owa/y")
        self.assertEqual(r.status, 200, res.stderr)
        self.assertTrue(r.json()["tls"])
        self.assertEqual(r.json()["sni"], "mail.contoso.com")
        [q] = self.tls.requests()
        self.assertEqual((q["method"], q["target"], q["conn"], q["req"]), ("GET", "/owa/y", 1, 1))
        self.assertTrue(any(n == "User-Agent" and v.startswith("curl/") for n, v in q["headers"]), q["headers"])

    def test_curl_ntlm(self):
        r, res = self.curl("/ntlm/x", "--ntlm", "-u", "alice:pw")
        self.assertEqual(r.status, 200, res.stderr)
        self.assertEqual(r.json()["user"], "alice")
        legs = self.tls.requests()
        self.assertEqual(len(legs), 2)
        self.assertEqual({q["conn"] for q in legs}, {legs[0]["conn"]})
        self.assertEqual([q["user"] for q in legs], [None, "alice"])

    def test_ntlm_is_connection_based(self):
        with self.conn() as a:
            r = a.request("GET", "/ntlm/1")
            self.assertEqual((r.status, r.header("WWW-Authenticate")), (401, "NTLM"))
            r = a.request("GET", "/ntlm/2", [("Authorization", "NTLM " + h.ntlm_negotiate())])
            self.assertEqual(r.status, 401)
            self.assertRegex(r.header("WWW-Authenticate"), r"^NTLM TlRMTVNTUAAC")
            r = a.request("GET", "/ntlm/3", [("Authorization", "NTLM " + h.ntlm_authenticate("bob", "CONTOSO"))])
            self.assertEqual(r.status, 200)
            self.assertEqual(r.json()["user"], "CONTOSO\\bob")
            r = a.request("GET", "/ntlm/4")
            self.assertEqual((r.status, r.json()["user"]), (200, "CONTOSO\\bob"))
            r = a.request("GET", "/EWS/Exchange.asmx")
            self.assertEqual((r.status, r.json()["user"]), (200, "CONTOSO\\bob"))
        with self.conn() as b:
            r = b.request("GET", "/ntlm/5", [("Authorization", "NTLM " + h.ntlm_authenticate("bob"))])
            self.assertEqual(r.status, 401)
            self.assertEqual(r.body, b"Unexpected NTLM message Type 3 in new connection")
            r = b.request("GET", "/EWS/Exchange.asmx")
            self.assertEqual((r.status, r.json()["user"]), (200, None), "EWS without NTLM is a plain echo")

    def test_expect_continue_and_chunked(self):
        with self.conn() as c:
            c.send(b"POST /owa/x HTTP/1.1\r\nHost: m\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            head = c.read_head(time.monotonic() + 5)
            self.assertEqual(head, b"HTTP/1.1 100 Continue")
            c.send(b"hello")
            self.assertEqual(c.read_response().json()["body_bytes"], 5)
            r = c.request("POST", "/owa/y", [("Transfer-Encoding", "chunked")], b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
            self.assertEqual((r.status, r.json()["body_bytes"], r.json()["req"]), (200, 5, 2))
            r = c.request("RPC_PING", "/owa/z")
            self.assertEqual(r.json()["method"], "RPC_PING")

    def test_http10_keep_alive(self):
        with self.conn() as c:
            r = c.request("GET", "/a", [("Connection", "keep-alive")], version="HTTP/1.0")
            self.assertEqual(r.header("Connection"), "keep-alive")
            r = c.request("GET", "/b", version="HTTP/1.0")
            self.assertEqual(r.json()["req"], 2)
            self.assertTrue(c.closed_by_peer(5))

    def test_hold_silent_close_bad_framing(self):
        t0 = time.monotonic()
        r, _ = self.curl("/hold?seconds=0.5")
        self.assertEqual(r.status, 200)
        self.assertGreaterEqual(time.monotonic() - t0, 0.5)
        r, res = self.curl("/silent", "--max-time", "1")
        self.assertEqual(res.returncode, 28)
        r, res = self.curl("/close")
        self.assertEqual(res.returncode, 52)
        with self.conn() as c:
            c.send(b"GET /bad-framing HTTP/1.1\r\nHost: m\r\n\r\n")
            head = c.read_head(time.monotonic() + 5)
            self.assertIn(b"Content-Length: 5", head)
            self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertEqual([q["target"] for q in self.tls.requests()], ["/hold?seconds=0.5", "/silent", "/close",
                                                                       "/bad-framing"])

    def test_rpc_in_data_logs_first_byte_and_early_end(self):
        with self.conn() as c:
            c.send(b"RPC_IN_DATA /rpc/rpcproxy.dll?x:6001 HTTP/1.0\r\nHost: m\r\nContent-Length: 1073741824\r\n\r\n")
            c.send(b"z" * 1000)
            first = h.wait_for(lambda: self.tls.entries("first-body-byte"), 5)
            self.assertTrue(first)
            self.assertEqual(self.tls.requests(), [], "the request line comes at the end")
            c.send(b"z" * (2 * 1024 * 1024))
        final = h.wait_for(lambda: self.tls.requests(), 5)
        # Closing with unread TLS session tickets resets the connection, so the tail of
        # what was sent may be lost: only bounds are certain.
        self.assertGreater(final[0]["body_bytes"], 1000)
        self.assertLessEqual(final[0]["body_bytes"], 1000 + 2 * 1024 * 1024)
        self.assertFalse(final[0]["complete"])
        self.assertLessEqual(len(self.tls.entries("body-progress")), 2)
        with self.conn() as c:
            r = c.request("RPC_IN_DATA", "/rpc/rpcproxy.dll?x", body=b"q" * 100)
            self.assertEqual((r.status, r.header("Content-Length")), (200, "0"))

    def test_rpc_out_data_and_mapi(self):
        with self.conn() as c:
            c.send(b"RPC_OUT_DATA /rpc/rpcproxy.dll?x&blocks=3 HTTP/1.0\r\nHost: m\r\nContent-Length: 0\r\n\r\n")
            r = c.read_response_head()
            self.assertEqual(r.header("Content-Length"), "1073741824")
            deadline = time.monotonic() + 5
            while c.buf.count(b"block ") < 3:
                c._fill(deadline)
        with self.conn() as c:
            t0 = time.monotonic()
            r = c.request("POST", "/mapi/emsmdb?pendings=2", body=b"x")
            self.assertEqual(r.body, b"PENDING\nPENDING\nDONE\n")
            self.assertGreaterEqual(time.monotonic() - t0, 1.0)

    def test_activesync_options(self):
        r, _ = self.curl("/Microsoft-Server-ActiveSync", "-X", "OPTIONS")
        self.assertEqual(r.header("MS-ASProtocolVersions"), "14.1,16.0")

    def test_partial_head_is_logged(self):
        with self.conn() as c:
            c.send(b"GET /owa/x HTTP/1.1\r\nHost: m\r\n")
        got = h.wait_for(lambda: self.tls.requests(), 5)
        self.assertEqual(got[0]["error"], "connection ended inside the head")

    def test_big_download(self):
        with self.conn() as c:
            c.send(b"GET /bigdownload?mib=3 HTTP/1.1\r\nHost: m\r\n\r\n")
            r = c.read_response()
            self.assertEqual((r.status, r.header("Content-Length")), (200, str(3 * 1024 * 1024)))
            self.assertEqual(len(r.body), 3 * 1024 * 1024)
            self.assertTrue(r.body.startswith(b"block 0000000000\n"))
            self.assertEqual(r.body[2 * 1024 * 1024:2 * 1024 * 1024 + 17], b"block 0000000002\n")
            self.assertEqual(c.request("GET", "/owa/after").status, 200, "the connection stays open")
        [sent] = self.tls.entries("response")
        self.assertEqual((sent["body_bytes"], sent["complete"]), (3 * 1024 * 1024, True))
        self.assertEqual(sent["body_sha256"], hashlib.sha256(r.body).hexdigest())

    def test_tls_handshake_on_plain_listener_gets_400(self):
        r, res = h.curl(["--interface", h.CLIENT, "--cacert", self.ca,
                         "https://%s:%d/owa/x" % (self.plain.host, self.plain.port)])
        self.assertEqual(res.returncode, 35, "curl: TLS connect error\n%s" % res.stderr)
        self.assertTrue(h.wait_for(lambda: self.plain.entries("not-http"), 5))
        self.assertEqual(self.plain.requests(), [])

    def test_sigterm_exits_zero(self):
        self.assertEqual(self.lab.stop_all(), {"origin": 0, "plain": 0})


if __name__ == "__main__":
    unittest.main()
