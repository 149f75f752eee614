"""Web publishing through both tiers (issue 3, section 9): real processes on loopback.

    client 127.10.0.100 --https--> front-end 127.10.0.10 --https (from 127.20.0.10)-->
        back-end 127.20.0.20 --https (from 127.30.0.20)--> origin 127.30.0.50 (origin.py)

(the default lab's addresses: each module runs on them moved by its own shift, see harness.py)

Every test starts its own origins and both dmzproxy instances (`dmzproxy run`) on free
ports and stops them afterwards (SIGTERM, then SIGKILL). It drives them with curl, or with
raw sockets where curl cannot send the bytes, and asserts on what the client got, on
X-Dmz-Error (which tier, which fault class), on the origin's log (what did and did not
arrive) and on each tier's access log.

Environment: DMZPROXY, the dmzproxy binary (default: build/dmzproxy of this checkout).
"""

import hashlib
import os
import re
import time
import unittest

import harness as h

FE, BE = "front-end", "back-end"
ORIGIN3 = h.lab_address("127.30.0.52")
DEFAULT_READ_TIMEOUT = 120  # README: target timeouts default to read 120 s
ACCESS_KEYS = {"time", "instance", "conn", "client", "original_client", "user", "listener", "method",
               "host", "path", "rule", "action", "target", "status", "bytes_in", "bytes_out",
               "duration_ms", "fault"}
FAULT_STATUS = {"rule-denied": 403, "no-rule-matched": 403, "upstream-connect": 502, "upstream-tls": 502,
                "upstream-protocol": 502, "upstream-timeout": 504}

PKI = None      # file names of the lab CA and leaf certificates, made once per run
PKI_LAB = None


def setUpModule():
    global PKI, PKI_LAB
    PKI_LAB = h.Lab(prefix="dmz-it-pki-")
    unittest.addModuleCleanup(PKI_LAB.close)   # also when setUpModule fails half-way
    pki = h.Pki(PKI_LAB.path("pki"))
    other = h.Pki(PKI_LAB.path("other-ca"), ca_name="some other CA")
    PKI = {
        "ca": pki.ca_cert,
        "mail": pki.leaf("mail", ["mail.contoso.com", "autodiscover.contoso.com"]),
        "wrong": pki.leaf("wrong", ["www.fabrikam.com"]),
        "untrusted": other.leaf("untrusted", ["mail.contoso.com"]),
    }


# One row per published path: (rule name, paths, methods, front-end target overrides,
# back-end target overrides, or None when the back-end has no such rule). Timeouts are
# per rule and per tier, so each test picks the tier that is to fail.
LONG = "10m"


def rules_table(ports):
    be_dead = {"port": ports["dead_origin"]}
    return [
        ("OWA", ["/owa"], ["GET", "POST", "HEAD"], {}, {}),
        ("NTLM", ["/ntlm"], None, {}, {}),
        ("EWS", ["/EWS"], ["GET", "POST"], {}, {}),
        ("Outlook Anywhere", ["/rpc/rpcproxy.dll"], ["RPC_IN_DATA", "RPC_OUT_DATA"],
         {"timeouts": {"read": "20m"}}, {"timeouts": {"read": "20m"}}),
        ("MAPI", ["/mapi"], ["POST", "GET"], {"timeouts": {"read": "15m"}}, {"timeouts": {"read": "15m"}}),
        ("ActiveSync", ["/Microsoft-Server-ActiveSync"], ["OPTIONS", "POST"],
         {"timeouts": {"read": "1h"}}, {"timeouts": {"read": "1h"}}),
        ("Hold long", ["/hold/long"], None, {"timeouts": {"read": LONG}}, {"timeouts": {"read": LONG}}),
        ("Hold short at back-end", ["/hold/short"], None, {"timeouts": {"read": LONG}},
         {"timeouts": {"read": "2s"}}),
        ("Hold short at front-end", ["/hold/fe-short"], None, {"timeouts": {"read": "2s"}},
         {"timeouts": {"read": LONG}}),
        ("Silent long", ["/silent/long"], None, {"timeouts": {"read": LONG}}, {"timeouts": {"read": LONG}}),
        ("Silent", ["/silent"], None, {"timeouts": {"read": LONG}}, {"timeouts": {"read": "2s"}}),
        ("Close", ["/close"], None, {}, {}),
        ("Bad framing", ["/bad-framing"], None, {}, {}),
        ("Refused at back-end", ["/refused"], None, {}, be_dead),
        ("Wrong name at back-end", ["/wrong-name"], None, {},
         {"address": h.ORIGIN2, "port": ports["origin2"]}),
        ("Untrusted at back-end", ["/untrusted"], None, {},
         {"address": ORIGIN3, "port": ports["origin3"]}),
        ("Refused at front-end", ["/fe-refused"], None, {"port": ports["dead_backend"]}, None),
        ("Wrong name at front-end", ["/fe-wrong-name"], None, {"name": "wrong.contoso.com"}, None),
    ]


