"""The mail store: each accepted message is DIR/[FOLDER/]<queue-id>.eml, the message as
received (un-dot-stuffed, without the final dot line), beside its sidecar <queue-id>.json.
The sidecar is written first and each file appears by an atomic rename, so whoever sees the
.eml also finds its .json complete."""

import itertools
import json
import os
import secrets
import threading


class Store:
    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self._counter = itertools.count(1)
        self._prefix = secrets.token_hex(5).upper()    # queue ids unique across restarts too
        self._lock = threading.Lock()

    def new_id(self):
        with self._lock:
            return "%s%06X" % (self._prefix, next(self._counter))

    def put(self, queue_id, message, meta, folder=None):
        d = os.path.join(self.dir, folder) if folder else self.dir
        os.makedirs(d, exist_ok=True)
        for name, data in ((queue_id + ".json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode()),
                           (queue_id + ".eml", message)):
            tmp = os.path.join(d, ".tmp-" + name)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(d, name))
