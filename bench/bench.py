#!/usr/bin/env python3
"""dmzproxy against nginx and HAProxy, each as a two-tier chain, in one run.

Run through bench/run (it installs the peers and builds Release). Every contender is
front-end -> back-end -> the same origin, one worker per tier, keep-alive to the next hop,
no access log, on 127.40.0.0/16:

    client (wrk, python) -> FE 127.40.1.1:8081 (plain) / :8443 (TLS) -> BE 127.40.2.1:8082
                         -> origin 127.40.0.1:8080 (nginx, 1 KiB at /owa/)
                                   127.40.0.1:8090 (holds requests: the ActiveSync Ping shape)
                                   127.40.0.1:8091 (discards an upload, notes its first byte:
                                                    bench/upload.c, native)

Prints a Markdown table: medians of --runs runs, with the ratio to nginx in brackets.
"""

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

ORIGIN = "127.40.0.1"
FE = "127.40.1.1"
BE = "127.40.2.1"
P_ORIGIN, P_HOLD, P_SINK, P_HELD = 8080, 8090, 8091, 8092
P_FE, P_FE_TLS, P_BE = 8081, 8443, 8082
P_SMTP_FE, P_SMTP_BE, P_SMTP_SINK = 2525, 2526, 2527
HERE = os.path.dirname(os.path.abspath(__file__))
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes

class Proc:
    def __init__(self, name, argv, cwd):
        self.name = name
        self.out = open(os.path.join(cwd, name + ".out"), "w")
        self.p = subprocess.Popen(argv, cwd=cwd, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True)

    def pids(self):
        """The process and its descendants (nginx and haproxy masters fork workers)."""
        out = {self.p.pid}
        changed = True
        while changed:
            changed = False
            for d in os.listdir("/proc"):
                if not d.isdigit() or int(d) in out:
                    continue
                try:
                    with open("/proc/%s/stat" % d) as f:
                        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                if ppid in out:
                    out.add(int(d))
                    changed = True
        return sorted(out)

    def cpu_seconds(self):
        total = 0
        for pid in self.pids():
            try:
                with open("/proc/%d/stat" % pid) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])   # utime, stime
            except (OSError, IndexError):
                pass
        return total / TICK

    def rss_kib(self):
        total = 0
        for pid in self.pids():
            try:
                with open("/proc/%d/statm" % pid) as f:
                    total += int(f.read().split()[1]) * PAGE // 1024
            except OSError:
                pass
        return total

    def hwm_kib(self):
        total = 0
        for pid in self.pids():
            try:
                with open("/proc/%d/status" % pid) as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            total += int(line.split()[1])
            except OSError:
                pass
        return total

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)
        self.out.close()


def wait_listening(host, port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listens on %s:%d after %d s" % (host, port, timeout))


# ---------------------------------------------------------------- origins (python parts)

HOLD_AND_SINK = r'''
import asyncio, sys
ADDR = sys.argv[1]; HOLD = int(sys.argv[2]); HELD = int(sys.argv[3])
held = 0
async def hold(r, w):
    global held
    try:
        await r.readuntil(b"\r\n\r\n")
        held += 1
        try:
            await r.read(1)        # until the client side goes away
        finally:
            held -= 1
    except Exception:
        pass
    finally:
        w.close()
async def count(r, w):
    try:
        await r.readuntil(b"\r\n\r\n")
        body = str(held).encode()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def main():
    a = await asyncio.start_server(hold, ADDR, HOLD, backlog=8192)
    b = await asyncio.start_server(count, ADDR, HELD, backlog=64)
    await asyncio.gather(a.serve_forever(), b.serve_forever())
asyncio.run(main())
'''


SMTP_SINK = r'''
import asyncio, sys
n = 0
async def session(r, w):
    global n
    w.write(b"220 sink ESMTP\r\n")
    try:
        while True:
            line = await r.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                w.write(b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n")
            elif verb == b"DATA":
                w.write(b"354 go\r\n")
                await r.readuntil(b"\r\n.\r\n")
                n += 1
                w.write(b"250 2.0.0 Ok: queued as %d\r\n" % n)
            elif verb == b"QUIT":
                w.write(b"221 bye\r\n")
                await w.drain()
                return
            else:
                w.write(b"250 ok\r\n")
            await w.drain()
    except Exception:
        pass
    finally:
        w.close()
async def main():
    s = await asyncio.start_server(session, sys.argv[1], int(sys.argv[2]), backlog=1024)
    await s.serve_forever()
asyncio.run(main())
'''


# ---------------------------------------------------------------- contenders

def cert_files(tmp):
    crt, key = os.path.join(tmp, "fe.crt"), os.path.join(tmp, "fe.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
                    "-subj", "/CN=mail.contoso.com", "-addext", "subjectAltName=DNS:mail.contoso.com",
                    "-keyout", key, "-out", crt], check=True, capture_output=True)
    with open(os.path.join(tmp, "fe.pem"), "w") as f:
        f.write(open(crt).read() + open(key).read())
    return crt, key


