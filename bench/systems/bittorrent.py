"""Stock BitTorrent: libtorrent (PyPI ``libtorrent``) seeding from the origin, a libtorrent
client on every host, the same piece size as roost's manifest, tuned for a LAN
(see ``bt_client.py``)."""

from __future__ import annotations

import os

from bench.systems.base import HERE, PYTHON, Bench, Node, Run, System

PORT = 6881


class LibtorrentSystem(System):
    name = "libtorrent"
    description = (
        "libtorrent: v1 torrent with roost's piece size, seeder on the origin, LAN-tuned"
        " clients given the origin and every host as peers"
    )

    def unavailable(self) -> str | None:
        try:
            import libtorrent  # noqa: F401
        except ImportError as exc:
            return f"libtorrent cannot be imported ({exc}); pip install libtorrent"
        return None

    def prepare(self, bench: Bench) -> None:
        import libtorrent as lt

        tree = bench.release.tree
        piece_size = bench.release.manifest.piece_size
        flags = lt.create_torrent.v1_only  # pieces span files, as roost's do: no pad files
        if hasattr(lt, "list_files"):  # libtorrent >= 2.1
            ct = lt.create_torrent(lt.list_files(tree), piece_size, flags)
        else:
            fs = lt.file_storage()
            lt.add_files(fs, tree)
            ct = lt.create_torrent(fs, piece_size, flags)
        ct.set_creator("roost bench")
        lt.set_piece_hashes(ct, os.path.dirname(tree))
        path = os.path.join(bench.workdir, "release.torrent")
        with open(path, "wb") as f:
            f.write(lt.bencode(ct.generate()))
        info = lt.torrent_info(path)
        if info.total_size() != bench.release.size:
            raise RuntimeError(f"torrent holds {info.total_size()} bytes, not {bench.release.size}")
        bench.state["torrent"] = path
        bench.state["torrent_name"] = info.name()
        bench.state["torrent_files"] = info.num_files()

    def start_origin(self, run: Run) -> None:
        origin = run.testbed.origin
        proc = run.spawn_origin(
            "seeder",
            [PYTHON, os.path.join(HERE, "bt_client.py"), "--torrent", run.bench.state["torrent"],
             "--save", os.path.dirname(run.release.tree),
             "--listen", f"{origin.address}:{PORT}", "--seed"],
        )  # fmt: skip
        proc.wait_line(lambda line: '"ready"' in line, timeout=60)

    def host_argv(self, run: Run, node: Node) -> list[str]:
        argv = [PYTHON, os.path.join(HERE, "bt_client.py"), "--torrent", run.bench.state["torrent"],
                "--save", run.host_dir(node), "--listen", f"{node.address}:{PORT}",
                "--peer", f"{run.testbed.origin.address}:{PORT}"]  # fmt: skip
        for other in run.testbed.host_nodes:
            if other is not node:
                argv += ["--peer", f"{other.address}:{PORT}"]
        return argv

    def host_tree(self, run: Run, node: Node) -> str:
        return os.path.join(run.host_dir(node), run.bench.state["torrent_name"])
