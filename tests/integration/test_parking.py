"""Parked keep-alive connections: a client connection idle between requests leaves its
session for the worker's parking lot (about 100 bytes instead of about 2 KiB) and becomes a
session again when the client speaks. Raw sockets and Python's TLS client are the clients;
the admin endpoint's dmzproxy_connections_parked gauge shows what is parked.

    DMZPROXY=build/dmzproxy python3 -m unittest -v test_parking
"""

import os
import re
import signal
import subprocess
import time
import unittest

import harness as h

ADMIN = h.FE_EXTERNAL
# A connection parks 50 ms after its last answer (up to one 50 ms deadline tick later).
PARKED_BY = 10.0   # generous: a loaded machine answers /metrics slowly


def request_bytes(path, host=h.PUBLIC_NAME):
    return ("GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path, host)).encode()


def read_response(sock, timeout=10):
    """One Content-Length framed response: (status, body), or None at EOF."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    text = head.decode("latin-1")
    m = re.search(r"(?im)^content-length:\s*(\d+)", text)
    length = int(m.group(1)) if m else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(text.split(" ")[1]), body[:length], body[length:]


class Parking(unittest.TestCase):
    def start(self, tls=False, idle="5m", paths=("/owa", "/ews"), extra_args=()):
        self.lab = h.Lab(prefix="dmz-park-")
        self.addCleanup(self.lab.close)
        self.tls = tls
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        self.port = h.free_port(h.FE_EXTERNAL)
        self.admin_port = h.free_port(ADMIN)
        self.paths = list(paths)
        self.idle = idle
        if tls:
            pki = h.Pki(self.lab.path("pki"))
            self.cert = pki.leaf("mail", [h.PUBLIC_NAME])
            self.ca = pki.ca_cert
        self.fe = self.lab.start_proxy("front-end", self.config_text(), h.FE_EXTERNAL, self.port,
                                       extra_args=list(extra_args))
        self.fe.process.wait_listening(ADMIN, self.admin_port)

    def config_text(self, paths=None, port=None):
        listener = {"name": "web", "protocol": "https" if self.tls else "http",
                    "bind": ["%s:%d" % (h.FE_EXTERNAL, port or self.port)], "authentication": "none",
                    "timeouts": {"idle": self.idle}}
        if self.tls:
            listener["certificates"] = [{"names": [h.PUBLIC_NAME], "cert": self.cert[0], "key": self.cert[1]}]
            listener["default_certificate"] = h.PUBLIC_NAME
        text = h.instance_config("front-end", "front-end", listener,
                                 [{"name": "OWA", "paths": list(paths or self.paths),
                                   "target": {"address": h.ORIGIN, "port": self.origin.port}}])
        return text.replace("[instance]\n", '[instance]\nadmin = "%s:%d"\n' % (ADMIN, self.admin_port), 1)

    def connect(self):
        s = h.connect(h.FE_EXTERNAL, self.port, ca_file=self.ca if self.tls else None)
        self.addCleanup(s.close)
        return s

    def metric(self, name):
        r = subprocess.run(["curl", "-s", "-S", "--max-time", "10", "http://%s:%d/metrics" % (ADMIN, self.admin_port)],
                           capture_output=True, text=True, timeout=30)
        m = re.search(r"(?m)^%s\{[^}]*\} (-?\d+)$" % re.escape(name), r.stdout)
        self.assertIsNotNone(m, "%s not in /metrics:\n%s" % (name, r.stdout))
        return int(m.group(1))

    def parked(self):
        return self.metric("dmzproxy_connections_parked")

    def wait_parked(self, n, timeout=PARKED_BY):
        ok = h.wait_for(lambda: self.parked() == n, timeout)
        self.assertTrue(ok, "expected %d parked connections, /metrics says %d\n%s" % (n, self.parked(), self.lab.diagnostics()))

    def get(self, s, path="/owa/"):
        s.sendall(request_bytes(path))
        return read_response(s)

    def conns_of(self, prefix):
        return [e["conn"] for e in self.fe.access() if e.get("path", "").startswith(prefix)]

    # ------------------------------------------------------------------------------------

    def park_and_wake(self):
        s = self.connect()
        for i in range(3):
            r = self.get(s, "/owa/cycle-%d" % i)
            self.assertIsNotNone(r, "cycle %d: the connection closed\n%s" % (i, self.lab.diagnostics()))
            self.assertEqual(r[0], 200, "cycle %d" % i)
            self.wait_parked(1)
            self.assertEqual(self.metric("dmzproxy_connections_active"), 1, "a parked connection still counts as open")
        r = self.get(s, "/owa/cycle-3")
        self.assertEqual(r[0], 200)
        # The access-log line is written just after the answer.
        h.wait_for(lambda: len(self.conns_of("/owa/cycle-")) == 4, 5.0)
        conns = self.conns_of("/owa/cycle-")
        self.assertEqual(len(conns), 4, self.fe.access())
        self.assertEqual(len(set(conns)), 1, "one client connection, one id in the access log: %r" % conns)
        # The origin saw every request (nothing answered from the lot).
        self.assertEqual(len([q for q in self.origin.requests() if q["target"].startswith("/owa/cycle-")]), 4)

    def test_plain_connection_parks_and_wakes_for_each_request(self):
        self.start()
        self.park_and_wake()

    def test_tls_connection_parks_and_wakes_for_each_request(self):
        self.start(tls=True)
        self.park_and_wake()

    def test_parked_connection_closes_at_the_idle_timeout(self):
        self.start(idle="3s")
        s = self.connect()
        t0 = time.monotonic()
        self.assertEqual(self.get(s)[0], 200)
        self.wait_parked(1, timeout=2.5)        # parked well before the idle timeout
        self.assertTrue(h.closed_within(s, 10.0), "the parked connection outlived its 3 s idle timeout")
        took = time.monotonic() - t0
        self.assertGreater(took, 2.8, "closed before the idle timeout")
        self.assertTrue(h.wait_for(lambda: self.parked() == 0 and self.metric("dmzproxy_connections_active") == 0, 10.0),
                        "the closed connection is still counted")

    def test_client_leaving_while_parked_is_forgotten(self):
        self.start()
        socks = [self.connect() for _ in range(5)]
        for s in socks:
            self.assertEqual(self.get(s)[0], 200)
        self.wait_parked(5)
        for s in socks[:3]:
            s.close()
        self.assertTrue(h.wait_for(lambda: self.parked() == 2 and self.metric("dmzproxy_connections_active") == 2, 10.0),
                        "parked %d, active %d" % (self.parked(), self.metric("dmzproxy_connections_active")))
        for s in socks[3:]:
            self.assertEqual(self.get(s)[0], 200)

    def test_request_arriving_in_pieces_and_pipelined_after_a_park(self):
        self.start()
        s = self.connect()
        self.assertEqual(self.get(s)[0], 200)
        self.wait_parked(1)
        whole = request_bytes("/owa/pieces")
        s.sendall(whole[:10])
        # The first piece wakes the parked connection (a session again) before the rest comes.
        self.assertTrue(h.wait_for(lambda: self.parked() == 0, 10), "the first piece did not wake the connection")
        s.sendall(whole[10:])
        r = read_response(s)
        self.assertEqual(r[0], 200, r)
        self.wait_parked(1)
        s.sendall(request_bytes("/owa/pipe-1") + request_bytes("/owa/pipe-2") + request_bytes("/nothing"))
        first = read_response(s)
        self.assertEqual(first[0], 200)
        rest = first[2]
        # The second and third answers may already sit in the first read's tail.
        s2 = _Prefixed(s, rest)
        second = read_response(s2)
        third = read_response(_Prefixed(s, second[2]))
        self.assertEqual((second[0], third[0]), (200, 403))
        self.assertEqual([q["target"] for q in self.origin.requests() if q["target"].startswith("/owa/p")],
                         ["/owa/pieces", "/owa/pipe-1", "/owa/pipe-2"])

    def test_many_idle_connections_all_park_then_all_answer(self):
        # Beyond 64 sessions idling, a new connection parks right after its first request.
        self.start()
        n = 300
        socks = [self.connect() for _ in range(n)]
        for i, s in enumerate(socks):
            self.assertEqual(self.get(s, "/owa/many-a-%d" % i)[0], 200)
        self.wait_parked(n, timeout=5.0)
        self.assertEqual(self.metric("dmzproxy_connections_active"), n)
        for i, s in enumerate(socks):
            s.sendall(request_bytes("/owa/many-b-%d" % i))
        for i, s in enumerate(socks):
            r = read_response(s)
            self.assertIsNotNone(r, "connection %d closed" % i)
            self.assertEqual(r[0], 200, "connection %d" % i)
        h.wait_for(lambda: len(self.conns_of("/owa/many-b-")) == n, 5.0)
        a = {e["path"][len("/owa/many-a-"):]: e["conn"] for e in self.fe.access() if e.get("path", "").startswith("/owa/many-a-")}
        b = {e["path"][len("/owa/many-b-"):]: e["conn"] for e in self.fe.access() if e.get("path", "").startswith("/owa/many-b-")}
        self.assertEqual(len(a), n)
        self.assertEqual(a, b, "each woken connection kept its id")
        for s in socks:
            s.close()
        self.assertTrue(h.wait_for(lambda: self.metric("dmzproxy_connections_active") == 0 and self.parked() == 0, 5.0))

    def test_drain_closes_parked_connections_at_once(self):
        self.start()
        s = self.connect()
        self.assertEqual(self.get(s)[0], 200)
        self.wait_parked(1)
        t0 = time.monotonic()
        os.kill(self.fe.process.proc.pid, signal.SIGTERM)
        self.assertTrue(h.closed_within(s, 2.0), "a parked connection must close at once on a drain")
        try:
            self.fe.process.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.fail("the drain waited for a parked connection")
        self.assertLess(time.monotonic() - t0, 3.0)
        self.assertEqual(self.fe.process.proc.returncode, 0)

    def reload(self, text):
        self.lab.write("front-end.toml", text)
        r = subprocess.run([h.DMZPROXY, "reload", "http://%s:%d" % (ADMIN, self.admin_port)], capture_output=True,
                           text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_woken_request_is_judged_by_the_config_reloaded_meanwhile(self):
        self.start()
        s = self.connect()
        self.assertEqual(self.get(s)[0], 200)
        self.wait_parked(1)
        self.reload(self.config_text(paths=["/ews"]))
        r = self.get(s, "/owa/after-reload")
        self.assertEqual(r[0], 403, "the woken request must meet the reloaded rules")
        self.assertEqual(self.get(s, "/ews/after-reload")[0], 200)
        # Its listener moved to another port: the parked connection is closed when it wakes.
        self.wait_parked(1)
        self.reload(self.config_text(port=h.free_port(h.FE_EXTERNAL)))
        s.sendall(request_bytes("/owa/gone"))
        self.assertIsNone(read_response(s, 5), "a connection of a listener that went away must close")
        self.assertTrue(h.wait_for(lambda: self.parked() == 0 and self.metric("dmzproxy_connections_active") == 0, 10.0))


class _Prefixed:
    """A socket whose first reads return bytes already received."""

    def __init__(self, sock, prefix):
        self.sock, self.prefix = sock, prefix

    def settimeout(self, t):
        self.sock.settimeout(t)

    def recv(self, n):
        if self.prefix:
            out, self.prefix = self.prefix, b""
            return out
        return self.sock.recv(n)


if __name__ == "__main__":
    unittest.main()
