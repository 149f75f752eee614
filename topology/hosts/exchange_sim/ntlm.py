"""NTLMSSP messages and IIS's connection-based NTLM, as Exchange's protected paths answer
them; Basic credentials. An emulation: any user and password is taken (the user, DOMAIN\\user,
is recorded), only the shape of the handshake is checked."""

import base64
import secrets
import struct
import time

NTLMSSP = b"NTLMSSP\x00"
NEG_UNICODE = 0x00000001
NEG_OEM = 0x00000002
REQUEST_TARGET = 0x00000004
NEG_NTLM = 0x00000200
NEG_ALWAYS_SIGN = 0x00008000
TARGET_TYPE_DOMAIN = 0x00010000
NEG_EXTENDED_SESSION_SECURITY = 0x00080000
NEG_TARGET_INFO = 0x00800000
NEG_VERSION = 0x02000000
NEG_128 = 0x20000000
NEG_56 = 0x80000000

UNEXPECTED_TYPE3 = "Unexpected NTLM message Type 3 in new connection"


def message_type(token):
    """(message type, raw bytes) of a base64 NTLMSSP token, or (None, None)."""
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except (ValueError, TypeError):
        return None, None
    if len(raw) < 12 or raw[:8] != NTLMSSP:
        return None, None
    return struct.unpack_from("<I", raw, 8)[0], raw


def challenge(type1_flags, netbios_domain, netbios_host, dns_domain, dns_host):
    """A valid NTLMSSP CHALLENGE (type 2) message, base64: target name, target info with a
    timestamp, version 10.0.17763."""
    unicode = not type1_flags or bool(type1_flags & NEG_UNICODE)
    enc = (lambda s: s.encode("utf-16-le")) if unicode else (lambda s: s.encode("ascii", "replace"))
    target = enc(netbios_domain)

    def av(av_id, value):
        data = value.encode("utf-16-le")
        return struct.pack("<HH", av_id, len(data)) + data

    info = av(2, netbios_domain) + av(1, netbios_host) + av(4, dns_domain) + av(3, dns_host)
    info += struct.pack("<HH", 7, 8) + struct.pack("<Q", int((time.time() + 11644473600) * 10000000))
    info += struct.pack("<HH", 0, 0)  # MsvAvEOL
    flags = (NEG_UNICODE if unicode else NEG_OEM) | REQUEST_TARGET | NEG_NTLM | NEG_ALWAYS_SIGN | \
        TARGET_TYPE_DOMAIN | NEG_EXTENDED_SESSION_SECURITY | NEG_TARGET_INFO | NEG_VERSION | \
        (type1_flags & (NEG_128 | NEG_56))
    header_len = 56
    msg = NTLMSSP + struct.pack("<I", 2)
    msg += struct.pack("<HHI", len(target), len(target), header_len)
    msg += struct.pack("<I", flags)
    msg += secrets.token_bytes(8)
    msg += b"\x00" * 8
    msg += struct.pack("<HHI", len(info), len(info), header_len + len(target))
    msg += bytes([10, 0]) + struct.pack("<H", 17763) + b"\x00\x00\x00\x0f"  # 10.0.17763, NTLM revision 15
    return base64.b64encode(msg + target + info).decode("ascii")


def authenticate_identity(raw):
    """(user, domain) of an NTLMSSP AUTHENTICATE (type 3) message, or (None, None)."""
    if len(raw) < 64:
        return None, None

    def field(offset):
        length, _, off = struct.unpack_from("<HHI", raw, offset)
        return raw[off:off + length]

    flags = struct.unpack_from("<I", raw, 60)[0]
    domain, user = field(28), field(36)
    if flags & NEG_UNICODE:
        return user.decode("utf-16-le", "replace"), domain.decode("utf-16-le", "replace")
    return user.decode("latin-1"), domain.decode("latin-1")


def basic_user(token):
    """The user of an `Authorization: Basic` token (any password), or None."""
    try:
        text = base64.b64decode(token.strip(), validate=True).decode("utf-8", "replace")
    except (ValueError, TypeError):
        return None
    user, sep, _ = text.partition(":")
    return user if sep and user else None


class IisNtlm:
    """One connection's NTLM state, as IIS keeps it: a type 1 gets a challenge, a type 3 on
    the same connection authenticates the connection (later requests on it need nothing),
    a type 3 on a connection that was never challenged is refused."""

    def __init__(self, dns_host, netbios_host=None, other_challenges=()):
        self.dns_host = dns_host
        self.refusal_fields = [("WWW-Authenticate", "NTLM")] + [("WWW-Authenticate", c) for c in other_challenges]
        self.netbios_host = (netbios_host or dns_host.split(".", 1)[0]).upper()[:15]
        self.state = None       # None | "challenged" | "authenticated"
        self.user = None
        self.completed = False  # the last answer() completed a handshake

    def answer(self, scheme, token):
        """For the Authorization scheme and token of a request (both may be ""): the user when
        the request may go on, else (header fields, text) of the 401. A refusal offers NTLM
        and the other challenges given at construction (Basic, say)."""
        s = scheme.lower()
        self.completed = False
        if s not in ("ntlm", "negotiate") or not token.strip():
            if self.state == "authenticated":
                return self.user
            return self.refusal_fields, "401 - Unauthorized: Access is denied due to invalid credentials.\n"
        kind, raw = message_type(token)
        if kind == 1:
            flags = struct.unpack_from("<I", raw, 12)[0] if len(raw) >= 16 else 0
            self.state, self.user = "challenged", None
            dns_domain = self.dns_host.split(".", 1)[1] if "." in self.dns_host else self.dns_host
            t2 = challenge(flags, dns_domain.split(".", 1)[0].upper()[:15], self.netbios_host, dns_domain, self.dns_host)
            return [("WWW-Authenticate", ("Negotiate " if s == "negotiate" else "NTLM ") + t2)], \
                "401 - Unauthorized: NTLM challenge\n"
        if kind == 3:
            if self.state != "challenged":
                return self.refusal_fields, UNEXPECTED_TYPE3
            user, domain = authenticate_identity(raw)
            if not user:
                self.state = None
                return self.refusal_fields, "401 - Unauthorized: NTLM message Type 3 without a user\n"
            self.user = "%s\\%s" % (domain, user) if domain else user
            self.state = "authenticated"
            self.completed = True
            return self.user
        return self.refusal_fields, "401 - Unauthorized: not an NTLM message\n"