class TwoTier(unittest.TestCase):
    """Starts origins, the back-end and the front-end for each test."""

    maxDiff = 4000

    def setUp(self):
        self.lab = h.Lab()
        self.addCleanup(self.lab.close)  # runs even when setUp fails half-way
        self.ports = {
            "fe": h.free_port(h.FE_EXTERNAL),
            "be": h.free_port(h.BE_PERIMETER),
            "origin": h.free_port(h.ORIGIN),
            "origin2": h.free_port(h.ORIGIN2),
            "origin3": h.free_port(ORIGIN3),
            "dead_origin": h.free_port(h.ORIGIN),
            "dead_backend": h.free_port(h.BE_PERIMETER),
        }
        ca = PKI["ca"]
        self.origin = self.lab.start_origin("origin", h.ORIGIN, self.ports["origin"], *PKI["mail"])
        self.origin2 = self.lab.start_origin("origin2", h.ORIGIN2, self.ports["origin2"], *PKI["wrong"])
        self.origin3 = self.lab.start_origin("origin3", ORIGIN3, self.ports["origin3"], *PKI["untrusted"])

        networks = h.NETWORKS
        fe_rules, be_rules = [], []
        for name, paths, methods, fe_over, be_over in rules_table(self.ports):
            fe_target = {"address": h.BE_PERIMETER, "source": h.FE_PERIMETER, "port": self.ports["be"],
                         "tls": True, "name": h.PUBLIC_NAME, "ca_file": ca}
            fe_target.update(fe_over)
            fe_rules.append({"name": name, "paths": paths, "methods": methods, "target": fe_target})
            if be_over is None:
                continue
            be_target = {"address": h.ORIGIN, "source": h.BE_INTERNAL, "port": self.ports["origin"],
                         "tls": True, "name": h.PUBLIC_NAME, "ca_file": ca}
            be_target.update(be_over)
            be_rules.append({"name": name, "paths": paths, "methods": methods, "target": be_target})

        def listener(address, port):
            return {"name": "web", "protocol": "https", "bind": ["%s:%d" % (address, port)],
                    "certificates": [{"names": ["mail.contoso.com", "autodiscover.contoso.com"],
                                      "cert": PKI["mail"][0], "key": PKI["mail"][1]}],
                    "default_certificate": "mail.contoso.com", "authentication": "none"}

        be_text = h.instance_config(BE, "back-end", listener(h.BE_PERIMETER, self.ports["be"]), be_rules,
                                    networks=networks, address_sets={"fe": [h.FE_PERIMETER + "/32"]},
                                    trust_forwarded_from=["fe"])
        fe_text = h.instance_config(FE, "front-end", listener(h.FE_EXTERNAL, self.ports["fe"]), fe_rules,
                                    networks=networks)
        self.be = self.lab.start_proxy(BE, be_text, h.BE_PERIMETER, self.ports["be"])
        self.fe = self.lab.start_proxy(FE, fe_text, h.FE_EXTERNAL, self.ports["fe"])

    # -- clients

    def url(self, path):
        return "https://%s:%d%s" % (h.PUBLIC_NAME, self.ports["fe"], path)

    def curl(self, *args, timeout=60):
        base = ["--resolve", "%s:%d:%s" % (h.PUBLIC_NAME, self.ports["fe"], h.FE_EXTERNAL),
                "--cacert", PKI["ca"], "--interface", h.CLIENT]
        return h.curl(base + list(args), timeout=timeout)

    def connection(self, timeout=15.0):
        return h.HttpConnection.open(h.FE_EXTERNAL, self.ports["fe"], ca_file=PKI["ca"], timeout=timeout)

    def raw(self, data, timeout=5.0):
        return h.raw_exchange(h.FE_EXTERNAL, self.ports["fe"], data, ca_file=PKI["ca"], timeout=timeout)

    # -- what the processes saw

    def diag(self):
        """Context for a failure message: the tails of every log."""
        parts = [self.lab.diagnostics()]
        for o in (self.origin, self.origin2, self.origin3):
            parts.append("--- %s log ---\n%s" % (o.name, h.tail(o.log, 15)))
        for p in (self.fe, self.be):
            parts.append("--- %s access log ---\n%s" % (p.name, h.tail(p.access_log, 15)))
        return "\n".join(parts)

    def wait_access(self, proxy, count=1, timeout=5.0):
        """The access log lines once at least `count` are there (the log is asynchronous)."""
        h.wait_for(lambda: len(proxy.access()) >= count, timeout)
        return proxy.access()

    def settle(self):
        """After the front-end answered: wait (bounded) for its access-log line, written
        when the transaction is over, then send a request that both tiers pass on and wait
        until the origin has it: anything forwarded before it has had every chance to arrive.
        Returns what the origins saw but that request."""
        self.wait_access(self.fe, 1, timeout=10.0)
        token = "/owa/settle-" + os.urandom(6).hex()
        with self.connection() as c:
            r = c.request("GET", token)
        self.assertEqual(r.status, 200, "the settling request failed: %r\n%s" % (r, self.diag()))
        self.assertTrue(h.wait_for(lambda: [q for q in self.origin.requests() if q["target"] == token], 15),
                        "the origin never logged the settling request\n" + self.diag())
        return [(o.name, q["method"], q["target"]) for o in (self.origin, self.origin2, self.origin3)
                for q in o.requests() if not q["target"].startswith("/owa/settle-")]

    def be_access(self):
        """The back-end's access log but for settle()'s own requests."""
        return [e for e in self.be.access() if not (e.get("path") or "").startswith("/owa/settle-")]

    def assertOriginSawNothing(self, msg=""):
        self.assertEqual(self.settle(), [], "the origin must see no request. " + msg + "\n" + self.diag())

    def assertDmzError(self, r, instance, fault, status=None):
        err = r.dmz_error()
        self.assertIsNotNone(err, "no X-Dmz-Error on %r\n%s" % (r, self.diag()))
        self.assertEqual(len([n for n, _ in r.headers if n.lower() == "x-dmz-error"]), 1,
                         "one X-Dmz-Error: a back-end's error passes through the front-end untouched")
        self.assertEqual((err[0], err[1]), (instance, fault), "X-Dmz-Error %r\n%s" % (r.header("X-Dmz-Error"),
                                                                                      self.diag()))
        expect = status if status is not None else FAULT_STATUS.get(fault)
        if expect is not None:
            self.assertEqual(r.status, expect, repr(r))
        return err