class Contender:
    name = "?"
    smtp = True   # publishes SMTP (nginx-light has no mail or stream module)
    floor = False  # a byte relay: plain throughput only

    def __init__(self, tmp, binary=None):
        self.tmp = os.path.join(tmp, self.name)
        os.makedirs(self.tmp, exist_ok=True)
        self.binary = binary
        self.fe = self.be = None

    def start(self):
        self.be = Proc("be", self.argv("be"), self.tmp)
        wait_listening(BE, P_BE)
        self.fe = Proc("fe", self.argv("fe"), self.tmp)
        wait_listening(FE, P_FE)
        if not self.floor:
            wait_listening(FE, P_FE_TLS)
        if self.smtp:
            wait_listening(FE, P_SMTP_FE)

    def stop(self):
        for p in (self.fe, self.be):
            if p:
                p.stop()

    def tiers(self):
        return {"front-end": self.fe, "back-end": self.be}


class Dmzproxy(Contender):
    name = "dmzproxy"

    def argv(self, tier):
        crt, key = os.path.join(os.path.dirname(self.tmp), "fe.crt"), os.path.join(os.path.dirname(self.tmp), "fe.key")
        if tier == "be":
            cfg = textwrap.dedent('''
                [instance]
                name = "back-end"
                trust_forwarded_from = ["fe"]
                [address_sets.fe]
                ranges = ["%s/32"]
                [listeners.web]
                protocol = "http"
                bind = ["%s:%d"]
                [listeners.smtp]
                protocol = "smtp"
                bind = ["%s:%d"]
                [[rules]]
                name = "mail"
                kind = "server"
                action = "allow"
                listeners = ["smtp"]
                accepted_domains = ["contoso.com"]
                target = { address = "%s", port = %d }
                [[rules]]
                name = "hold"
                action = "allow"
                listeners = ["web"]
                paths = ["/hold"]
                target = { address = "%s", port = %d, timeouts = { read = "10m" } }
                [[rules]]
                name = "upload"
                action = "allow"
                listeners = ["web"]
                paths = ["/rpc"]
                target = { address = "%s", port = %d, timeouts = { read = "10m" } }
                [[rules]]
                name = "origin"
                action = "allow"
                listeners = ["web"]
                paths = ["/owa"]
                target = { address = "%s", port = %d }
                ''') % (FE, BE, P_BE, BE, P_SMTP_BE, ORIGIN, P_SMTP_SINK, ORIGIN, P_HOLD, ORIGIN, P_SINK, ORIGIN, P_ORIGIN)
        else:
            cfg = textwrap.dedent('''
                [instance]
                name = "front-end"
                [listeners.web]
                protocol = "http"
                bind = ["%s:%d"]
                [listeners.tls]
                protocol = "https"
                bind = ["%s:%d"]
                certificates = [{ names = ["mail.contoso.com"], cert = "%s", key = "%s" }]
                [listeners.smtp]
                protocol = "smtp"
                bind = ["%s:%d"]
                [[rules]]
                name = "mail"
                kind = "server"
                action = "allow"
                listeners = ["smtp"]
                accepted_domains = ["contoso.com"]
                target = { address = "%s", port = %d, proxy_protocol = true, source = "%s" }
                [[rules]]
                name = "back-end"
                action = "allow"
                listeners = ["web", "tls"]
                paths = ["/owa", "/hold", "/rpc"]
                target = { address = "%s", port = %d, source = "%s", timeouts = { read = "10m" } }
                ''') % (FE, P_FE, FE, P_FE_TLS, crt, key, FE, P_SMTP_FE, BE, P_SMTP_BE, FE, BE, P_BE, FE)
        path = os.path.join(self.tmp, tier + ".toml")
        with open(path, "w") as f:
            f.write(cfg)
        return [self.binary, "run", "-c", path, "--threads", "1"]



class DmzproxyBefore(Dmzproxy):
    """Another build of dmzproxy (bench/run --before REV), the same configuration: a change's
    before and after measured in one run."""
    name = "dmzproxy-before"

