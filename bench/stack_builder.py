#!/usr/bin/env python3
"""Build a realistic, deterministic IOTstack directory for the benchmark.

    python3 bench/stack_builder.py DEST [--scale 1.0] [--seed 1]

At scale 1 the tree holds about 300 MB in about 26,000 entries, shaped like
a Raspberry Pi running Node-RED, Mosquitto, InfluxDB, Grafana, Portainer,
Zigbee2MQTT and Home Assistant: ~24,000 small text files in node_modules
(Pareto-distributed sizes, the case where per-file cost decides), eight
16 MiB semi-compressible InfluxDB shards, a Grafana database, an already
compressed 20 MiB blob, a Home Assistant database with a hard link and
symlinks to it, a text log, empty directories, an awkward file name, and
files owned by the service uids 1000, 472 and 1883 (when run as root).
--scale multiplies the counts and most sizes; --entries N adds small files
in volumes/nextcloud/data (a Nextcloud's shape) until the tree holds N
entries; the same seed and scale give the same names, bytes, modes and
mtimes.  Stdlib only, Python 3.9+.
"""
import argparse
import os
import random
import sys

MTIME = 1_700_000_000
NODERED_UID, GRAFANA_UID, MOSQUITTO_UID = 1000, 472, 1883

WORDS = ("temperature humidity sensor topic payload msg node flow function require "
         "module exports const let return async await value mqtt influx measurement "
         "field tag timestamp grafana dashboard panel query select from where group "
         "by time mean last device zigbee battery linkquality state on off brightness "
         "color home assistant entity automation trigger condition action service "
         "data").split()

SERVICES = ("nodered", "mosquitto", "influxdb", "grafana", "portainer-ce",
            "zigbee2mqtt", "homeassistant")


def source_text(rng, size):
    """Code-like lines of random words: deflates like real JavaScript/YAML."""
    lines, length = [], 0
    while length < size:
        words = rng.choices(WORDS, k=rng.randint(3, 12))
        line = "%s = %d;\n" % (" ".join(words), rng.randint(0, 99999))
        lines.append(line)
        length += len(line)
    return "".join(lines)[:size].encode()


def database_bytes(rng, size, random_share=0.35):
    """Binary pages that deflate to roughly random_share of their size."""
    page = 4096
    noise = int(page * random_share)
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(noise)
        out += bytes([rng.randrange(4)]) * (page - noise)
    return bytes(out[:size])


class TreeWriter:
    """Writes files below dest with fixed mtimes; owners only as root."""

    def __init__(self, dest):
        self.dest = dest
        self.as_root = os.geteuid() == 0
        self.made = set()

    def path(self, rel):
        return os.path.join(self.dest, rel)

    def mkdir(self, rel):
        if rel not in self.made:
            os.makedirs(self.path(rel), exist_ok=True)
            self.made.add(rel)

    def file(self, rel, data, mode=0o644, owner=None):
        self.mkdir(os.path.dirname(rel))
        path = self.path(rel)
        with open(path, "wb") as f:
            f.write(data)
        os.chmod(path, mode)
        if owner is not None and self.as_root:
            os.chown(path, owner, owner)
        os.utime(path, (MTIME, MTIME))