# ---------------------------------------------------------------- strict framing

HOST = b"Host: mail.contoso.com\r\n"
FRAMING_CASES = {
    "content_length_and_transfer_encoding":
        b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "differing_content_length_fields":
        b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "differing_content_length_list":
        b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Content-Length: 5, 6\r\n\r\nhello!",
    "malformed_content_length":
        b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Content-Length: +5\r\n\r\nhello",
    "transfer_encoding_chunked_not_last":
        b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "transfer_encoding_without_chunked":
        b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\nhello",
    "obs_fold":
        b"GET /owa/x HTTP/1.1\r\n" + HOST + b"X-Folded: a\r\n b\r\n\r\n",
    "bare_lf_in_fields":
        b"GET /owa/x HTTP/1.1\r\nHost: mail.contoso.com\nX-A: b\r\n\r\n",
    "bare_lf_after_request_line":
        b"GET /owa/x HTTP/1.1\nHost: mail.contoso.com\r\n\r\n",
    "bare_cr":
        b"GET /owa/x HTTP/1.1\r\n" + HOST + b"X-A: b\rX-B: c\r\n\r\n",
    "nul_in_value":
        b"GET /owa/x HTTP/1.1\r\n" + HOST + b"X-A: b\x00c\r\n\r\n",
    "invalid_field_name":
        b"GET /owa/x HTTP/1.1\r\n" + HOST + b"X@A: b\r\n\r\n",
    "space_in_field_name":
        b"GET /owa/x HTTP/1.1\r\n" + HOST + b"X A: b\r\n\r\n",
    "whitespace_before_colon":
        b"GET /owa/x HTTP/1.1\r\n" + HOST + b"X-A : b\r\n\r\n",
    "bad_chunk_size":
        b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    "overflowing_chunk_size":
        b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n\r\n"
        b"10000000000000005\r\nhello\r\n0\r\n\r\n",
    "missing_host":
        b"GET /owa/x HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
    "repeated_host":
        b"GET /owa/x HTTP/1.1\r\n" + HOST + HOST + b"\r\n",
    "repeated_host_differing":
        b"GET /owa/x HTTP/1.1\r\n" + HOST + b"Host: evil.example.net\r\n\r\n",
    "absolute_form_authority_differs_from_host":
        b"GET https://evil.example.net/owa/x HTTP/1.1\r\n" + HOST + b"\r\n",
}


