"""Listening sockets, the accept loop and stopping: what every simulated server shares.

A server blocks SIGTERM and SIGINT first (hold_stop_signals), starts an accept loop per
listening socket, each connection in a thread of its own, and then waits in its main thread
for one of those signals (wait_for_stop): no polling, and no thread but the main one ever
sees the signal.
"""

import argparse
import signal
import socket
import threading
import time

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class Eof(Exception):
    """The peer closed or reset the connection, or it idled out."""


def receive(sock, closed_reason="closed"):
    """The next bytes from `sock`; Eof when the peer closed (`closed_reason`), reset, or
    stayed silent past the socket's timeout ("idle timeout")."""
    try:
        data = sock.recv(65536)
    except socket.timeout:
        raise Eof("idle timeout") from None
    except OSError as e:            # ssl.SSLError included
        raise Eof(str(e)) from None
    if not data:
        raise Eof(closed_reason)
    return data


def listen(address, port, backlog=256):
    """A listening TCP socket on address:port (IPv6 when the address has a colon)."""
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def address_argument(text):
    """(address, port) of ADDRESS:PORT ([v6]:PORT too), as an argparse type."""
    address, _, port = text.rpartition(":")
    address = address.strip("[]")
    if not address or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("%r is not ADDRESS:PORT" % text)
    return address, int(port)


class Connection:
    """What every connection of a simulated server has: a number (counted per server class,
    from 1), its socket and peer, an input buffer, the TLS version once there is TLS, and
    the server's stop flag."""

    ids = None                      # itertools.count(1), set by each server class
    ids_lock = threading.Lock()

    def __init__(self, sock, peer, stopping=None):
        with Connection.ids_lock:
            self.id = next(type(self).ids)
        self.sock = sock
        self.peer = peer
        self.stopping = stopping or threading.Event()
        self.buf = bytearray()
        self.tls = None


def accept_in_background(sock, handle, stopping, name="accept"):
    """Accepts connections on `sock` in a daemon thread until `stopping` (a threading.Event)
    is set; each connection runs handle(sock, (address, port)) in a daemon thread of its own."""

    def loop():
        while not stopping.is_set():
            try:
                conn, peer = sock.accept()
            except InterruptedError:
                continue
            except OSError:
                if stopping.is_set():
                    return
                time.sleep(0.05)        # out of descriptors and the like: pause, do not spin
                continue
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            threading.Thread(target=handle, args=(conn, peer[:2]), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True, name=name)
    thread.start()
    return thread


def serve_until_stopped(sock, handle, stopping):
    """Accepts on `sock` (see accept_in_background) until SIGTERM or SIGINT, then sets
    `stopping`. The caller has called hold_stop_signals() before starting any thread."""
    accept_in_background(sock, handle, stopping)
    wait_for_stop()
    stopping.set()


def hold_stop_signals():
    """Blocks SIGTERM and SIGINT in this thread and in every thread started after it, so that
    wait_for_stop() alone takes them. Call it before starting any thread."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def wait_for_stop():
    """Waits until SIGTERM or SIGINT arrives (after hold_stop_signals); returns its number."""
    return signal.sigwait(STOP_SIGNALS)