class Nginx(Contender):
    name = "nginx"
    smtp = False

    def argv(self, tier):
        crt, key = os.path.join(os.path.dirname(self.tmp), "fe.crt"), os.path.join(os.path.dirname(self.tmp), "fe.key")
        nxt = (BE, P_BE) if tier == "fe" else None
        common = textwrap.dedent('''
            worker_processes 1;
            daemon off;
            pid %(dir)s/%(tier)s.pid;
            error_log %(dir)s/%(tier)s.err warn;
            worker_rlimit_nofile 20000;
            events { worker_connections 16000; }
            http {
              access_log off;
              client_body_temp_path %(dir)s/%(tier)s-body;
              proxy_temp_path %(dir)s/%(tier)s-proxy;
              fastcgi_temp_path %(dir)s/%(tier)s-f; uwsgi_temp_path %(dir)s/%(tier)s-u; scgi_temp_path %(dir)s/%(tier)s-s;
              keepalive_requests 100000;
              keepalive_timeout 20m;
              client_max_body_size 0;
              proxy_http_version 1.1;
              proxy_request_buffering off;
              proxy_buffering off;
              proxy_read_timeout 10m;
              proxy_set_header Connection "";
              proxy_set_header Host $host;
              proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
              %(upstreams)s
              server {
                listen %(addr)s;
                %(tls)s
                location / { proxy_pass http://%(up)s; }
                location /hold { proxy_pass http://%(uphold)s; }
                location /rpc { proxy_pass http://%(upsink)s; }
              }
            }
            ''')
        if tier == "fe":
            ups = "upstream be { server %s:%d; keepalive 64; }" % (BE, P_BE)
            addr = "%s:%d" % (FE, P_FE)
            tls = "listen %s:%d ssl; ssl_certificate %s; ssl_certificate_key %s;" % (FE, P_FE_TLS, crt, key)
            up = uphold = upsink = "be"
        else:
            ups = ("upstream origin { server %s:%d; keepalive 64; } upstream hold { server %s:%d; keepalive 64; }"
                   " upstream sink { server %s:%d; keepalive 64; }") % (ORIGIN, P_ORIGIN, ORIGIN, P_HOLD, ORIGIN, P_SINK)
            addr = "%s:%d" % (BE, P_BE)
            tls = ""
            up, uphold, upsink = "origin", "hold", "sink"
        cfg = common % {"dir": self.tmp, "tier": tier, "upstreams": ups, "addr": addr, "tls": tls, "up": up,
                        "uphold": uphold, "upsink": upsink}
        del nxt
        path = os.path.join(self.tmp, tier + ".conf")
        with open(path, "w") as f:
            f.write(cfg)
        return ["nginx", "-c", path, "-e", os.path.join(self.tmp, tier + ".err")]


class Haproxy(Contender):
    name = "haproxy"

    def argv(self, tier):
        pem = os.path.join(os.path.dirname(self.tmp), "fe.pem")
        if tier == "fe":
            binds = "bind %s:%d\n  bind %s:%d ssl crt %s" % (FE, P_FE, FE, P_FE_TLS, pem)
            backends = "backend next\n  server be %s:%d\n" % (BE, P_BE)
            smtp = ("frontend smtp\n  mode tcp\n  bind %s:%d\n  default_backend smtp_next\n"
                    "backend smtp_next\n  mode tcp\n  server be %s:%d send-proxy-v2\n") % (FE, P_SMTP_FE, BE, P_SMTP_BE)
            routes = "default_backend next"
        else:
            binds = "bind %s:%d" % (BE, P_BE)
            backends = ("backend origin\n  server o %s:%d\nbackend hold\n  server h %s:%d\nbackend sink\n  server s %s:%d\n") % (
                ORIGIN, P_ORIGIN, ORIGIN, P_HOLD, ORIGIN, P_SINK)
            routes = ("use_backend hold if { path_beg /hold }\n  use_backend sink if { path_beg /rpc }\n"
                      "  default_backend origin")
            smtp = ("frontend smtp\n  mode tcp\n  bind %s:%d accept-proxy\n  default_backend smtp_sink\n"
                    "backend smtp_sink\n  mode tcp\n  server s %s:%d\n") % (BE, P_SMTP_BE, ORIGIN, P_SMTP_SINK)
        cfg = textwrap.dedent('''
            global
              nbthread 1
              maxconn 9000
            defaults
              mode http
              timeout connect 10s
              timeout client 20m
              timeout server 10m
              timeout http-request 30s
              option forwardfor
              http-reuse safe
            frontend web
              %s
              %s
            %s
            ''') % (binds, routes, backends) + smtp
        path = os.path.join(self.tmp, tier + ".cfg")
        with open(path, "w") as f:
            f.write(cfg)
        return ["haproxy", "-db", "-f", path]


