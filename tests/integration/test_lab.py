"""The live lab, end to end: `dmzproxy lab up` on the default topology, driven by real
clients through both tiers to the simulated Exchange host (topology/hosts/exchange_host.py).

    DMZPROXY=build/dmzproxy DMZ_SOURCE_DIR=. python3 -m unittest -v test_lab

One lab, started in setUpClass, serves every test of `LabThroughBothTiers` (the lab takes a
few seconds to start); `LabLifecycle` starts its own for the up/status/down round trip
and for the port-already-taken refusal. Each runs `lab up --shift SHIFT` (harness.SHIFT,
this module's own): the topology's addresses (127.10.0.10, 127.20.0.20, 127.30.0.50, ...)
move SHIFT /16 blocks up, so a default lab a user runs, or another module's lab, may run at
the same time. Ports are the topology's (443, 25, 80, 2525; 10000 + P when ports below 1024
cannot be bound).

Clients: curl (--resolve, --cacert, --interface <External client_address>), swaks, and raw
TLS sockets for Outlook Anywhere and MAPI. The host's statistics endpoint (lab status
--json: hosts[].stats) proves what reached it and what did not. Every wait is bounded;
the lab is always stopped in cleanup.
"""

import base64
import glob
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
import unittest
import urllib.request

import harness as h

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_DIR = os.environ.get("DMZ_SOURCE_DIR") or os.path.normpath(os.path.join(HERE, "..", ".."))
DMZPROXY = os.environ.get("DMZPROXY") or os.path.join(SOURCE_DIR, "build", "dmzproxy")
TOPOLOGY = os.path.join(SOURCE_DIR, "topology", "exchange-two-tier.toml")

PUBLIC_NAME = "mail.contoso.com"
BE_INTERNAL = h.lab_address("127.30.0.20")     # the back-end's leg on Internal: the host's peer
FE_EXTERNAL = h.lab_address("127.10.0.10")
HOST_ADDRESS = h.lab_address("127.30.0.50")
AS_VERSIONS = "2.5,12.0,12.1,14.0,14.1,16.0,16.1"
AS_COMMANDS = ("Sync,SendMail,SmartForward,SmartReply,GetAttachment,GetHierarchy,CreateCollection,"
               "DeleteCollection,MoveCollection,FolderSync,FolderCreate,FolderDelete,FolderUpdate,MoveItems,"
               "GetItemEstimate,MeetingResponse,Search,Settings,Ping,ItemOperations,Provision,"
               "ResolveRecipients,ValidateCert")
PING_SECONDS = 70
UP_TIMEOUT = 90
DOWN_TIMEOUT = 60

HAVE_CURL = shutil.which("curl") is not None
HAVE_SWAKS = shutil.which("swaks") is not None


# ---------------------------------------------------------------- the lab command

def run(args, timeout):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(os.environ, DMZ_SOURCE_DIR=SOURCE_DIR))


def lab(state, *args, timeout=UP_TIMEOUT):
    return run([DMZPROXY, "lab", "--state", state, *args], timeout)


def lab_up(state, topology=TOPOLOGY):
    """`lab up --detach` on this module's shifted addresses."""
    return lab(state, "up", "--detach", "--shift", str(h.SHIFT), topology)


def lab_status(state):
    res = lab(state, "status", "--json", timeout=30)
    try:
        return res.returncode, json.loads(res.stdout)
    except json.JSONDecodeError:
        return res.returncode, {"unparsable": res.stdout, "stderr": res.stderr}


def lab_down(state):
    try:
        return lab(state, "down", timeout=DOWN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -1, "", "lab down timed out")


def all_pids(status):
    pids = set(status.get("pids", []))
    for group in ("instances", "hosts"):
        for node in status.get(group, []):
            pids.add(node["pid"])
    return sorted(pids)


