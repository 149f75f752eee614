#!/usr/bin/env python3
"""The simulated Exchange host of the dmzproxy lab: one process per host.

    exchange_host.py --name NAME --address 127.x.y.z --cert PEM --key KEY --store DIR
                     --stats 127.0.0.1:PORT --log FILE.jsonl [--accepted-domain D]...
                     --service NAME:PROTOCOL:PORT[:ROLE]...
                     [--fqdn NAME] [--pending-period-ms MS] [--max-message-size BYTES]

`dmzproxy lab up` starts it (topology/src/lab.cpp) once per [hosts.*] entry of the
topology. Every service binds on --address; PROTOCOL is https, http or smtp; ROLE (smtp)
is e.g. `frontend` (FrontEnd transport, 25) or `hub` (Hub transport, 2525). The statistics
endpoint (GET /stats, JSON) binds on 127.0.0.1 only. SIGTERM or SIGINT ends the process
with status 0 within a fraction of a second. Python 3 standard library only; the pieces
live in the exchange_sim package beside this file (the test origin and SMTP sink reuse them).

The server's DNS name (in Autodiscover answers, SMTP banners and queue ids) is --fqdn, or
the first DNS name of the certificate's subjectAltName, or --name.

Web services (https/http): HTTP/1.1 with keep-alive, a thread per connection, TLS 1.2+.
  /owa                 GET/POST/HEAD: a page naming the host and showing the client
                       address it received (the first X-Forwarded-For entry if present,
                       else the peer), the peer, the Host and the user (NTLM-authenticated
                       connection, or Authorization: Basic, else "anonymous");
                       `?format=json` gives the same as JSON.
  /ecp                 a page saying it is the Exchange admin center.
  /Microsoft-Server-ActiveSync
                       OPTIONS: MS-ASProtocolVersions and MS-ASProtocolCommands.
                       POST Cmd=Ping: held for the heartbeat, then 200 (WBXML Status 1).
                       The heartbeat is `?HeartbeatInterval=N` or `X-Heartbeat: N` when
                       given (test overrides), else the HeartbeatInterval of the WBXML body,
                       else 60 s; at most 3540 s. A client that goes away ends the hold.
  /rpc/rpcproxy.dll    Outlook Anywhere RPC_IN_DATA / RPC_OUT_DATA channel pairs.
                       PAIRING RULE: the first 16 bytes of each channel's request body are
                       the pair cookie (in real MS-RPCH this is the virtual connection
                       cookie carried by the CONN/A1 and CONN/B1 RTS PDUs). RPC_OUT_DATA
                       carries a small body (e.g. Content-Length 76): right after its cookie
                       is read the OUT channel answers `200` with `Content-Length:
                       1073741824` and stays open (the rest of its body is ignored).
                       The bytes that arrive on an RPC_IN_DATA channel after its cookie
                       are echoed, as they arrive, on the OUT channel of the same cookie
                       (bytes that arrive before that OUT channel exists are kept, up to
                       8 MiB, and sent when it comes). The IN channel is answered (200,
                       Content-Length 0) only if its whole declared body arrives.
  /mapi/emsmdb, /mapi/nspi
                       POST: 200 chunked: `PROCESSING` at once, a `PENDING` chunk every
                       X-PendingPeriod ms (request header; default --pending-period-ms,
                       1000) `?pendings=N` times (default 3), then `DONE` and the last chunk.
  /EWS/Exchange.asmx   POST: a small SOAP response naming the host and the user;
                       GET: a short WSDL-like page.
  /autodiscover/autodiscover.xml   POST: an Autodiscover (POX) response naming the server.
  /autodiscover/autodiscover.json  GET: {"Protocol": P, "Url": "https://<fqdn>/..."}
                       (P from ?Protocol=, e.g. ActiveSync, EWS, AutodiscoverV1).
  /OAB/...             GET/HEAD: a small file (oab.xml, or a few bytes of "LZX" data).
  /powershell          a page (so tests can prove that it was, or was never, reached).
  /                    302 to /owa/; anything else 404.
NTLM emulation on the paths Exchange protects with Windows authentication (/EWS, /rpc,
/mapi, /autodiscover/autodiscover.xml, /OAB): connection-based like IIS. A type-1 message
gets 401 with a valid type-2 challenge; a type-3 on the same connection authenticates it
(any user and password: it is an emulation; the user, DOMAIN\\user, is recorded); a type-3
on a connection that was never challenged gets 401 "Unexpected NTLM message Type 3 in new
connection". `Authorization: Basic` is accepted there too (any password). Without
credentials: 401 with `WWW-Authenticate: NTLM` and `WWW-Authenticate: Basic realm="<name>"`.
/owa and ActiveSync demand nothing but record a Basic user when one is sent.

SMTP services: ESMTP with STARTTLS (same certificate), PIPELINING, SIZE, 8BITMIME,
ENHANCEDSTATUSCODES and CHUNKING (BDAT, as Exchange offers it). Only <CRLF>.<CRLF> ends
DATA (a bare LF never does), and a leading dot is removed (un-dot-stuffing); BDAT chunks
are taken as they are. Recipients outside the --accepted-domain domains get
`550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain`, as Exchange says.
Each accepted message is stored as DIR/<service-name>/<queue-id>.eml (the message as
received, un-dot-stuffed, without the final dot line) with a sidecar <queue-id>.json
(queue_id, internal_id, mail_from, rcpts, peer, peer_port, ehlo, tls, size, sha256,
service, role, time, via: DATA or BDAT), the sidecar first, each by an atomic rename. The client gets
`250 2.6.0 <queue-id@fqdn> [InternalId=N] Queued mail for delivery`.

Statistics, GET http://127.0.0.1:PORT/stats: JSON with `requests` per path prefix (owa,
ecp, activesync, rpc, mapi, ews, autodiscover, oab, powershell, other), `connections`
(connection id -> count, peer, service, user), `recent` (the last 200 requests: method,
path, target, peer, x_forwarded_for, host, user, conn, service, status),
`ntlm_handshakes`, `messages` (stored per SMTP service), `smtp` and `rpc` details.
Every request (when its response starts, or when it ends without one) and every message
is also appended as one JSON line to --log, flushed at once.
"""