class Relay(Contender):
    """The floor (bench/relay.c): a two-tier chain of byte relays, one upstream connection
    per client connection. What any proxy with this I/O model costs before it parses,
    checks or rewrites anything."""
    smtp = False
    floor = True

    def stop(self):
        super().stop()
        # An io_uring instance is torn down after its process has gone, and holds the
        # listening socket until then: wait (3 s at most) until both ports are free.
        deadline = time.monotonic() + 3
        for host, port in ((FE, P_FE), (BE, P_BE)):
            while time.monotonic() < deadline:
                try:
                    socket.create_connection((host, port), timeout=0.2).close()
                    time.sleep(0.05)
                except OSError:
                    break

    def argv(self, tier):
        listen, nxt = ((FE, P_FE), (BE, P_BE)) if tier == "fe" else ((BE, P_BE), (ORIGIN, P_ORIGIN))
        return [self.binary, self.mode, listen[0], str(listen[1]), nxt[0], str(nxt[1])]


class RelayEpoll(Relay):
    name = "relay-epoll"
    mode = "epoll"


class RelayUring(Relay):
    name = "relay-uring"
    mode = "uring"


# ---------------------------------------------------------------- measurements

def wrk(url, seconds, conns=50):
    res = subprocess.run(["wrk", "-t1", "-c%d" % conns, "-d%ds" % seconds, "--latency", url], capture_output=True, text=True,
                         timeout=seconds + 30)
    out = res.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: (.*)", out)

    def ms(label):
        m = re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)\s*$" % label, out, re.M)
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
    return {"rps": rps, "requests": reqs, "p50": ms("50"), "p99": ms("99"),
            "errors": int(errors.group(1)) if errors else 0, "socket_errors": sock_err.group(1) if sock_err else ""}


def throughput(c, seconds, tls):
    url = ("https://%s:%d/owa/" if tls else "http://%s:%d/owa/") % (FE, P_FE_TLS if tls else P_FE)
    wrk(url, 2)  # warm-up: pools, TLS session caches, page cache
    cpu0 = {k: p.cpu_seconds() for k, p in c.tiers().items()}
    r = wrk(url, seconds)
    cpu1 = {k: p.cpu_seconds() for k, p in c.tiers().items()}
    for k in cpu0:
        r["cpu_us_" + k] = (cpu1[k] - cpu0[k]) * 1e6 / max(1, r["requests"])
    return r


def open_idle(n, tls, ctx):
    """n keep-alive connections, each after one complete request."""
    socks = []
    req = b"GET /owa/ HTTP/1.1\r\nHost: mail.contoso.com\r\n\r\n"
    for _ in range(n):
        s = socket.create_connection((FE, P_FE_TLS if tls else P_FE), timeout=10)
        if tls:
            s = ctx.wrap_socket(s, server_hostname="mail.contoso.com")
        s.sendall(req)
        got = b""
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 1024:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("closed during the idle-connection request")
            got += chunk
        if not got.startswith(b"HTTP/1.1 200"):
            raise RuntimeError("the idle-connection request got: %r" % got[:200])
        socks.append(s)
    return socks


def idle_memory(c, n, tls):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    open_idle(20, tls, ctx)   # settle allocators
    time.sleep(0.5)
    before = c.fe.rss_kib()
    socks = open_idle(n, tls, ctx)
    time.sleep(1.0)
    after = c.fe.rss_kib()
    for s in socks:
        s.close()
    return (after - before) / n


def held_memory(c, n, monitor):
    base = monitor()
    before = {k: p.rss_kib() for k, p in c.tiers().items()}
    socks = []
    for i in range(n):
        s = socket.create_connection((FE, P_FE), timeout=10)
        s.sendall(b"GET /hold/%d HTTP/1.1\r\nHost: mail.contoso.com\r\n\r\n" % i)
        socks.append(s)
    deadline = time.monotonic() + 60
    held = 0
    while time.monotonic() < deadline:
        held = monitor() - base
        if held >= n:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    after = {k: p.rss_kib() for k, p in c.tiers().items()}
    for s in socks:
        s.close()
    return {k: (after[k] - before[k]) / n for k in before}, held


