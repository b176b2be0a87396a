"""A libtorrent peer for the benchmark (one per host, and the seeder on the origin).

Tuned for a LAN as libtorrent's settings allow: the ``high_performance_seed`` preset,
no DHT, LSD, UPnP, NAT-PMP or uTP, unlimited unchoke slots, no connection pacing;
peers are given directly (``--peer``, the origin and every other host) instead of a
tracker. The torrent is v1 with the release's piece size. JSON lines on stdout:
``ready`` (seeder), ``progress``, ``complete`` (every piece hash-checked), ``error``.
Run by path (``libtorrent`` from PyPI must be importable):

    python bench/systems/bt_client.py --torrent T --save DIR --listen ADDR:PORT
        [--peer ADDR:PORT ...] [--seed]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import libtorrent as lt


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
    sys.stdout.flush()


def lan_settings(listen: str) -> dict:
    settings = lt.high_performance_seed()
    settings.update(
        {
            "listen_interfaces": listen,
            "enable_dht": False,
            "enable_lsd": False,
            "enable_upnp": False,
            "enable_natpmp": False,
            "enable_outgoing_utp": False,
            "enable_incoming_utp": False,
            "enable_ip_notifier": False,
            "unchoke_slots_limit": -1,
            "connections_limit": 10000,
            "smooth_connects": False,
            "min_reconnect_time": 1,
            "peer_connect_timeout": 5,
            "allow_multiple_connections_per_ip": True,
            "alert_mask": lt.alert.category_t.status_notification
            | lt.alert.category_t.error_notification
            | lt.alert.category_t.storage_notification,
        }
    )
    return settings


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--torrent", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--peer", action="append", default=[])
    p.add_argument("--seed", action="store_true")
    args = p.parse_args()
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    session = lt.session(lan_settings(args.listen))
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(args.torrent)
    atp.save_path = args.save
    atp.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    if args.seed:
        atp.flags |= lt.torrent_flags.seed_mode  # pieces are checked when first served
    handle = session.add_torrent(atp)
    for peer in args.peer:
        host, _, port = peer.rpartition(":")
        handle.connect_peer((host, int(port)))
    ready = complete = False
    last = 0.0
    while not stop:
        for alert in session.pop_alerts():
            if isinstance(alert, lt.torrent_finished_alert) and not complete and not args.seed:
                complete = True
                emit("complete")
            elif isinstance(alert, (lt.torrent_error_alert, lt.file_error_alert)):
                emit("error", message=alert.message())
        status = handle.status()
        if args.seed and not ready and status.is_seeding:
            ready = True
            emit("ready")
        now = time.monotonic()
        if now - last >= 0.2 and not args.seed:
            last = now
            emit("progress", done=status.total_wanted_done, total=status.total_wanted)
        session.wait_for_alert(50)
    return 0


if __name__ == "__main__":
    sys.exit(main())
