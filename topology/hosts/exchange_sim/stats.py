"""The simulated host's statistics, GET /stats: requests per path category, connections, the
last requests, NTLM handshakes, messages per SMTP service, Outlook Anywhere pairs."""

import collections
import json
import os
import threading
import time

from .jsonlog import now_iso

RECENT = 200
MAX_TRACKED_CONNECTIONS = 5000
CATEGORIES = ("owa", "ecp", "activesync", "rpc", "mapi", "ews", "autodiscover", "oab", "powershell", "other")
PREFIXES = (("/owa", "owa"), ("/ecp", "ecp"), ("/microsoft-server-activesync", "activesync"), ("/rpc", "rpc"),
            ("/mapi", "mapi"), ("/ews", "ews"), ("/autodiscover", "autodiscover"), ("/oab", "oab"),
            ("/powershell", "powershell"))


def category(path_lower):
    for prefix, name in PREFIXES:
        if path_lower == prefix or path_lower.startswith(prefix + "/"):
            return name
    return "other"


class Stats:
    def __init__(self, host):
        self.host = host
        self.lock = threading.Lock()
        self.started = time.time()
        self.requests = {c: 0 for c in CATEGORIES}
        self.connections = collections.OrderedDict()
        self.recent = collections.deque(maxlen=RECENT)
        self.ntlm_handshakes = 0
        self.messages = {}
        self.smtp = {}

    def connection(self, conn_id, service, peer, tls):
        with self.lock:
            self.connections[str(conn_id)] = {"count": 0, "peer": "%s:%d" % peer, "service": service,
                                              "tls": tls, "user": None, "opened": now_iso(), "open": True}
            while len(self.connections) > MAX_TRACKED_CONNECTIONS:
                self.connections.popitem(last=False)

    def connection_closed(self, conn_id):
        with self.lock:
            c = self.connections.get(str(conn_id))
            if c:
                c["open"] = False

    def request(self, conn, req, cat):
        rec = {"time": now_iso(), "conn": conn.id, "service": conn.service.name, "method": req.method,
               "path": req.path, "target": req.target, "peer": conn.peer[0], "peer_port": conn.peer[1],
               "x_forwarded_for": req.header("x-forwarded-for"), "host": req.header("host"),
               "user": None, "category": cat, "status": None}
        with self.lock:
            self.requests[cat] += 1
            c = self.connections.get(str(conn.id))
            if c:
                c["count"] += 1
            self.recent.append(rec)
        return rec

    def update(self, rec, **fields):
        with self.lock:
            rec.update(fields)

    def set_user(self, conn, rec, user):
        with self.lock:
            rec["user"] = user
            c = self.connections.get(str(conn.id))
            if c and user:
                c["user"] = user

    def ntlm_done(self):
        with self.lock:
            self.ntlm_handshakes += 1

    def smtp_event(self, service, key, n=1):
        with self.lock:
            s = self.smtp.setdefault(service, {"sessions": 0, "messages": 0, "rcpt_refused": 0, "bytes": 0})
            s[key] += n
            if key == "messages":
                self.messages[service] = self.messages.get(service, 0) + n

    def snapshot(self):
        h = self.host
        with self.lock:
            return json.dumps({
                "name": h.name, "fqdn": h.fqdn, "address": h.address, "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
                "uptime_s": round(time.time() - self.started, 3),
                "services": [{"name": s.name, "protocol": s.protocol, "port": s.port, "role": s.role}
                             for s in h.services],
                "accepted_domains": h.accepted_domains,
                "requests": dict(self.requests),
                "requests_total": sum(self.requests.values()),
                "connections": self.connections,
                "recent": list(self.recent),
                "ntlm_handshakes": self.ntlm_handshakes,
                "messages": dict(self.messages),
                "smtp": self.smtp,
                "rpc": h.rpc.snapshot(),
            }, indent=1, default=str)

