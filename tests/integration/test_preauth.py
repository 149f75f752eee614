"""Pre-authentication through the live lab: the `pre-authentication` scenario
(topology/scenarios/lab/pre-authentication.toml), with its session and lockout times
shortened so that expiry and recovery can be watched, driven by curl and swaks as a client
on External. The host's statistics prove that no unauthenticated request reached it.

    DMZPROXY=build/dmzproxy DMZ_SOURCE_DIR=. python3 -m unittest -v test_preauth

The lab runs with `--shift SHIFT` (harness.SHIFT, this module's own), beside any other.
"""

import base64
import collections
import glob
import json
import os
import re
import secrets
import shutil
import struct
import subprocess
import tempfile
import time
import unittest
import zlib

import test_lab
from test_lab import DMZPROXY, PUBLIC_NAME, SOURCE_DIR, lab_down, lab_status, lab_up, logs_tail, wait_until

SCENARIO = os.path.abspath(os.path.join(SOURCE_DIR, "topology", "scenarios", "lab", "pre-authentication.toml"))
IDLE_S = 3
LIFETIME_S = 8
LOCK_THRESHOLD = 3
LOCK_WINDOW_S = 10  # the failures must fit in it even when each scrypt check waits for a loaded CPU


def shortened_scenario(directory):
    """The scenario with short session and lockout times, config paths made absolute."""
    with open(SCENARIO, encoding="utf-8") as f:
        text = f.read()
    text = text.replace('session = { idle = "15m", lifetime = "8h", same_site = "Lax" }',
                        'session = { idle = "%ds", lifetime = "%ds", same_site = "Lax" }' % (IDLE_S, LIFETIME_S))
    text = text.replace('lockout = { threshold = 5, address_threshold = 20, window = "15m" }',
                        'lockout = { threshold = %d, address_threshold = 50, window = "%ds" }' % (
                            LOCK_THRESHOLD, LOCK_WINDOW_S))
    text = re.sub(r'config = "(\.\./[^"]+)"',
                  lambda m: 'config = "%s"' % os.path.normpath(os.path.join(os.path.dirname(SCENARIO), m.group(1))),
                  text)
    assert '"%ds"' % IDLE_S in text and "threshold = %d" % LOCK_THRESHOLD in text, "the scenario file changed"
    path = os.path.join(directory, "pre-authentication-short.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@unittest.skipUnless(os.path.exists(DMZPROXY), "the dmzproxy binary (DMZPROXY) is missing")
class PreAuthenticationLab(unittest.TestCase):
    curl = test_lab.LabThroughBothTiers.__dict__["curl"]
    stats = test_lab.LabThroughBothTiers.__dict__["stats"]
    swaks = test_lab.LabThroughBothTiers.swaks
    derive = test_lab.LabThroughBothTiers.__dict__["derive"]

    @classmethod
    def setUpClass(cls):
        cls.state = tempfile.mkdtemp(prefix="dmz-preauth-")
        cls.tmp = tempfile.mkdtemp(prefix="dmz-preauth-client-")
        cls.addClassCleanup(cls.stop_lab)     # also when setUpClass fails half-way
        cls.topology = shortened_scenario(cls.tmp)
        # Users of their own for wrong passwords and the lockout, so that neither locks out
        # the demo user the other tests sign in with. They go into the lab's user store
        # before the lab starts (lab up adds its demo user beside them), so that no test
        # waits for the front-end to notice a changed store.
        cls.wrong_user = "wrong-" + secrets.token_hex(3)
        cls.lock_user = "lock-" + secrets.token_hex(3)
        cls.lock_password = secrets.token_urlsafe(12)
        store = os.path.join(cls.state, "users.toml")
        for name, pw in ((cls.wrong_user, secrets.token_urlsafe(12)), (cls.lock_user, cls.lock_password)):
            res = subprocess.run([DMZPROXY, "users", "--file", store, "add", name, "--password-stdin"], input=pw + "\n",
                                 capture_output=True, text=True, timeout=60, check=False)
            assert res.returncode == 0, res.stderr
        res = lab_up(cls.state, cls.topology)
        if res.returncode != 0:
            raise AssertionError("lab up failed (exit %d):\n%s\n%s\n%s" % (res.returncode, res.stdout, res.stderr,
                                                                            logs_tail(cls.state)))
        rc, st = lab_status(cls.state)
        cls.status = st
        cls.derive(st)

    @classmethod
    def stop_lab(cls):
        res = lab_down(cls.state)
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if not os.environ.get("DMZ_KEEP_LAB"):
            shutil.rmtree(cls.state, ignore_errors=True)
        if res.returncode != 0:
            raise AssertionError("lab down failed: %s" % res.stderr)

    # -- helpers

    def host_requests(self):
        """How many requests the simulated Exchange host has seen, over every path."""
        return sum(self.stats()["requests"].values())

    def fe_log(self):
        return test_lab.read_bytes(os.path.join(self.state, "logs", "front-end.jsonl")).decode("utf-8", "replace")

    def fe_records(self):
        return [json.loads(l) for l in self.fe_log().splitlines() if l.strip()]

    def wait_record(self, pred, timeout=5):
        return wait_until(lambda: next((r for r in self.fe_records() if pred(r)), None), timeout)

    def login(self, jar, user=None, password=None, url="/owa/"):
        return self.curl("/dmzproxy/auth/login", "-c", jar, "-b", jar, "--data-urlencode", "username=%s" % (user or self.user),
                         "--data-urlencode", "password=%s" % (password if password is not None else self.password),
                         "--data-urlencode", "url=%s" % url)

    def jar(self):
        return os.path.join(self.tmp, "jar-" + secrets.token_hex(4))

    def cookie_from_jar(self, jar):
        with open(jar, encoding="ascii") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 7 and parts[5] == "DmzSession":
                    return parts[6]
        return None

    # -- Basic (ActiveSync, Outlook, EWS, scripts)

    def test_without_credentials_401_with_realm_and_nothing_reaches_the_host(self):
        before = self.host_requests()
        for path in ("/owa/", "/EWS/Exchange.asmx", "/mapi/emsmdb", "/autodiscover/autodiscover.json?Protocol=EWS"):
            status, headers, body, _ = self.curl(path)
            self.assertEqual(status, 401, (path, body))
            self.assertIn('Basic realm="Contoso Mail"', " ".join(headers.get("www-authenticate", [])), headers)
            self.assertIn("auth-required", " ".join(headers.get("x-dmz-error", [])), headers)
        status, _, _, _ = self.curl("/Microsoft-Server-ActiveSync", "-X", "OPTIONS")
        self.assertEqual(status, 401)
        # Then a request that does reach the host: once it is counted, the refused ones before
        # it have had every chance to arrive.
        status, _, body, _ = self.curl("/owa/", "-u", "%s:%s" % (self.user, self.password))
        self.assertEqual(status, 200, body)
        self.assertEqual(self.host_requests(), before + 1, "an unauthenticated request reached Exchange")

    def test_basic_credentials_reach_the_host_as_the_user(self):
        status, _, body, _ = self.curl("/owa/", "-u", "%s:%s" % (self.user, self.password))
        self.assertEqual(status, 200, body)
        self.assertIn('<td id="user">%s</td>' % self.user, body)
        rec = self.wait_record(lambda r: r.get("path") == "/owa/" and r.get("status") == 200)
        self.assertIsNotNone(rec)
        self.assertEqual(rec["user"], self.user)

    def test_activesync_with_basic(self):
        status, headers, body, _ = self.curl("/Microsoft-Server-ActiveSync", "-X", "OPTIONS",
                                             "-u", "%s:%s" % (self.user, self.password))
        self.assertEqual(status, 200, body)
        self.assertIn("ms-asprotocolversions", headers)
        status, _, _, _ = self.curl("/Microsoft-Server-ActiveSync", "-X", "OPTIONS", "-u", "%s:wrong" % self.wrong_user)
        self.assertEqual(status, 401)

    def test_wrong_and_unknown_users_get_the_same_answer(self):
        a = self.curl("/owa/", "-u", "%s:not-it" % self.wrong_user)
        b = self.curl("/owa/", "-u", "nobody-%s:not-it" % secrets.token_hex(3))
        self.assertEqual(a[0], 401)
        self.assertEqual(b[0], 401)
        strip = lambda s: re.sub(r"'[^']*'", "''", s)
        self.assertEqual(strip(" ".join(a[1]["x-dmz-error"])), strip(" ".join(b[1]["x-dmz-error"])))

    # -- forms (browsers)

    def test_browser_is_sent_to_the_login_page(self):
        status, headers, _, _ = self.curl("/owa/?path=/mail", "-H", "Accept: text/html,application/xhtml+xml")
        self.assertEqual(status, 302)
        self.assertEqual(headers["location"], ["/dmzproxy/auth/login?url=%2Fowa%2F%3Fpath%3D%2Fmail"])
        status, headers, body, _ = self.curl("/dmzproxy/auth/login?url=%2Fowa%2F")
        self.assertEqual(status, 200)
        self.assertRegex(body, r'<input type="password" id="password" name="password"')
        self.assertIn('value="/owa/"', body)
        self.assertIn("DENY", headers.get("x-frame-options", [""])[0])

    def test_forms_login_session_and_logout(self):
        jar = self.jar()
        before = self.host_requests()
        status, headers, body, _ = self.login(jar, url="/owa/?x=1")
        self.assertEqual(status, 302, body)
        self.assertEqual(headers["location"], ["/owa/?x=1"])
        cookie = headers["set-cookie"][0]
        for attr in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/"):
            self.assertIn(attr, cookie)
        self.assertEqual(self.host_requests(), before, "the login itself is answered by the front-end")
        status, _, body, _ = self.curl("/owa/", "-b", jar, "-c", jar, "-H", "Accept: text/html")
        self.assertEqual(status, 200, body)
        self.assertIn('<td id="user">%s</td>' % self.user, body)   # delegated to Exchange as Basic
        value = self.cookie_from_jar(jar)
        self.assertTrue(value)
        # Logout (OWA's own logoff URL): the cookie is cleared, and even replayed it is dead.
        status, headers, body, _ = self.curl("/owa/logoff.owa", "-b", jar, "-c", jar)
        self.assertEqual(status, 200)
        self.assertIn("Max-Age=0", headers["set-cookie"][0])
        before = self.host_requests()
        status, headers, _, _ = self.curl("/owa/", "-H", "Cookie: DmzSession=" + value, "-H", "Accept: text/html")
        self.assertEqual(status, 302)
        self.assertIn("reason=expired", headers["location"][0])
        self.assertEqual(self.host_requests(), before)
        rec = self.wait_record(lambda r: "logged out" in (r.get("detail") or ""))
        self.assertIsNotNone(rec, self.fe_log()[-2000:])

    def test_wrong_password_on_the_form(self):
        jar = self.jar()
        status, headers, body, _ = self.login(jar, user=self.wrong_user, password="wrong")
        self.assertEqual(status, 200)
        self.assertIn("The user name or password is incorrect.", body)
        self.assertNotIn("set-cookie", headers)

    def test_sign_in_page_in_chromium(self):
        """The page a user sees: rendered by a real browser from the bytes the proxy sent."""
        status, _, body, _ = self.login(self.jar(), user=self.wrong_user, password="wrong")
        self.assertEqual(status, 200)
        page = os.path.join(self.tmp, "signin-%s.html" % secrets.token_hex(3))
        with open(page, "w", encoding="utf-8") as f:
            f.write(body)
        profile = tempfile.mkdtemp(prefix="dmz-chromium-", dir=self.tmp)
        base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--user-data-dir=" + profile,
                "--window-size=1400,900"]
        dom = subprocess.run(base + ["--dump-dom", "file://" + page], capture_output=True, text=True, timeout=120)
        self.assertEqual(dom.returncode, 0, dom.stderr[-2000:])
        # Accessible: each field has its own label, the error is announced, the realm is the heading.
        for field in ("username", "password"):
            self.assertRegex(dom.stdout, r'<label for="%s">' % field)
            self.assertRegex(dom.stdout, r'<input[^>]* id="%s"' % field)
        self.assertIn('role="alert"', dom.stdout)
        self.assertRegex(dom.stdout, r"<h1>[^<]+</h1>")
        shot = os.path.join(self.tmp, "signin.png")
        r = subprocess.run(base + ["--screenshot=" + shot, "file://" + page], capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr[-2000:])
        width, height, pixels = read_png(shot)
        self.assertEqual((width, height), (1400, 900))
        colours = collections.Counter(pixels)
        near = lambda rgb, tol=6: sum(n for c, n in colours.items() if all(abs(a - b) <= tol for a, b in zip(c, rgb)))
        self.assertGreater(near((15, 108, 189)), 20000, "the blue band with the realm is missing")      # header
        self.assertGreater(near((253, 231, 233)), 3000, "the wrong-password message is not visible")  # error box
        self.assertGreater(near((243, 242, 241)), 500000, "the page background is not the quiet grey")

    def test_session_idle_expiry(self):
        jar = self.jar()
        self.assertEqual(self.login(jar)[0], 302)
        self.assertEqual(self.curl("/owa/", "-b", jar, "-c", jar)[0], 200)
        time.sleep(IDLE_S + 1.2)    # deliberate: the session must sit idle past its idle timeout
        before = self.host_requests()
        status, headers, _, _ = self.curl("/owa/", "-b", jar, "-c", jar, "-H", "Accept: text/html")
        self.assertEqual(status, 302)
        self.assertIn("reason=expired", headers["location"][0])
        self.assertEqual(self.host_requests(), before)
        self.assertIsNotNone(self.wait_record(lambda r: "idle too long" in (r.get("detail") or "")))

    def test_session_lifetime_ends_an_active_session(self):
        jar = self.jar()
        self.assertEqual(self.login(jar)[0], 302)
        start = time.monotonic()
        statuses = []
        # A request started every second keeps it from idling (however long each takes); the
        # lifetime still ends it. Bounded by the lifetime and a few seconds more.
        while time.monotonic() - start < LIFETIME_S + 5:
            sent = time.monotonic()
            statuses.append((round(sent - start, 1), self.curl("/owa/", "-b", jar, "-c", jar)[0]))
            if statuses[-1][1] != 200:
                break
            time.sleep(max(0.0, sent + 1 - time.monotonic()))
        ok = [t for t, s in statuses if s == 200]
        self.assertTrue(ok and ok[-1] >= IDLE_S + 1, statuses)      # refreshed past the idle timeout
        self.assertEqual(statuses[-1][1], 401, statuses)              # then the lifetime ended it
        self.assertGreaterEqual(statuses[-1][0], LIFETIME_S - 1.5, statuses)

    def test_tampered_cookie_is_refused(self):
        jar = self.jar()
        self.assertEqual(self.login(jar)[0], 302)
        value = self.cookie_from_jar(jar)
        body, _, mac = value.rpartition(".")
        fields = base64.urlsafe_b64decode(body[3:] + "=" * (-len(body[3:]) % 4)).decode("latin-1")
        forged = fields.replace(self.user, "administrator", 1)
        forged_body = "v1." + base64.urlsafe_b64encode(forged.encode("latin-1")).decode().rstrip("=")
        before = self.host_requests()
        for v in (forged_body + "." + mac, value[:-2] + ("AA" if not value.endswith("AA") else "BB")):
            status, _, _, _ = self.curl("/owa/", "-H", "Cookie: DmzSession=" + v)
            self.assertEqual(status, 401)
        self.assertEqual(self.host_requests(), before)

    def test_open_redirect_is_refused(self):
        jar = self.jar()
        for bad in ("https://evil.example/", "//evil.example/", "/\\evil.example"):
            status, headers, _, _ = self.login(jar, url=bad)
            self.assertEqual(status, 302)
            self.assertEqual(headers["location"], ["/"], bad)

    # -- lockout

    def test_lockout_after_failures_and_recovery_after_the_window(self):
        user, password = self.lock_user, self.lock_password
        self.assertEqual(self.curl("/owa/", "-u", "%s:%s" % (user, password))[0], 200)
        before = self.host_requests()
        for i in range(LOCK_THRESHOLD):
            t_last_failure = time.monotonic()
            self.assertEqual(self.curl("/owa/", "-u", "%s:wrong" % user)[0], 401)
        status, headers, _, _ = self.curl("/owa/", "-u", "%s:%s" % (user, password))
        self.assertEqual(status, 401, "the right password must not help while locked out")
        self.assertIn("auth-failed", " ".join(headers["x-dmz-error"]))
        self.assertEqual(self.host_requests(), before, "no attempt reached Exchange")
        self.assertIsNotNone(self.wait_record(lambda r: "locked out" in (r.get("detail") or "")))
        # Attempts refused by the lockout do not extend it: ask until the window has passed.
        def recovered():
            r = self.curl("/owa/", "-u", "%s:%s" % (user, password))
            return r if r[0] == 200 else None
        last = wait_until(recovered, LOCK_WINDOW_S + 20, interval=0.3)
        self.assertIsNotNone(last, "still locked out long after the window")
        self.assertGreaterEqual(time.monotonic() - t_last_failure, LOCK_WINDOW_S, "the lockout ended early")
        self.assertIn('<td id="user">%s</td>' % user, last[2])

    # -- SMTP AUTH

    def test_smtp_auth_over_starttls_relays_and_without_it_does_not(self):
        token = secrets.token_hex(4)
        res = self.swaks("-tls", "--auth", "LOGIN", "--auth-user", self.user, "--auth-password", self.password,
                         "--from", "%s@contoso.com" % self.user, "--to", "friend@fabrikam.com",
                         "--header", "Subject: relay %s" % token)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertIn("235 2.7.0", res.stdout)

        def stored():
            for meta in glob.glob(os.path.join(self.mail_store, "*", "*.json")):
                with open(meta, encoding="utf-8") as f:
                    m = json.load(f)
                eml = meta[:-5] + ".eml"
                if os.path.exists(eml) and token.encode() in test_lab.read_bytes(eml):
                    return m
            return None
        m = wait_until(stored, 10)
        self.assertIsNotNone(m, "the relayed message was not stored")
        self.assertEqual(m["rcpts"], ["friend@fabrikam.com"])
        self.assertEqual(m["authenticated_as"], self.user)

        res = self.swaks("-tls", "--from", "someone@example.net", "--to", "friend@fabrikam.com")
        self.assertNotEqual(res.returncode, 0)
        self.assertIn("550 5.7.1", res.stdout)
        res = self.swaks("-tls", "--auth", "PLAIN", "--auth-user", self.wrong_user, "--auth-password", "wrong",
                         "--from", "x@contoso.com", "--to", "friend@fabrikam.com")
        self.assertIn("535 5.7.8", res.stdout)
        # Inbound mail for the accepted domain needs no AUTH at all.
        res = self.swaks("--from", "someone@example.net", "--to", "%s@contoso.com" % self.user)
        self.assertEqual(res.returncode, 0, res.stdout)

    def test_auth_is_not_offered_before_starttls(self):
        res = self.swaks("--quit-after", "EHLO")
        self.assertRegex(res.stdout, r"(?m)^<-\s+250[ -]STARTTLS")
        self.assertNotRegex(res.stdout, r"(?m)^<-\s+250[ -]AUTH")
        res = self.swaks("-tls", "--quit-after", "EHLO")
        self.assertRegex(res.stdout, r"(?m)^<~\s+250[ -]AUTH PLAIN LOGIN")

    # -- diagnose

    def test_diagnose_says_auth_fault(self):
        def diagnose(*args):
            return test_lab.run([DMZPROXY, "diagnose", "--state", self.state, *args, "https://%s/owa/" % PUBLIC_NAME], 60)
        res = diagnose()
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn("AUTH FAULT at front-end", res.stdout)
        self.assertIn("rule Exchange/owa (allow, needs a user)", res.stdout, "an allow rule wanting a user is not a deny")
        self.assertNotIn("(deny)", res.stdout)
        res = diagnose("-u", "%s:wrong-%s" % (self.wrong_user, secrets.token_hex(2)))
        self.assertIn("AUTH FAULT at front-end", res.stdout)
        self.assertIn("refused", res.stdout)
        hops = [l for l in res.stdout.splitlines() if l.startswith("hop ") and " rule " in l]
        self.assertIn("refused these credentials", hops[0], res.stdout)
        for l in hops[1:]:  # the front-end refused: nothing behind it was asked
            self.assertIn("not reached: stopped at front-end", l, res.stdout)
        res = diagnose("-u", "%s:%s" % (self.user, self.password))
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertIn("OK", res.stdout)


def read_png(path):
    """(width, height, [(r, g, b), ...]) of an 8-bit RGB or RGBA PNG, as Chromium writes them."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, chunk = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8 and ctype in (2, 6), (depth, ctype)
            bpp = 3 if ctype == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw, stride, prev, pixels = zlib.decompress(idat), width * bpp, bytearray(width * bpp), []
    for y in range(height):
        line = raw[y * (stride + 1):(y + 1) * (stride + 1)]
        ftype, cur = line[0], bytearray(line[1:])
        for i in range(stride):
            a = cur[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if ftype == 1:
                cur[i] = (cur[i] + a) & 255
            elif ftype == 2:
                cur[i] = (cur[i] + b) & 255
            elif ftype == 3:
                cur[i] = (cur[i] + (a + b) // 2) & 255
            elif ftype == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        pixels.extend(tuple(cur[i:i + 3]) for i in range(0, stride, bpp))
        prev = cur
    return width, height, pixels


if __name__ == "__main__":
    unittest.main()
