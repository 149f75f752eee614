"""Password checks off the event loop (issue 16, item 4): scrypt runs on a small bounded
pool. A burst of wrong passwords fills its queue and hears 503 with the fault class
`overloaded` at once, while a user whose password is cached is served on the same worker
meanwhile.

    DMZPROXY=build/dmzproxy python3 -m unittest -v test_auth_pool
"""

import base64
import concurrent.futures
import subprocess
import unittest

import harness as h

BURST = 60  # far more than the pool's 2 threads and 16 waiting places


def basic(user, password):
    return ("Authorization", "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode())


class SaturatedPasswordChecks(unittest.TestCase):
    def setUp(self):
        self.lab = h.Lab(prefix="dmz-auth-pool-")
        self.addCleanup(self.lab.close)
        store = self.lab.path("users.toml")
        subprocess.run([h.DMZPROXY, "users", "--file", store, "add", "alice", "--password-stdin"], input="alice-pw\n",
                       capture_output=True, text=True, timeout=60, check=True)
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        self.port = h.free_port(h.FE_EXTERNAL)
        cfg = """
[instance]
name = "front-end"
user_store = "%s"

[listeners.web]
protocol = "http"
bind = ["%s:%d"]
authentication = "basic"
lockout = { threshold = 0, address_threshold = 0 }

[[rules]]
name = "OWA for users"
action = "allow"
paths = ["/owa"]
users = ["*"]
target = { address = "%s", port = %d }
""" % (store, h.FE_EXTERNAL, self.port, h.ORIGIN, self.origin.port)
        # One worker: the burst and the cached user share its event loop.
        self.fe = self.lab.start_proxy("front-end", cfg, h.FE_EXTERNAL, self.port, threads=1)

    def get(self, conn, who):
        # Generous: on a loaded machine the checks that did get a place take a while.
        return conn.request("GET", "/owa/", [who], timeout=60.0)

    def test_a_burst_hears_503_overloaded_and_a_cached_user_is_served_meanwhile(self):
        alice = h.HttpConnection.open(h.FE_EXTERNAL, self.port)
        self.addCleanup(alice.close)
        self.assertEqual(self.get(alice, basic("alice", "alice-pw")).status, 200)  # now cached
        conns = [h.HttpConnection.open(h.FE_EXTERNAL, self.port) for _ in range(BURST)]
        for c in conns:
            self.addCleanup(c.close)
        with concurrent.futures.ThreadPoolExecutor(BURST) as pool:
            flood = [pool.submit(self.get, c, basic("mallory-%d" % i, "guess")) for i, c in enumerate(conns)]
            # While the burst waits for the pool, the cached user gets through on the same worker.
            during = [self.get(alice, basic("alice", "alice-pw")).status for _ in range(5)]
            statuses = [f.result().status for f in flood]
            busy = [f.result() for f in flood if f.result().status == 503]
        self.assertEqual(during, [200] * 5)
        self.assertEqual(sorted(set(statuses) - {401, 503}), [], statuses)
        self.assertTrue(busy, "no request heard 503 though %d checks came at once: %s" % (BURST, statuses))
        self.assertIn("overloaded", busy[0].dmz_error() or "")
        self.assertIn(401, statuses, "some of the burst were checked (and refused)")
        overloaded = lambda: [e for e in self.fe.access() if e.get("fault") == "overloaded"]
        self.assertTrue(h.wait_for(lambda: len(overloaded()) == len(busy), 10), "the access log counts each 503")
        self.assertEqual(overloaded()[0]["status"], 503)
        # Once the burst is over, a new password check works again.
        fresh = h.HttpConnection.open(h.FE_EXTERNAL, self.port)
        self.addCleanup(fresh.close)
        self.assertEqual(self.get(fresh, basic("mallory", "guess")).status, 401)
        self.assertEqual(len(self.origin.requests()), 6, "only alice reached the upstream")


if __name__ == "__main__":
    unittest.main()
