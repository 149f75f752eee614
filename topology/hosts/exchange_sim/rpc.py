"""Outlook Anywhere channel pairs: the bytes of an RPC_IN_DATA channel are echoed, as they
arrive, on the RPC_OUT_DATA channel of the same pair cookie (the first 16 body bytes of each
channel). Bytes that come before their OUT channel are kept, up to RPC_QUEUE_LIMIT."""

import collections
import socket
import threading

RPC_QUEUE_LIMIT = 8 * 1024 * 1024


class OutChannel:
    """The OUT side of a pair: its connection thread alone writes to the socket; IN
    channels hand it bytes through a queue and a wake-up socket."""

    def __init__(self):
        self.queue = collections.deque()
        self.queued = 0
        self.closed = False
        self.pair = None
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)

    def wake(self):
        try:
            self.wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def close(self):
        for s in (self.wake_r, self.wake_w):
            try:
                s.close()
            except OSError:
                pass


class RpcPair:
    def __init__(self, cookie):
        self.cookie = cookie
        self.cond = threading.Condition()
        self.out = None
        self.ins = 0
        self.pending = collections.deque()
        self.pending_bytes = 0
        self.dropped = 0

    def push(self, data, stopping):
        """Hands IN-channel bytes to the OUT channel (waiting while it is far behind)."""
        with self.cond:
            while self.out is not None and not self.out.closed and self.out.queued > RPC_QUEUE_LIMIT:
                if stopping.is_set():
                    return
                self.cond.wait(0.5)
            out = self.out
            if out is not None and not out.closed:
                out.queue.append(data)
                out.queued += len(data)
                out.wake()
            elif self.pending_bytes + len(data) <= RPC_QUEUE_LIMIT:
                self.pending.append(data)
                self.pending_bytes += len(data)
            else:
                self.dropped += len(data)

    def take(self, chan):
        with self.cond:
            items = list(chan.queue)
            chan.queue.clear()
            chan.queued = 0
            self.cond.notify_all()
            return items


class RpcRegistry:
    def __init__(self):
        self.lock = threading.Lock()
        self.pairs = {}
        self.out_channels = 0
        self.in_channels = 0
        self.bytes_echoed = 0

    def attach_out(self, cookie, chan):
        with self.lock:
            self.out_channels += 1
            pair = self.pairs.get(cookie)
            if pair is None:
                pair = self.pairs[cookie] = RpcPair(cookie)
        with pair.cond:
            old = pair.out
            pair.out = chan
            chan.pair = pair
            while pair.pending:
                d = pair.pending.popleft()
                chan.queue.append(d)
                chan.queued += len(d)
            pair.pending_bytes = 0
            if old is not None:
                old.closed = True       # replaced: it gets nothing more
                old.wake()
            chan.wake()
        return pair

    def detach_out(self, chan):
        pair = chan.pair
        if pair is None:
            return
        with self.lock:
            with pair.cond:
                if pair.out is chan:
                    pair.out = None
                chan.closed = True
                pair.cond.notify_all()
                if pair.out is None and pair.ins == 0 and self.pairs.get(pair.cookie) is pair:
                    del self.pairs[pair.cookie]

    def attach_in(self, cookie):
        with self.lock:
            self.in_channels += 1
            pair = self.pairs.get(cookie)
            if pair is None:
                pair = self.pairs[cookie] = RpcPair(cookie)
            with pair.cond:
                pair.ins += 1
        return pair

    def detach_in(self, pair):
        with self.lock:
            with pair.cond:
                pair.ins -= 1
                if pair.out is None and pair.ins == 0 and self.pairs.get(pair.cookie) is pair:
                    del self.pairs[pair.cookie]

    def echoed(self, n):
        with self.lock:
            self.bytes_echoed += n

    def snapshot(self):
        with self.lock:
            return {"pairs_open": len(self.pairs), "out_channels": self.out_channels,
                    "in_channels": self.in_channels, "bytes_echoed": self.bytes_echoed,
                    "pairs": [{"cookie": p.cookie.hex(), "out": p.out is not None, "ins": p.ins,
                               "pending_bytes": p.pending_bytes} for p in list(self.pairs.values())[:50]]}