def build(dest, scale=1.0, seed=1):
    """Create the tree in dest (which should be empty)."""
    rng = random.Random(seed)

    def scaled(n):
        return max(1, int(n * scale))

    tree = TreeWriter(dest)

    # Top level: compose files, hooks, menu.sh (which marks an IOTstack directory).
    compose = ["version: '3.6'", "services:"]
    for service in SERVICES:
        compose += ["  %s:" % service, "    container_name: %s" % service,
                    "    restart: unless-stopped", "    volumes:",
                    "      - ./volumes/%s:/data" % service]
    tree.file("docker-compose.yml", ("\n".join(compose) + "\n").encode())
    tree.file("compose-override.yml", b"services: {}\n")
    tree.file(".env", b"TZ=Etc/UTC\n", mode=0o600)
    tree.file("menu.sh", b"#!/bin/bash\necho menu\n", mode=0o755)
    tree.file("post_restore.sh", b"#!/bin/bash\necho restored\n", mode=0o755)
    for service in ("nodered", "mosquitto", "zigbee2mqtt"):
        tree.file("services/%s/Dockerfile" % service, source_text(rng, 800))
    tree.file("services/mosquitto/mosquitto.conf", source_text(rng, 400))

    # Node-RED: flows and ~24,000 small modules in packages of 60 files.
    nodered = "volumes/nodered/data"
    tree.file(nodered + "/flows.json", source_text(rng, scaled(200_000)), owner=NODERED_UID)
    tree.file(nodered + "/flows_cred.json", rng.randbytes(512), mode=0o600, owner=NODERED_UID)
    tree.file(nodered + "/settings.js", source_text(rng, 20_000), owner=NODERED_UID)
    for i in range(scaled(24_000)):
        size = int(rng.paretovariate(1.3) * 600) % 40_000 + 40
        tree.file("%s/node_modules/pkg%03d/lib/f%05d.js" % (nodered, i // 60, i),
                  source_text(rng, size), owner=NODERED_UID)
    for i in range(scaled(400)):
        tree.mkdir("%s/node_modules/empty%03d/.bin" % (nodered, i))

    # InfluxDB: 16 MiB shards (their number scales), metadata, write-ahead log.
    influx = "volumes/influxdb/data"
    for i in range(scaled(8)):
        tree.file("%s/data/telegraf/autogen/%d/000000001-000000002.tsm" % (influx, i + 1),
                  database_bytes(rng, 16 << 20), owner=0)
    tree.file(influx + "/meta/meta.db", database_bytes(rng, 64_000, 0.5))
    tree.file(influx + "/wal/telegraf/_00001.wal", database_bytes(rng, scaled(4 << 20), 0.6))

    # Grafana: an SQLite database and plugin files.
    grafana = "volumes/grafana/data"
    tree.file(grafana + "/grafana.db", database_bytes(rng, scaled(24 << 20), 0.25),
              mode=0o640, owner=GRAFANA_UID)
    for i in range(scaled(300)):
        tree.file("%s/plugins/panel%02d/module%03d.js" % (grafana, i // 30, i),
                  source_text(rng, 3000), owner=GRAFANA_UID)

    # Mosquitto: retained messages, a text log, a password file.
    mosquitto = "volumes/mosquitto"
    tree.file(mosquitto + "/data/mosquitto.db", database_bytes(rng, 200_000, 0.4),
              owner=MOSQUITTO_UID)
    tree.file(mosquitto + "/log/mosquitto.log", source_text(rng, scaled(6 << 20)),
              owner=MOSQUITTO_UID)
    tree.file(mosquitto + "/pwfile/pwfile", b"user:$7$hash\n", mode=0o600, owner=MOSQUITTO_UID)

    # Portainer: a database and an already-compressed (random) backup blob.
    portainer = "volumes/portainer-ce/data"
    tree.file(portainer + "/portainer.db", database_bytes(rng, scaled(4 << 20), 0.5))
    tree.file(portainer + "/backups/portainer-backup.tar.gz", rng.randbytes(scaled(20 << 20)))

    # Zigbee2MQTT and Home Assistant.
    zigbee = "volumes/zigbee2mqtt/data"
    tree.file(zigbee + "/configuration.yaml", source_text(rng, 3000))
    tree.file(zigbee + "/database.db", source_text(rng, scaled(400_000)))
    home = "volumes/homeassistant"
    tree.file(home + "/home-assistant_v2.db", database_bytes(rng, scaled(32 << 20), 0.3))
    for i in range(scaled(150)):
        tree.file("%s/.storage/core.entity%03d" % (home, i), source_text(rng, 2500), mode=0o600)
    tree.file(home + "/with space and ünïcödé.yaml", source_text(rng, 500))

    # Entries a faithful backup must keep as they are.
    os.symlink("home-assistant_v2.db", tree.path(home + "/current.db"))
    os.symlink("/usr/share/zoneinfo/Etc/UTC", tree.path(home + "/localtime"))
    os.link(tree.path(home + "/home-assistant_v2.db"), tree.path(home + "/hardlink.db"))
    tree.mkdir(mosquitto + "/empty")
    os.chmod(tree.path(mosquitto + "/pwfile"), 0o700)


NEXTCLOUD_UID = 33  # www-data
FILES_PER_FOLDER = 1000


def count_entries(dest):
    return sum(len(dirs) + len(files) for _folder, dirs, files in os.walk(dest))


def add_small_files(dest, entries, seed=1):
    """Fill volumes/nextcloud/data with small files (0-2000 bytes of text,
    1,000 per folder) until the tree holds `entries` entries: the shape of
    a Nextcloud's data, where the cost per entry decides."""
    rng = random.Random(seed)
    tree = TreeWriter(dest)
    text = source_text(rng, 1 << 16)
    missing = entries - count_entries(dest)
    number = 0
    while missing > 0:
        folder = "volumes/nextcloud/data/pi/files/%04d" % (number // FILES_PER_FOLDER)
        if folder not in tree.made:
            parts = folder.split("/")
            missing -= sum(1 for i in range(len(parts))
                           if not os.path.isdir(tree.path("/".join(parts[:i + 1]))))
        size = rng.randint(0, 2000)
        start = rng.randint(0, len(text) - size)
        tree.file("%s/f%06d.txt" % (folder, number), text[start:start + size],
                  owner=NEXTCLOUD_UID)
        number += 1
        missing -= 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--entries", type=int, default=0,
                        help="add small files in volumes/nextcloud/data until the tree "
                             "holds this many entries")
    args = parser.parse_args()
    if os.path.exists(args.dest) and os.listdir(args.dest):
        sys.exit("stack_builder: %s exists and is not empty" % args.dest)
    os.makedirs(args.dest, exist_ok=True)
    build(args.dest, args.scale, args.seed)
    if args.entries:
        add_small_files(args.dest, args.entries, args.seed)


if __name__ == "__main__":
    main()
