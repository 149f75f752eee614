"""Server-side TLS: a context per certificate (TLS 1.2 and later) that remembers the name a
client asked for (SNI), the handshake with a deadline, and a certificate's DNS names."""

import ssl

HANDSHAKE_TIMEOUT = 10.0


def server_context(cert, key):
    """A server context for the PEM chain `cert` and its `key` (OSError, ssl.SSLError when
    they cannot be loaded)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)

    def remember_sni(sslsock, name, _ctx):
        sslsock.dmz_sni = name

    ctx.sni_callback = remember_sni
    return ctx


def handshake(sock, ctx, timeout=HANDSHAKE_TIMEOUT):
    """The server side of a handshake on `sock`, bounded by `timeout`: (TLS socket, protocol
    version, SNI or None). The socket's timeout is left at `timeout`."""
    sock.settimeout(timeout)
    tls = ctx.wrap_socket(sock, server_side=True)
    return tls, tls.version(), getattr(tls, "dmz_sni", None)


def cert_dns_names(path):
    """The DNS names of a PEM certificate's subjectAltName, in order (empty if unreadable)."""
    if not path:
        return []
    try:
        decoded = ssl._ssl._test_decode_cert(path)  # pylint: disable=protected-access
    except Exception:  # noqa: BLE001 - any failure: no names
        return []
    return [v for k, v in decoded.get("subjectAltName", ()) if k == "DNS"]