import argparse
import http.server
import os
import ssl
import sys
import threading

from exchange_sim import serve
from exchange_sim import tls as tlsmod
from exchange_sim.jsonlog import JsonLog, now_iso
from exchange_sim.rpc import RpcRegistry
from exchange_sim.stats import Stats
from exchange_sim.store import Store
from exchange_sim.transport import ExchangeTransport
from exchange_sim.web import ExchangeWeb

SMTP_MAX_SIZE = 37748736             # Exchange's default receive connector limit (36 MB)


class Service:
    def __init__(self, spec):
        parts = spec.split(":")
        if len(parts) not in (3, 4) or not parts[0] or parts[1] not in ("https", "http", "smtp") or \
                not parts[2].isdigit() or not 0 < int(parts[2]) < 65536:
            raise ValueError("--service wants NAME:PROTOCOL:PORT[:ROLE] with PROTOCOL https, http or smtp, "
                             "got %r" % spec)
        self.name, self.protocol, self.port = parts[0], parts[1], int(parts[2])
        self.role = parts[3] if len(parts) == 4 and parts[3] else None
        self.sock = None


class Host:
    def __init__(self, args, services, tls_context):
        self.name = args.name
        self.address = args.address
        self.services = services
        self.accepted_domains = [d.strip().rstrip(".").lower() for d in args.accepted_domain if d.strip()]
        self.xclient_from = set(args.xclient_from)
        self.tls_context = tls_context
        names = tlsmod.cert_dns_names(args.cert)
        self.fqdn = args.fqdn or (names[0] if names else args.name)
        self.domain = self.accepted_domains[0] if self.accepted_domains else (
            self.fqdn.split(".", 1)[1] if "." in self.fqdn else self.fqdn)
        self.pending_period_ms = args.pending_period_ms
        self.max_message_size = args.max_message_size
        self.log = JsonLog(args.log)
        self.store = Store(args.store)
        self.rpc = RpcRegistry()
        self.stats = Stats(self)
        self.stopping = threading.Event()

    def handler(self, service):
        """What serves one connection of `service`."""
        kind = ExchangeTransport if service.protocol == "smtp" else ExchangeWeb
        return lambda sock, peer: kind(self, service, sock, peer).run()


