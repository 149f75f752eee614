"""Operations (issue 8): hot reload on SIGHUP under load, graceful drain on SIGTERM and
access-log reopening on SIGUSR1, with real processes on 127.0.0.0/8 and raw sockets as
the clients.

    DMZPROXY=build/dmzproxy python3 -m unittest -v test_ops
"""

import base64
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import harness as h


def config(port, origin_port):
    return h.instance_config("front-end", "front-end",
                             {"name": "web", "protocol": "http", "bind": ["%s:%d" % (h.FE_EXTERNAL, port)],
                              "authentication": "none"},
                             [{"name": "OWA", "paths": ["/owa", "/hold"],
                               "target": {"address": h.ORIGIN, "port": origin_port, "timeouts": {"read": "5m"}}}])


def request(sock, path):
    sock.sendall(("GET %s HTTP/1.1\r\nHost: mail.contoso.com\r\n\r\n" % path).encode())


def read_response(sock, timeout):
    """One response (Content-Length framed): (status, head text, body), or None at EOF."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    text = head.decode("latin-1")
    length = 0
    for line in text.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(text.split(" ")[1]), text, body


class Drain(unittest.TestCase):
    def start(self, drain_timeout):
        self.lab = h.Lab(prefix="dmz-ops-")
        self.addCleanup(self.lab.close)
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        self.port = h.free_port(h.FE_EXTERNAL)
        self.fe = self.lab.start_proxy("front-end", config(self.port, self.origin.port), h.FE_EXTERNAL, self.port,
                                       extra_args=["--drain-timeout", str(drain_timeout)])

    def connect(self):
        return h.connect(h.FE_EXTERNAL, self.port)

    def test_sigterm_finishes_requests_in_flight_and_closes_idle_connections(self):
        self.start(drain_timeout=20)
        idle = self.connect()
        self.addCleanup(idle.close)
        request(idle, "/owa/")
        self.assertEqual(read_response(idle, 10)[0], 200)
        busy = self.connect()
        self.addCleanup(busy.close)
        request(busy, "/hold?seconds=3")
        self.assertTrue(h.wait_for(lambda: [q for q in self.origin.requests() if q["target"] == "/hold?seconds=3"], 15),
                        "the held request never reached the origin")
        t0 = time.monotonic()
        os.kill(self.fe.process.proc.pid, signal.SIGTERM)

        self.assertTrue(h.closed_within(idle, 5.0), "an idle keep-alive connection must close at once on SIGTERM")
        self.assertTrue(h.wait_for(lambda: not h.port_accepts(h.FE_EXTERNAL, self.port), 10),
                        "the listener still listens while draining")
        with self.assertRaises(OSError, msg="no new connection may be accepted while draining"):
            self.connect().close()
        r = read_response(busy, 10)
        self.assertIsNotNone(r, "the request in flight lost its answer\n" + self.lab.diagnostics())
        status, head, body = r
        self.assertEqual(status, 200, head)
        self.assertIn("/hold?seconds=3", body.decode("latin-1"), "the origin's own answer")
        self.assertIn("connection: close", head.lower(), "the last answer of a draining connection says so")
        self.assertTrue(h.closed_within(busy, 2.0))
        code = self.fe.process.proc.wait(timeout=10)
        took = time.monotonic() - t0
        self.assertEqual(code, 0)
        self.assertGreater(took, 1.0, "the process must wait for the request in flight (3 s at the origin)")
        self.assertLess(took, 12, "and stop once it is done, not at the 20 s drain timeout")
        self.assertIn("drained", self.fe.process.output())

    def test_drain_timeout_cuts_what_is_still_in_flight(self):
        self.start(drain_timeout=1)
        held = self.connect()
        self.addCleanup(held.close)
        request(held, "/hold?seconds=30")
        self.assertTrue(h.wait_for(lambda: [q for q in self.origin.requests() if q["target"] == "/hold?seconds=30"], 15),
                        "the held request never reached the origin")
        t0 = time.monotonic()
        os.kill(self.fe.process.proc.pid, signal.SIGTERM)
        code = self.fe.process.proc.wait(timeout=10)
        self.assertEqual(code, 0)
        self.assertLess(time.monotonic() - t0, 8, "the 1 s drain timeout, not the 30 s hold")
        self.assertIn("drain timeout, closing 1 connections", self.fe.process.output())

    def test_second_sigterm_stops_at_once(self):
        self.start(drain_timeout=60)
        held = self.connect()
        self.addCleanup(held.close)
        request(held, "/hold?seconds=30")
        self.assertTrue(h.wait_for(lambda: [q for q in self.origin.requests() if q["target"] == "/hold?seconds=30"], 15),
                        "the held request never reached the origin")
        os.kill(self.fe.process.proc.pid, signal.SIGTERM)
        self.assertTrue(h.wait_for(lambda: not h.port_accepts(h.FE_EXTERNAL, self.port), 10),
                        "the first SIGTERM never started the drain")
        t0 = time.monotonic()
        os.kill(self.fe.process.proc.pid, signal.SIGTERM)
        self.assertEqual(self.fe.process.proc.wait(timeout=10), 0)
        self.assertLess(time.monotonic() - t0, 5, "at once, not after the 60 s drain timeout")
        self.assertIn("second signal, stopping now", self.fe.process.output())


def tier_config(name, address, port, rules, extra_listeners=()):
    """A plain-HTTP tier: listener `web` on address:port (plus `extra_listeners`, each
    (name, address, port)), and `rules` as (rule name, paths, target address, target port)."""
    text = h.instance_config(name, name, {"name": "web", "protocol": "http", "bind": ["%s:%d" % (address, port)],
                                          "authentication": "none"},
                             [{"name": r, "paths": paths, "listeners": ["web"] + [x[0] for x in extra_listeners],
                               "target": {"address": a, "port": p, "timeouts": {"read": "5m"}}}
                              for r, paths, a, p in rules])
    for lname, a, p in extra_listeners:
        text += '\n[listeners.%s]\nprotocol = "http"\nbind = ["%s:%d"]\nauthentication = "none"\n' % (lname, a, p)
    return text


class Load:
    """curl loops requesting /owa/ through the front-end until stopped: each curl run asks
    for the page 10 times on one keep-alive connection, so new connections keep meeting new
    snapshots and kept ones cross them too. Bounded: each loop stops itself after `limit`
    seconds."""

    def __init__(self, port, clients=4, limit=60, pause=0.0):
        self.port, self.limit, self.pause = port, limit, pause
        self.ok = 0
        self.failures = []
        self.stop_flag = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def client(self):
        end = time.monotonic() + self.limit
        url = "http://%s:%d/owa/" % (h.FE_EXTERNAL, self.port)
        per_run = 1 if self.pause else 10
        while not self.stop_flag.is_set() and time.monotonic() < end:
            urls = []
            for _ in range(per_run):
                urls += ["-o", "/dev/null", url]
            r = subprocess.run(["curl", "-s", "-S", "--interface", h.CLIENT, "--max-time", "15", "-w", "%{http_code}\\n"] + urls,
                               capture_output=True, text=True, timeout=60)
            codes = r.stdout.split()
            with self.lock:
                self.ok += codes.count("200")
                bad = [c for c in codes if c != "200"]
                if r.returncode != 0 or len(codes) != per_run or bad:
                    self.failures.append("curl exit %d, codes %s: %s" % (r.returncode, codes, r.stderr.strip()[-300:]))
            if self.pause:
                time.sleep(self.pause)

    def wait_ok(self, more, timeout=60):
        """Waits until `more` requests have succeeded since the call (fails the test if not)."""
        with self.lock:
            goal = self.ok + more
        if not h.wait_for(lambda: self.ok >= goal or self.failures, timeout) or self.failures:
            raise AssertionError("the load did not get %d more answers: %d so far, failures %s" % (
                more, self.ok, self.failures[:3]))

    def stop(self):
        self.stop_flag.set()
        for t in self.threads:
            t.join(timeout=30)
        return self.ok, self.failures


class Reload(unittest.TestCase):
    def setUp(self):
        self.lab = h.Lab(prefix="dmz-ops-")
        self.addCleanup(self.lab.close)
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        self.fe_port = h.free_port(h.FE_EXTERNAL)
        self.be_port = h.free_port(h.BE_PERIMETER)
        self.be = self.lab.start_proxy("back-end", self.be_text(0), h.BE_PERIMETER, self.be_port)
        self.fe = self.lab.start_proxy("front-end", self.fe_text(0), h.FE_EXTERNAL, self.fe_port)

    def fe_text(self, i, paths=("/owa", "/hold"), extra_listeners=()):
        rules = [("Web", list(paths), h.BE_PERIMETER, self.be_port)]
        if i % 2:
            rules.append(("Marker %d" % i, ["/marker%d" % i], h.BE_PERIMETER, self.be_port))
        return tier_config("front-end", h.FE_EXTERNAL, self.fe_port, rules, extra_listeners)

    def be_text(self, i):
        rules = [("Web", ["/owa", "/hold"], h.ORIGIN, self.origin.port)]
        if i % 2:
            rules.append(("Marker %d" % i, ["/marker%d" % i], h.ORIGIN, self.origin.port))
        return tier_config("back-end", h.BE_PERIMETER, self.be_port, rules)

    def reload(self, proxy, text):
        with open(proxy.config, "w") as f:
            f.write(text)
        os.kill(proxy.process.proc.pid, signal.SIGHUP)

    def stderr(self, proxy):
        with open(proxy.process.stderr_path, errors="replace") as f:
            return f.read()

    def get(self, path, port=None):
        with h.connect(h.FE_EXTERNAL, port or self.fe_port) as s:
            request(s, path)
            return read_response(s, 10)

    def test_ten_reloads_of_both_tiers_under_load_lose_no_request(self):
        load = Load(self.fe_port)
        self.addCleanup(load.stop)
        load.wait_ok(20)
        for i in range(1, 11):
            self.reload(self.be, self.be_text(i))
            self.reload(self.fe, self.fe_text(i))
            # Each reload is taken (both tiers on version i + 1) and requests flow on it
            # before the next one.
            for p in (self.fe, self.be):
                self.assertTrue(h.wait_for(lambda: "config version %d" % (i + 1) in self.stderr(p), 15),
                                "%s did not reach config version %d\n%s" % (p.name, i + 1, self.stderr(p)))
            load.wait_ok(10)
        ok, failures = load.stop()
        self.assertEqual(failures, [], "requests failed during the reloads")
        self.assertGreater(ok, 200, "the load must really have run")
        # New connections got the last snapshot: version 10 has no marker rule, 9's is gone.
        self.assertEqual(self.get("/marker9")[0], 403)
        self.reload(self.be, self.be_text(11))
        self.reload(self.fe, self.fe_text(11))
        for p in (self.fe, self.be):
            self.assertTrue(h.wait_for(lambda: "config version 12" in self.stderr(p), 10), self.stderr(p))
        r = self.get("/marker11")
        self.assertEqual(r[0], 200, "%s\n%s\n%s" % (r[1], self.stderr(self.fe), self.stderr(self.be)))

    def test_broken_config_under_load_keeps_the_old_one_and_says_why(self):
        load = Load(self.fe_port)
        self.addCleanup(load.stop)
        load.wait_ok(20)
        good = self.fe_text(0)
        broken = good.replace('[listeners.web]', '[listeners.web\n', 1)
        self.reload(self.fe, broken)
        self.assertTrue(h.wait_for(lambda: "reload refused" in self.stderr(self.fe), 10), self.stderr(self.fe))
        self.reload(self.fe, good.replace('"/owa"', '"/owa", 7', 1))  # parses, fails the schema
        self.assertTrue(h.wait_for(lambda: self.stderr(self.fe).count("reload refused") >= 2, 15), self.stderr(self.fe))
        load.wait_ok(50)                    # and requests go on after the refusals
        ok, failures = load.stop()
        self.assertEqual(failures, [], "requests failed after a refused reload")
        self.assertGreater(ok, 50)
        err = self.stderr(self.fe)
        self.assertRegex(err, re.escape(self.fe.config) + r":\d+:\d+", "the reason names file:line:column")
        self.assertIn("still running config version 1", err)
        self.assertNotIn("config version 2", err)
        self.assertEqual(self.get("/owa/")[0], 200)

    def test_listener_added_and_removed_without_disturbing_the_others(self):
        extra_port = h.free_port(h.FE_EXTERNAL)
        load = Load(self.fe_port)
        self.addCleanup(load.stop)
        load.wait_ok(20)
        self.reload(self.fe, self.fe_text(0, extra_listeners=[("extra", h.FE_EXTERNAL, extra_port)]))
        self.assertTrue(h.wait_for(lambda: "config version 2" in self.stderr(self.fe), 10), self.stderr(self.fe))
        self.assertIn("listening now: extra on %s:%d" % (h.FE_EXTERNAL, extra_port), self.stderr(self.fe))
        self.assertEqual(self.get("/owa/", port=extra_port)[0], 200)
        self.reload(self.fe, self.fe_text(0))
        self.assertTrue(h.wait_for(lambda: "config version 3" in self.stderr(self.fe), 10), self.stderr(self.fe))
        self.assertIn("closed: %s:%d" % (h.FE_EXTERNAL, extra_port), self.stderr(self.fe))
        self.assertTrue(h.wait_for(lambda: not h.port_accepts(h.FE_EXTERNAL, extra_port), 10),
                        "the removed listener still listens")
        with self.assertRaises(OSError, msg="the removed listener must stop accepting"):
            self.get("/owa/", port=extra_port)
        ok, failures = load.stop()
        self.assertEqual(failures, [], "the main listener must not notice")
        self.assertGreater(ok, 50)

    def test_a_request_in_flight_finishes_on_the_config_it_started_with(self):
        with h.connect(h.FE_EXTERNAL, self.fe_port) as held:
            request(held, "/hold?seconds=5")
            self.assertTrue(h.wait_for(lambda: [q for q in self.origin.requests() if q["target"] == "/hold?seconds=5"], 15),
                            "the held request never reached the origin")
            self.reload(self.fe, self.fe_text(0, paths=("/owa",)))  # /hold no longer published
            self.assertTrue(h.wait_for(lambda: "config version 2" in self.stderr(self.fe), 10), self.stderr(self.fe))
            r = read_response(held, 10)
        self.assertIsNotNone(r)
        self.assertEqual(r[0], 200, r[1])
        self.assertEqual(self.get("/hold?seconds=0")[0], 403, "a new connection gets the new config")


ADMIN = h.FE_EXTERNAL


class Admin(unittest.TestCase):
    """The admin endpoint, driven by curl and by `dmzproxy reload`."""

    def start(self, token=None):
        self.lab = h.Lab(prefix="dmz-ops-")
        self.addCleanup(self.lab.close)
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        self.port = h.free_port(h.FE_EXTERNAL)
        self.admin_port = h.free_port(ADMIN)
        self.token = token
        self.text = config(self.port, self.origin.port).replace(
            '[instance]\n', '[instance]\nadmin = "%s:%d"\n%s' % (
                ADMIN, self.admin_port, 'admin_token_file = "admin.token"\n' if token else ""), 1)
        if token:
            self.lab.write("admin.token", token + "\n")
        self.fe = self.lab.start_proxy("front-end", self.text, h.FE_EXTERNAL, self.port)
        self.fe.process.wait_listening(ADMIN, self.admin_port)
        self.url = "http://%s:%d" % (ADMIN, self.admin_port)

    def curl(self, path, *args):
        r = subprocess.run(["curl", "-s", "-S", "-o", "-", "-w", "\n%{http_code}", "--max-time", "10"] + list(args) +
                           [self.url + path], capture_output=True, text=True, timeout=30)
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    def reload_cli(self, *args):
        return subprocess.run([h.DMZPROXY, "reload", self.url] + list(args), capture_output=True, text=True, timeout=60)

    def get(self, path):
        with h.connect(h.FE_EXTERNAL, self.port) as s:
            request(s, path)
            return read_response(s, 10)[0]

    def test_metrics_count_requests_by_rule_status_and_fault(self):
        self.start()
        self.assertEqual([self.get("/owa/") for _ in range(3)] + [self.get("/nothing-here")], [200, 200, 200, 403])
        code, text = self.curl("/metrics")
        self.assertEqual(code, 200, text)
        self.assertIn('dmzproxy_requests_total{instance="front-end",rule="OWA",action="allow",status="2xx",fault=""} 3',
                      text)
        self.assertRegex(text, r'dmzproxy_requests_total\{instance="front-end",rule="default deny",action="deny",'
                               r'status="4xx",fault="no-rule-matched"\} 1')
        self.assertIn('dmzproxy_request_duration_seconds_count{instance="front-end"} 4', text)
        self.assertIn('dmzproxy_request_duration_seconds_bucket{instance="front-end",le="+Inf"} 4', text)
        self.assertRegex(text, r'dmzproxy_sent_bytes_total\{instance="front-end"\} [1-9]\d*')
        self.assertIn('dmzproxy_connections_active{instance="front-end",listener="web"} 0', text)
        self.assertIn('dmzproxy_config_version{instance="front-end"} 1', text)
        with h.connect(h.FE_EXTERNAL, self.port) as held:  # one open connection shows
            request(held, "/owa/")
            read_response(held, 10)
            self.assertTrue(h.wait_for(lambda: 'listener="web"} 1' in self.curl("/metrics")[1], 15))

    def test_status_and_reload_through_the_endpoint(self):
        self.start()
        self.get("/owa/")
        code, body = self.curl("/status")
        self.assertEqual(code, 200, body)
        st = json.loads(body)
        self.assertEqual((st["instance"], st["config"]["version"], st["draining"]), ("front-end", 1, False))
        self.assertEqual(st["listeners"][0]["bind"], ["%s:%d" % (h.FE_EXTERNAL, self.port)])
        self.assertEqual([(r["name"], r["hits"]) for r in st["rules"]], [("OWA", 1)])
        r = self.reload_cli()
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("config version 2", r.stdout)
        with open(self.fe.config, "w") as f:
            f.write(self.text.replace("[listeners.web]", "[listeners.web", 1))
        r = self.reload_cli()
        self.assertEqual(r.returncode, 1, r.stdout + r.stderr)
        self.assertIn("still running config version 2", r.stderr)
        self.assertRegex(r.stderr, re.escape(self.fe.config) + r":\d+:\d+")
        self.assertEqual(json.loads(self.curl("/status")[1])["config"]["version"], 2)
        self.assertEqual(self.curl("/reload")[0], 405, "GET must not reload")
        self.assertEqual(self.get("/owa/"), 200)

    def test_token_is_required_when_configured(self):
        self.start(token="s3cret-admin-token-0123456789")
        self.assertEqual(self.curl("/metrics")[0], 401)
        self.assertEqual(self.curl("/metrics", "-H", "Authorization: Bearer wrong-token-0123456789")[0], 401)
        self.assertEqual(self.curl("/metrics", "-H", "Authorization: Bearer s3cret-admin-token-0123456789")[0], 200)
        r = self.reload_cli()
        self.assertEqual(r.returncode, 1, "no token: refused")
        self.assertIn("HTTP 401", r.stderr)
        r = self.reload_cli("--token-file", self.lab.path("admin.token"))
        self.assertEqual(r.returncode, 0, r.stderr)

    def test_auth_failures_and_lockouts_are_counted(self):
        self.lab = h.Lab(prefix="dmz-ops-")
        self.addCleanup(self.lab.close)
        origin = self.lab.start_origin("origin", h.ORIGIN)
        store = self.lab.path("users.toml")
        subprocess.run([h.DMZPROXY, "users", "--file", store, "add", "alice", "--password-stdin"], input="alice-pw\n",
                       capture_output=True, text=True, timeout=60, check=True)
        self.port, self.admin_port = h.free_port(h.FE_EXTERNAL), h.free_port(ADMIN)
        self.url = "http://%s:%d" % (ADMIN, self.admin_port)
        text = h.instance_config("front-end", "front-end",
                                 {"name": "web", "protocol": "http", "bind": ["%s:%d" % (h.FE_EXTERNAL, self.port)],
                                  "authentication": "basic", "realm": "contoso",
                                  "lockout": {"threshold": 2, "window": "1m"}},
                                 [{"name": "OWA", "paths": ["/owa"], "users": ["*"],
                                   "target": {"address": h.ORIGIN, "port": origin.port}}])
        text = text.replace("[instance]\n", '[instance]\nuser_store = "%s"\nadmin = "%s:%d"\n' % (store, ADMIN, self.admin_port), 1)
        fe = self.lab.start_proxy("front-end", text, h.FE_EXTERNAL, self.port)
        fe.process.wait_listening(ADMIN, self.admin_port)

        def basic(user, pw):
            with h.connect(h.FE_EXTERNAL, self.port) as s:
                auth = base64.b64encode(("%s:%s" % (user, pw)).encode()).decode()
                s.sendall(("GET /owa/ HTTP/1.1\r\nHost: mail.contoso.com\r\nAuthorization: Basic %s\r\n\r\n" % auth).encode())
                return read_response(s, 15)[0]

        self.assertEqual([basic("alice", "wrong"), basic("alice", "wrong"), basic("alice", "alice-pw"),
                          basic("mallory", "x")], [401, 401, 401, 401])
        code, text = self.curl("/metrics")
        self.assertEqual(code, 200, text)
        self.assertIn('dmzproxy_auth_failures_total{instance="front-end",reason="bad password"} 2', text)
        self.assertIn('dmzproxy_auth_failures_total{instance="front-end",reason="locked out"} 1', text)
        self.assertIn('dmzproxy_auth_failures_total{instance="front-end",reason="unknown user"} 1', text)
        self.assertIn('dmzproxy_lockout_refusals_total{instance="front-end"} 1', text)

    def test_smtp_messages_and_relay_denials_are_counted(self):
        import smtp_support as ss
        self.lab = h.Lab(prefix="dmz-ops-")
        self.addCleanup(self.lab.close)
        sink = ss.start_sink(self.lab, "sink", h.ORIGIN)
        self.port, self.admin_port = h.free_port(h.FE_EXTERNAL), h.free_port(ADMIN)
        self.url = "http://%s:%d" % (ADMIN, self.admin_port)
        text = h.instance_config("front-end", "front-end",
                                 {"name": "smtp", "protocol": "smtp", "bind": ["%s:%d" % (h.FE_EXTERNAL, self.port)]},
                                 [{"name": "Mail", "kind": "server", "listeners": ["smtp"], "accepted_domains": ["contoso.com"],
                                   "target": {"address": h.ORIGIN, "port": sink.port}}])
        text = text.replace("[instance]\n", '[instance]\nadmin = "%s:%d"\n' % (ADMIN, self.admin_port), 1)
        fe = self.lab.start_proxy("front-end", text, h.FE_EXTERNAL, self.port)
        fe.process.wait_listening(ADMIN, self.admin_port)
        server = ["--server", "%s:%d" % (h.FE_EXTERNAL, self.port), "--local-interface", h.CLIENT, "--from", "a@example.net"]
        ok = ss.swaks(*server, "--to", "demo@contoso.com")
        self.assertEqual(ok.returncode, 0, ok)
        denied = ss.swaks(*server, "--to", "victim@fabrikam.com")
        self.assertIn("550", denied.codes(), denied)

        def counted():
            text = self.curl("/metrics")[1]
            return ('dmzproxy_smtp_messages_total{instance="front-end",outcome="accepted"} 1' in text and
                    'dmzproxy_smtp_messages_total{instance="front-end",outcome="refused"} 1' in text and
                    'dmzproxy_smtp_relay_denied_total{instance="front-end"} 1' in text)
        self.assertTrue(h.wait_for(counted, 15), self.curl("/metrics")[1])
        st = json.loads(self.curl("/status")[1])
        self.assertEqual(st["smtp"], {"accepted": 1, "refused": 1, "relay_denied": 1})

    def test_admin_off_loopback_without_token_is_a_config_error(self):
        lab = h.Lab(prefix="dmz-ops-")
        self.addCleanup(lab.close)
        path = lab.write("fe.toml", config(8080, 8081).replace('[instance]\n', '[instance]\nadmin = "10.1.2.3:9401"\n', 1))
        r = lab.check(path)
        self.assertNotEqual(r.returncode, 0)
        self.assertRegex(r.stdout + r.stderr, re.escape(path) + r":\d+:\d+: error.*not on loopback and has no token")


class LiveLogView(unittest.TestCase):
    """The live log view in a real browser: headless Chromium (Debian's package) loads the
    page from the front-end's admin endpoint while requests flow through both tiers, runs
    its script (--virtual-time-budget lets its polling happen) and hands back the DOM."""

    def setUp(self):
        self.lab = h.Lab(prefix="dmz-ops-")
        self.addCleanup(self.lab.close)
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        self.fe_port, self.be_port = h.free_port(h.FE_EXTERNAL), h.free_port(h.BE_PERIMETER)
        self.fe_admin, self.be_admin = h.free_port(h.FE_EXTERNAL), h.free_port(h.BE_PERIMETER)
        be = tier_config("back-end", h.BE_PERIMETER, self.be_port, [("Web", ["/owa"], h.ORIGIN, self.origin.port)])
        fe = tier_config("front-end", h.FE_EXTERNAL, self.fe_port, [("Web", ["/owa"], h.BE_PERIMETER, self.be_port)])
        be = be.replace("[instance]\n", '[instance]\nadmin = "%s:%d"\n' % (h.BE_PERIMETER, self.be_admin), 1)
        fe = fe.replace("[instance]\n", '[instance]\nadmin = "%s:%d"\n' % (h.FE_EXTERNAL, self.fe_admin), 1)
        self.be = self.lab.start_proxy("back-end", be, h.BE_PERIMETER, self.be_port)
        self.fe = self.lab.start_proxy("front-end", fe, h.FE_EXTERNAL, self.fe_port)
        self.be.process.wait_listening(h.BE_PERIMETER, self.be_admin)
        self.fe.process.wait_listening(h.FE_EXTERNAL, self.fe_admin)

    def get(self, path):
        with h.connect(h.FE_EXTERNAL, self.fe_port) as s:
            request(s, path)
            return read_response(s, 10)[0]

    def browse(self, query):
        fe, be = "http://%s:%d" % (h.FE_EXTERNAL, self.fe_admin), "http://%s:%d" % (h.BE_PERIMETER, self.be_admin)
        url = "%s/log?tiers=%s,%s%s" % (fe, fe, be, query)
        profile = tempfile.mkdtemp(prefix="dmz-chromium-", dir=self.lab.dir)
        r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + profile,
                            "--window-size=1400,900", "--virtual-time-budget=4000", "--dump-dom", url],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        self.last_dom = r.stdout
        rows = re.findall(r'<tr class="row" data-tier="([^"]*)" data-rule="([^"]*)" data-status="([^"]*)" '
                          r'data-fault="([^"]*)" data-path="([^"]*)"', r.stdout)
        hops = dict(re.findall(r'<div class="hop" data-name="([^"]*)" data-health="([^"]*)"', r.stdout))
        hits = re.findall(r'<li data-rule="([^"]*)" data-hits="(\d+)"', r.stdout)
        return rows, hops, hits

    def test_rows_filters_and_topology_in_chromium(self):
        self.assertEqual([self.get("/owa/") for _ in range(3)] + [self.get("/nothing-here")], [200, 200, 200, 403])
        flowing = Load(self.fe_port, clients=1, limit=40, pause=0.2)  # and more while the page loads
        self.addCleanup(flowing.stop)

        rows, hops, hits = self.browse("")
        tiers = {t for t, *_ in rows}
        self.assertEqual(tiers, {"front-end", "back-end"}, rows[:5])
        self.assertIn(("front-end", "default deny", "403", "no-rule-matched", "/nothing-here"), rows)
        self.assertTrue([r for r in rows if r[0] == "back-end" and r[2] == "200" and r[4] == "/owa/"])
        self.assertEqual(hops, {"clients": "ok", "front-end": "ok", "back-end": "ok"})
        self.assertTrue(all(int(n) >= 3 for rule, n in hits if rule == "Web"), hits)
        self.assertEqual(len([h for h in hits if h[0] == "Web"]), 2, "one rule list per tier")

        rows, _, _ = self.browse("&fault=no-rule-matched")
        self.assertEqual(rows, [("front-end", "default deny", "403", "no-rule-matched", "/nothing-here")])
        rows, _, _ = self.browse("&tier=back-end&status=2")
        self.assertTrue(rows)
        self.assertEqual({(t, s[0]) for t, _, s, _, _ in rows}, {("back-end", "2")})
        ok, failures = flowing.stop()
        self.assertEqual(failures, [])

    def test_long_lines_fit_a_1400_pixel_window(self):
        # A long request and a long detail wrap inside their columns; nothing (not the
        # duration column either) hides behind a horizontal scrollbar.
        self.assertEqual(self.get("/nothing-here/" + "segment-" * 80), 403)
        self.assertEqual(self.get("/owa/" + "x" * 300), 200)
        rows, _, _ = self.browse("")
        self.assertTrue([r for r in rows if r[4].startswith("/nothing-here/segment-")], rows[:5])
        self.assertIn('data-overflow="no"', self.last_dom)
        self.assertNotIn('data-overflow="yes"', self.last_dom)


class LogRotation(unittest.TestCase):
    def test_sigusr1_reopens_the_access_log(self):
        # logrotate's way: move the file away, signal, and the next lines go to a new file.
        lab = h.Lab(prefix="dmz-ops-")
        self.addCleanup(lab.close)
        origin = lab.start_origin("origin", h.ORIGIN)
        port = h.free_port(h.FE_EXTERNAL)
        fe = lab.start_proxy("front-end", config(port, origin.port), h.FE_EXTERNAL, port)
        with h.connect(h.FE_EXTERNAL, port) as s:
            request(s, "/owa/before")
            self.assertEqual(read_response(s, 10)[0], 200)
        self.assertTrue(h.wait_for(lambda: [r for r in fe.access() if r.get("path") == "/owa/before"], 5))
        rotated = fe.access_log + ".1"
        os.rename(fe.access_log, rotated)
        os.kill(fe.process.proc.pid, signal.SIGUSR1)
        self.assertTrue(h.wait_for(lambda: os.path.exists(fe.access_log), 5), "no new log file after SIGUSR1\n" +
                        fe.process.output())
        with h.connect(h.FE_EXTERNAL, port) as s:
            request(s, "/owa/after")
            self.assertEqual(read_response(s, 10)[0], 200)
        self.assertTrue(h.wait_for(lambda: [r for r in fe.access() if r.get("path") == "/owa/after"], 5))
        self.assertEqual([r["path"] for r in fe.access()], ["/owa/after"])
        self.assertEqual([r["path"] for r in h.read_jsonl(rotated)], ["/owa/before"])
        self.assertIn("access log reopened", fe.process.output())


if __name__ == "__main__":
    unittest.main()
