"""Central HTTP for the benchmark: one host downloads every file of the release at once.

Fetches ``/index.json``, then every file over ``--connections`` keep-alive
connections in parallel (largest first), hashing each file as it arrives and
checking it against the index before it counts; files get the index's mode.
JSON lines on stdout: progress, then ``complete`` once every file is written and
verified. Standard library only; run by path:

    python bench/systems/http_client.py --url http://ADDR:PORT --dest DIR
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import queue
import sys
import threading
import time
from urllib.parse import quote, urlsplit

CHUNK = 1 << 20
STALL_TIMEOUT = 20.0
ATTEMPTS = 8


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--connections", type=int, default=4)
    args = p.parse_args()
    parts = urlsplit(args.url)
    host, port = parts.hostname, parts.port or 80

    def connect() -> http.client.HTTPConnection:
        # With 64 flows through the origin's shaped link, a TCP flow can sit in
        # retransmission backoff for minutes; a stalled transfer is retried on a new
        # connection instead (see worker), as a real download client would.
        return http.client.HTTPConnection(host, port, timeout=STALL_TIMEOUT)

    conn = connect()
    conn.request("GET", "/index.json")
    response = conn.getresponse()
    if response.status != 200:
        emit("error", message=f"index: HTTP {response.status}")
        return 1
    files = json.loads(response.read())["files"]
    conn.close()
    total = sum(f["size"] for f in files)
    done = [0]
    lock = threading.Lock()
    errors: list[str] = []
    work: queue.Queue = queue.Queue()
    for entry in sorted(files, key=lambda e: -e["size"]):
        work.put(entry)

    def worker() -> None:
        c = connect()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while not errors:
            try:
                entry = work.get_nowait()
            except queue.Empty:
                break
            for attempt in range(ATTEMPTS):
                got = 0
                try:
                    c.request("GET", "/f/" + quote(entry["path"]))
                    r = c.getresponse()
                    if r.status != 200:
                        raise OSError(f"HTTP {r.status}")
                    path = os.path.join(args.dest, entry["path"])
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    digest = hashlib.sha256()
                    with open(path, "wb") as f:
                        while True:
                            n = r.readinto(buf)
                            if not n:
                                break
                            digest.update(view[:n])
                            f.write(view[:n])
                            got += n
                            with lock:
                                done[0] += n
                    if digest.hexdigest() != entry["sha256"]:
                        raise OSError("sha256 mismatch")
                    os.chmod(path, entry["mode"])
                    break
                except (OSError, http.client.HTTPException) as exc:
                    with lock:
                        done[0] -= got
                    c.close()
                    if attempt == ATTEMPTS - 1:
                        errors.append(f"{entry['path']}: {exc}")
                        return
                    c = connect()  # a stalled flow: start the file again on a fresh one
        c.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.connections)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=0.2)
        emit("progress", done=done[0], total=total)
    if errors:
        emit("error", message=errors[0])
        return 1
    emit("complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
