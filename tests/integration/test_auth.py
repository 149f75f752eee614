"""Basic pre-authentication at the front-end against the user store (issue 6, first part):
no unauthenticated request reaches the upstream when a rule requires a user; delegation
decides what the upstream gets of the credentials; `dmzproxy users` changes take effect
without a restart.

    DMZPROXY=build/dmzproxy python3 -m unittest -v test_auth
"""

import base64
import os
import subprocess
import time
import unittest

import harness as h


def add_user(store, name, password):
    subprocess.run([h.DMZPROXY, "users", "--file", store, "add", name, "--password-stdin"], input=password + "\n",
                   capture_output=True, text=True, timeout=60, check=True)


def basic(user, password):
    return ("Authorization", "Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode())


class BasicListener(unittest.TestCase):
    def setUp(self):
        self.lab = h.Lab(prefix="dmz-auth-")
        self.addCleanup(self.lab.close)
        self.store = self.lab.path("users.toml")
        self.users("add", "alice", "-g", "mail-users", password="alice-pw")
        self.users("add", "bob", password="bob-pw")
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        port = h.free_port(h.FE_EXTERNAL)
        target = '{ address = "%s", port = %d }' % (h.ORIGIN, self.origin.port)
        cfg = """
[instance]
name = "front-end"
user_store = "%s"

[listeners.web]
protocol = "http"
bind = ["%s:%d"]
authentication = "basic"
realm = "Contoso"

[[rules]]
name = "OWA for users"
action = "allow"
paths = ["/owa"]
users = ["*"]
delegation = "basic"
target = %s

[[rules]]
name = "EWS for mail-users"
action = "allow"
paths = ["/EWS"]
groups = ["mail-users"]
delegation = "none"
target = %s

[[rules]]
name = "Anonymous autodiscover"
action = "allow"
paths = ["/autodiscover"]
target = %s

[groups.mail-users]
""" % (self.store, h.FE_EXTERNAL, port, target, target, target)
        # One worker: each worker re-reads the store on its own, up to a second apart, so with
        # two a changed password may work on one connection and not yet on the next; these
        # tests are about the change taking effect at all.
        self.fe = self.lab.start_proxy("front-end", cfg, h.FE_EXTERNAL, port, threads=1)
        self.port = port

    def users(self, *args, password=None):
        res = subprocess.run([h.DMZPROXY, "users", "--file", self.store, *args, *(["--password-stdin"] if password else [])],
                             input=(password or "") + "\n", capture_output=True, text=True, timeout=60, check=False)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        return res

    def get(self, path, *headers):
        with h.HttpConnection.open(h.FE_EXTERNAL, self.port) as c:
            return c.request("GET", path, list(headers))

    def test_no_credentials_is_401_and_nothing_reaches_the_upstream(self):
        r = self.get("/owa/")
        self.assertEqual(r.status, 401, r)
        self.assertIn('Basic realm="Contoso"', r.header("WWW-Authenticate") or "")
        self.assertIn("auth-required", r.dmz_error() or "")
        self.assertEqual(self.origin.requests(), [])

    def test_wrong_password_and_unknown_user_look_the_same(self):
        for who in (basic("alice", "nope"), basic("mallory", "nope")):
            r = self.get("/owa/", who)
            self.assertEqual(r.status, 401, r)
            self.assertIn("auth-failed", r.dmz_error() or "")
        self.assertEqual(self.origin.requests(), [])
        failed = lambda: [e for e in self.fe.access() if e.get("fault") == "auth-failed"]
        h.wait_for(lambda: len(failed()) == 2, 10)  # the log is written asynchronously
        self.assertEqual(sorted(e["user"] for e in failed()), ["alice", "mallory"])
        # The rule the request was for, in the log (and so in the live view and /metrics).
        self.assertEqual([e["rule"] for e in failed()], ["OWA for users"] * 2)

    def test_valid_credentials_reach_the_upstream_with_basic_delegation(self):
        r = self.get("/owa/", basic("alice", "alice-pw"))
        self.assertEqual(r.status, 200, r)
        req = self.origin.requests()[-1]
        headers = {k.lower(): v for k, v in req["headers"]}
        self.assertTrue(headers.get("authorization", "").startswith("Basic "), headers)
        h.wait_for(lambda: len(self.fe.access()) == 1, 10)
        self.assertEqual(self.fe.access()[-1]["user"], "alice")

    def test_delegation_none_strips_the_credentials(self):
        r = self.get("/EWS/Exchange.asmx", basic("alice", "alice-pw"))
        self.assertEqual(r.status, 200, r)
        headers = {k.lower(): v for k, v in self.origin.requests()[-1]["headers"]}
        self.assertNotIn("authorization", headers)

    def test_group_rule_refuses_a_user_outside_the_group(self):
        r = self.get("/EWS/Exchange.asmx", basic("bob", "bob-pw"))
        self.assertEqual(r.status, 403, r)
        self.assertEqual(self.origin.requests(), [])

    def test_anonymous_rule_still_serves_anonymous_clients(self):
        self.assertEqual(self.get("/autodiscover/autodiscover.json").status, 200)

    def test_password_change_and_removal_take_effect_without_restart(self):
        self.assertEqual(self.get("/owa/", basic("alice", "alice-pw")).status, 200)
        # The front-end re-reads the store when its modification time changes (looked at no
        # more than once a second): ask until it has.
        self.users("passwd", "alice", password="new-pw")
        self.assertTrue(h.wait_for(lambda: self.get("/owa/", basic("alice", "alice-pw")).status == 401, 15),
                        "the old password still works")
        self.assertEqual(self.get("/owa/", basic("alice", "new-pw")).status, 200)
        self.users("del", "bob")
        self.assertTrue(h.wait_for(lambda: self.get("/autodiscover/x", basic("bob", "bob-pw")).status == 401, 15),
                        "a deleted user still gets in")


class StoreFile(unittest.TestCase):
    def test_hashes_are_salted_scrypt_and_the_file_is_private(self):
        lab = h.Lab(prefix="dmz-users-")
        self.addCleanup(lab.close)
        store = lab.path("users.toml")
        for name in ("a", "b"):
            subprocess.run([h.DMZPROXY, "users", "--file", store, "add", name, "--password-stdin"], input="same\n",
                           capture_output=True, text=True, timeout=60, check=True)
        import tomllib
        text = open(store).read()
        hashes = [u["password"] for u in tomllib.loads(text)["users"].values()]
        self.assertEqual(len(hashes), 2)
        self.assertTrue(all(x.startswith("$scrypt$ln=15,r=8,p=1$") for x in hashes), hashes)
        self.assertNotEqual(hashes[0], hashes[1], "same password, different salt")
        self.assertNotIn("same", text)
        self.assertEqual(os.stat(store).st_mode & 0o077, 0)
        res = subprocess.run([h.DMZPROXY, "users", "--file", store, "list"], capture_output=True, text=True, timeout=30)
        self.assertEqual(res.stdout.split(), ["a", "b"])


class CheckDelegation(unittest.TestCase):
    def run_check(self, listener_auth, delegation, extra=""):
        lab = h.Lab(prefix="dmz-deleg-")
        self.addCleanup(lab.close)
        cfg = lab.write("c.toml", """
[instance]
user_store = "users.toml"
[listeners.web]
protocol = "http"
bind = ["127.0.0.1:18999"]
authentication = "%s"
[[rules]]
name = "R"
action = "allow"
delegation = "%s"
%s
target = { address = "127.0.0.2", port = 80 }
""" % (listener_auth, delegation, extra))
        return subprocess.run([h.DMZPROXY, "check", "-q", "--json", "-c", cfg], capture_output=True, text=True, timeout=30)

    def codes(self, res):
        import json
        return [f["code"] for f in json.loads(res.stdout)["findings"]]

    def test_basic_delegation_on_an_unauthenticated_listener_is_an_error(self):
        res = self.run_check("none", "basic")
        self.assertEqual(res.returncode, 1)
        self.assertIn("AUTH001", self.codes(res))

    def test_pass_through_on_a_basic_listener_is_an_error(self):
        self.assertIn("AUTH001", self.codes(self.run_check("basic", "pass-through")))

    def test_users_on_a_listener_that_authenticates_nobody_is_an_error(self):
        self.assertIn("AUTH002", self.codes(self.run_check("none", "none", 'users = ["*"]')))

    def test_consistent_settings_are_clean_but_for_plain_http(self):
        res = self.run_check("basic", "basic", 'users = ["*"]')
        self.assertEqual(res.returncode, 0, res.stdout)
        # The only finding: passwords over plain http (the listener here is http).
        self.assertEqual(self.codes(res), ["AUTH004"], res.stdout)

    def test_forms_over_plain_http_is_a_warning(self):
        import json
        res = self.run_check("forms", "basic", 'users = ["*"]')
        [f] = json.loads(res.stdout)["findings"]
        self.assertEqual((f["code"], f["severity"]), ("AUTH004", "warning"), f)


if __name__ == "__main__":
    unittest.main()


class FormsSessions(unittest.TestCase):
    """Forms listeners that share one session key: a session made at one front-end is good
    at another; a front-end with another key refuses it; the upstream never sees the
    session cookie, but gets the user's Basic credentials (delegation basic)."""

    def setUp(self):
        self.lab = h.Lab(prefix="dmz-forms-")
        self.addCleanup(self.lab.close)
        self.store = self.lab.path("users.toml")
        add_user(self.store, "alice", "alice-pw")
        self.origin = self.lab.start_origin("origin", h.ORIGIN)
        shared = self.lab.path("shared-session.key")
        self.fes = []
        for i, key in enumerate((shared, shared, self.lab.path("other-session.key"))):
            port = h.free_port(h.FE_EXTERNAL)
            cfg = """
[instance]
name = "front-end-%d"
user_store = "%s"
session_key = "%s"
[listeners.web]
protocol = "http"
bind = ["%s:%d"]
authentication = "forms"
[[rules]]
name = "OWA"
action = "allow"
paths = ["/owa"]
users = ["*"]
delegation = "basic"
target = { address = "%s", port = %d }
""" % (i, self.store, key, h.FE_EXTERNAL, port, h.ORIGIN, self.origin.port)
            self.fes.append((self.lab.start_proxy("front-end-%d" % i, cfg, h.FE_EXTERNAL, port), port))

    def request(self, fe, method, path, headers=(), body=b""):
        with h.HttpConnection.open(h.FE_EXTERNAL, self.fes[fe][1]) as c:
            return c.request(method, path, list(headers), body=body)

    def login(self, fe, user, pw):
        body = ("username=%s&password=%s&url=%%2Fowa%%2F" % (user, pw)).encode()
        r = self.request(fe, "POST", "/dmzproxy/auth/login",
                         [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(body)))], body)
        return r

    def test_a_session_from_one_front_end_is_good_at_another_with_the_same_key(self):
        r = self.login(0, "alice", "alice-pw")
        self.assertEqual(r.status, 302, r)
        cookie = r.header("Set-Cookie")
        self.assertIn("HttpOnly", cookie)
        self.assertNotIn("Secure", cookie, "an http listener cannot use a Secure cookie")
        value = cookie.split(";")[0]
        self.assertEqual(self.origin.requests(), [], "the login is answered by the front-end")
        r = self.request(1, "GET", "/owa/", [("Cookie", "theme=dark; " + value + "; lang=en")])
        self.assertEqual(r.status, 200, r)
        headers = {k.lower(): v for k, v in self.origin.requests()[-1]["headers"]}
        self.assertEqual(headers.get("authorization"), "Basic " + base64.b64encode(b"alice:alice-pw").decode())
        self.assertEqual(headers.get("cookie"), "theme=dark; lang=en", "the session cookie stays at the front-end")
        n = len(self.origin.requests())
        r = self.request(2, "GET", "/owa/", [("Cookie", value)])
        self.assertEqual(r.status, 401, "another key, another session space")
        self.assertEqual(len(self.origin.requests()), n)
        self.assertTrue(os.path.exists(self.lab.path("other-session.key")))
        self.assertEqual(os.stat(self.lab.path("shared-session.key")).st_mode & 0o777, 0o600)

    def test_a_new_password_ends_the_session(self):
        value = self.login(0, "alice", "alice-pw").header("Set-Cookie").split(";")[0]
        self.assertEqual(self.request(0, "GET", "/owa/", [("Cookie", value)]).status, 200)
        subprocess.run([h.DMZPROXY, "users", "--file", self.store, "passwd", "alice", "--password-stdin"], input="new-pw\n",
                       capture_output=True, text=True, timeout=60, check=True)
        self.assertTrue(h.wait_for(lambda: self.request(0, "GET", "/owa/", [("Cookie", value)]).status == 401, 15),
                        "the old session still works after the password change")

    def test_login_refuses_what_is_not_a_small_form(self):
        r = self.request(0, "POST", "/dmzproxy/auth/login", [("Content-Type", "application/json"), ("Content-Length", "2")], b"{}")
        self.assertEqual(r.status, 400)
        big = b"username=alice&password=" + b"x" * 9000
        r = self.request(0, "POST", "/dmzproxy/auth/login",
                         [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(big)))], big)
        self.assertEqual(r.status, 413)
        self.assertEqual(self.origin.requests(), [])


