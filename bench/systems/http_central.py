"""Central HTTP: every host downloads the release from one HTTP server on the origin at once
(the "everyone pulls from the git server / artifact store" world)."""

from __future__ import annotations

import json
import os

from bench.systems.base import HERE, PYTHON, Bench, Node, Run, System

PORT = 8080
CONNECTIONS = 4  # parallel downloads per host


class HttpSystem(System):
    name = "http"
    description = (
        f"central HTTP: a sendfile HTTP server on the origin, every host fetches every file"
        f" over {CONNECTIONS} keep-alive connections, sha256-checked"
    )

    def prepare(self, bench: Bench) -> None:
        index = os.path.join(bench.workdir, "http-index.json")
        files = [
            {"path": f.path, "size": f.size, "mode": f.mode, "sha256": f.sha256}
            for f in bench.release.manifest.files
        ]
        with open(index, "w") as f:
            json.dump({"files": files}, f)
        bench.state["http_index"] = index

    def start_origin(self, run: Run) -> None:
        origin = run.testbed.origin
        proc = run.spawn_origin(
            "http",
            [PYTHON, os.path.join(HERE, "http_server.py"), "--listen", f"{origin.address}:{PORT}",
             "--root", run.release.tree, "--index", run.bench.state["http_index"]],
        )  # fmt: skip
        proc.wait_line(lambda line: '"ready"' in line, timeout=30)

    def host_argv(self, run: Run, node: Node) -> list[str]:
        return [PYTHON, os.path.join(HERE, "http_client.py"),
                "--url", f"http://{run.testbed.origin.address}:{PORT}",
                "--dest", self.host_tree(run, node), "--connections", str(CONNECTIONS)]  # fmt: skip

    def host_tree(self, run: Run, node: Node) -> str:
        return os.path.join(run.host_dir(node), "release")
