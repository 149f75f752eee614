"""One JSON object per line, appended and flushed at once, so that whoever reads the file
(a test, `lab status`) sees every event that has happened."""

import json
import threading
import time


def now_iso():
    """UTC time with milliseconds, e.g. 2024-05-01T12:00:00.123Z."""
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)


class JsonLog:
    """Appends to `path` (none: writes nothing); safe to share between threads."""

    def __init__(self, path):
        self._f = open(path, "a", encoding="utf-8") if path else None
        self._lock = threading.Lock()

    def write(self, obj):
        if self._f is None:
            return
        line = json.dumps(obj, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            try:
                self._f.write(line)
                self._f.flush()
            except (OSError, ValueError):   # closed while stopping, disk full: the event is lost
                pass

    def close(self):
        with self._lock:
            if self._f:
                try:
                    self._f.close()
                except OSError:
                    pass
                self._f = None
