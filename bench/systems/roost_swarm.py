"""roost: a tracker and a seeder in the origin namespace, ``roost.runtime fetch`` on every host."""

from __future__ import annotations

import os
from typing import Any

from bench.systems.base import PYTHON, Bench, Node, Run, System
from roost.runtime.swarm import write_secret

TRACKER_PORT = 7070
SEED_PORT = 7071
LINGER = 120.0  # hosts keep serving until the tracker says the swarm is complete


def runtime_command(run: Run) -> list[str]:
    """How the testbed starts roost's runtime: as a host would, or under the sampling
    profiler (``--profile-hosts``), each run's profiles in a folder of their own."""
    if run.bench.profiles is None:
        return [PYTHON, "-m", "roost.runtime"]
    out = os.path.join(run.bench.profiles, os.path.basename(run.dir))
    return [PYTHON, "-m", "bench.hostprofile", "--out", out, "roost.runtime"]


class RoostSystem(System):
    name = "roost"
    description = "roost: tracker + seeder on the origin, `roost.runtime fetch` on every host"
    stripes = "auto"  # the tracker's relay plan (``roost tracker --stripes``)

    def prepare(self, bench: Bench) -> None:
        if "roost_secret" in bench.state:  # both roost modes share one secret
            return
        secret = os.path.join(bench.workdir, "swarm.secret")
        write_secret(secret)
        bench.state["roost_secret"] = secret

    def tracker_url(self, run: Run) -> str:
        return f"http://{run.testbed.origin.address}:{TRACKER_PORT}"

    def start_origin(self, run: Run) -> None:
        origin = run.testbed.origin
        db = os.path.join(run.dir, "tracker.sqlite")
        token = os.path.join(run.dir, "tracker.token")
        secret = run.bench.state["roost_secret"]
        run.spawn_origin(
            "tracker",
            [PYTHON, "-m", "roost", "tracker", "--host", origin.address,
             "--port", str(TRACKER_PORT), "--db", db, "--token-file", token,
             "--stripes", self.stripes],
        )  # fmt: skip
        run.wait_port(origin, TRACKER_PORT)
        register = (
            "import sys\n"
            "from roost.runtime.announce import register_swarm, tracker_key\n"
            "from roost.runtime.manifest import load_manifest\n"
            "from roost.runtime.swarm import read_secret\n"
            "url, token_file, secret_file, manifest, n = sys.argv[1:]\n"
            "swarm = load_manifest(manifest).id\n"
            "key = tracker_key(read_secret(secret_file), swarm)\n"
            "token = open(token_file).read().strip()\n"
            "register_swarm(url, token, swarm, key, expected_peers=int(n))\n"
        )
        argv = [PYTHON, "-c", register, self.tracker_url(run), token, secret,
                run.release.manifest_path, str(run.testbed.hosts)]  # fmt: skip
        run.run_in(origin, argv)
        run.spawn_origin(
            "seeder",
            [*runtime_command(run), "seed", run.release.manifest_path, run.release.tree,
             "--tracker", self.tracker_url(run), "--secret-file", secret,
             "--listen", f"{origin.address}:{SEED_PORT}", "--advertise", origin.address],
        )  # fmt: skip
        run.wait_port(origin, SEED_PORT)

    def host_argv(self, run: Run, node: Node) -> list[str]:
        argv = [*runtime_command(run), "fetch", run.release.manifest_path,
                "--dest", run.host_dir(node), "--tag", "bench", "--activate",
                "--tracker", self.tracker_url(run),
                "--secret-file", run.bench.state["roost_secret"], "--events",
                "--listen", f"{node.address}:0", "--advertise", node.address,
                "--linger", str(LINGER)]  # fmt: skip
        if node.rack is not None:
            argv += ["--rack", f"rack{node.rack}"]
        return argv

    def host_tree(self, run: Run, node: Node) -> str:
        return os.path.join(run.host_dir(node), "current")

    def interpret(self, event: dict[str, Any]) -> tuple[float | None, float | None, str | None]:
        if event.get("event") == "progress" and event.get("pieces"):
            return event["have"] / event["pieces"], None, None
        return super().interpret(event)


class RoostPlainSwarmSystem(RoostSystem):
    """roost's other mode: no relay plan, every peer picks its sources (rarest first)."""

    name = "roost-swarm"
    description = "roost without a relay plan (`roost tracker --stripes off`): a plain swarm"
    stripes = "off"
