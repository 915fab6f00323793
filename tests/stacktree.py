"""Test fixture: build a small but realistic IOTstack directory tree and compare trees.

``build_stack(dest)`` creates a miniature ``~/IOTstack`` (compose files, ``services/``,
``volumes/`` for Node-RED, Mosquitto, InfluxDB, Grafana and a Home Assistant leftover,
plus ``.tmp/`` and ``backups/`` content that a backup must skip).  The tree is fully
deterministic for a given ``seed`` and ``scale`` - contents, modes, owners (when running
as root) and mtimes - so that ``snapshot()`` of a tree restored from a backup can be
compared with ``snapshot()`` of the original using ``diff_snapshots()``.

It deliberately contains the things archive code tends to get wrong: symlinks (relative,
absolute, dangling, to a directory, with a >100 byte target), a hard-link pair, a FIFO,
empty (and nested empty) directories, awkward file names (spaces, unicode, leading dash,
glob characters, quotes/dollar, colon), a >255 byte deep path with a 130 byte name
component, service uids/gids (0, 1000, 472, 1883, an unnamed 54321, mixed uid/gid),
setuid/setgid files, a read-only file, a sticky 1777 directory, 0700/0600 entries and
fixed integer mtimes on everything (directories included).

Tests of stopping and starting services use real compose projects on a real engine
(``tests/engine.py``, ``tests/real_stack.py``), never a stand-in for docker.

Everything is stdlib only and works on Python 3.9+.  When not running as root, ownership
is simply not changed (every entry belongs to the current user) - use ``IS_ROOT`` to skip
ownership assertions.
"""

import collections
import hashlib
import os
import random
import stat
import zlib

from tests.support import IS_ROOT


# mtimes: BASE_MTIME + a small per-path offset (see _default_mtime)
BASE_MTIME = 1_700_000_000
OLD_MTIME = 946_684_800  # 2000-01-01T00:00:00Z, used for one file

# Service uids/gids as used by the IOTstack images.
UID_ROOT = 0
UID_NODERED = 1000
UID_GRAFANA = 472
UID_MOSQUITTO = 1883
UID_ORPHAN = 54321  # a uid/gid without a name on the system

COMPOSE_SERVICES = ("nodered", "mosquitto", "influxdb", "grafana")

# Relative paths (inside the stack) that a backup must NOT contain.
NOT_BACKED_UP = ("backups", ".tmp/cache")

# Well known paths, relative to the stack root (see build_stack for what they are).
P = {
    "compose": "docker-compose.yml",
    "compose_override": "docker-compose.override.yml",
    "compose_override_iotstack": "compose-override.yml",
    "env": ".env",
    "menu": "menu.sh",
    "extra_file": "extra/notes.txt",
    "db_dump": ".tmp/databases_backup/influxdb-backup.tar",
    "tmp_cache_file": ".tmp/cache/x",
    "old_backup_note": "backups/backup/old_note.txt",
    "ha_db": "volumes/homeassistant/home-assistant_v2.db",
    "hardlink": "volumes/homeassistant/hardlink.db",
    "symlink_rel": "volumes/homeassistant/current.db",
    "symlink_abs": "volumes/homeassistant/localtime",
    "symlink_dangling": "volumes/homeassistant/dangling.db",
    "symlink_dir": "volumes/nodered/data/projects",
    "symlink_long": "volumes/nodered/data/deep/longlink",
    "fifo": "volumes/nodered/data/control.fifo",
    "setuid": "volumes/nodered/data/bin/setuid-helper",
    "setgid": "volumes/nodered/data/bin/setgid-helper",
    "readonly": "volumes/grafana/data/readonly.ini",
    "group_writable": "volumes/grafana/data/shared.ini",
    "sticky_dir": "volumes/nodered/data/tmp",
    "dir_0700": "volumes/mosquitto/pwfile",
    "pwfile": "volumes/mosquitto/pwfile/pwfile",
    "orphan_owner": "volumes/influxdb/data/orphan.dat",
    "mixed_owner": "volumes/grafana/data/mixed-owner.txt",
    "old_mtime": "services/nodered/Dockerfile",
    "grafana_dir": "volumes/grafana/data",
    "grafana_db": "volumes/grafana/data/grafana.db",
    "empty_dir": "volumes/mosquitto/log",
    "empty_nested": "volumes/nodered/data/node_modules/empty000/.bin",
    "awkward_dir": "volumes/nodered/data/awkward",
    "unicode": "volumes/nodered/data/awkward/with space and \u00fcn\u00efc\u00f6d\u00e9.yaml",
    "spaces": "volumes/nodered/data/awkward/file with spaces.txt",
    "dash": "volumes/nodered/data/awkward/-dash.txt",
    "glob": "volumes/nodered/data/awkward/glob*?[chars].txt",
    "quote_dollar": "volumes/nodered/data/awkward/it's $HOME.txt",
    "colon": "volumes/nodered/data/awkward/a:b.txt",
}
_DEEP_DIRS = ["d%d-%s" % (i, "x" * 57) for i in range(1, 4)]  # 60 chars each
P["long_dir"] = "volumes/nodered/data/deep/" + "/".join(_DEEP_DIRS)
P["long_name"] = P["long_dir"] + "/" + "long-file-name-" + "n" * 111 + ".txt"  # 130 chars


