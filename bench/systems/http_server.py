"""Central HTTP for the benchmark: serves a release tree from the origin namespace.

``GET /index.json`` lists every file (path, size, mode, sha256); ``GET /f/<path>``
sends one file with ``sendfile``, as nginx would. HTTP/1.1 keep-alive, a thread per
connection. Standard library only; run by path (not as part of the bench package):

    python bench/systems/http_server.py --listen ADDR:PORT --root TREE --index INDEX
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--root", required=True)
    p.add_argument("--index", required=True)
    args = p.parse_args()
    with open(args.index, "rb") as f:
        index_bytes = f.read()
    files = {e["path"]: e for e in json.loads(index_bytes)["files"]}
    root = os.path.abspath(args.root)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *a: object) -> None:
            pass

        def do_GET(self) -> None:
            if self.path == "/index.json":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(index_bytes)))
                self.end_headers()
                self.wfile.write(index_bytes)
                return
            rel = unquote(self.path[3:]) if self.path.startswith("/f/") else None
            if rel not in files:  # only what the index lists, nothing else
                self.send_error(404)
                return
            with open(os.path.join(root, rel), "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(size))
                self.end_headers()
                if size:
                    self.connection.sendfile(f)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024

    host, port = args.listen.rsplit(":", 1)
    server = Server((host, int(port)), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(json.dumps({"event": "ready"}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
