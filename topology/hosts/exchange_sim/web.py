"""Exchange's web services as the simulated host serves them: HTTP/1.1 with keep-alive, a
thread per connection, TLS 1.2 and later (see exchange_host.py for what each path answers).
NTLM is emulated, connection-based like IIS, on the paths Exchange protects with Windows
authentication; Basic is accepted there too."""

import collections
import email.utils
import hashlib
import html
import itertools
import json
import re
import secrets
import select
import time
import urllib.parse

from . import http
from .jsonlog import now_iso
from .ntlm import IisNtlm, basic_user
from .rpc import OutChannel
from .serve import Eof
from .stats import category

MAX_BODY = 64 * 1024 * 1024          # bodies read whole (everything but RPC_IN_DATA)
MAX_AUTH_DRAIN = 16 * 1024 * 1024    # a 401'd request body larger than this closes instead
DEFAULT_HEARTBEAT = 60
MAX_HEARTBEAT = 3540
RPC_OUT_LENGTH = 1073741824
MAX_PENDINGS = 1000
AS_VERSIONS = "2.5,12.0,12.1,14.0,14.1,16.0,16.1"
AS_COMMANDS = ("Sync,SendMail,SmartForward,SmartReply,GetAttachment,GetHierarchy,CreateCollection,"
               "DeleteCollection,MoveCollection,FolderSync,FolderCreate,FolderDelete,FolderUpdate,MoveItems,"
               "GetItemEstimate,MeetingResponse,Search,Settings,Ping,ItemOperations,Provision,"
               "ResolveRecipients,ValidateCert")


def protected(path_lower, cat):
    """The paths Exchange's IIS protects with Windows authentication."""
    if cat in ("ews", "rpc", "mapi", "oab"):
        return True
    return path_lower.startswith("/autodiscover/autodiscover.xml")


class ExchangeRequest(http.Request):
    def __init__(self, *args):
        super().__init__(*args)
        self.path = urllib.parse.unquote(self.raw_path)
        self.lower = self.path.lower()
        self.query = {}
        for k, v in urllib.parse.parse_qsl(self.query_text, keep_blank_values=True):
            self.query.setdefault(k.lower(), v)
        self.user = None
        self.rec = None
        self.logged = False