class Lockout(unittest.TestCase):
    """Soft lockout: after N bad passwords a user's attempts fail like a bad password until
    the window passes; an address with too many failures is refused too. Nothing reaches the
    upstream meanwhile, and the log says why."""

    def start(self, lockout):
        self.lab = h.Lab(prefix="dmz-lockout-")
        self.addCleanup(self.lab.close)
        store = self.lab.path("users.toml")
        for name, pw in (("alice", "alice-pw"), ("bob", "bob-pw")):
            add_user(store, name, pw)
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
lockout = %s
[[rules]]
name = "OWA"
action = "allow"
paths = ["/owa"]
users = ["*"]
target = { address = "%s", port = %d }
""" % (store, h.FE_EXTERNAL, self.port, lockout, h.ORIGIN, self.origin.port)
        self.fe = self.lab.start_proxy("front-end", cfg, h.FE_EXTERNAL, self.port)

    def get(self, user, pw, source=h.CLIENT):
        with h.HttpConnection.open(h.FE_EXTERNAL, self.port, source=source) as c:
            return c.request("GET", "/owa/", [basic(user, pw)])

    def test_lockout_after_n_failures_then_recovery_after_the_window(self):
        # 10 s: the three failures must fit in the window even when each check waits for a
        # loaded CPU (scrypt runs niced).
        self.start('{ threshold = 3, window = "10s", address_threshold = 100 }')
        for _ in range(3):
            t_last_failure = time.monotonic()
            self.assertEqual(self.get("alice", "wrong").status, 401)
        locked = self.get("alice", "alice-pw")
        self.assertEqual(locked.status, 401, "the right password is refused while locked out")
        wrong = self.get("alice", "wrong-again")
        self.assertEqual((locked.status, locked.dmz_error()[1]), (wrong.status, wrong.dmz_error()[1]),
                         "a locked-out user gets the same answer as a wrong password")
        self.assertEqual(self.get("bob", "bob-pw").status, 200, "other users are not affected")
        self.assertTrue(h.wait_for(lambda: any("locked out" in e.get("detail", "") for e in self.fe.access()), 10),
                        "no 'locked out' in the access log")
        self.assertEqual([q for q in self.origin.requests() if "alice" in str(q["headers"])], [])
        # Attempts refused by the lockout do not extend it: ask until the 10 s window has passed.
        self.assertTrue(h.wait_for(lambda: self.get("alice", "alice-pw").status == 200, 20, interval=0.2),
                        "not recovered after the window")
        self.assertGreaterEqual(time.monotonic() - t_last_failure, 10.0, "the lockout ended early")

    def test_address_with_too_many_failures_is_refused(self):
        self.start('{ threshold = 0, window = "30s", address_threshold = 4 }')
        for i in range(4):
            self.assertEqual(self.get("user%d" % i, "guess").status, 401)
        self.assertEqual(self.get("bob", "bob-pw").status, 401, "the address is blocked even with good credentials")
        self.assertEqual(self.get("bob", "bob-pw", source=h.lab_address("127.10.0.101")).status, 200, "other addresses are not")
        self.assertTrue(h.wait_for(lambda: any("too many failures" in e.get("detail", "") for e in self.fe.access()), 10),
                        "no 'too many failures' in the access log")