class Framing(TwoTier):
    """RFC 9112 refusals at the edge: 400 from the front-end, connection closed, nothing
    forwarded."""

    def check_refused(self, data):
        r = self.raw(data)
        seen = self.settle()
        problems = []
        if seen:
            problems.append("the origin saw %r" % seen)
        if r.status != 400:
            problems.append("status %s, not 400" % r.status)
        err = r.dmz_error()
        if not err or (err[0], err[1]) != (FE, "bad-request"):
            problems.append("X-Dmz-Error %r, not '%s; bad-request; ...'" % (r.header("X-Dmz-Error"), FE))
        if not r.closed:
            problems.append("the front-end left the connection open after a framing error")
        if problems:
            self.fail("; ".join(problems) + "\n%r\n%s" % (r, self.diag()))

    def test_control_valid_get_reaches_origin(self):
        r = self.raw(b"GET /owa/x HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n")
        self.assertEqual(r.status, 200, "%r\n%s" % (r, self.diag()))
        self.assertEqual([q["target"] for q in self.origin.requests()], ["/owa/x"])

    def test_control_valid_chunked_post_reaches_origin(self):
        r = self.raw(b"POST /owa/x HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                     b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
        self.assertEqual(r.status, 200, "%r\n%s" % (r, self.diag()))
        reqs = self.origin.requests()
        self.assertEqual(len(reqs), 1, self.diag())
        self.assertEqual(reqs[0]["body_bytes"], 11)
        self.assertEqual(reqs[0]["body_sha256"], hashlib.sha256(b"hello world").hexdigest())


def _framing_test(data):
    def test(self):
        self.check_refused(data)
    return test


for _name, _data in FRAMING_CASES.items():
    setattr(Framing, "test_" + _name, _framing_test(_data))


# ---------------------------------------------------------------- path escapes

ESCAPES = {
    "dot_dot": "/owa/../ecp/",
    "encoded_dot_dot": "/owa/%2e%2e/ecp/",
    "encoded_dot_dot_upper": "/owa/%2E%2E/ecp/",
    "half_encoded_dot_dot": "/owa/.%2e/ecp/",
    "encoded_slash": "/owa/..%2fecp/",
    "backslash": "/owa/..\\ecp/",
    "backslashes_only": "/owa\\..\\ecp\\",
    "encoded_backslash": "/owa/..%5cecp/",
    "double_encoding": "/owa/%252e%252e/ecp/",
    "double_encoded_slash": "/owa/..%252fecp/",
    "dot_dot_semicolon": "/owa/..;/ecp/",
}


class PathEscapes(TwoTier):
    """A path that leaves its published prefix never reaches the origin."""

    def check_escape(self, target):
        r = self.raw(("GET %s HTTP/1.1\r\nHost: mail.contoso.com\r\nConnection: close\r\n\r\n" % target)
                     .encode("latin-1"))
        self.assertIn(r.status, (400, 403), "%s -> %r\n%s" % (target, r, self.diag()))
        err = r.dmz_error()
        self.assertIsNotNone(err, repr(r))
        self.assertEqual(err[0], FE, repr(r))
        self.assertIn(err[1], ("bad-request", "no-rule-matched", "rule-denied"), repr(r))
        self.assertOriginSawNothing(target)

    def test_control_published_path_reaches_origin(self):
        r, res = self.curl(self.url("/owa/ok"))
        self.assertEqual(r.status, 200, res.stderr)
        self.assertEqual([q["target"] for q in self.origin.requests()], ["/owa/ok"])

    def test_unpublished_path_is_no_rule_matched(self):
        r, res = self.curl("--path-as-is", self.url("/ecp/"))
        self.assertDmzError(r, FE, "no-rule-matched", 403)
        self.assertIn(b"no-rule-matched", r.body, "the HTML page names the class")
        self.assertOriginSawNothing()


def _escape_test(target):
    def test(self):
        self.check_escape(target)
    return test


for _name, _target in ESCAPES.items():
    setattr(PathEscapes, "test_" + _name, _escape_test(_target))


# ---------------------------------------------------------------- forwarding

class Forwarding(TwoTier):
    def test_headers_reaching_exchange(self):
        r, res = self.curl("-H", "X-Forwarded-For: 6.6.6.6", "-H", "Forwarded: for=6.6.6.6",
                           self.url("/owa/headers"))
        self.assertEqual(r.status, 200, "%s\n%s" % (res.stderr, self.diag()))
        seen = r.json()
        fields = {}
        for n, v in seen["headers"]:
            fields.setdefault(n.lower(), []).append(v)
        self.assertEqual(fields.get("host"), ["mail.contoso.com:%d" % self.ports["fe"]],
                         "Host as the client sent it (host_header = original)")
        xff = ", ".join(fields.get("x-forwarded-for", []))
        self.assertNotIn("6.6.6.6", xff + " ".join(fields.get("forwarded", [])),
                         "a client's own X-Forwarded-For/Forwarded is overwritten at the edge")
        self.assertEqual(xff.split(",")[0].strip(), h.CLIENT, "X-Forwarded-For: " + xff)
        via = ", ".join(fields.get("via", []))
        self.assertRegex(via, r"1\.1 front-end\b", "Via: " + via)
        self.assertRegex(via, r"1\.1 back-end\b", "Via: " + via)
        self.assertEqual(seen["peer"].split(":")[0], h.BE_INTERNAL,
                         "the back-end connects from its Internal leg (target.source)")
        self.assertEqual(seen["sni"], h.PUBLIC_NAME, "SNI toward the origin is the target name")

    def test_expect_100_continue(self):
        body = os.urandom(2 * 1024 * 1024)
        path = self.lab.write("body.bin", "")
        with open(path, "wb") as f:
            f.write(body)
        r, res = self.curl("-H", "Expect: 100-continue", "--data-binary", "@" + path, self.url("/owa/upload"))
        self.assertEqual(r.status, 200, "%s\n%s" % (res.stderr, self.diag()))
        reqs = self.origin.requests()
        self.assertEqual(len(reqs), 1, self.diag())
        self.assertEqual(reqs[0]["body_bytes"], len(body))
        self.assertEqual(reqs[0]["body_sha256"], hashlib.sha256(body).hexdigest())

    def test_activesync_options(self):
        r, res = self.curl("-X", "OPTIONS", self.url("/Microsoft-Server-ActiveSync"))
        self.assertEqual(r.status, 200, "%s\n%s" % (res.stderr, self.diag()))
        self.assertEqual(r.header("MS-ASProtocolVersions"), "14.1,16.0")
        self.assertIn("Ping", r.header("MS-ASProtocolCommands") or "")
        self.assertEqual([(q["method"], q["target"]) for q in self.origin.requests()],
                         [("OPTIONS", "/Microsoft-Server-ActiveSync")])

    def test_sigterm_exits_zero(self):
        codes = self.lab.stop_all()
        self.assertEqual(codes[FE], 0, self.diag())
        self.assertEqual(codes[BE], 0, self.diag())


# ---------------------------------------------------------------- NTLM pinning

class Ntlm(TwoTier):
    def test_curl_ntlm_through_both_tiers(self):
        r, res = self.curl("--ntlm", "-u", "alice:pw", self.url("/ntlm/x"))
        self.assertEqual(r.status, 200, "%s\n%s" % (res.stderr, self.diag()))
        self.assertEqual(r.json()["user"], "alice")
        legs = [q for q in self.origin.requests() if q["target"] == "/ntlm/x"]
        self.assertGreaterEqual(len(legs), 2, self.diag())
        auth = [dict((n.lower(), v) for n, v in q["headers"]).get("authorization", "") for q in legs]
        self.assertTrue(any(a.startswith("NTLM TlRMTVNTUAAB") for a in auth), auth)  # type 1
        self.assertTrue(any(a.startswith("NTLM TlRMTVNTUAAD") for a in auth), auth)  # type 3
        self.assertEqual(len({q["conn"] for q in legs}), 1,
                         "all NTLM legs must reach the origin on one upstream connection: %r" %
                         [(q["conn"], q["req"]) for q in legs])
        self.assertEqual(legs[-1]["user"], "alice")

    def test_second_client_never_gets_the_pinned_connection(self):
        a = self.connection()
        self.addCleanup(a.close)
        b = self.connection()
        self.addCleanup(b.close)

        def plain(conn, tag):
            return conn.request("GET", "/ntlm/" + tag)

        r = a.request("GET", "/ntlm/alice-1", [("Authorization", "NTLM " + h.ntlm_negotiate())])
        self.assertEqual(r.status, 401, repr(r))
        self.assertRegex(r.header("WWW-Authenticate") or "", r"^NTLM \S+", "a type-2 challenge")
        rb = plain(b, "other-1")
        self.assertEqual(rb.status, 401, "second client, between the legs: %r" % rb)
        r = a.request("GET", "/ntlm/alice-2", [("Authorization", "NTLM " + h.ntlm_authenticate("alice", "CONTOSO"))])
        self.assertEqual(r.status, 200, "type 3 on the pinned connection: %r\n%s" % (r, self.diag()))
        self.assertEqual(r.json()["user"], "CONTOSO\\alice")
        for i in range(5):
            rb = plain(b, "other-%d" % (i + 2))
            self.assertEqual(rb.status, 401, "second client got %r" % rb)
            ra = plain(a, "alice-%d" % (i + 3))
            self.assertEqual(ra.status, 200, "the authenticated connection stays alice's: %r" % ra)
            self.assertEqual(ra.json()["user"], "CONTOSO\\alice")
        a.close()
        for i in range(3):
            rb = plain(b, "other-after-%d" % i)
            self.assertEqual(rb.status, 401, "after alice left, the second client got %r" % rb)
        with self.connection() as c:
            self.assertEqual(plain(c, "third-1").status, 401)

        reqs = self.origin.requests()
        alice_conns = {q["conn"] for q in reqs if q["target"].startswith("/ntlm/alice-")}
        self.assertEqual(len(alice_conns), 1, "alice's legs on one upstream connection: %r" %
                         [(q["target"], q["conn"]) for q in reqs])
        others = [(q["target"], q["conn"]) for q in reqs
                  if not q["target"].startswith("/ntlm/alice-") and q["conn"] in alice_conns]
        self.assertEqual(others, [], "requests of other clients on alice's upstream connection")

    def test_authenticated_connection_keeps_its_upstream_across_a_pause(self):
        # Idle keep-alive connections are parked after 50 ms (test_parking); a connection
        # bound to its upstream by NTLM is not, at either tier: Outlook pauses between calls.
        with self.connection() as a:
            r = a.request("GET", "/ntlm/pause-1", [("Authorization", "NTLM " + h.ntlm_negotiate())])
            self.assertEqual(r.status, 401, repr(r))
            r = a.request("GET", "/ntlm/pause-2", [("Authorization", "NTLM " + h.ntlm_authenticate("alice"))])
            self.assertEqual(r.status, 200, repr(r))
            for i in range(3, 5):
                time.sleep(0.6)     # deliberate: a pause longer than the parking delay is the point
                r = a.request("GET", "/ntlm/pause-%d" % i)
                self.assertEqual(r.status, 200, "after a pause: %r\n%s" % (r, self.diag()))
                self.assertEqual(r.json()["user"], "alice")
        conns = {q["conn"] for q in self.origin.requests() if q["target"].startswith("/ntlm/pause-")}
        self.assertEqual(len(conns), 1, "every leg on the pinned upstream connection")

    def test_pinned_upstream_closes_with_the_client(self):
        with self.connection() as a:
            r = a.request("GET", "/ntlm/p1", [("Authorization", "NTLM " + h.ntlm_negotiate())])
            self.assertEqual(r.status, 401, repr(r))
            r = a.request("GET", "/ntlm/p2", [("Authorization", "NTLM " + h.ntlm_authenticate("alice"))])
            self.assertEqual(r.status, 200, repr(r))
        conn = [q for q in self.origin.requests() if q["target"] == "/ntlm/p2"][0]["conn"]
        closed = h.wait_for(lambda: [e for e in self.origin.entries("close") if e["conn"] == conn], 5.0)
        self.assertTrue(closed, "the origin connection pinned to the client must close with it\n" + self.diag())

    def test_type3_on_a_new_connection_is_refused_by_the_origin(self):
        # Control for the origin's emulation through the chain: legs spread over two client
        # connections fail the way IIS fails them behind a pooling proxy.
        with self.connection() as a:
            self.assertEqual(a.request("GET", "/ntlm/s1", [("Authorization", "NTLM " + h.ntlm_negotiate())])
                             .status, 401)
        with self.connection() as b:
            r = b.request("GET", "/ntlm/s2", [("Authorization", "NTLM " + h.ntlm_authenticate("alice"))])
            self.assertEqual(r.status, 401, repr(r))
            self.assertIn(b"Unexpected NTLM message Type 3 in new connection", r.body)


# ---------------------------------------------------------------- streaming

class Streaming(TwoTier):
    def test_held_request_ends_upstream_when_the_client_leaves(self):
        # A phone dropping its ActiveSync Ping: the origin never answers, the read timeouts
        # are 10 minutes, and both tiers must still notice the client leaving and close their
        # upstream connections, so the origin sees its connection end within seconds.
        with self.connection() as c:
            c.send(b"GET /silent/long HTTP/1.1\r\nHost: %s\r\n\r\n" % h.PUBLIC_NAME.encode())
            self.assertTrue(h.wait_for(lambda: [q for q in self.origin.requests() if q["target"] == "/silent/long"], 15),
                            "the held request never reached the origin\n" + self.diag())
        conn = [q for q in self.origin.requests() if q["target"] == "/silent/long"][0]["conn"]
        t0 = time.monotonic()
        closed = h.wait_for(lambda: [e for e in self.origin.entries("close") if e["conn"] == conn], 5.0)
        self.assertTrue(closed, "the origin connection of a held request must close with the client\n" + self.diag())
        self.assertLess(time.monotonic() - t0, 3.0)
        for tier in (self.fe, self.be):
            h.wait_for(lambda: [r for r in tier.access() if r.get("path") == "/silent/long"], 5.0)
            rows = [r for r in tier.access() if r.get("path") == "/silent/long"]
            self.assertTrue(rows, "no access-log line at " + tier.name + "\n" + self.diag())
            self.assertIn("closed the connection while its answer was pending", rows[0].get("detail", ""), repr(rows[0]))

    def test_rpc_in_data_reaches_origin_before_client_finishes(self):
        c = self.connection(timeout=10.0)
        self.addCleanup(c.close)
        c.send(b"RPC_IN_DATA /rpc/rpcproxy.dll?ex01.corp.contoso.com:6001 HTTP/1.0\r\n"
               b"Host: mail.contoso.com\r\nUser-Agent: MSRPC\r\nContent-Length: 1073741824\r\n"
               b"Connection: Keep-Alive\r\nCache-Control: no-cache\r\n\r\n")
        piece = b"\x05" * 65536
        try:
            for _ in range(128):  # 8 MiB
                c.send(piece)
        except (TimeoutError, OSError) as e:
            self.fail("the proxy stopped taking the RPC_IN_DATA body after some MiB (%s): buffered?\n%s"
                      % (e, self.diag()))
        first = h.wait_for(lambda: self.origin.entries("first-body-byte"), 10.0)
        self.assertTrue(first, "no body byte reached the origin while the client was still sending\n" +
                        self.diag())
        for _ in range(16):  # 1 MiB more, then stop early
            c.send(piece)
        client_done = time.time()
        c.close()
        final = h.wait_for(lambda: [q for q in self.origin.requests() if q["method"] == "RPC_IN_DATA"], 10.0)
        self.assertTrue(final, "the origin did not see the channel end\n" + self.diag())
        q = final[0]
        self.assertLess(first[0]["first_body_byte_time"], client_done)
        self.assertFalse(q["complete"], "the channel ended early")
        self.assertGreater(q["body_bytes"], 0)
        self.assertLessEqual(q["body_bytes"], 9 * 1024 * 1024)
        cl = [v for n, v in q["headers"] if n.lower() == "content-length"]
        self.assertEqual(cl, ["1073741824"], "the declared length is forwarded")

    def test_rpc_out_data_streams_to_client(self):
        with self.connection() as c:
            c.send(b"RPC_OUT_DATA /rpc/rpcproxy.dll?ex01.corp.contoso.com:6001&blocks=5 HTTP/1.0\r\n"
                   b"Host: mail.contoso.com\r\nContent-Length: 76\r\nConnection: Keep-Alive\r\n\r\n" + b"\x00" * 76)
            r = c.read_response_head(timeout=10)
            self.assertIsNotNone(r, self.diag())
            self.assertEqual(r.status, 200, "%r\n%s" % (r, self.diag()))
            self.assertEqual(r.header("Content-Length"), "1073741824")
            deadline = time.monotonic() + 10
            arrivals = {}
            while len(arrivals) < 5 and time.monotonic() < deadline:
                for m in re.finditer(rb"block (\d) at ([0-9.]+)", bytes(c.buf)):
                    arrivals.setdefault(int(m.group(1)), (time.time(), float(m.group(2))))
                if len(arrivals) < 5:
                    c._fill(deadline)
            self.assertEqual(sorted(arrivals), [0, 1, 2, 3, 4], self.diag())
            self.assertLess(arrivals[0][0], arrivals[4][1],
                            "block 0 must reach the client before the origin has produced block 4")
        [q] = self.origin.requests()
        self.assertEqual((q["method"], q["body_bytes"]), ("RPC_OUT_DATA", 76))

    def test_mapi_pending_chunks_are_flushed_one_by_one(self):
        with self.connection() as c:
            c.send(b"POST /mapi/emsmdb?pendings=3 HTTP/1.1\r\nHost: mail.contoso.com\r\n"
                   b"Content-Type: application/mapi-http\r\nX-RequestType: Execute\r\nContent-Length: 4\r\n\r\nping")
            r = c.read_response_head(timeout=10)
            self.assertIsNotNone(r, self.diag())
            self.assertEqual(r.status, 200, "%r\n%s" % (r, self.diag()))
            deadline = time.monotonic() + 10
            t_pending = t_done = None
            while t_done is None and time.monotonic() < deadline:
                if t_pending is None and b"PENDING" in c.buf:
                    t_pending = time.monotonic()
                if b"DONE" in c.buf:
                    t_done = time.monotonic()
                    break
                if not c._fill(deadline):
                    break
            self.assertIsNotNone(t_pending, self.diag())
            self.assertIsNotNone(t_done, self.diag())
            self.assertGreater(t_done - t_pending, 0.8,
                               "PENDING chunks must reach the client as they are produced, not with DONE")
        [q] = self.origin.requests()
        self.assertEqual((q["method"], q["target"], q["body_bytes"]), ("POST", "/mapi/emsmdb?pendings=3", 4))


# ---------------------------------------------------------------- timeouts and faults

class Faults(TwoTier):
    def test_short_read_timeout_at_back_end_is_504_from_back_end(self):
        t0 = time.monotonic()
        r, res = self.curl(self.url("/hold/short?seconds=%d" % (DEFAULT_READ_TIMEOUT + 5)))
        self.assertDmzError(r, BE, "upstream-timeout", 504)
        self.assertLess(time.monotonic() - t0, 30, "the rule's 2 s read timeout, not the default")
        self.assertEqual([q["target"] for q in self.origin.requests()],
                         ["/hold/short?seconds=%d" % (DEFAULT_READ_TIMEOUT + 5)])

    def test_short_read_timeout_at_front_end_is_504_from_front_end(self):
        r, res = self.curl(self.url("/hold/fe-short?seconds=10"))
        self.assertDmzError(r, FE, "upstream-timeout", 504)
        self.assertEqual([q["target"] for q in self.origin.requests()], ["/hold/fe-short?seconds=10"])

    def test_hold_longer_than_default_read_timeout_on_long_rule(self):
        seconds = DEFAULT_READ_TIMEOUT + 5
        r, res = self.curl(self.url("/hold/long?seconds=%d" % seconds), timeout=seconds + 60)
        self.assertEqual(r.status, 200, "%r %s\n%s" % (r, res.stderr, self.diag()))
        self.assertIsNone(r.header("X-Dmz-Error"))
        self.assertEqual(r.json()["target"], "/hold/long?seconds=%d" % seconds, "the origin's own answer")
        self.assertEqual(len(self.origin.requests()), 1, "one request, no retry")

    def test_upstream_refused_at_back_end(self):
        r, res = self.curl(self.url("/refused"))
        self.assertDmzError(r, BE, "upstream-connect", 502)
        self.assertOriginSawNothing()

    def test_upstream_refused_at_front_end(self):
        r, res = self.curl(self.url("/fe-refused"))
        self.assertDmzError(r, FE, "upstream-connect", 502)
        self.assertOriginSawNothing()
        self.assertEqual(self.be_access(), [])

    def test_upstream_silent(self):
        r, res = self.curl(self.url("/silent"))
        self.assertDmzError(r, BE, "upstream-timeout", 504)
        self.assertEqual([q["target"] for q in self.origin.requests()], ["/silent"])

    def test_upstream_certificate_for_wrong_name_at_back_end(self):
        r, res = self.curl(self.url("/wrong-name"))
        err = self.assertDmzError(r, BE, "upstream-tls", 502)
        self.assertIn("name mismatch", err[2].lower(), r.header("X-Dmz-Error"))
        self.assertEqual(self.origin2.requests(), [], "no request over an unverified connection")

    def test_upstream_certificate_for_wrong_name_at_front_end(self):
        r, res = self.curl(self.url("/fe-wrong-name"))
        err = self.assertDmzError(r, FE, "upstream-tls", 502)
        self.assertIn("name mismatch", err[2].lower(), r.header("X-Dmz-Error"))
        self.assertOriginSawNothing()
        self.assertEqual(self.be_access(), [], "no request over an unverified connection")

    def test_upstream_certificate_untrusted(self):
        r, res = self.curl(self.url("/untrusted"))
        err = self.assertDmzError(r, BE, "upstream-tls", 502)
        self.assertIn("untrusted", err[2].lower(), r.header("X-Dmz-Error"))
        self.assertEqual(self.origin3.requests(), [])

    def test_upstream_closes_without_answer(self):
        r, res = self.curl(self.url("/close"))
        self.assertDmzError(r, BE, "upstream-protocol", 502)
        self.assertGreaterEqual(len(self.origin.requests()), 1)

    def test_upstream_response_with_bad_framing(self):
        r, res = self.curl(self.url("/bad-framing"))
        self.assertDmzError(r, BE, "upstream-protocol", 502)
        self.assertNotIn(b"hello", r.body, "nothing of the badly framed response reaches the client")
        self.assertGreaterEqual(len(self.origin.requests()), 1)

    def test_error_page_names_tier_and_class(self):
        r, res = self.curl(self.url("/refused"))
        self.assertIn("text/html", r.header("Content-Type") or "")
        self.assertIn(b"back-end", r.body)
        self.assertIn(b"upstream-connect", r.body)


# ---------------------------------------------------------------- access log

class AccessLog(TwoTier):
    def test_one_line_per_request_at_each_tier(self):
        with self.connection() as c:
            for path, method, body in (("/owa/one", "GET", b""), ("/owa/two", "GET", b""),
                                       ("/owa/three", "POST", b"abc")):
                r = c.request(method, path, body=body)
                self.assertEqual(r.status, 200, "%r\n%s" % (r, self.diag()))
        fe = self.wait_access(self.fe, 3)
        be = self.wait_access(self.be, 3)
        self.assertEqual([e.get("path") for e in fe], ["/owa/one", "/owa/two", "/owa/three"], self.diag())
        self.assertEqual([e.get("path") for e in be], ["/owa/one", "/owa/two", "/owa/three"], self.diag())
        for e in fe + be:
            self.assertLessEqual(ACCESS_KEYS, set(e), "missing keys: %s" % sorted(ACCESS_KEYS - set(e)))
        for e in fe:
            self.assertEqual(e["instance"], FE)
            self.assertEqual(e["client"], h.CLIENT)
            self.assertEqual(e["original_client"], h.CLIENT)
            self.assertEqual(e["listener"], "web")
            self.assertEqual(e["rule"], "OWA")
            self.assertEqual(e["action"], "allow")
            self.assertEqual(e["status"], 200)
            self.assertIn(e["fault"], (None, "", "none"))
            self.assertEqual(e["host"].split(":")[0], h.PUBLIC_NAME)
        self.assertEqual(len({e["conn"] for e in fe}), 1, "one client connection, one conn id")
        self.assertEqual(fe[2]["method"], "POST")
        self.assertGreaterEqual(fe[2]["bytes_in"], 3)
        self.assertGreater(fe[0]["bytes_out"], 0)
        for e in be:
            self.assertEqual(e["instance"], BE)
            self.assertEqual(e["client"], h.FE_PERIMETER, "the back-end's peer is the front-end's leg")
            self.assertEqual(e["original_client"], h.CLIENT, "the back-end trusts the front-end's X-Forwarded-For")
            self.assertEqual(e["status"], 200)

    def test_refusals_are_logged_with_their_fault(self):
        r, res = self.curl("--path-as-is", self.url("/ecp/"))
        self.assertEqual(r.status, 403)
        self.raw(FRAMING_CASES["content_length_and_transfer_encoding"])
        fe = self.wait_access(self.fe, 2)
        self.assertEqual(len(fe), 2, self.diag())
        denied, bad = fe
        self.assertEqual((denied["status"], denied["action"], denied["fault"]), (403, "deny", "no-rule-matched"))
        self.assertEqual((bad["status"], bad["fault"]), (400, "bad-request"))

    def test_upstream_fault_is_logged_at_the_tier_that_failed(self):
        r, res = self.curl(self.url("/refused"))
        self.assertEqual(r.status, 502)
        fe = self.wait_access(self.fe, 1)
        be = self.wait_access(self.be, 1)
        self.assertEqual(be[0]["fault"], "upstream-connect", self.diag())
        self.assertEqual(be[0]["status"], 502)
        self.assertEqual(fe[0]["status"], 502, "the front-end logs what it passed on")


if __name__ == "__main__":
    unittest.main()