class ExchangeWeb(http.HttpConnection):
    """One client connection of a web service (https or http) of the simulated host."""

    idle_timeout = 120.0                 # IIS connectionTimeout
    ids = itertools.count(1)

    def __init__(self, host, service, sock, peer):
        super().__init__(sock, peer, host.tls_context if service.protocol == "https" else None, host.stopping)
        self.host = host
        self.service = service
        self.ntlm = IisNtlm(host.fqdn, host.name, ['Basic realm="%s"' % host.name])

    @property
    def server_fields(self):
        return (("Date", self.http_date()), ("Server", "Microsoft-IIS/10.0"), ("X-FEServer", self.host.name.upper()),
                ("X-Powered-By", "ASP.NET"))

    def read_body(self, req, limit=MAX_BODY):
        return super().read_body(req, limit)

    def opened(self):
        self.host.stats.connection(self.id, self.service.name, self.peer, self.tls)

    def closed(self):
        self.host.stats.connection_closed(self.id)

    def log_request(self, req, status, error=None, **extra):
        if req.logged:
            return
        req.logged = True
        self.host.stats.update(req.rec, status=status)
        obj = {"event": "request", "time": now_iso(), "host": self.host.name, "service": self.service.name,
               "conn": self.id, "req": self.requests, "peer": self.peer[0], "peer_port": self.peer[1],
               "tls": self.tls, "sni": self.sni, "method": req.method, "target": req.target, "path": req.path,
               "category": req.rec["category"], "host_header": req.header("host"),
               "x_forwarded_for": req.header("x-forwarded-for"), "via": req.header("via"),
               "user": req.user, "status": status, "body_bytes": req.body_bytes}
        if error:
            obj["error"] = error
        obj.update(extra)
        self.host.log.write(obj)


    def respond(self, req, status, fields=(), body=b"", keep_alive=True, reason=None, **log_extra):
        self.log_request(req, status, **log_extra)
        return super().respond(req, status, fields, body, keep_alive, reason)

    def page(self, req, status, title, inner, keep_alive, headers=()):
        body = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>%s</title></head>\n<body>\n%s\n"
                "<p><small>Simulated Exchange host <b>%s</b> (dmzproxy lab)</small></p>\n</body></html>\n") % (
            html.escape(title), inner, html.escape(self.host.name))
        return self.respond(req, status, [("Content-Type", "text/html; charset=utf-8")] + list(headers),
                            body, keep_alive)

    # -- the loop


    def serve_one(self):
        try:
            head = self.read_head()
        except ValueError:
            self.send(self.head_bytes(None, 431, None, [("Content-Length", "0")], False))
            return False
        if head is None:
            return False
        req = http.parse_head(head, ExchangeRequest)
        self.requests += 1
        if not req.well_formed or any(not n or n != n.strip() for n, _ in req.headers):
            self.host.log.write({"event": "bad-request", "time": now_iso(), "host": self.host.name,
                                 "conn": self.id, "peer": self.peer[0], "head": head[:200].decode("latin-1")})
            self.send(self.head_bytes(None, 400, None, [("Content-Type", "text/plain"), ("Content-Length", "12")],
                                      False) + b"Bad Request\n")
            return False
        cat = category(req.lower)
        req.rec = self.host.stats.request(self, req, cat)
        try:
            req.framing = http.framing(req, strict=True)
        except ValueError as e:
            return self.respond(req, 400, [("Content-Type", "text/plain")], str(e) + "\n", False, error=str(e))
        try:
            return self.dispatch(req, cat)
        except Eof as e:
            self.log_request(req, None, error="connection ended: %s" % e, complete=req.complete)
            return False
        except OverflowError as e:
            return self.respond(req, 413, [("Content-Type", "text/plain")], str(e) + "\n", False, error=str(e))
        except ValueError as e:
            return self.respond(req, 400, [("Content-Type", "text/plain")], str(e) + "\n", False, error=str(e))

    # -- authentication

    def authenticate(self, req):
        """None when the request may go on (req.user set), else (header fields, text) of a 401."""
        scheme, _, token = (req.header("authorization") or "").strip().partition(" ")
        if scheme.lower() == "basic":
            req.user = basic_user(token)
            return None if req.user else (self.ntlm.refusal_fields, "401 - Unauthorized: malformed Basic credentials\n")
        answer = self.ntlm.answer(scheme, token)
        if isinstance(answer, tuple):
            return answer
        req.user = answer
        if self.ntlm.completed:
            self.host.stats.ntlm_done()
            self.host.log.write({"event": "ntlm", "time": now_iso(), "host": self.host.name,
                                 "conn": self.id, "peer": self.peer[0], "user": req.user})
        return None

    def passive_user(self, req):
        scheme, _, token = (req.header("authorization") or "").strip().partition(" ")
        if scheme.lower() == "basic":
            req.user = basic_user(token)
        if not req.user and self.ntlm.state == "authenticated":
            req.user = self.ntlm.user

    # -- dispatch

    def dispatch(self, req, cat):
        keep = req.keep_alive
        if protected(req.lower, cat):
            refusal = self.authenticate(req)
        else:
            refusal = None
            self.passive_user(req)
        self.host.stats.set_user(self, req.rec, req.user)
        if refusal is not None:
            headers, text = refusal
            kind, length = req.framing
            expect = (req.header("expect") or "").lower() == "100-continue"
            if kind != "none" and (expect or kind == "chunked" or length > MAX_AUTH_DRAIN):
                keep = False          # answer at once and close, as IIS does for a big upload
            elif kind != "none":
                self.drain_body(req)
            return self.respond(req, 401, [("Content-Type", "text/html")] + headers, text, keep)

        m = req.method
        if cat == "owa":
            if m not in ("GET", "POST", "HEAD"):
                self.read_body(req)
                return self.respond(req, 405, [("Allow", "GET, POST, HEAD")], b"", keep)
            self.read_body(req)
            return self.owa(req, keep)
        if cat == "ecp":
            self.read_body(req)
            return self.page(req, 200, "Exchange admin center",
                             "<h1>Exchange admin center</h1>\n<p id=\"ecp\">The Exchange admin center (/ecp) of "
                             "host %s was reached by %s.</p>" % (html.escape(self.host.name),
                                                                  html.escape(self.client_address(req))), keep)
        if cat == "activesync":
            return self.activesync(req, keep)
        if cat == "rpc":
            if req.lower.rstrip("/") != "/rpc/rpcproxy.dll":
                self.read_body(req)
                return self.page(req, 404, "Not found", "<h1>404 - File or directory not found.</h1>", keep)
            if m == "RPC_OUT_DATA":
                return self.rpc_out(req)
            if m == "RPC_IN_DATA":
                return self.rpc_in(req, keep)
            self.read_body(req)
            return self.respond(req, 405, [("Allow", "RPC_IN_DATA, RPC_OUT_DATA")], b"", keep)
        if cat == "mapi":
            self.read_body(req)
            if m == "POST" and (req.lower.startswith("/mapi/emsmdb") or req.lower.startswith("/mapi/nspi")):
                return self.mapi(req, keep)
            if m in ("GET", "HEAD"):
                return self.page(req, 200, "MAPI over HTTP",
                                 "<h1>Exchange MAPI/HTTP Connectivity Endpoint</h1>\n<p>User: %s</p>" %
                                 html.escape(req.user or "anonymous"), keep)
            return self.respond(req, 405, [("Allow", "POST, GET")], b"", keep)
        if cat == "ews":
            body = self.read_body(req)
            return self.ews(req, body, keep)
        if cat == "autodiscover":
            body = self.read_body(req)
            return self.autodiscover(req, body, keep)
        if cat == "oab":
            self.read_body(req)
            return self.oab(req, keep)
        if cat == "powershell":
            self.read_body(req)
            return self.page(req, 200, "Remote PowerShell",
                             "<h1>Exchange Remote PowerShell</h1>\n<p id=\"powershell\">/powershell of host %s "
                             "was reached.</p>" % html.escape(self.host.name), keep)
        self.read_body(req)
        if req.lower == "/":
            return self.respond(req, 302, [("Location", "/owa/"), ("Content-Type", "text/html")],
                                b"<a href=\"/owa/\">/owa/</a>\n", keep)
        return self.page(req, 404, "Not found", "<h1>404 - File or directory not found.</h1>", keep)

    def client_address(self, req):
        xff = req.header("x-forwarded-for")
        if xff:
            first = xff.split(",")[0].strip()
            if first:
                return first
        return self.peer[0]

    # -- /owa

    def owa(self, req, keep):
        info = collections.OrderedDict([
            ("host", self.host.name), ("server", self.host.fqdn),
            ("client_address", self.client_address(req)), ("peer_address", self.peer[0]),
            ("peer_port", self.peer[1]), ("x_forwarded_for", req.header("x-forwarded-for")),
            ("x_forwarded_proto", req.header("x-forwarded-proto")), ("via", req.header("via")),
            ("host_header", req.header("host")), ("user", req.user or "anonymous"),
            ("method", req.method), ("path", req.path), ("conn", self.id), ("request_on_conn", self.requests),
            ("tls", self.tls), ("sni", self.sni), ("service", self.service.name)])
        if req.query.get("format") == "json":
            return self.respond(req, 200, [("Content-Type", "application/json")], json.dumps(info) + "\n", keep)
        rows = "\n".join("<tr><th>%s</th><td id=\"%s\">%s</td></tr>" % (
            html.escape(k.replace("_", " ")), html.escape(k.replace("_", "-")),
            html.escape("" if v is None else str(v))) for k, v in info.items())
        inner = ("<h1>Outlook on the web</h1>\n<p>Served by the simulated Exchange host <b id=\"host-name\">%s</b> "
                 "to client <b>%s</b> (peer %s), user <b>%s</b>.</p>\n<table>\n%s\n</table>") % (
            html.escape(self.host.name), html.escape(info["client_address"]), html.escape(self.peer[0]),
            html.escape(info["user"]), rows)
        return self.page(req, 200, "Outlook - %s" % self.host.name, inner, keep)

    # -- ActiveSync

    def activesync(self, req, keep):
        m = req.method
        base = [("MS-Server-ActiveSync", "15.20"), ("Cache-Control", "private")]
        if m == "OPTIONS":
            self.read_body(req)
            return self.respond(req, 200, base + [("Allow", "OPTIONS,POST"), ("MS-ASProtocolVersions", AS_VERSIONS),
                                                  ("MS-ASProtocolCommands", AS_COMMANDS),
                                                  ("Public", "OPTIONS,POST")], b"", keep)
        if m != "POST":
            self.read_body(req)
            return self.respond(req, 501, [("Content-Type", "text/plain")], b"Not implemented\n", keep)
        body = self.read_body(req, 10 * 1024 * 1024)
        cmd = req.query.get("cmd", "")
        if cmd.lower() != "ping":
            return self.respond(req, 200, base + [("Content-Type", "application/vnd.ms-sync.wbxml")], b"", keep,
                                command=cmd)
        heartbeat, source = DEFAULT_HEARTBEAT, "default"
        override = req.query.get("heartbeatinterval") or req.header("x-heartbeat")
        if override is not None and override.strip().isdigit():
            heartbeat, source = int(override.strip()), "override"
        else:
            mm = re.search(rb"\x48\x03(\d{1,5})\x00", body) if b"\x00\x0d" in body else None
            if mm:
                heartbeat, source = int(mm.group(1)), "wbxml"
        heartbeat = max(0, min(heartbeat, MAX_HEARTBEAT))
        self.host.log.write({"event": "ping-hold", "time": now_iso(), "host": self.host.name, "conn": self.id,
                             "peer": self.peer[0], "user": req.user, "heartbeat": heartbeat, "source": source})
        started = time.monotonic()
        if not self.wait_peer(heartbeat):
            self.log_request(req, None, error="client left during the Ping hold", command="Ping",
                             heartbeat=heartbeat, held_s=round(time.monotonic() - started, 3))
            return False
        # Ping response: Status 1 (the heartbeat expired, nothing changed).
        wbxml = bytes([0x03, 0x01, 0x6A, 0x00, 0x00, 0x0D, 0x45, 0x47, 0x03]) + b"1" + bytes([0x00, 0x01, 0x01])
        return self.respond(req, 200, base + [("Content-Type", "application/vnd.ms-sync.wbxml")], wbxml, keep,
                            command="Ping", heartbeat=heartbeat, held_s=round(time.monotonic() - started, 3))

    # -- Outlook Anywhere

    def rpc_out(self, req):
        cookie = b""
        for part in self.body_parts(req):       # answered as soon as the cookie is in
            cookie += part[:16 - len(cookie)]
            if len(cookie) == 16:
                break
        if len(cookie) < 16:
            return self.respond(req, 400, [("Content-Type", "text/plain")],
                                b"RPC_OUT_DATA: the body must start with the 16-byte channel cookie\n", False)
        self.buf.clear()                        # the rest of the small body is not used
        self.log_request(req, 200, channel="out", cookie=cookie.hex())
        self.send(self.head_bytes(req, 200, "Success", [("Content-Type", "application/rpc"),
                                                          ("Content-Length", str(RPC_OUT_LENGTH))], True))
        rpc = self.host.rpc
        chan = OutChannel()
        pair = rpc.attach_out(cookie, chan)
        sent = 0
        try:
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
            poller.register(chan.wake_r.fileno(), select.POLLIN)
            while not self.host.stopping.is_set() and not chan.closed:
                events = dict(poller.poll(500))
                if chan.wake_r.fileno() in events:
                    try:
                        while chan.wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                if self.sock.fileno() in events:
                    if not self.peek_input():
                        break
                    self.buf.clear()       # nothing is expected from the client on OUT
                for data in pair.take(chan):
                    data = data[:RPC_OUT_LENGTH - sent]
                    if data:
                        self.send(data)
                        sent += len(data)
                        rpc.echoed(len(data))
                if sent >= RPC_OUT_LENGTH:
                    break
        finally:
            rpc.detach_out(chan)
            chan.close()
            self.host.log.write({"event": "rpc-out-closed", "time": now_iso(), "host": self.host.name,
                                 "conn": self.id, "cookie": cookie.hex(), "bytes_echoed": sent})
        return False

    def rpc_in(self, req, keep):
        rpc = self.host.rpc
        cookie = bytearray()
        pair = None
        forwarded = 0
        try:
            for part in self.body_parts(req):
                if pair is None:
                    need = 16 - len(cookie)
                    cookie += part[:need]
                    part = part[need:]
                    if len(cookie) == 16:
                        pair = rpc.attach_in(bytes(cookie))
                if part and pair is not None:
                    pair.push(part, self.host.stopping)
                    forwarded += len(part)
        except Eof as e:
            self.log_request(req, None, error="connection ended inside the IN channel body: %s" % e,
                             channel="in", cookie=bytes(cookie).hex(), forwarded=forwarded, complete=False)
            return False
        finally:
            if pair is not None:
                rpc.detach_in(pair)
        return self.respond(req, 200, [("Content-Type", "application/rpc")], b"", keep, reason="Success",
                            channel="in", cookie=bytes(cookie).hex(), forwarded=forwarded, complete=True)

    # -- MAPI over HTTP

    def mapi(self, req, keep):
        try:
            period_ms = int((req.header("x-pendingperiod") or "").strip() or self.host.pending_period_ms)
        except ValueError:
            period_ms = self.host.pending_period_ms
        period_ms = max(10, min(period_ms, 60000))
        try:
            pendings = int(req.query.get("pendings", "3"))
        except ValueError:
            pendings = 3
        pendings = max(0, min(pendings, MAX_PENDINGS))
        request_type = req.header("x-requesttype") or "Execute"
        started = time.monotonic()
        headers = [("Content-Type", "application/mapi-http"), ("Transfer-Encoding", "chunked"),
                   ("Cache-Control", "private"), ("X-RequestType", request_type), ("X-ResponseCode", "0"),
                   ("X-PendingPeriod", str(period_ms)), ("X-ServerApplication", "Exchange/15.02.1544.004")]
        if req.header("x-requestid"):
            headers.append(("X-RequestId", req.header("x-requestid")))
        self.log_request(req, 200, pendings=pendings, pending_period_ms=period_ms)

        self.send(self.head_bytes(req, 200, None, headers, keep) + http.chunk(b"PROCESSING\r\n"))
        for _ in range(pendings):
            if not self.wait_peer(period_ms / 1000.0):
                return False
            self.send(http.chunk(b"PENDING\r\n"))
        if not self.wait_peer(period_ms / 1000.0):
            return False
        elapsed = int((time.monotonic() - started) * 1000)
        done = ("DONE\r\nX-ResponseCode: 0\r\nX-ElapsedTime: %d\r\nX-StartTime: %s\r\n\r\n" % (
            elapsed, email.utils.formatdate(usegmt=True))).encode()
        self.send(http.chunk(done) + http.LAST_CHUNK)
        return keep

    # -- EWS, Autodiscover, OAB

    def ews(self, req, body, keep):
        user = req.user or "anonymous"
        if req.method == "POST":
            soap = (
                '<?xml version="1.0" encoding="utf-8"?>\n'
                '<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">'
                '<s:Header><h:ServerVersionInfo MajorVersion="15" MinorVersion="2" MajorBuildNumber="1544" '
                'MinorBuildNumber="4" Version="V2017_07_11" '
                'xmlns:h="http://schemas.microsoft.com/exchange/services/2006/types"/>'
                '<lab:Lab xmlns:lab="urn:dmzproxy:lab" Host="%s" User="%s" Client="%s" Peer="%s"/></s:Header>'
                '<s:Body><m:GetFolderResponse xmlns:m="http://schemas.microsoft.com/exchange/services/2006/messages">'
                '<m:ResponseMessages><m:GetFolderResponseMessage ResponseClass="Success">'
                '<m:ResponseCode>NoError</m:ResponseCode></m:GetFolderResponseMessage></m:ResponseMessages>'
                '</m:GetFolderResponse></s:Body></s:Envelope>\n') % tuple(
                html.escape(x, quote=True) for x in (self.host.name, user, self.client_address(req), self.peer[0]))
            return self.respond(req, 200, [("Content-Type", "text/xml; charset=utf-8")], soap, keep)
        if req.method in ("GET", "HEAD"):
            wsdl = ('<?xml version="1.0" encoding="utf-8"?>\n<wsdl:definitions '
                    'xmlns:wsdl="http://schemas.xmlsoap.org/wsdl/" '
                    'targetNamespace="http://schemas.microsoft.com/exchange/services/2006/messages">\n'
                    '<!-- Exchange Web Services of the simulated host %s; user %s -->\n'
                    '<wsdl:service name="ExchangeServices"><wsdl:port name="ExchangeServicePort">'
                    '<soap:address xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/" '
                    'location="https://%s/EWS/Exchange.asmx"/></wsdl:port></wsdl:service>\n'
                    '</wsdl:definitions>\n') % (html.escape(self.host.name), html.escape(user),
                                                html.escape(self.host.fqdn))
            return self.respond(req, 200, [("Content-Type", "text/xml; charset=utf-8")], wsdl, keep)
        return self.respond(req, 405, [("Allow", "GET, POST")], b"", keep)

    def autodiscover(self, req, body, keep):
        fqdn = self.host.fqdn
        if req.lower.startswith("/autodiscover/autodiscover.json"):
            if req.method not in ("GET", "HEAD"):
                return self.respond(req, 405, [("Allow", "GET")], b"", keep)
            protocol = req.query.get("protocol", "")
            urls = {"activesync": ("ActiveSync", "/Microsoft-Server-ActiveSync"),
                    "ews": ("EWS", "/EWS/Exchange.asmx"),
                    "autodiscoverv1": ("AutodiscoverV1", "/Autodiscover/Autodiscover.xml"),
                    "rest": ("Rest", "/api")}
            if protocol.lower() not in urls:
                return self.respond(req, 400, [("Content-Type", "application/json")], json.dumps({
                    "ErrorCode": "InvalidProtocol",
                    "ErrorMessage": "The given protocol value '%s' is invalid. Supported values are "
                                    "'ActiveSync,AutodiscoverV1,Ews,Rest'." % protocol}), keep)
            name, path = urls[protocol.lower()]
            return self.respond(req, 200, [("Content-Type", "application/json; charset=utf-8")],
                                json.dumps({"Protocol": name, "Url": "https://%s%s" % (fqdn, path)}), keep)
        if req.lower.startswith("/autodiscover/autodiscover.xml"):
            if req.method != "POST":
                err = ('<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover '
                       'xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">'
                       '<Response><Error Time="%s" Id="%d"><ErrorCode>600</ErrorCode>'
                       '<Message>Invalid Request</Message><DebugData /></Error></Response></Autodiscover>\n') % (
                    time.strftime("%H:%M:%S"), secrets.randbits(31))
                return self.respond(req, 200, [("Content-Type", "text/xml; charset=utf-8")], err, keep)
            text = body.decode("utf-8", "replace")
            mm = re.search(r"<EMailAddress>\s*([^<\s]+)\s*</EMailAddress>", text, re.I)
            address = mm.group(1) if mm else (req.user or "user").split("\\")[-1] + "@" + self.host.domain
            esc = html.escape
            if "mobilesync" in text.lower():
                xml = ('<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover '
                       'xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">'
                       '<Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/mobilesync/'
                       'responseschema/2006"><Culture>en:us</Culture><User><EMailAddress>%s</EMailAddress></User>'
                       '<Action><Settings><Server><Type>MobileSync</Type><Url>https://%s/Microsoft-Server-ActiveSync'
                       '</Url><Name>https://%s/Microsoft-Server-ActiveSync</Name></Server></Settings></Action>'
                       '</Response></Autodiscover>\n') % (esc(address), esc(fqdn), esc(fqdn))
            else:
                xml = ('<?xml version="1.0" encoding="utf-8"?>\n<Autodiscover '
                       'xmlns="http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006">'
                       '<Response xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/'
                       'responseschema/2006a"><User><DisplayName>%s</DisplayName>'
                       '<AutoDiscoverSMTPAddress>%s</AutoDiscoverSMTPAddress></User>'
                       '<Account><AccountType>email</AccountType><Action>settings</Action>'
                       '<MicrosoftOnline>False</MicrosoftOnline>'
                       '<Protocol><Type>EXHTTP</Type><Server>%s</Server><SSL>On</SSL><AuthPackage>Ntlm</AuthPackage>'
                       '<ASUrl>https://%s/EWS/Exchange.asmx</ASUrl><EwsUrl>https://%s/EWS/Exchange.asmx</EwsUrl>'
                       '<OABUrl>https://%s/OAB/</OABUrl></Protocol>'
                       '<Protocol Type="mapiHttp" Version="1"><MailStore><ExternalUrl>https://%s/mapi/emsmdb/'
                       '?MailboxId=%s</ExternalUrl></MailStore><AddressBook><ExternalUrl>https://%s/mapi/nspi/'
                       '?MailboxId=%s</ExternalUrl></AddressBook></Protocol>'
                       '<Protocol><Type>WEB</Type><External><OWAUrl AuthenticationMethod="Fba">https://%s/owa/'
                       '</OWAUrl></External></Protocol></Account>'
                       '<!-- simulated Exchange host %s -->'
                       '</Response></Autodiscover>\n') % (
                    esc(req.user or address), esc(address), esc(fqdn), esc(fqdn), esc(fqdn), esc(fqdn), esc(fqdn),
                    esc(address), esc(fqdn), esc(address), esc(fqdn), esc(self.host.name))
            return self.respond(req, 200, [("Content-Type", "text/xml; charset=utf-8")], xml, keep)
        return self.page(req, 404, "Not found", "<h1>404 - File or directory not found.</h1>", keep)

    def oab(self, req, keep):
        if req.method not in ("GET", "HEAD"):
            return self.respond(req, 405, [("Allow", "GET, HEAD")], b"", keep)
        if req.lower.endswith(".xml") or req.lower.rstrip("/") in ("/oab",) or req.lower.endswith("/"):
            xml = ('<?xml version="1.0" encoding="utf-8"?>\n<OAB><OAL id="lab-oal" dn="/" name="\\Default Offline '
                   'Address Book"><Full seq="1" ver="32" size="64" uncompressedsize="128" SHA="%s">lab-full.lzx'
                   '</Full></OAL><!-- simulated Exchange host %s --></OAB>\n') % (
                hashlib.sha1(self.host.name.encode()).hexdigest(), html.escape(self.host.name))
            return self.respond(req, 200, [("Content-Type", "text/xml")], xml, keep)
        data = (b"LZX\x00" + hashlib.sha256(req.path.encode()).digest()) * 2
        return self.respond(req, 200, [("Content-Type", "application/octet-stream")], data, keep)