def upload(c, size, tool):
    """One RPC_IN_DATA of `size` bytes through the chain (plain), sent by the native tool:
    MB/s, first-byte delay at the origin, peak RSS per tier (sampled every 50 ms)."""
    peak = {k: p.rss_kib() for k, p in c.tiers().items()}
    sender = subprocess.Popen([tool, "send", FE, str(P_FE), str(size)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while sender.poll() is None and time.monotonic() < deadline:
        for k, p in c.tiers().items():
            peak[k] = max(peak[k], p.rss_kib())
        time.sleep(0.05)
    if sender.poll() is None:
        sender.kill()
    out, _ = sender.communicate()
    if sender.returncode != 0:
        raise RuntimeError("the upload failed: %r" % out)
    r = json.loads(out)
    return {"mb_s": size / 1e6 / (r["end"] - r["start"]), "first_byte_ms": (r["response"]["first_byte"] - r["start"]) * 1000,
            "peak_rss_mib": {k: v / 1024 for k, v in peak.items()}}


def smtp_rate(c, conns=4, per_conn=1500, size=2048):
    """Messages per second through the chain: `conns` clients, each sending `per_conn`
    messages of `size` bytes one after another on one session; and CPU µs per message
    per tier."""
    body = (b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)) + b".\r\n"
    done = [0] * conns
    errors = []

    def client(i):
        try:
            s = socket.create_connection((FE, P_SMTP_FE), timeout=30)
            f = s.makefile("rb")

            def reply():
                while True:
                    line = f.readline()
                    if not line:
                        raise EOFError("closed")
                    if line[3:4] != b"-":
                        return line
            reply()
            s.sendall(b"EHLO bench.example\r\n")
            reply()
            for _ in range(per_conn):
                s.sendall(b"MAIL FROM:<a@example.net>\r\n")
                if not reply().startswith(b"250"):
                    raise RuntimeError("MAIL refused")
                s.sendall(b"RCPT TO:<b@contoso.com>\r\n")
                if not reply().startswith(b"250"):
                    raise RuntimeError("RCPT refused")
                s.sendall(b"DATA\r\n")
                if not reply().startswith(b"354"):
                    raise RuntimeError("DATA refused")
                s.sendall(body)
                if not reply().startswith(b"250"):
                    raise RuntimeError("message refused")
                done[i] += 1
            s.sendall(b"QUIT\r\n")
            s.close()
        except Exception as e:   # reported with the result
            errors.append(repr(e))
    threads = [threading.Thread(target=client, args=(i,)) for i in range(conns)]
    cpu0 = {k: p.cpu_seconds() for k, p in c.tiers().items()}
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0
    cpu1 = {k: p.cpu_seconds() for k, p in c.tiers().items()}
    r = {"msgs_s": sum(done) / elapsed, "messages": sum(done), "errors": errors}
    for k in cpu0:
        r["cpu_us_" + k] = (cpu1[k] - cpu0[k]) * 1e6 / max(1, sum(done))
    return r


# ---------------------------------------------------------------- the run

def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dmzproxy", required=True)
    ap.add_argument("--upload-tool", required=True, help="bench/upload.c, built")
    ap.add_argument("--relay-tool", help="bench/relay.c, built: the relay-epoll and relay-uring floors")
    ap.add_argument("--dmzproxy-before", help="another dmzproxy build: the row dmzproxy-before, with ratios against it")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--connections", type=int, default=5000)
    ap.add_argument("--upload-mib", type=int, default=1024)
    ap.add_argument("--only", default="dmzproxy,nginx,haproxy,relay-epoll,relay-uring")
    ap.add_argument("--skip", default="")
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args()
    # Every process inherits the hard limit (the proxies need two descriptors per held request).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 2 * a.connections + 100:
        sys.exit("bench: the descriptor limit (%d) is too low for --connections %d" % (hard, a.connections))
    skip = set(filter(None, a.skip.split(",")))
    tmp = tempfile.mkdtemp(prefix="dmz-bench-")
    os.chmod(tmp, 0o755)   # nginx workers run as nobody/www-data when started by root
    cert_files(tmp)
    origin_conf = os.path.join(tmp, "origin.conf")
    os.makedirs(os.path.join(tmp, "www", "owa"))
    with open(os.path.join(tmp, "www", "owa", "index.html"), "wb") as f:
        f.write(b"o" * 1024)
    with open(origin_conf, "w") as f:
        f.write(textwrap.dedent('''
            worker_processes 1; daemon off; pid %(d)s/origin.pid; error_log %(d)s/origin.err warn;
            worker_rlimit_nofile 20000;
            events { worker_connections 16000; }
            http { access_log off; keepalive_requests 1000000; keepalive_timeout 20m;
              client_body_temp_path %(d)s/ob; proxy_temp_path %(d)s/op; fastcgi_temp_path %(d)s/of;
              uwsgi_temp_path %(d)s/ou; scgi_temp_path %(d)s/os;
              server { listen %(a)s:%(p)d; root %(d)s/www; } }
            ''') % {"d": tmp, "a": ORIGIN, "p": P_ORIGIN})
    procs = [Proc("origin", ["nginx", "-c", origin_conf, "-e", os.path.join(tmp, "origin.err")], tmp),
             Proc("hold", [sys.executable, "-c", HOLD_AND_SINK, ORIGIN, str(P_HOLD), str(P_HELD)], tmp),
             Proc("upload-sink", [a.upload_tool, "sink", ORIGIN, str(P_SINK)], tmp),
             Proc("smtp-sink", [sys.executable, "-c", SMTP_SINK, ORIGIN, str(P_SMTP_SINK)], tmp)]
    results = {}
    try:
        wait_listening(ORIGIN, P_ORIGIN)
        wait_listening(ORIGIN, P_HOLD)
        wait_listening(ORIGIN, P_SINK)
        wait_listening(ORIGIN, P_HELD)
        wait_listening(ORIGIN, P_SMTP_SINK)

        def held_now():
            s = socket.create_connection((ORIGIN, P_HELD), timeout=5)
            s.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            s.close()
            return int(got.split(b"\r\n\r\n", 1)[1])

        results["origin direct"] = {}
        if "throughput" not in skip:
            log("origin direct ...")
            direct = [wrk("http://%s:%d/owa/" % (ORIGIN, P_ORIGIN), a.duration) for _ in range(a.runs)]
            results["origin direct"] = {"rps": median([r["rps"] for r in direct]), "p99": median([r["p99"] for r in direct]),
                                        "p50": median([r["p50"] for r in direct])}
        if "upload" not in skip:
            rates = []
            for _ in range(a.runs):
                out = subprocess.run([a.upload_tool, "send", ORIGIN, str(P_SINK), str(a.upload_mib << 20)], capture_output=True,
                                     text=True, timeout=300, check=True).stdout
                u = json.loads(out)
                rates.append((a.upload_mib << 20) / 1e6 / (u["end"] - u["start"]))
            results["origin direct"]["upload_mb_s"] = median(rates)
        classes = {"dmzproxy": Dmzproxy, "dmzproxy-before": DmzproxyBefore, "nginx": Nginx, "haproxy": Haproxy, "relay-epoll": RelayEpoll, "relay-uring": RelayUring}
        names = a.only.split(",")
        if a.dmzproxy_before and "dmzproxy-before" not in names:
            names.insert(names.index("dmzproxy") + 1 if "dmzproxy" in names else 0, "dmzproxy-before")
        if not a.relay_tool and any(classes[n].floor for n in names):
            log("bench: no --relay-tool, so the relay floors are left out")
            names = [n for n in names if not classes[n].floor]
        binaries = {"dmzproxy": a.dmzproxy, "dmzproxy-before": a.dmzproxy_before, "relay-epoll": a.relay_tool, "relay-uring": a.relay_tool}
        chains = {name: classes[name](tmp, binaries.get(name)) for name in names}
        for name in [n for n in names if chains[n].floor]:
            # A floor that cannot start here (io_uring disabled, say) is left out, not fatal.
            try:
                chains[name].start()
            except RuntimeError as e:
                log("%s: left out, it does not start here (%s; its output is in %s)" % (name, e, chains[name].tmp))
                names.remove(name)
            finally:
                chains[name].stop()
        proxies = [n for n in names if not chains[n].floor]   # the floors take part in throughput only
        for name in names:
            results[name] = {}

        def rounds(n, phase, fn, which=names):
            """n rounds of `fn(name, chain)` for each contender in turn, on a chain started
            for that run: the box's load drifts over minutes, so the runs of all contenders
            interleave instead of one contender's runs coming in a block. Memory freed by an
            earlier test also stays in the allocator, so a fresh chain measures cleanly."""
            out = {name: [] for name in which}
            for i in range(n):
                for name in (which if i % 2 == 0 else which[::-1]):
                    log("%s: %s, run %d" % (name, phase, i + 1))
                    c = chains[name]
                    c.start()
                    try:
                        out[name].append(fn(name, c))
                    finally:
                        c.stop()
            return out

        if "throughput" not in skip:
            def one_throughput(name, c):
                r = {m: throughput(c, a.duration, m == "tls") for m in (("plain",) if c.floor else ("plain", "tls"))}
                log("%s: %s" % (name, "; ".join("%s %.0f req/s, p99 %.2f ms, CPU FE/BE %.1f/%.1f us" % (
                    m, x["rps"], x["p99"], x["cpu_us_front-end"], x["cpu_us_back-end"]) for m, x in r.items())))
                return r
            tp = rounds(a.runs, "throughput", one_throughput)
            for name in names:
                results[name]["rounds"] = {
                    "plain": [x["plain"]["rps"] for x in tp[name]], "tls": [x["tls"]["rps"] for x in tp[name] if "tls" in x],
                    "p99": [x["plain"]["p99"] for x in tp[name]],
                    "cpu": [x["plain"]["cpu_us_front-end"] + x["plain"]["cpu_us_back-end"] for x in tp[name]]}
                for mode in [m for m in ("plain", "tls") if m in tp[name][0]]:
                    rs = [x[mode] for x in tp[name]]
                    r = results[name][mode] = {k: median([x[k] for x in rs])
                                               for k in ("rps", "p50", "p99", "cpu_us_front-end", "cpu_us_back-end")}
                    r["errors"] = sum(x["errors"] for x in rs)
                    r["socket_errors"] = [x["socket_errors"] for x in rs if x["socket_errors"]]
        if "memory" not in skip:
            for tls in (False, True):
                idle = rounds(a.runs, "idle connections" + (" (TLS)" if tls else ""),
                              lambda name, c: idle_memory(c, a.connections, tls), proxies)
                for name in proxies:
                    results[name]["idle_kib_tls" if tls else "idle_kib_plain"] = median(idle[name])

            def held_one(name, c):
                held, n = held_memory(c, a.connections, held_now)
                if n < a.connections:
                    log("%s: only %d of %d held requests reached the origin" % (name, n, a.connections))
                return held
            helds = rounds(a.runs, "held requests", held_one, proxies)
            for name in proxies:
                results[name]["held_kib"] = {k: median([x[k] for x in helds[name]]) for k in helds[name][0]}
        smtp_names = [n for n in names if chains[n].smtp]
        if "smtp" not in skip and smtp_names:
            # At least five runs: a run is two seconds, and its rate moves with the load of
            # the four processes sharing two cores.
            sm = rounds(max(a.runs, 5), "smtp", lambda name, c: smtp_rate(c), smtp_names)
            for name in smtp_names:
                r = results[name]
                r["smtp_msgs_s"] = median([x["msgs_s"] for x in sm[name]])
                r["smtp_cpu_us"] = {k: median([x["cpu_us_" + k] for x in sm[name]]) for k in chains[name].tiers()}
                r["smtp_errors"] = [e for x in sm[name] for e in x["errors"]]
                r.setdefault("rounds", {})["smtp"] = [x["msgs_s"] for x in sm[name]]
                log("%s: smtp %s msg/s, CPU µs/msg %s" % (name, ["%.0f" % x["msgs_s"] for x in sm[name]],
                                                        {k: "%.0f" % v for k, v in r["smtp_cpu_us"].items()}))
        if "upload" not in skip:
            ups = rounds(a.runs, "upload", lambda name, c: upload(c, a.upload_mib << 20, a.upload_tool), proxies)
            for name in proxies:
                r = results[name]
                r["upload_mb_s"] = median([u["mb_s"] for u in ups[name]])
                r["upload_first_byte_ms"] = median([u["first_byte_ms"] for u in ups[name]])
                r["upload_peak_rss_mib"] = {k: max(u["peak_rss_mib"][k] for u in ups[name]) for k in ups[name][0]["peak_rss_mib"]}
                r.setdefault("rounds", {})["upload"] = [u["mb_s"] for u in ups[name]]
                log("%s: upload %s MB/s" % (name, ["%.0f" % u["mb_s"] for u in ups[name]]))
    finally:
        for p in procs:
            p.stop()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)
    report(results, a)
    shutil.rmtree(tmp, ignore_errors=True)