_WORDS = (
    "const var let function return require module exports node msg payload topic "
    "send done this config RED nodes registerType on input close status fill shape "
    "text if else for while true false null undefined error warn log debug flow "
    "global context get set callback options settings http request response"
).split()

_PKG_NAMES = (
    "node-red-contrib-influxdb", "node-red-dashboard", "node-red-node-email",
    "node-red-contrib-mqtt-broker", "node-red-node-serialport", "node-red-contrib-cron-plus",
    "node-red-node-sqlite", "node-red-contrib-home-assistant-websocket", "mqtt", "ws",
    "lodash", "moment", "debug", "ms", "semver", "uuid", "axios", "express",
)


def _text(rng, approx_size):
    """Deterministic JS-ish text of about approx_size bytes."""
    out = []
    n = 0
    while n < approx_size:
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        line = "    " * rng.randint(0, 3) + line + ";\n"
        out.append(line)
        n += len(line)
    return "".join(out)


def _semi_compressible(rng, size):
    """InfluxDB-shard-like bytes: each 4 KiB block is 35% random then a run of one byte."""
    blocks = []
    rand_len = int(4096 * 0.35)
    for _ in range((size + 4095) // 4096):
        run = bytes([rng.randrange(256)]) * (4096 - rand_len)
        blocks.append(rng.randbytes(rand_len) + run)
    return b"".join(blocks)[:size]


def _big(size, scale):
    """Scaled size of a big file: a multiple of 4 KiB, at least one block."""
    return max(4096, int(round(size * scale / 4096.0)) * 4096)


def _count(n, scale, minimum=1):
    return max(minimum, int(round(n * scale)))


def _default_mtime(rel):
    return BASE_MTIME + zlib.crc32(rel.encode("utf-8")) % 100_000


COMPOSE_YML = """\
networks:
  default:
    driver: bridge
    ipam:
      driver: default

services:
  nodered:
    container_name: nodered
    build:
      context: ./services/nodered/.
      args:
      - DOCKERHUB_TAG=latest
      - EXTRA_PACKAGES=
    restart: unless-stopped
    user: "0"
    environment:
    - TZ=${TZ:-Etc/UTC}
    ports:
    - "1880:1880"
    volumes:
    - ./volumes/nodered/data:/data
    - ./volumes/nodered/ssh:/root/.ssh

  mosquitto:
    container_name: mosquitto
    build:
      context: ./.templates/mosquitto/.
      args:
      - MOSQUITTO_BASE=eclipse-mosquitto:latest
    restart: unless-stopped
    environment:
    - TZ=${TZ:-Etc/UTC}
    ports:
    - "1883:1883"
    volumes:
    - ./volumes/mosquitto/config:/mosquitto/config
    - ./volumes/mosquitto/data:/mosquitto/data
    - ./volumes/mosquitto/log:/mosquitto/log
    - ./volumes/mosquitto/pwfile:/mosquitto/pwfile

  influxdb:
    container_name: influxdb
    image: "influxdb:1.8"
    restart: unless-stopped
    ports:
    - "8086:8086"
    environment:
    - TZ=${TZ:-Etc/UTC}
    - INFLUXDB_HTTP_FLUX_ENABLED=false
    - INFLUXDB_REPORTING_DISABLED=false
    - INFLUXDB_HTTP_AUTH_ENABLED=false
    - INFLUXDB_MONITOR_STORE_ENABLED=FALSE
    volumes:
    - ./volumes/influxdb/data:/var/lib/influxdb
    - ./backups/influxdb/db:/var/lib/influxdb/backup

  grafana:
    container_name: grafana
    image: grafana/grafana
    restart: unless-stopped
    user: "0"
    ports:
    - "3000:3000"
    environment:
    - TZ=${TZ:-Etc/UTC}
    - GF_PATHS_DATA=/var/lib/grafana
    - GF_PATHS_LOGS=/var/lib/grafana/logs
    volumes:
    - ./volumes/grafana/data:/var/lib/grafana
    - ./volumes/grafana/log:/var/log/grafana
    healthcheck:
      test: ["CMD", "wget", "-O", "/dev/null", "http://localhost:3000"]
      interval: 30s
      timeout: 10s
      retries: 3
      start_period: 30s
"""

COMPOSE_OVERRIDE_IOTSTACK = """\
services:
  nodered:
    environment:
    - NODE_RED_ENABLE_PROJECTS=true
"""

COMPOSE_OVERRIDE = """\
services:
  grafana:
    environment:
    - GF_SECURITY_ADMIN_PASSWORD=${GRAFANA_PASSWORD}
"""

DOT_ENV = """\
TZ=Etc/UTC
GRAFANA_PASSWORD=s3cr3t-not-really
INFLUXDB_ADMIN_PASSWORD=also-not-really
"""

MENU_SH = """\
#!/bin/bash
# IOTstack menu (test fixture stand-in)
echo "IOTstack menu"
exit 0
"""


class _Builder:
    def __init__(self, dest, scale, seed):
        self.dest = dest
        self.scale = scale
        self.rng = random.Random(seed)
        # rel path -> dict(uid=, gid=, mode=, mtime=) overrides
        self.attrs = {}

    # -- creation helpers ---------------------------------------------------------
    def _abs(self, rel):
        return os.path.join(self.dest, *rel.split("/"))

    def _set(self, rel, **kw):
        self.attrs.setdefault(rel, {}).update(kw)

    def mkdir(self, rel, **kw):
        os.makedirs(self._abs(rel), exist_ok=True)
        if kw:
            self._set(rel, **kw)

    def write(self, rel, data, **kw):
        path = self._abs(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if isinstance(data, str):
            data = data.encode("utf-8")
        with open(path, "wb") as f:
            f.write(data)
        if kw:
            self._set(rel, **kw)

    def symlink(self, rel, target, **kw):
        path = self._abs(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.symlink(target, path)
        if kw:
            self._set(rel, **kw)

    def hardlink(self, rel, existing_rel):
        os.link(self._abs(existing_rel), self._abs(rel))
        self._set(rel, skip=True)  # attributes come from the first name

    def fifo(self, rel, **kw):
        path = self._abs(rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkfifo(path)
        if kw:
            self._set(rel, **kw)

    # -- content ----------------------------------------------------------------
    def build(self):
        rng = self.rng
        scale = self.scale
        svc = dict(uid=UID_NODERED, gid=UID_NODERED)
        mq = dict(uid=UID_MOSQUITTO, gid=UID_MOSQUITTO)
        gf = dict(uid=UID_GRAFANA, gid=UID_GRAFANA)

        # top level
        self.write("docker-compose.yml", COMPOSE_YML)
        self.write("compose-override.yml", COMPOSE_OVERRIDE_IOTSTACK)
        self.write("docker-compose.override.yml", COMPOSE_OVERRIDE)
        self.write(".env", DOT_ENV, mode=0o600)
        self.write("menu.sh", MENU_SH, mode=0o755)
        self.write("extra/notes.txt", "extra files kept next to the stack\n")
        self.write(".tmp/databases_backup/influxdb-backup.tar",
                   _semi_compressible(rng, _big(64 * 1024, scale)))
        self.write(".tmp/cache/x", "temporary cache, never backed up\n")
        self.write(".tmp/cache/y.bin", rng.randbytes(2048))
        self.write("backups/backup/old_note.txt", "an old, unrelated backup note\n")

        # services/
        self.write("services/nodered/Dockerfile",
                   "ARG DOCKERHUB_TAG=latest\nFROM nodered/node-red:${DOCKERHUB_TAG}\n",
                   mtime=OLD_MTIME)
        self.write("services/nodered/addons.yml", "addons: []\n")
        self.write("services/mosquitto/service.yml", "mosquitto:\n  container_name: mosquitto\n")
        self.write("services/influxdb/service.yml", "influxdb:\n  container_name: influxdb\n")
        self.write("services/grafana/service.yml", "grafana:\n  container_name: grafana\n")

        # --- Node-RED -------------------------------------------------------------
        nr = "volumes/nodered/data"
        self.mkdir("volumes/nodered", mode=0o755)
        self.mkdir(nr, **svc)
        self.mkdir("volumes/nodered/ssh", mode=0o700, **svc)
        self.write("volumes/nodered/ssh/known_hosts", _text(rng, 300), mode=0o600, **svc)
        self.write(nr + "/settings.js", _text(rng, 3000), **svc)
        self.write(nr + "/flows.json", _text(rng, 4000), **svc)
        self.write(nr + "/flows_cred.json", _text(rng, 200), mode=0o600, **svc)
        self.write(nr + "/package.json", '{"name": "node-red-project", "version": "0.0.1"}\n', **svc)
        self.write(nr + "/.config.runtime.json", '{"_credentialSecret": "x"}\n', mode=0o640, **svc)
        nm = nr + "/node_modules"
        self.mkdir(nm, **svc)
        for i in range(_count(40, scale)):
            pkg = "%s/%s-%03d" % (nm, _PKG_NAMES[i % len(_PKG_NAMES)], i)
            self.mkdir(pkg, **svc)
            self.write(pkg + "/package.json",
                       '{"name": "pkg%03d", "version": "1.%d.0", "main": "index.js"}\n'
                       % (i, rng.randrange(20)), **svc)
            self.write(pkg + "/index.js", _text(rng, rng.randint(200, 3000)), **svc)
            self.write(pkg + "/README.md", _text(rng, rng.randint(200, 1500)), **svc)
            self.write(pkg + "/LICENSE", "MIT License\n\nCopyright (c) test\n", **svc)
            self.write(pkg + "/lib/util.js", _text(rng, rng.randint(100, 2000)), **svc)
            self.write(pkg + "/lib/nodes/node.js", _text(rng, rng.randint(100, 2000)), **svc)
            self.write(pkg + "/lib/nodes/node.html", _text(rng, rng.randint(100, 1000)), **svc)
            self.mkdir(pkg + "/lib", **svc)
            self.mkdir(pkg + "/lib/nodes", **svc)
        for i in range(_count(2, scale)):
            self.mkdir("%s/empty%03d" % (nm, i), **svc)
            self.mkdir("%s/empty%03d/.bin" % (nm, i), **svc)
        self.mkdir(nr + "/lib", **svc)
        self.write(nr + "/lib/flows/common.json", _text(rng, 500), **svc)
        self.symlink(P["symlink_dir"], "lib")
        # already-compressed blobs
        for i in range(2):
            self.write("%s/archive/flows-%03d.tar.gz" % (nr, i),
                       rng.randbytes(_big(256 * 1024, scale)), **svc)
        self.mkdir(nr + "/archive", **svc)
        # special files
        self.fifo(P["fifo"], mode=0o600, **svc)
        self.write(P["setuid"], "#!/bin/sh\necho setuid\n", mode=0o4755, **svc)
        self.write(P["setgid"], "#!/bin/sh\necho setgid\n", mode=0o2755, uid=0, gid=UID_NODERED)
        self.mkdir(nr + "/bin", **svc)
        self.mkdir(P["sticky_dir"], mode=0o1777, **svc)
        self.write(P["sticky_dir"] + "/session.lock", "locked\n", **svc)
        # awkward names
        self.mkdir(P["awkward_dir"], **svc)
        for key in ("unicode", "spaces", "dash", "glob", "quote_dollar", "colon"):
            self.write(P[key], "awkward name: %s\n" % key, **svc)
        self.write(P["awkward_dir"] + "/.hidden", "hidden file\n", **svc)
        # deep / long names
        self.write(P["long_name"], "a file with a long name in a deep directory\n", **svc)
        d = nr + "/deep"
        for part in _DEEP_DIRS:
            d += "/" + part
            self.mkdir(d, **svc)
        self.mkdir(nr + "/deep", **svc)
        self.symlink(P["symlink_long"], P["long_name"][len(nr + "/deep/"):])

        # --- Mosquitto ------------------------------------------------------------
        self.mkdir("volumes/mosquitto", **mq)
        self.mkdir("volumes/mosquitto/config", **mq)
        self.write("volumes/mosquitto/config/mosquitto.conf",
                   "listener 1883\npersistence true\npersistence_location /mosquitto/data\n"
                   "password_file /mosquitto/pwfile/pwfile\n", **mq)
        self.write("volumes/mosquitto/config/filter.acl", "user admin\ntopic readwrite #\n", **mq)
        self.mkdir("volumes/mosquitto/data", mode=0o755, **mq)
        self.write("volumes/mosquitto/data/mosquitto.db", rng.randbytes(8192), mode=0o600, **mq)
        self.mkdir(P["dir_0700"], mode=0o700, **mq)
        self.write(P["pwfile"], "admin:$7$101$abcdefghijklmnop\n", mode=0o600, **mq)
        self.mkdir(P["empty_dir"], mode=0o755, **mq)

        # --- InfluxDB -------------------------------------------------------------
        idb = "volumes/influxdb/data"
        self.mkdir("volumes/influxdb")
        self.mkdir(idb)
        self.write(idb + "/meta/meta.db", rng.randbytes(4096))
        for shard in (2, 3, 4):
            sdir = "%s/data/telegraf/autogen/%d" % (idb, shard)
            self.write(sdir + "/000000001-000000001.tsm",
                       _semi_compressible(rng, _big(512 * 1024, scale)))
            self.write(sdir + "/fields.idx", rng.randbytes(512))
            wdir = "%s/wal/telegraf/autogen/%d" % (idb, shard)
            self.write(wdir + "/_00001.wal", rng.randbytes(1024))
        self.mkdir(idb + "/wal/_internal/monitor/1")  # empty wal dir
        self.write(P["orphan_owner"], "owned by an unnamed uid/gid\n",
                   uid=UID_ORPHAN, gid=UID_ORPHAN)

        # --- Grafana --------------------------------------------------------------
        self.mkdir("volumes/grafana", mode=0o755)
        self.mkdir(P["grafana_dir"], **gf)
        self.write(P["grafana_db"], _semi_compressible(rng, _big(128 * 1024, scale)),
                   mode=0o640, **gf)
        self.mkdir(P["grafana_dir"] + "/plugins", **gf)  # empty
        self.mkdir(P["grafana_dir"] + "/csv", mode=0o700, **gf)  # empty
        self.write(P["readonly"], "[readonly]\nvalue = 1\n", mode=0o444, **gf)
        # Wider than a usual umask lets a new file be: restore must chmod it.
        self.write(P["group_writable"], "[shared]\nvalue = 2\n", mode=0o666, **gf)
        self.write(P["mixed_owner"], "uid 1000, gid 472\n", uid=UID_NODERED, gid=UID_GRAFANA)
        self.mkdir("volumes/grafana/log", **gf)
        self.write("volumes/grafana/log/grafana.log", _text(rng, 1000), mode=0o640, **gf)

        # --- Home Assistant leftovers: symlinks and a hard link -------------------
        ha = "volumes/homeassistant"
        self.write(P["ha_db"], _semi_compressible(rng, _big(256 * 1024, scale)), mode=0o644)
        self.hardlink(P["hardlink"], P["ha_db"])
        self.symlink(P["symlink_rel"], "home-assistant_v2.db")
        self.symlink(P["symlink_abs"], "/usr/share/zoneinfo/Etc/UTC")
        self.symlink(P["symlink_dangling"], "missing/nowhere.db")
        self.write(ha + "/configuration.yaml", "homeassistant:\n  name: Home\n")
        self.write(ha + "/secrets.yaml", "api_password: x\n", mode=0o600)

    # -- attributes (ownership, modes, mtimes) ------------------------------------
    def apply_attrs(self):
        dirs = []
        for dirpath, dirnames, filenames in os.walk(self.dest):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, self.dest).replace(os.sep, "/")
                st = os.lstat(path)
                if stat.S_ISDIR(st.st_mode):
                    dirs.append((rel, path))
                    continue
                a = self.attrs.get(rel, {})
                if a.get("skip"):
                    continue
                is_link = stat.S_ISLNK(st.st_mode)
                if IS_ROOT:
                    os.lchown(path, a.get("uid", 0), a.get("gid", 0))
                if not is_link:  # chmod AFTER chown (chown clears setuid/setgid)
                    os.chmod(path, a.get("mode", 0o644))
                mt = a.get("mtime", _default_mtime(rel))
                os.utime(path, (mt, mt), follow_symlinks=False)
        # directories last, deepest first, so that their mtimes stick
        dirs.sort(key=lambda d: (-d[0].count("/"), d[0]))
        for rel, path in dirs:
            a = self.attrs.get(rel, {})
            if IS_ROOT:
                os.lchown(path, a.get("uid", 0), a.get("gid", 0))
            os.chmod(path, a.get("mode", 0o755))
            mt = a.get("mtime", _default_mtime(rel))
            os.utime(path, (mt, mt), follow_symlinks=False)
        os.chmod(self.dest, 0o755)
        os.utime(self.dest, (BASE_MTIME, BASE_MTIME))


def build_stack(dest, scale=1.0, seed=1):
    """Build the fixture IOTstack tree at ``dest`` (must not exist, or be an empty dir).

    Deterministic for (scale, seed).  ``scale`` multiplies the number of small files
    (node_modules packages, empty dirs) and the sizes of the big files.
    """
    dest = os.fspath(dest)
    if os.path.lexists(dest):
        if not os.path.isdir(dest) or os.listdir(dest):
            raise FileExistsError("build_stack: %s exists and is not an empty directory" % dest)
    else:
        os.makedirs(dest)
    b = _Builder(dest, scale, seed)
    b.build()
    b.apply_attrs()


# ---------------------------------------------------------------------------------
# snapshots

Entry = collections.namedtuple(
    "Entry", "type mode uid gid mtime size sha256 target link_group")
Entry.__doc__ = """One tree entry as recorded by snapshot().

type: 'file' | 'dir' | 'symlink' | 'fifo' | 'other'; mode: stat.S_IMODE (0o777 for
symlinks on Linux); uid, gid; mtime: int seconds (lstat); size and sha256 (hex): files
only, else None; target: symlink target, else None; link_group: for regular files whose
inode has two or more names inside the (non-skipped) tree, the smallest of those
relative paths, else None."""

FIELDS = Entry._fields


def _norm_rel(p):
    p = os.fspath(p).replace(os.sep, "/").strip("/")
    while p.startswith("./"):
        p = p[2:]
    return p


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def snapshot(root, skip=()):
    """Describe the tree under ``root`` as {relative '/'-separated path: Entry}.

    ``root`` itself is not included.  ``skip``: relative paths (top-level or nested,
    e.g. ('backups', '.tmp/cache')) left out together with everything below them.
    Symlinks are never followed.  The result is an ordinary dict with sorted keys.
    """
    root = os.fspath(root)
    skip = {_norm_rel(s) for s in skip}
    raw = {}
    inodes = collections.defaultdict(list)

    def walk(dirpath, prefix):
        with os.scandir(dirpath) as it:
            names = sorted(e.name for e in it)
        for name in names:
            rel = prefix + name
            if rel in skip:
                continue
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            m = st.st_mode
            size = sha = target = None
            if stat.S_ISREG(m):
                typ = "file"
                size = st.st_size
                sha = _sha256(path)
                if st.st_nlink > 1:
                    inodes[(st.st_dev, st.st_ino)].append(rel)
            elif stat.S_ISDIR(m):
                typ = "dir"
            elif stat.S_ISLNK(m):
                typ = "symlink"
                target = os.readlink(path)
            elif stat.S_ISFIFO(m):
                typ = "fifo"
            else:
                typ = "other"
            raw[rel] = [typ, stat.S_IMODE(m), st.st_uid, st.st_gid,
                        st.st_mtime_ns // 1_000_000_000, size, sha, target, None]
            if typ == "dir":
                walk(path, rel + "/")

    walk(root, "")
    for rels in inodes.values():
        if len(rels) > 1:
            canon = min(rels)
            for rel in rels:
                raw[rel][8] = canon
    return {rel: Entry(*raw[rel]) for rel in sorted(raw)}


def _fmt(field, value):
    if field == "mode" and value is not None:
        return oct(value)
    return repr(value)


def diff_snapshots(a, b, ignore=()):
    """Human-readable differences between two snapshots (a = expected, b = actual).

    Returns [] when equal.  ``ignore``: fields not to compare, either a field name
    ('uid') for all entries or 'TYPE:field' for one entry type only, e.g.
    ('uid', 'gid', 'symlink:mtime').  Use as
    ``self.assertEqual(diff_snapshots(a, b), [])`` for a readable failure.
    """
    ignore = set(ignore)
    for item in ignore:
        typ, _, field = item.rpartition(":")
        if field not in FIELDS or typ not in ("", "file", "dir", "symlink", "fifo", "other"):
            raise ValueError("unknown snapshot field in ignore: %r" % (item,))
    out = []
    for rel in sorted(set(a) | set(b)):
        if rel not in b:
            out.append("only in first (missing in second): %s [%s]" % (rel, a[rel].type))
            continue
        if rel not in a:
            out.append("only in second (missing in first): %s [%s]" % (rel, b[rel].type))
            continue
        ea, eb = a[rel], b[rel]
        for field in FIELDS:
            if field in ignore or ("%s:%s" % (ea.type, field)) in ignore:
                continue
            va, vb = getattr(ea, field), getattr(eb, field)
            if va != vb:
                out.append("%s: %s differs: %s != %s"
                           % (rel, field, _fmt(field, va), _fmt(field, vb)))
    return out