def make_stats_server(host, address, port):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "exchange-host-stats"

        def do_GET(self):  # noqa: N802 - the http.server API
            path = self.path.split("?", 1)[0].rstrip("/")
            if path == "/stats":
                body = host.stats.snapshot().encode()
                ctype = "application/json"
                status = 200
            elif path == "":
                body = ("simulated Exchange host %s: GET /stats\n" % host.name).encode()
                ctype, status = "text/plain", 200
            else:
                body, ctype, status = b"not found\n", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True

    return Server((address, port), Handler)



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="the host's name in the topology")
    ap.add_argument("--address", required=True, help="the address every service binds on")
    ap.add_argument("--cert", help="PEM certificate (chain) for HTTPS and STARTTLS")
    ap.add_argument("--key", help="PEM private key")
    ap.add_argument("--store", required=True, help="mail store: DIR/<service>/<queue-id>.eml and .json")
    ap.add_argument("--stats", required=True, help="127.0.0.1:PORT for GET /stats")
    ap.add_argument("--log", help="JSON lines, appended")
    ap.add_argument("--accepted-domain", action="append", default=[], help="a domain mail is accepted for")
    ap.add_argument("--xclient-from", action="append", default=[],
                    help="an address whose XCLIENT LOGIN is believed (a publishing tier that authenticated the sender)")
    ap.add_argument("--service", action="append", default=[], help="NAME:PROTOCOL:PORT[:ROLE]")
    ap.add_argument("--fqdn", help="the server's DNS name (default: the certificate's first DNS name)")
    ap.add_argument("--pending-period-ms", type=int, default=1000, help="MAPI PENDING period (default 1000)")
    ap.add_argument("--max-message-size", type=int, default=SMTP_MAX_SIZE, help="SMTP SIZE limit in bytes")
    args = ap.parse_args(argv)
    try:
        services = [Service(s) for s in args.service]
    except ValueError as e:
        ap.error(str(e))
    if not services:
        ap.error("at least one --service is needed")
    if bool(args.cert) != bool(args.key):
        ap.error("--cert and --key go together")
    stats_host, _, stats_port = args.stats.rpartition(":")
    if not stats_port.isdigit():
        ap.error("--stats wants ADDRESS:PORT")
    stats_host = stats_host.strip("[]") or "127.0.0.1"
    if stats_host not in ("127.0.0.1", "localhost"):
        ap.error("--stats binds on loopback only (127.0.0.1)")
    tls_context = None
    if args.cert:
        try:
            tls_context = tlsmod.server_context(args.cert, args.key)
        except (OSError, ssl.SSLError) as e:
            print("exchange_host %s: cannot load certificate %s / key %s: %s" % (args.name, args.cert, args.key, e),
                  file=sys.stderr, flush=True)
            return 1
    elif any(s.protocol == "https" for s in services):
        ap.error("an https service needs --cert and --key")

    serve.hold_stop_signals()     # before binding: a SIGTERM from now on is a clean stop
    host = Host(args, services, tls_context)
    for s in services:
        try:
            s.sock = serve.listen(args.address, s.port)
        except OSError as e:
            print("exchange_host %s: service %s: cannot bind %s:%d: %s" % (args.name, s.name, args.address, s.port,
                                                                           e.strerror or e), file=sys.stderr,
                  flush=True)
            return 1
    try:
        stats_server = make_stats_server(host, "127.0.0.1", int(stats_port))
    except OSError as e:
        print("exchange_host %s: statistics: cannot bind 127.0.0.1:%s: %s" % (args.name, stats_port, e.strerror or e),
              file=sys.stderr, flush=True)
        return 1

    threading.Thread(target=stats_server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True,
                     name="stats").start()
    for s in services:
        serve.accept_in_background(s.sock, host.handler(s), host.stopping, name="accept-" + s.name)
    host.log.write({"event": "start", "time": now_iso(), "host": host.name, "fqdn": host.fqdn, "pid": os.getpid(),
                    "address": host.address, "stats": "http://127.0.0.1:%s/stats" % stats_port,
                    "services": [{"name": s.name, "protocol": s.protocol, "port": s.port, "role": s.role}
                                 for s in services], "accepted_domains": host.accepted_domains})
    print("exchange host %s (%s) pid %d: %s; stats http://127.0.0.1:%s/stats" % (
        host.name, host.fqdn, os.getpid(),
        ", ".join("%s %s %s:%d%s" % (s.name, s.protocol, args.address, s.port, " (%s)" % s.role if s.role else "")
                  for s in services), stats_port), flush=True)

    serve.wait_for_stop()
    host.stopping.set()
    host.log.write({"event": "stop", "time": now_iso(), "host": host.name, "pid": os.getpid()})
    for s in services:
        try:
            s.sock.close()
        except OSError:
            pass
    try:
        stats_server.socket.close()
    except OSError:
        pass
    host.log.close()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        pass
    os._exit(0)  # daemon threads may sit in blocking calls: end now, everything is flushed


if __name__ == "__main__":
    sys.exit(main())