def pid_gone(pid):
    """True when `pid` no longer runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open("/proc/%d/stat" % pid, encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def wait_until(predicate, timeout, interval=0.1):
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def may_bind_privileged():
    """The same judgement as `lab up` (topology/src/lab.cpp) on whether ports < 1024 bind."""
    if os.geteuid() == 0:
        return True
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:") and int(line.split()[1], 16) & (1 << 10):
                    return True
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", encoding="ascii") as f:
            return int(f.read().strip()) <= 25
    except (OSError, ValueError):
        return False


def logs_tail(state, n=30):
    out = []
    for path in sorted(glob.glob(os.path.join(state, "logs", "*"))):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()[-n:]
        except OSError:
            continue
        out.append("--- %s\n%s" % (path, "".join(lines)))
    return "\n".join(out)


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def http_get_json(url, timeout=10):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


# ---------------------------------------------------------------- raw HTTP over TLS

class Reader:
    """Buffered reads from a socket, each bounded by a deadline."""

    def __init__(self, sock, timeout=15.0):
        self.sock = sock
        self.buf = bytearray()
        self.timeout = timeout

    def _fill(self, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no data in time")
        self.sock.settimeout(left)
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("connection closed")
        self.buf += data

    def until(self, marker, deadline=None):
        deadline = deadline or time.monotonic() + self.timeout
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[:i + len(marker)])
                del self.buf[:i + len(marker)]
                return out
            self._fill(deadline)

    def exact(self, n, deadline=None):
        deadline = deadline or time.monotonic() + self.timeout
        while len(self.buf) < n:
            self._fill(deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def head(self, deadline=None):
        """(status, {lowercase name: value}) of a response head (100 Continue skipped)."""
        while True:
            raw = self.until(b"\r\n\r\n", deadline).decode("latin-1")
            lines = raw.split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            if status != 100:
                return status, headers


def ntlm_type3(user, domain, workstation="WS01"):
    """A syntactically valid NTLMSSP AUTHENTICATE (type 3) message, base64."""
    u, d, w = (s.encode("utf-16-le") for s in (user, domain, workstation))
    lm, nt = b"\x00" * 24, secrets.token_bytes(24)
    off = 64
    fields = []
    payload = b""
    for data in (lm, nt, d, u, w):
        fields.append(struct.pack("<HHI", len(data), len(data), off + len(payload)))
        payload += data
    msg = b"NTLMSSP\x00" + struct.pack("<I", 3) + b"".join(fields)
    msg += struct.pack("<HHI", 0, 0, off + len(payload))   # session key
    msg += struct.pack("<I", 0x00000001 | 0x00000200 | 0x00080000)
    return base64.b64encode(msg + payload).decode("ascii")


# ---------------------------------------------------------------- the tests

@unittest.skipUnless(os.path.exists(DMZPROXY), "the dmzproxy binary (DMZPROXY) is missing")
class LabThroughBothTiers(unittest.TestCase):
    """One lab; real clients on External; the host's statistics prove what arrived."""

    @classmethod
    def setUpClass(cls):
        cls.state = tempfile.mkdtemp(prefix="dmz-lab-")
        cls.tmp = tempfile.mkdtemp(prefix="dmz-lab-client-")
        cls.ping = None
        cls.status = None
        cls.addClassCleanup(cls.stop_lab)     # also when setUpClass fails half-way
        t0 = time.monotonic()
        try:
            res = lab_up(cls.state)
        except subprocess.TimeoutExpired:
            raise AssertionError("lab up --detach did not return within %d s:\n%s" % (UP_TIMEOUT,
                                                                                     logs_tail(cls.state)))
        cls.up_seconds = time.monotonic() - t0
        if res.returncode != 0:
            raise AssertionError("lab up failed (exit %d):\nstdout:\n%s\nstderr:\n%s\n%s" % (
                res.returncode, res.stdout, res.stderr, logs_tail(cls.state)))
        cls.up_output = res.stdout
        rc, st = lab_status(cls.state)
        cls.status_rc, cls.status = rc, st
        try:
            cls.derive(st)
        except (KeyError, IndexError, StopIteration, TypeError) as e:
            raise AssertionError("lab status --json lacks %r: %s" % (e, json.dumps(st)[:3000]))
        if HAVE_CURL:
            cls.start_ping()

    @classmethod
    def derive(cls, st):
        cls.ca_file = st["ca_file"]
        user = st["users"][0]
        cls.user, cls.password = user["name"], user["password"]
        nets = {n["name"]: n for n in st["networks"]}
        cls.client = nets["External"]["client_address"]
        cls.internal_client = nets["Internal"]["client_address"]
        fe = next(i for i in st["instances"] if i["role"] == "front-end")
        web = next(l for l in fe["listeners"] if l["protocol"] == "https" and l.get("network") == "External")
        smtp = next(l for l in fe["listeners"] if l["protocol"] == "smtp" and l.get("network") == "External")
        cls.web_addr, cls.web_port = web["address"], web["port"]
        cls.smtp_addr, cls.smtp_port = smtp["address"], smtp["port"]
        host = next(h for h in st["hosts"] if h["name"] == "exchange")
        cls.host = host
        cls.stats_url = host["stats"]
        cls.mail_store = host["mail_store"]
        cls.host_services = {s["name"]: s for s in host["services"]}

    @classmethod
    def stop_lab(cls):
        res = lab_down(cls.state)
        if cls.ping is not None:          # a Ping still held (its test not run) ends with the lab
            cls.ping["thread"].join(timeout=20)
        pids = all_pids(cls.status) if isinstance(cls.status, dict) else []
        gone = wait_until(lambda: all(pid_gone(p) for p in pids), 15)
        shutil.rmtree(cls.tmp, ignore_errors=True)
        if os.environ.get("DMZ_KEEP_LAB"):
            print("lab state kept in", cls.state)
        else:
            shutil.rmtree(cls.state, ignore_errors=True)
        if res.returncode != 0 or not gone:
            raise AssertionError("lab down: exit %d, processes still running: %s\n%s" % (
                res.returncode, [p for p in pids if not pid_gone(p)], res.stderr))

    # -- clients

    @classmethod
    def curl(cls, path, *args, timeout=30, name=PUBLIC_NAME):
        """(status, headers of the last response {lowercase: [values]}, body text, seconds)."""
        stem = os.path.join(cls.tmp, secrets.token_hex(4))
        cmd = ["curl", "-sS", "--noproxy", "*", "--max-time", str(timeout), "--cacert", cls.ca_file,
               "--interface", cls.client, "--resolve", "%s:%d:%s" % (name, cls.web_port, cls.web_addr),
               "-D", stem + ".h", "-o", stem + ".b", "-w", "%{http_code}", *args,
               "https://%s:%d%s" % (name, cls.web_port, path)]
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 15, check=False)
        elapsed = time.monotonic() - t0
        try:
            with open(stem + ".h", encoding="latin-1") as f:
                head_text = f.read()
        except OSError:
            head_text = ""
        try:
            with open(stem + ".b", encoding="utf-8", errors="replace") as f:
                body = f.read()
        except OSError:
            body = ""
        headers = {}
        blocks = [b for b in re.split(r"\r?\n\r?\n", head_text) if b.strip()]
        if blocks:
            for line in blocks[-1].splitlines()[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers.setdefault(k.strip().lower(), []).append(v.strip())
        status = int(res.stdout.strip()) if res.stdout.strip().isdigit() else 0
        if status == 0:
            body += "\n[curl exit %d: %s]" % (res.returncode, res.stderr.strip())
        return status, headers, body, elapsed

    @classmethod
    def stats(cls):
        return http_get_json(cls.stats_url)

    def through_both_tiers(self):
        """A request that the tiers pass on, seen by the host: what was sent before it has had
        every chance to arrive (a barrier, instead of waiting some time)."""
        token = secrets.token_hex(6)
        status, _, body, _ = self.curl("/owa/?barrier=%s" % token)
        self.assertEqual(status, 200, body)
        self.assertIsNotNone(self.find_request(token), "the host never recorded the barrier request")

    def find_request(self, token, timeout=15):
        """The host's record of the request whose target carries `token` (None if never)."""
        def look():
            for rec in self.stats()["recent"]:
                if token in (rec.get("target") or ""):
                    return rec
            return None
        return wait_until(look, timeout)

    def tls_socket(self):
        ctx = ssl.create_default_context(cafile=self.ca_file)
        raw = socket.create_connection((self.web_addr, self.web_port), timeout=10, source_address=(self.client, 0))
        return ctx.wrap_socket(raw, server_hostname=PUBLIC_NAME)

    def basic(self):
        return "Basic " + base64.b64encode(("%s:%s" % (self.user, self.password)).encode()).decode()

    def swaks(self, *args, server=None, source=None, timeout=60):
        server = server or "%s:%d" % (self.smtp_addr, self.smtp_port)
        cmd = ["swaks", "--server", server, "--local-interface", source or self.client, "--timeout", "30", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def stored(self, service):
        return sorted(glob.glob(os.path.join(self.mail_store, service, "*.json")))

    # -- ActiveSync Ping, started in setUpClass so that the 70 s hold overlaps the rest

    @classmethod
    def start_ping(cls):
        token = secrets.token_hex(4)
        body = os.path.join(cls.tmp, "ping.wbxml")
        # Ping (code page 13): <Ping><HeartbeatInterval>70</HeartbeatInterval><Folders><Folder>
        # <Id>1</Id><Class>Email</Class></Folder></Folders></Ping>
        hb = str(PING_SECONDS).encode()
        wbxml = bytes([0x03, 0x01, 0x6A, 0x00, 0x00, 0x0D, 0x45, 0x48, 0x03]) + hb + bytes([0x00, 0x01]) + \
            bytes([0x49, 0x4A, 0x4B, 0x03]) + b"1" + bytes([0x00, 0x01, 0x4C, 0x03]) + b"Email" + \
            bytes([0x00, 0x01, 0x01, 0x01, 0x01])
        with open(body, "wb") as f:
            f.write(wbxml)
        cls.ping = {"token": token, "result": None}

        def go():
            cls.ping["started"] = time.monotonic()
            cls.ping["result"] = cls.curl(
                "/Microsoft-Server-ActiveSync?Cmd=Ping&User=%s&DeviceId=LAB%s&DeviceType=TestDevice" % (
                    cls.user, token),
                "-X", "POST", "-u", "%s:%s" % (cls.user, cls.password),
                "-H", "Content-Type: application/vnd.ms-sync.wbxml", "-H", "MS-ASProtocolVersion: 16.1",
                "-H", "X-Heartbeat: %d" % PING_SECONDS, "--data-binary", "@" + body,
                timeout=PING_SECONDS + 30)

        cls.ping["thread"] = threading.Thread(target=go, daemon=True)
        cls.ping["thread"].start()

    # -- the tests

    def test_status_json(self):
        st = self.status
        self.assertEqual(self.status_rc, 0, st)
        self.assertTrue(st.get("running"), st)
        self.assertTrue(os.path.isfile(st["ca_file"]), st["ca_file"])
        self.assertTrue(any(u["name"] == "demo" and u["password"] for u in st["users"]), st["users"])
        nets = {n["name"]: n for n in st["networks"]}
        self.assertEqual(set(nets), {"External", "Perimeter", "Internal"})
        self.assertEqual(nets["External"]["ranges"], [h.lab_address("127.10.0.0/16")])
        self.assertEqual(nets["External"]["client_address"], h.lab_address("127.10.0.100"))
        self.assertEqual(st["shift"], h.SHIFT)
        for n in nets.values():
            self.assertIsInstance(n["ranges"], list)
            self.assertIn("client_address", n)
        self.assertEqual({i["name"]: i["role"] for i in st["instances"]},
                         {"front-end": "front-end", "back-end": "back-end"})
        mapped = st.get("ports_mapped")
        for inst in st["instances"]:
            self.assertIsInstance(inst["pid"], int)
            self.assertFalse(pid_gone(inst["pid"]), inst)
            self.assertTrue(inst["listeners"], inst)
            for l in inst["listeners"]:
                for key in ("name", "protocol", "address", "port", "public_names"):
                    self.assertIn(key, l, l)
        fe = next(i for i in st["instances"] if i["name"] == "front-end")
        web = next(l for l in fe["listeners"] if l["name"] == "web")
        self.assertEqual((web["protocol"], web["address"]), ("https", FE_EXTERNAL))
        self.assertEqual(web["port"], 10443 if mapped else 443)
        self.assertIn(PUBLIC_NAME, web["public_names"])
        self.assertEqual([h["name"] for h in st["hosts"]], ["exchange"])
        host = st["hosts"][0]
        self.assertFalse(pid_gone(host["pid"]), host)
        services = {s["name"]: s for s in host["services"]}
        self.assertEqual(set(services), {"web", "frontend-transport", "hub-transport"})
        for s in services.values():
            self.assertEqual(s["address"], HOST_ADDRESS)
        self.assertEqual(services["web"]["protocol"], "https")
        self.assertEqual(services["hub-transport"]["port"], 2525)
        self.assertEqual(services["frontend-transport"]["port"], 10025 if mapped else 25)
        # The host's own statistics endpoint answers on loopback.
        stats = self.stats()
        self.assertEqual(stats["name"], "exchange")
        self.assertEqual(stats["pid"], host["pid"])

    def test_up_printed_endpoints_and_commands(self):
        out = self.up_output
        self.assertIn("curl --cacert", out)
        self.assertIn("--resolve %s:%d:%s" % (PUBLIC_NAME, self.web_port, self.web_addr), out)
        self.assertIn("swaks --server %s:%d" % (self.smtp_addr, self.smtp_port), out)
        self.assertIn(self.password, out)
        self.assertLess(self.up_seconds, 30, "lab up --detach took %.1f s" % self.up_seconds)

    def test_admin_endpoints_and_lab_reload(self):
        # Every instance has an admin endpoint on loopback, printed by lab up and recorded in
        # lab.json; lab reload re-derives each config from the topology and reloads it.
        for inst in self.status["instances"]:
            self.assertRegex(inst["admin"], r"^http://127\.0\.0\.1:\d+$", inst)
            self.assertIn(inst["admin"] + "/metrics", self.up_output)
            with urllib.request.urlopen(inst["admin"] + "/metrics", timeout=10) as r:
                text = r.read().decode()
            self.assertIn('dmzproxy_config_version{instance="%s"}' % inst["name"], text)
            with urllib.request.urlopen(inst["admin"] + "/status", timeout=10) as r:
                self.assertEqual(json.loads(r.read())["instance"], inst["name"])
        res = lab(self.state, "reload", timeout=120)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        for inst in self.status["instances"]:
            self.assertRegex(res.stdout, r"%s: reloaded .*config version \d+" % re.escape(inst["name"]))
            with urllib.request.urlopen(inst["admin"] + "/status", timeout=10) as r:
                self.assertGreaterEqual(json.loads(r.read())["config"]["version"], 2)

    @unittest.skipUnless(HAVE_CURL, "curl is missing")
    def test_owa_shows_the_original_external_client(self):
        token = secrets.token_hex(6)
        status, headers, body, _ = self.curl("/owa/?lab=%s" % token)
        self.assertEqual(status, 200, body)
        self.assertIn('id="host-name">exchange<', body)
        self.assertIn('id="client-address">%s<' % self.client, body)
        self.assertIn('id="peer-address">%s<' % BE_INTERNAL, body)
        self.assertIn('id="host-header">%s<' % PUBLIC_NAME, body)
        self.assertIn('id="user">anonymous<', body)
        rec = self.find_request(token)
        self.assertIsNotNone(rec, "the host never recorded the /owa request")
        self.assertEqual(rec["peer"], BE_INTERNAL)
        self.assertEqual((rec["x_forwarded_for"] or "").split(",")[0].strip(), self.client)
        self.assertEqual(rec["category"], "owa")
        # A Basic user sent by the client reaches the host through both tiers.
        token = secrets.token_hex(6)
        status, _, body, _ = self.curl("/owa/?lab=%s" % token, "-u", "%s:%s" % (self.user, self.password))
        self.assertEqual(status, 200, body)
        self.assertIn('id="user">%s<' % self.user, body)

    @unittest.skipUnless(HAVE_CURL, "curl is missing")
    def test_ecp_and_powershell_refused_by_the_front_end(self):
        before = self.stats()["requests"]
        for path in ("/ecp/", "/powershell"):
            status, headers, body, _ = self.curl(path)
            self.assertEqual(status, 403, (path, body))
            err = (headers.get("x-dmz-error") or [""])[0]
            self.assertTrue(err.startswith("front-end;"), (path, err))
        self.through_both_tiers()
        after = self.stats()["requests"]
        self.assertEqual(after["ecp"], before["ecp"])
        self.assertEqual(after["powershell"], before["powershell"])
        self.assertEqual(after["ecp"], 0, "an /ecp request reached the host")
        self.assertEqual(after["powershell"], 0, "a /powershell request reached the host")

    @unittest.skipUnless(HAVE_CURL, "curl is missing")
    def test_activesync_options(self):
        status, headers, body, _ = self.curl("/Microsoft-Server-ActiveSync", "-X", "OPTIONS",
                                             "-u", "%s:%s" % (self.user, self.password))
        self.assertEqual(status, 200, body)
        self.assertEqual(headers.get("ms-asprotocolversions"), [AS_VERSIONS], headers)
        self.assertEqual(headers.get("ms-asprotocolcommands"), [AS_COMMANDS], headers)

    @unittest.skipUnless(HAVE_CURL, "curl is missing")
    def test_activesync_ping_held_70_s(self):
        ping = self.ping
        ping["thread"].join(timeout=PING_SECONDS + 50)
        self.assertFalse(ping["thread"].is_alive(), "the Ping never came back")
        status, headers, body, elapsed = ping["result"]
        self.assertEqual(status, 200, body)
        self.assertGreaterEqual(elapsed, PING_SECONDS - 1, "the Ping came back after %.1f s" % elapsed)
        self.assertLess(elapsed, PING_SECONDS + 15, "the Ping came back after %.1f s" % elapsed)
        rec = self.find_request(ping["token"])
        self.assertIsNotNone(rec, "the host never recorded the Ping")
        self.assertEqual((rec["status"], rec["user"], rec["peer"]), (200, self.user, BE_INTERNAL))

    def test_outlook_anywhere_in_out_echo(self):
        cookie = secrets.token_bytes(16)
        token = secrets.token_hex(6)
        target = "/rpc/rpcproxy.dll?ex01.corp.contoso.com:6001&lab=%s" % token
        out = self.tls_socket()
        inn = None
        try:
            out.sendall(("RPC_OUT_DATA %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nUser-Agent: MSRPC\r\n"
                         "Accept: application/rpc\r\nContent-Length: 76\r\n\r\n" % (target, PUBLIC_NAME,
                                                                                    self.basic())).encode()
                        + cookie + b"\x00" * 60)
            out_reader = Reader(out)
            status, headers = out_reader.head()
            self.assertEqual(status, 200, headers)
            self.assertEqual(headers.get("content-length"), "1073741824", headers)
            inn = self.tls_socket()
            inn.sendall(("RPC_IN_DATA %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nUser-Agent: MSRPC\r\n"
                         "Accept: application/rpc\r\nContent-Length: 1073741824\r\n\r\n" % (
                             target, PUBLIC_NAME, self.basic())).encode() + cookie)
            first = b"first bytes on IN " + token.encode()
            inn.sendall(first)
            self.assertEqual(out_reader.exact(len(first)), first)
            big = secrets.token_bytes(200 * 1024)
            inn.sendall(big)
            self.assertEqual(out_reader.exact(len(big), time.monotonic() + 20), big)
            last = b"last " + token.encode()
            inn.sendall(last)
            self.assertEqual(out_reader.exact(len(last)), last)
        finally:
            for s in (inn, out):
                if s is not None:
                    s.close()
        # The host counts echoed bytes just after it sent them: the client may be a moment ahead.
        echoed = len(first) + len(big) + len(last)
        def counted():
            stats = self.stats()
            return stats if stats["rpc"]["bytes_echoed"] >= echoed else None
        st = wait_until(counted, 15)
        self.assertIsNotNone(st, "the host counted fewer echoed bytes than arrived: %s" % self.stats()["rpc"])
        outs = [r for r in st["recent"] if token in (r.get("target") or "") and r["method"] == "RPC_OUT_DATA"]
        ins = [r for r in st["recent"] if token in (r.get("target") or "") and r["method"] == "RPC_IN_DATA"]
        self.assertEqual(len(outs), 1, st["recent"][-10:])
        self.assertEqual(len(ins), 1, st["recent"][-10:])
        self.assertEqual(outs[0]["peer"], BE_INTERNAL)
        self.assertNotEqual(outs[0]["conn"], ins[0]["conn"])
        self.assertEqual((ins[0]["x_forwarded_for"] or "").split(",")[0].strip(), self.client)

    def test_mapi_pending_chunks_arrive_over_time(self):
        token = secrets.token_hex(6)
        body = b"\x00" * 32
        s = self.tls_socket()
        try:
            s.sendall(("POST /mapi/emsmdb/?MailboxId=demo@contoso.com&pendings=3&lab=%s HTTP/1.1\r\nHost: %s\r\n"
                       "Authorization: %s\r\nContent-Type: application/mapi-http\r\nX-RequestType: Execute\r\n"
                       "X-PendingPeriod: 1000\r\nX-ClientInfo: {lab}\r\nContent-Length: %d\r\n\r\n" % (
                           token, PUBLIC_NAME, self.basic(), len(body))).encode() + body)
            r = Reader(s)
            status, headers = r.head()
            self.assertEqual(status, 200, headers)
            self.assertEqual(headers.get("transfer-encoding", "").lower(), "chunked", headers)
            chunks = []
            deadline = time.monotonic() + 20
            while True:
                size = int(r.until(b"\r\n", deadline).split(b";")[0].strip(), 16)
                if size == 0:
                    r.until(b"\r\n", deadline)
                    break
                data = r.exact(size, deadline)
                r.exact(2, deadline)
                chunks.append((time.monotonic(), data))
        finally:
            s.close()
        pendings = [t for t, d in chunks for _ in range(d.count(b"PENDING"))]
        done = [t for t, d in chunks if b"DONE" in d]
        self.assertEqual(len(pendings), 3, chunks)
        self.assertEqual(len(done), 1, chunks)
        gaps = [b - a for a, b in zip(pendings, pendings[1:])] + [done[0] - pendings[-1]]
        for g in gaps:
            self.assertGreater(g, 0.5, "PENDING chunks did not arrive over time: gaps %s" % gaps)
        self.assertGreater(done[0] - pendings[0], 2.0)
        rec = self.find_request(token)
        self.assertEqual((rec["status"], rec["peer"], rec["user"]), (200, BE_INTERNAL, self.user))

    @unittest.skipUnless(HAVE_CURL, "curl is missing")
    def test_ews_with_ntlm(self):
        before = self.stats()["ntlm_handshakes"]
        status, headers, body, _ = self.curl("/EWS/Exchange.asmx")
        self.assertEqual(status, 401, body)
        self.assertIn("NTLM", headers.get("www-authenticate", []), headers)
        status, headers, body, _ = self.curl(
            "/EWS/Exchange.asmx", "--ntlm", "-u", "contoso\\%s:%s" % (self.user, self.password),
            "-X", "POST", "-H", "Content-Type: text/xml", "-d", "<x/>")
        self.assertEqual(status, 200, body)
        m = re.search(r'User="([^"]*)"', body)
        self.assertIsNotNone(m, body)
        self.assertEqual(m.group(1).lower(), "contoso\\%s" % self.user)
        self.assertIn('Client="%s"' % self.client, body)
        self.assertEqual(self.stats()["ntlm_handshakes"], before + 1)
        # A type-3 on a connection that was never challenged: the legs must share one connection.
        status, _, body, _ = self.curl("/EWS/Exchange.asmx", "-H", "Authorization: NTLM " +
                                       ntlm_type3(self.user, "contoso"))
        self.assertEqual(status, 401, body)
        self.assertIn("Unexpected NTLM message Type 3 in new connection", body)

    @unittest.skipUnless(HAVE_CURL, "curl is missing")
    def test_autodiscover_and_oab(self):
        status, _, body, _ = self.curl("/autodiscover/autodiscover.json?Email=demo@contoso.com&Protocol=ActiveSync",
                                       name=PUBLIC_NAME)
        self.assertEqual(status, 200, body)
        self.assertEqual(json.loads(body), {"Protocol": "ActiveSync",
                                            "Url": "https://%s/Microsoft-Server-ActiveSync" % PUBLIC_NAME})
        req = ('<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="http://schemas.microsoft.com/exchange/'
               'autodiscover/outlook/requestschema/2006"><Request><EMailAddress>demo@contoso.com</EMailAddress>'
               '<AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/'
               'responseschema/2006a</AcceptableResponseSchema></Request></Autodiscover>')
        status, _, body, _ = self.curl("/autodiscover/autodiscover.xml", "--ntlm", "-u",
                                       "contoso\\%s:%s" % (self.user, self.password), "-H",
                                       "Content-Type: text/xml", "--data-binary", req)
        self.assertEqual(status, 200, body)
        self.assertIn("<Server>%s</Server>" % PUBLIC_NAME, body)
        status, _, body, _ = self.curl("/OAB/lab/oab.xml", "-u", "%s:%s" % (self.user, self.password))
        self.assertEqual(status, 200, body)
        self.assertIn("<OAB>", body)

    @unittest.skipUnless(HAVE_SWAKS, "swaks is missing")
    def test_mail_to_an_accepted_domain_arrives_as_a_file(self):
        token = secrets.token_hex(8)
        before = set(self.stored("frontend-transport"))
        count = self.stats()["messages"].get("frontend-transport", 0)
        lines = ["From: someone@example.net", "To: demo@contoso.com", "Subject: lab %s" % token, "",
                 "Hello from the External network, %s." % token, ".a line that starts with a dot",
                 "..and one with two", "bye"]
        msg_file = os.path.join(self.tmp, "msg-%s.txt" % token)
        with open(msg_file, "w", encoding="ascii", newline="\r\n") as f:
            f.write("\n".join(lines) + "\n")
        res = self.swaks("--from", "someone@example.net", "--to", "demo@contoso.com", "--data", "@" + msg_file)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertRegex(res.stdout, r"250 2\.6\.0 <[0-9A-F]+@%s> \[InternalId=\d+\] Queued mail for delivery" %
                         re.escape(PUBLIC_NAME))
        new = wait_until(lambda: sorted(set(self.stored("frontend-transport")) - before), 20)
        self.assertEqual(len(new), 1, new)
        with open(new[0], encoding="utf-8") as f:
            meta = json.load(f)
        self.assertEqual(meta["rcpts"], ["demo@contoso.com"])
        self.assertEqual(meta["mail_from"], "someone@example.net")
        self.assertEqual(meta["peer"], BE_INTERNAL)
        self.assertEqual(meta["service"], "frontend-transport")
        # swaks spoke DATA; the host offers CHUNKING as Exchange does, so the back-end
        # passed the message on as one BDAT, and the dot lines above arrive unstuffed.
        self.assertEqual(meta["via"], "BDAT")
        with open(new[0][:-len(".json")] + ".eml", "rb") as f:
            eml = f.read()
        expected = ("\r\n".join(lines) + "\r\n").encode()
        self.assertTrue(eml.startswith(expected), eml)
        self.assertEqual(eml[len(expected):].strip(b"\r\n"), b"", eml)
        self.assertEqual(meta["size"], len(eml))
        self.assertEqual(self.stats()["messages"].get("frontend-transport", 0), count + 1)

    @unittest.skipUnless(HAVE_SWAKS, "swaks is missing")
    def test_relay_to_another_domain_is_refused(self):
        before = set(self.stored("frontend-transport"))
        smtp_before = self.stats()["smtp"].get("frontend-transport", {})
        res = self.swaks("--from", "someone@example.net", "--to", "victim@fabrikam.com")
        self.assertNotEqual(res.returncode, 0, res.stdout)
        self.assertRegex(res.stdout, r"(?m)^<\*\* +550 5\.7\.1 ", res.stdout)
        # Then a message that does go through: once it is stored, the relay attempt before it
        # has had every chance to arrive.
        token = secrets.token_hex(8)
        res = self.swaks("--from", "someone@example.net", "--to", "demo@contoso.com", "--body", "after %s" % token)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        barrier = wait_until(lambda: [p for p in set(self.stored("frontend-transport")) - before
                                      if token.encode() in read_bytes(p[:-len(".json")] + ".eml")], 20)
        self.assertTrue(barrier, "the message after the relay attempt was never stored")
        self.assertEqual(set(self.stored("frontend-transport")) - before, set(barrier))
        smtp_after = self.stats()["smtp"].get("frontend-transport", {})
        self.assertEqual(smtp_after.get("rcpt_refused", 0), smtp_before.get("rcpt_refused", 0),
                         "the relay attempt reached the host")

    @unittest.skipUnless(HAVE_SWAKS, "swaks is missing")
    def test_hub_transport_starttls_on_internal(self):
        """The host's Hub transport, reached directly from the Internal network: STARTTLS
        with the lab certificate, accepted domains only, as Exchange answers."""
        hub = self.host_services["hub-transport"]
        server = "%s:%d" % (hub["address"], hub["port"])
        token = secrets.token_hex(8)
        res = self.swaks("--from", "ops@contoso.com", "--to", "demo@contoso.com", "--tls", "--tls-verify",
                         "--tls-ca-path", self.ca_file, "--tls-sni", PUBLIC_NAME, "--body", "hub %s" % token,
                         server=server, source=self.internal_client)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        self.assertIn("STARTTLS", res.stdout)
        found = wait_until(lambda: [p for p in self.stored("hub-transport")
                                    if token.encode() in read_bytes(p[:-len(".json")] + ".eml")], 20)
        self.assertTrue(found, "the message never reached the hub-transport store")
        with open(found[0], encoding="utf-8") as f:
            self.assertEqual(json.load(f)["via"], "DATA", "swaks straight to the host speaks DATA")
        with open(found[0], encoding="utf-8") as f:
            meta = json.load(f)
        self.assertTrue(meta["tls"], meta)
        self.assertEqual(meta["peer"], self.internal_client)
        res = self.swaks("--from", "ops@contoso.com", "--to", "victim@fabrikam.com", server=server,
                         source=self.internal_client)
        self.assertIn("550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain", res.stdout)


@unittest.skipUnless(os.path.exists(DMZPROXY), "the dmzproxy binary (DMZPROXY) is missing")
class LabLifecycle(unittest.TestCase):
    """Labs of their own: up/status/down twice, and a taken port refused by name."""

    def setUp(self):
        self.state = tempfile.mkdtemp(prefix="dmz-lab-cycle-")

    def tearDown(self):
        lab_down(self.state)
        shutil.rmtree(self.state, ignore_errors=True)

    def up_and_check(self):
        res = lab_up(self.state)
        self.assertEqual(res.returncode, 0, "lab up failed:\n%s\n%s\n%s" % (res.stdout, res.stderr,
                                                                          logs_tail(self.state)))
        rc, st = lab_status(self.state)
        self.assertEqual(rc, 0, st)
        self.assertTrue(st["running"], st)
        pids = all_pids(st)
        self.assertEqual(len(pids), 3, st)       # front-end, back-end, the exchange host
        for p in pids:
            self.assertFalse(pid_gone(p), p)
        stats = http_get_json(st["hosts"][0]["stats"])
        self.assertEqual(stats["pid"], st["hosts"][0]["pid"])
        return st, pids

    def down_and_check(self, pids):
        t0 = time.monotonic()
        res = lab_down(self.state)
        self.assertEqual(res.returncode, 0, res.stdout + res.stderr)
        gone = wait_until(lambda: all(pid_gone(p) for p in pids), 15)
        self.assertTrue(gone, "still running after lab down: %s" % [p for p in pids if not pid_gone(p)])
        rc, st = lab_status(self.state)
        self.assertNotEqual(rc, 0, st)
        self.assertFalse(st.get("running"), st)
        self.assertFalse(os.path.exists(os.path.join(self.state, "lab.json")))
        return time.monotonic() - t0

    def test_up_status_down_round_trip(self):
        st, pids = self.up_and_check()
        # lab up waited for every listener without connecting to it: no instance logged a
        # session nobody asked for (readiness probes used to show in the live log as SMTP).
        for name in ("front-end", "back-end"):
            log = os.path.join(self.state, "logs", name + ".jsonl")
            with open(log, encoding="utf-8") as f:
                self.assertEqual(f.read(), "", "%s logged sessions right after lab up" % name)
        self.down_and_check(pids)
        st2, pids2 = self.up_and_check()
        self.assertEqual(st2["ca_file"], st["ca_file"])      # the lab CA is made once and reused
        if HAVE_CURL:
            fe = next(i for i in st2["instances"] if i["role"] == "front-end")
            web = next(l for l in fe["listeners"] if l["protocol"] == "https" and l.get("network") == "External")
            client = next(n for n in st2["networks"] if n["name"] == "External")["client_address"]
            res = subprocess.run(["curl", "-sS", "--noproxy", "*", "--max-time", "20", "--cacert", st2["ca_file"],
                                  "--interface", client, "--resolve",
                                  "%s:%d:%s" % (PUBLIC_NAME, web["port"], web["address"]),
                                  "https://%s:%d/owa/" % (PUBLIC_NAME, web["port"])],
                                 capture_output=True, text=True, timeout=40, check=False)
            self.assertIn('id="client-address">%s<' % client, res.stdout, res.stderr)
        self.down_and_check(pids2)

    def test_a_taken_port_is_refused_by_name(self):
        port = 443 if may_bind_privileged() else 10443
        holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                holder.bind((FE_EXTERNAL, port))
            except OSError as e:
                self.skipTest("cannot hold %s:%d ourselves: %s" % (FE_EXTERNAL, port, e))
            holder.listen(1)
            res = lab_up(self.state)
            out = res.stdout + res.stderr
            self.assertNotEqual(res.returncode, 0, out)
            self.assertIn("%s:%d" % (FE_EXTERNAL, port), out)
            self.assertIn("pid %d" % os.getpid(), out)
            self.assertFalse(os.path.exists(os.path.join(self.state, "lab.json")), out)
            # Nothing was left running: the host's web address does not answer.
            with socket.socket() as probe:
                probe.settimeout(1)
                self.assertNotEqual(probe.connect_ex((HOST_ADDRESS, 443 if port == 443 else 10443)), 0)
        finally:
            holder.close()


if __name__ == "__main__":
    unittest.main()
