"""Helpers for integration tests: real processes on loopback, driven by real clients.

Everything binds inside 127.0.0.0/8 (on Linux all of it is routable on lo); every wait is
bounded in time and count, and waits for a condition (wait_for), never for a fixed time.
Python 3 standard library plus the `openssl` and `curl` command-line tools.

Addresses: each test module has its own. They follow the default lab
(topology/exchange-two-tier.toml) moved SHIFT /16 blocks up, as `dmzproxy lab up --shift
SHIFT` moves a lab: 127.B.x.y becomes 127.(B + SHIFT).x.y (lab_address). ctest gives each
module its own shift (DMZ_TEST_SHIFT, tests/CMakeLists.txt), so no two modules running at
once, and no lab a user runs from another clone (the default block), share an address.
A second suite on the same machine waits, module by module, on a lock per shift.
By hand the shift is 100. With the default lab's names:
  client      127.10.0.100  (External)
  front-end   127.10.0.10 (External leg), 127.20.0.10 (Perimeter leg)
  back-end    127.20.0.20 (Perimeter leg), 127.30.0.20 (Internal leg)
  origin      127.30.0.50   (the Exchange host stand-in), 127.30.0.51 a second one
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ORIGIN_PY = os.path.join(HERE, "origin.py")
DMZPROXY = os.environ.get("DMZPROXY") or os.path.normpath(os.path.join(HERE, "..", "..", "build", "dmzproxy"))

SHIFT = int(os.environ.get("DMZ_TEST_SHIFT") or 100)
SHIFT_LOCK_WAIT = 900  # seconds: at most one module of another suite runs first


def _hold_shift_lock():
    """Two suites on one machine (two clones, or CI beside a developer's run) give a module
    the same SHIFT: this module waits for its namesake in the other suite instead of
    colliding with it. The lock is held until the process exits."""
    import fcntl
    f = open(os.path.join(tempfile.gettempdir(), "dmzproxy-test-shift-%d.lock" % SHIFT), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f
    except BlockingIOError:
        pass
    print("shift %d is in use by another test suite on this machine: waiting up to %d s"
          % (SHIFT, SHIFT_LOCK_WAIT), file=sys.stderr, flush=True)

    def give_up(_sig, _frame):
        raise SystemExit("shift %d stayed in use for %d s by another test suite" % (SHIFT, SHIFT_LOCK_WAIT))

    old = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(SHIFT_LOCK_WAIT)
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return f


_SHIFT_LOCK = _hold_shift_lock()


def lab_address(default):
    """This module's counterpart of an address (or a range) of the default lab."""
    octets = default.split(".")
    assert octets[0] == "127" and 0 < int(octets[1]) + SHIFT <= 255, (default, SHIFT)
    return ".".join([octets[0], str(int(octets[1]) + SHIFT)] + octets[2:])


CLIENT = lab_address("127.10.0.100")
FE_EXTERNAL = lab_address("127.10.0.10")
FE_PERIMETER = lab_address("127.20.0.10")
BE_PERIMETER = lab_address("127.20.0.20")
BE_INTERNAL = lab_address("127.30.0.20")
ORIGIN = lab_address("127.30.0.50")
ORIGIN2 = lab_address("127.30.0.51")
NETWORKS = {"Perimeter": [lab_address("127.20.0.0/16")], "Internal": [lab_address("127.30.0.0/16")]}
PUBLIC_NAME = "mail.contoso.com"

START_TIMEOUT = 30.0   # generous: a loaded two-core machine starts Python slowly
STOP_GRACE = 15.0


# ---------------------------------------------------------------- waiting, ports, files

def wait_for(predicate, timeout, interval=0.05):
    """Poll `predicate` until it returns a truthy value (returned) or `timeout` passes
    (returns the last falsy value). Bounded in time and in count."""
    deadline = time.monotonic() + timeout
    tries = int(timeout / interval) + 2
    value = None
    for _ in range(tries):
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    return value


_HANDED_OUT = set()


def free_port(host):
    """A port that was free on `host` a moment ago (bind port 0, close), and that this
    process has not handed out before: two ports asked for before either is bound differ.
    The host is this module's own (see above), so no other module asks for its ports."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if (host, port) not in _HANDED_OUT:
            _HANDED_OUT.add((host, port))
            return port
    raise RuntimeError("no fresh free port on %s" % host)


def _proc_net_listening(host, port):
    """Whether a socket listens on host:port, read from /proc/net/tcp (no connection made,
    so nothing shows up in the server's logs). None when /proc is not there."""
    try:
        with open("/proc/net/tcp", encoding="ascii") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return None
    want_ip = socket.inet_aton(host)[::-1].hex().upper()
    want = "%s:%04X" % (want_ip, port)
    wildcard = "00000000:%04X" % port
    for row in rows:
        cols = row.split()
        if len(cols) > 3 and cols[3] == "0A" and cols[1] in (want, wildcard):
            return True
    return False


def port_accepts(host, port):
    listening = _proc_net_listening(host, port)
    if listening is not None:
        return listening
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def read_jsonl(path):
    """The complete JSON lines of a file (a partly written last line is left out)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in text.split("\n")[:-1]:
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                out.append({"unparsable": line})
    return out


def tail(path, n=40):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------- lab PKI (openssl CLI)

def _openssl(*args, cwd=None):
    res = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if res.returncode != 0:
        raise RuntimeError("openssl %s failed: %s" % (" ".join(args), res.stderr))
    return res


class Pki:
    """A throw-away CA and leaf certificates (P-256 keys, subjectAltNames) in `directory`."""

    def __init__(self, directory, ca_name="dmzproxy test CA"):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.ca_key = os.path.join(directory, "ca.key")
        self.ca_cert = os.path.join(directory, "ca.pem")
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", self.ca_key)
        _openssl("req", "-x509", "-new", "-key", self.ca_key, "-sha256", "-days", "3", "-subj", "/CN=" + ca_name,
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-addext", "subjectKeyIdentifier=hash",
                 "-out", self.ca_cert)

    def leaf(self, stem, names, ips=()):
        """(cert, key) for a server certificate whose subjectAltNames are `names` (DNS) and
        `ips`. The cert file holds the leaf only; the CA is self.ca_cert."""
        key = os.path.join(self.dir, stem + ".key")
        csr = os.path.join(self.dir, stem + ".csr")
        cert = os.path.join(self.dir, stem + ".pem")
        ext = os.path.join(self.dir, stem + ".ext")
        sans = ["DNS:" + n for n in names] + ["IP:" + a for a in ips]
        with open(ext, "w", encoding="ascii") as f:
            f.write("basicConstraints = critical,CA:FALSE\n"
                    "keyUsage = critical,digitalSignature\n"
                    "extendedKeyUsage = serverAuth\n"
                    "subjectKeyIdentifier = hash\n"
                    "authorityKeyIdentifier = keyid,issuer\n"
                    "subjectAltName = %s\n" % ",".join(sans))
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", key)
        _openssl("req", "-new", "-key", key, "-subj", "/CN=" + names[0], "-out", csr)
        _openssl("x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", self.ca_key, "-sha256",
                 "-set_serial", "0x" + secrets.token_hex(12), "-days", "2", "-extfile", ext, "-out", cert)
        return cert, key


# ---------------------------------------------------------------- TOML text

def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: same escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join("%s = %s" % (toml_key(k), toml_value(x)) for k, x in v.items()) + " }"
    raise TypeError("no TOML for %r" % (v,))


def toml_key(k):
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


def toml_table(header, values):
    lines = ["[%s]" % header]
    lines += ["%s = %s" % (toml_key(k), toml_value(v)) for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def instance_config(name, role, listener, rules, networks=None, address_sets=None, trust_forwarded_from=None):
    """The TOML text of an instance config.

    listener: {"name": "web", "protocol": "https", "bind": [...], "certificates": [...], ...}
    rules:    dicts in order; `kind` defaults to web, `action` to allow, `listeners` to the listener.
    """
    out = ["# generated by tests/integration/harness.py\n"]
    out.append(toml_table("instance", {"name": name, "role": role,
                                       "trust_forwarded_from": trust_forwarded_from}))
    for net, ranges in (networks or {}).items():
        out.append(toml_table("networks." + toml_key(net), {"ranges": ranges}))
    for aset, ranges in (address_sets or {}).items():
        out.append(toml_table("address_sets." + toml_key(aset), {"ranges": ranges}))
    lst = dict(listener)
    lname = lst.pop("name", "web")
    out.append(toml_table("listeners." + toml_key(lname), lst))
    for r in rules:
        r = dict(r)
        r.setdefault("kind", "web")
        if r["kind"] != "exchange":
            r.setdefault("action", "allow")
        r.setdefault("listeners", [lname])
        out.append(toml_table("[rules]", r))
    return "\n".join(out)


# ---------------------------------------------------------------- processes

class Process:
    """A child process with its stdout/stderr in files; stop() by pid, SIGTERM then SIGKILL."""

    def __init__(self, name, argv, workdir):
        self.name = name
        self.argv = argv
        self.stdout_path = os.path.join(workdir, name + ".stdout")
        self.stderr_path = os.path.join(workdir, name + ".stderr")
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
                                     cwd=workdir)
        self.returncode = None

    def wait_listening(self, host, port, timeout=START_TIMEOUT):
        def ready():
            return self.proc.poll() is not None or port_accepts(host, port)
        wait_for(ready, timeout, interval=0.02)
        if self.proc.poll() is not None:
            raise RuntimeError("%s exited with %s before listening on %s:%d\n%s\n%s" % (
                self.name, self.proc.returncode, host, port, " ".join(self.argv), self.output()))
        if not port_accepts(host, port):
            raise RuntimeError("%s does not listen on %s:%d after %.0f s\n%s" % (
                self.name, host, port, timeout, self.output()))

    def wait_output(self, text, timeout=START_TIMEOUT):
        """Waits until `text` appears in the process's stderr (or it exits): raises if not."""
        def said():
            with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
                return text in f.read()
        wait_for(lambda: self.proc.poll() is not None or said(), timeout, interval=0.02)
        if not said():
            raise RuntimeError("%s did not say %r within %.0f s (exit %s)\n%s" % (
                self.name, text, timeout, self.proc.returncode, self.output()))

    def running(self):
        return self.proc.poll() is None

    def stop(self):
        """SIGTERM, then SIGKILL after STOP_GRACE seconds. Returns the exit code (negative:
        killed by that signal)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=STOP_GRACE)
        self.returncode = self.proc.returncode
        for f in (self._out, self._err):
            if not f.closed:
                f.close()
        return self.returncode

    def output(self, n=30):
        return "--- %s stderr ---\n%s--- %s stdout ---\n%s" % (
            self.name, tail(self.stderr_path, n), self.name, tail(self.stdout_path, n))


class Origin:
    def __init__(self, name, host, port, log, process):
        self.name, self.host, self.port, self.log, self.process = name, host, port, log, process

    def entries(self, event=None):
        rows = read_jsonl(self.log)
        return [r for r in rows if event is None or r.get("event") == event]

    def requests(self):
        return self.entries("request")


class Proxy:
    def __init__(self, name, config, access_log, process, port):
        self.name, self.config, self.access_log, self.process, self.port = name, config, access_log, process, port

    def access(self):
        return read_jsonl(self.access_log)


class Lab:
    """Owns a temp dir and the processes started in it; close() stops every one."""

    def __init__(self, prefix="dmz-it-"):
        self.dir = tempfile.mkdtemp(prefix=prefix)
        self.processes = []

    def path(self, name):
        return os.path.join(self.dir, name)

    def write(self, name, text):
        p = self.path(name)
        with open(p, "w", encoding="utf-8") as f:
            f.write(text)
        return p

    def start(self, name, argv, host, port):
        p = Process(name, argv, self.dir)
        self.processes.append(p)
        p.wait_listening(host, port)
        return p

    def start_origin(self, name, host, port=None, cert=None, key=None):
        port = port or free_port(host)
        log = self.path(name + ".jsonl")
        argv = [sys.executable, ORIGIN_PY, "--listen", "%s:%d" % (host, port), "--log", log, "--name", name]
        if cert:
            argv += ["--cert", cert, "--key", key]
        return Origin(name, host, port, log, self.start(name, argv, host, port))

    def start_proxy(self, name, config_text, host, port, threads=2, extra_args=()):
        cfg = self.write(name + ".toml", config_text)
        access = self.path(name + ".access.jsonl")
        argv = [DMZPROXY, "run", "-c", cfg, "--threads", str(threads), "--access-log", access] + list(extra_args)
        process = self.start(name, argv, host, port)
        # Listening is not enough: "ready" comes once its signal handlers are in place (a
        # SIGTERM or SIGHUP before that would end it the default way).
        process.wait_output(": ready, ")
        return Proxy(name, cfg, access, process, port)

    def check(self, config_path):
        return subprocess.run([DMZPROXY, "check", "-q", "-c", config_path], capture_output=True, text=True,
                              timeout=60, check=False)

    def diagnostics(self):
        return "\n".join(p.output() for p in self.processes)

    def stop_all(self):
        codes = {}
        for p in reversed(self.processes):
            codes[p.name] = p.stop()
        return codes

    def close(self):
        """Stops every process; removes the directory unless DMZ_IT_KEEP is set."""
        self.stop_all()
        if os.environ.get("DMZ_IT_KEEP"):
            sys.stderr.write("kept %s\n" % self.dir)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------- clients

def tls_client_context(ca_file):
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def connect(host, port, source=CLIENT, ca_file=None, server_name=PUBLIC_NAME, timeout=10.0):
    """A TCP (or, with ca_file, TLS) connection from `source` to host:port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((source, 0))
        s.connect((host, port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ca_file:
            s = tls_client_context(ca_file).wrap_socket(s, server_hostname=server_name)
    except BaseException:
        s.close()
        raise
    return s


def closed_within(sock, seconds):
    """Whether the peer closes the connection (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


class Response:
    def __init__(self, status=None, reason="", headers=None, body=b"", raw=b"", closed=False):
        self.status = status
        self.reason = reason
        self.headers = headers or []
        self.body = body
        self.raw = raw
        self.closed = closed  # the server closed the connection after this response

    def header(self, name):
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def dmz_error(self):
        """The X-Dmz-Error fields (instance, class, detail) or None."""
        v = self.header("X-Dmz-Error")
        if v is None:
            return None
        parts = [p.strip() for p in v.split(";", 2)]
        return tuple(parts + [""] * (3 - len(parts)))

    def __repr__(self):
        return "<Response %s %r X-Dmz-Error=%r closed=%s body=%r>" % (
            self.status, self.reason, self.header("X-Dmz-Error"), self.closed, self.body[:300])


class HttpConnection:
    """A minimal HTTP/1.1 client over one connection, for what curl cannot do: raw bytes,
    interleaving on chosen connections, timing of streamed bodies. Every read is bounded
    by the socket timeout and a deadline."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    @classmethod
    def open(cls, host, port, ca_file=None, source=CLIENT, server_name=PUBLIC_NAME, timeout=10.0):
        return cls(connect(host, port, source, ca_file, server_name, timeout))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, data):
        self.sock.sendall(data)

    def request(self, method, target, headers=(), body=b"", host=PUBLIC_NAME, version="HTTP/1.1", timeout=15.0):
        head = "%s %s %s\r\n" % (method, target, version)
        names = {n.lower() for n, _ in headers}
        if host is not None and "host" not in names:
            head += "Host: %s\r\n" % host
        for n, v in headers:
            head += "%s: %s\r\n" % (n, v)
        if body and "content-length" not in names and "transfer-encoding" not in names:
            head += "Content-Length: %d\r\n" % len(body)
        self.send(head.encode("latin-1") + b"\r\n" + body)
        return self.read_response(method, timeout=timeout)

    def _fill(self, deadline):
        if self.eof:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no more bytes before the deadline")
        self.sock.settimeout(min(left, 30.0))
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        except ssl.SSLError as e:
            if "EOF" in str(e) or "eof" in str(e) or "SHUTDOWN" in str(e).upper():
                data = b""
            else:
                raise
        except socket.timeout:
            raise TimeoutError("no bytes for %.1f s" % left) from None
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def read_head(self, deadline):
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                head = bytes(self.buf[:i])
                del self.buf[:i + 4]
                return head
            if not self._fill(deadline):
                return None

    def read_exact(self, n, deadline):
        while len(self.buf) < n:
            if not self._fill(deadline):
                break
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_line(self, deadline):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return line
            if not self._fill(deadline):
                return None

    def read_response_head(self, timeout=15.0):
        """Status line and fields of the next final response (1xx skipped); None on EOF."""
        deadline = time.monotonic() + timeout
        while True:
            head = self.read_head(deadline)
            if head is None:
                return None
            lines = head.decode("latin-1").split("\r\n")
            m = re.match(r"HTTP/1\.[01] (\d{3}) ?(.*)", lines[0])
            if not m:
                raise ValueError("not an HTTP response: %r" % lines[0][:200])
            headers = []
            for line in lines[1:]:
                n, _, v = line.partition(":")
                headers.append((n.strip(), v.strip()))
            status = int(m.group(1))
            if 100 <= status < 200 and status != 101:
                continue
            return Response(status, m.group(2), headers, raw=head)

    def read_response(self, method="GET", timeout=15.0):
        deadline = time.monotonic() + timeout
        r = self.read_response_head(timeout)
        if r is None:
            return Response(closed=True)
        te = (r.header("Transfer-Encoding") or "").lower()
        cl = r.header("Content-Length")
        if method == "HEAD" or r.status in (204, 304):
            pass
        elif "chunked" in te:
            body = bytearray()
            while True:
                line = self.read_line(deadline)
                if line is None:
                    break
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.read_line(deadline):
                        pass
                    break
                body += self.read_exact(size, deadline)
                self.read_line(deadline)
            r.body = bytes(body)
        elif cl is not None:
            r.body = self.read_exact(int(cl), deadline)
        else:
            while self._fill(deadline):
                pass
            r.body = bytes(self.buf)
            self.buf.clear()
        conn = (r.header("Connection") or "").lower()
        r.closed = "close" in conn
        return r

    def closed_by_peer(self, timeout=5.0):
        """True when the peer closes the connection within `timeout` (bytes read meanwhile
        are kept in the buffer), False if it stays open."""
        deadline = time.monotonic() + timeout
        try:
            while self._fill(deadline):
                pass
        except TimeoutError:
            return False
        return True


def raw_exchange(host, port, data, ca_file=None, timeout=5.0, source=CLIENT):
    """Send `data` on a new connection, read the response and whether the server then
    closes the connection (within `timeout`)."""
    with HttpConnection.open(host, port, ca_file=ca_file, source=source, timeout=timeout) as c:
        c.send(data)
        try:
            r = c.read_response(timeout=timeout)
        except TimeoutError:
            return Response(status=None, closed=False)
        if r.status is not None:
            r.closed = c.closed_by_peer(timeout)
        return r


def curl(args, timeout=60):
    """Run curl; returns (final Response, CompletedProcess). The final response is the last
    header block curl wrote (after any NTLM 401 legs)."""
    d = tempfile.mkdtemp(prefix="dmz-curl-")
    try:
        hfile, bfile = os.path.join(d, "h"), os.path.join(d, "b")
        cmd = ["curl", "-sS", "--max-time", str(timeout - 5), "-D", hfile, "-o", bfile, *args]
        res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        r = Response()
        try:
            with open(hfile, "rb") as f:
                blocks = [b for b in f.read().split(b"\r\n\r\n") if b.strip()]
        except FileNotFoundError:
            blocks = []
        finals = [b for b in blocks if not re.match(rb"HTTP/\S+ 1\d\d", b)]
        if finals:
            lines = finals[-1].decode("latin-1").split("\r\n")
            m = re.match(r"HTTP/\S+ (\d{3}) ?(.*)", lines[0])
            r.status, r.reason = int(m.group(1)), m.group(2)
            r.headers = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:] if ":" in line]
        try:
            with open(bfile, "rb") as f:
                r.body = f.read()
        except FileNotFoundError:
            pass
        return r, res
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- NTLM messages (client side)

def ntlm_negotiate():
    """Base64 NTLMSSP NEGOTIATE (type 1): unicode, NTLM, extended session security."""
    import base64
    import struct
    flags = 0x00000001 | 0x00000002 | 0x00000004 | 0x00000200 | 0x00008000 | 0x00080000
    msg = b"NTLMSSP\x00" + struct.pack("<II", 1, flags) + struct.pack("<HHI", 0, 0, 32) * 2
    return base64.b64encode(msg).decode("ascii")


def ntlm_authenticate(user, domain="", workstation="WS01"):
    """Base64 NTLMSSP AUTHENTICATE (type 3) naming `user` (responses are zeros: the test
    origin checks the handshake's shape, not the password)."""
    import base64
    import struct
    payload = [b"\x00" * 24, b"\x00" * 24, domain.encode("utf-16-le"), user.encode("utf-16-le"),
               workstation.encode("utf-16-le"), b""]
    offset = 64
    fields = b""
    for p in payload:
        fields += struct.pack("<HHI", len(p), len(p), offset)
        offset += len(p)
    flags = 0x00000001 | 0x00000200 | 0x00008000 | 0x00080000
    msg = b"NTLMSSP\x00" + struct.pack("<I", 3) + fields + struct.pack("<I", flags)
    assert len(msg) == 64
    return base64.b64encode(msg + b"".join(payload)).decode("ascii")


def stop_together(processes):
    """Stops several processes at once: SIGTERM to every running one first, then
    Process.stop() on each (which waits, and SIGKILLs after STOP_GRACE). A dmzproxy
    instance takes its shutdown grace to exit, so stopping both tiers together halves the
    wait. Returns {name: exit code}."""
    for p in processes:
        if p.proc.poll() is None:
            try:
                os.kill(p.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    return {p.name: p.stop() for p in processes}