def report(res, a):
    ng = res.get("nginx")

    def ratio(v, ref):
        return " (%.2f×)" % (v / ref) if ref else ""

    print("\n| chain | req/s plain | req/s TLS at front | p50 / p99 ms plain | CPU µs/req FE / BE (plain) |"
          " idle KiB/conn plain / TLS | held KiB/conn FE / BE | 1 GiB upload MB/s | first byte ms | peak RSS MiB FE / BE |"
          " SMTP msg/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    d = res.get("origin direct")
    if d:
        print("| origin direct | %s | | %s | | | | %s | | | |" % (
            "%.0f" % d["rps"] if "rps" in d else "", "%.2f / %.2f" % (d["p50"], d["p99"]) if "rps" in d else "",
            "%.0f" % d["upload_mb_s"] if "upload_mb_s" in d else ""))
    for name in ("dmzproxy", "dmzproxy-before", "nginx", "haproxy", "relay-epoll", "relay-uring"):
        r = res.get(name)
        if not r:
            continue
        p, t = r.get("plain"), r.get("tls")
        ref = ng if ng and "plain" in ng and name != "nginx" else None
        cells = ["", "", "", ""] if not p else [
            "%.0f%s" % (p["rps"], ratio(p["rps"], ref["plain"]["rps"]) if ref else ""),
            "%.0f%s" % (t["rps"], ratio(t["rps"], ref["tls"]["rps"]) if ref else "") if t else "",
            "%.2f / %.2f%s" % (p["p50"], p["p99"], ratio(p["p99"], ref["plain"]["p99"]) if ref else ""),
            "%.1f / %.1f%s" % (p["cpu_us_front-end"], p["cpu_us_back-end"],
                               ratio(p["cpu_us_front-end"] + p["cpu_us_back-end"],
                                     ref["plain"]["cpu_us_front-end"] + ref["plain"]["cpu_us_back-end"]) if ref else ""),
        ]
        if r.get("idle_kib_plain") is not None:
            cells.append("%.2f / %.2f" % (r["idle_kib_plain"], r["idle_kib_tls"]))
            cells.append("%.2f / %.2f" % (r["held_kib"]["front-end"], r["held_kib"]["back-end"]))
        else:
            cells += ["", ""]
        if "upload_mb_s" in r:
            cells.append("%.0f%s" % (r["upload_mb_s"], ratio(r["upload_mb_s"], res["haproxy"]["upload_mb_s"])
                                     if name != "haproxy" and "haproxy" in res and "upload_mb_s" in res["haproxy"] else ""))
            cells.append("%.0f" % r["upload_first_byte_ms"])
            cells.append("%.1f / %.1f" % (r["upload_peak_rss_mib"]["front-end"], r["upload_peak_rss_mib"]["back-end"]))
        else:
            cells += ["", "", ""]
        if "smtp_msgs_s" in r:
            hp = res.get("haproxy", {}).get("smtp_msgs_s")
            cells.append("%.0f%s" % (r["smtp_msgs_s"], ratio(r["smtp_msgs_s"], hp) if hp and name != "haproxy" else "") +
                         (" (TCP mode)" if name == "haproxy" else ""))
        else:
            cells.append("")
        print("| %s | %s |" % (name, " | ".join(cells)))
        if r.get("smtp_errors"):
            print("\n%s smtp errors: %s" % (name, r["smtp_errors"][:3]))
        errs = [m for m in ("plain", "tls") if m in r and (r[m]["errors"] or r[m]["socket_errors"])]
        for m in errs:
            print("\n%s %s: %d non-2xx responses, socket errors %s" % (name, m, r[m]["errors"], r[m]["socket_errors"]))
    print("\nRatios in brackets: against nginx (throughput, p99, CPU FE+BE), against HAProxy (upload, SMTP).")
    # The contenders of one round ran minutes apart at most: the ratio within each round,
    # then its median, is the steadier comparison on a noisy box.
    lines = []
    for name, ref_name, keys in (("dmzproxy", "nginx", ("plain", "tls", "p99", "cpu")),
                                 ("haproxy", "nginx", ("plain", "tls", "p99", "cpu")),
                                 ("relay-epoll", "nginx", ("plain", "cpu")), ("relay-uring", "nginx", ("plain", "cpu")),
                                 ("dmzproxy", "haproxy", ("upload", "smtp")),
                                 ("dmzproxy", "dmzproxy-before", ("plain", "tls", "p99", "cpu", "upload", "smtp"))):
        mine, ref = res.get(name, {}).get("rounds", {}), res.get(ref_name, {}).get("rounds", {})
        for k in keys:
            if mine.get(k) and ref.get(k):
                rs = [x / y for x, y in zip(mine[k], ref[k]) if y]
                lines.append("%s/%s %s: %s (median %.2f)" % (name, ref_name, k, " ".join("%.2f" % x for x in rs), median(rs)))
    if lines:
        print("Round by round: " + "; ".join(lines) + ".")
    print("Medians of %d runs of %d s (wrk -t1 -c50), %d connections for memory, %d MiB upload, %d SMTP runs of 6,000 messages; %s, %d cores." % (
        a.runs, a.duration, a.connections, a.upload_mib, max(a.runs, 5), os.uname().release, os.cpu_count()))


if __name__ == "__main__":
    main()
