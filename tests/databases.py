"""Real databases as compose services on the test engine, their writers and
their own consistency checks (issue 24); used by tests/test_databases.py and
by `bench/bench.py --databases`.

InfluxDB 1.x, MariaDB, PostgreSQL, an SQLite application (as Home
Assistant's recorder) and Mosquitto with persistence, all from Debian's
packages, run as services of one IOTstack-shaped compose project: image
iotbase-open:1 (busybox with `/` at 0755, so a non-root database can walk
it), the host's /usr, /lib, /lib64, /etc/passwd and /etc/group bind-mounted
read-only, `network_mode: none`, each database as its own uid with its data
in ./volumes/<service>.  Clients reach the servers through unix sockets in
./run/<service> (not a backup item), the way a writer on the Pi would.
PostgreSQL stops on SIGINT (fast shutdown), as its official image does.

A writer per database inserts numbered rows at a given rate and records
each acknowledgement with its time (the SQLite one runs inside its container
and appends its acknowledgements to ./acks/sqlite.log); a row that could not
be written while its database was down is counted as lost.  After a restore
onto a fresh folder, check_restored() starts the databases and proves each
consistent with its own tools: `mariadb-check --extended`, `pg_amcheck
--heapallindexed` (and pg_controldata: shut down cleanly), `PRAGMA
integrity_check`, full scans of InfluxDB and of Mosquitto's queued
messages; that none needed crash recovery (its log, or the files a crash
leaves); and that every row acknowledged before its container's `die`
event is there.

Everything runs as root (the data belongs to five uids); without root, the
packages or IOTSTACK_HEAVY=1, skip_reason() says why.  Stdlib only.
"""
from __future__ import annotations

import collections
import glob
import http.client
import io
import json
import os
import pwd
import shutil
import socket
import struct
import subprocess
import tarfile
import threading
import time
import urllib.parse

from tests import engine as E

OPEN_IMAGE = "iotbase-open:1"
HEAVY_REASON = "heavy suite: runs where IOTSTACK_HEAVY=1 (CI's 3.11 pass)"


def _newest_postgres() -> str:
    """Debian's PostgreSQL binaries (bookworm: 15), the newest installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else "/usr/lib/postgresql/15/bin"


PG_BIN = _newest_postgres()
SERVICES = ("influxdb", "mariadb", "mosquitto", "postgres", "sqlite")
# The host tools each database needs (server, init, client, check).
TOOLS = {
    "mariadb": ("/usr/sbin/mariadbd", "/usr/bin/mariadb-install-db", "/usr/bin/mariadb",
                "/usr/bin/mariadb-check", "/usr/bin/mariadb-admin"),
    "postgres": tuple(os.path.join(PG_BIN, t) for t in (
        "postgres", "initdb", "psql", "pg_amcheck", "pg_controldata", "pg_isready")),
    "influxdb": ("/usr/bin/influxd",),
    "sqlite": ("/usr/bin/python3", "/usr/bin/sqlite3"),
    "mosquitto": ("/usr/sbin/mosquitto",),
}
APT_PACKAGES = "influxdb mariadb-server postgresql sqlite3 mosquitto"
USERS = {"mariadb": "mysql", "postgres": "postgres", "influxdb": "influxdb",
         "mosquitto": "mosquitto"}
SQLITE_UID = 1000
PAD = "x" * 64  # each row carries a little payload, as a sensor reading does
READY_TIMEOUT = 90


class DatabaseError(AssertionError):
    """A database did not start, failed its check or lost a row."""


def skip_reason() -> str | None:
    """Why the database suite cannot run here, or None."""
    if os.environ.get("IOTSTACK_HEAVY", "") in ("", "0"):
        return HEAVY_REASON
    if os.geteuid() != 0:
        return "the databases' data belongs to their own uids: needs root"
    missing = [tool for tools in TOOLS.values() for tool in tools if not os.path.exists(tool)]
    missing += ["user " + user for user in USERS.values() if not _user(user)]
    if missing:
        return ("missing %s: apt-get install %s" % (", ".join(missing), APT_PACKAGES))
    return None


def _user(name: str):
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def ids(service: str) -> tuple[int, int]:
    """The uid and gid a service's database runs as."""
    if service == "sqlite":
        return SQLITE_UID, SQLITE_UID
    entry = pwd.getpwnam(USERS[service])
    return entry.pw_uid, entry.pw_gid


# ---------------------------------------------------------------------------
# The image and the compose file

def ensure_open_image(eng=None) -> None:
    """Import iotbase-open:1: busybox as iotbase:1, but `/` at 0755 (docker
    import keeps the root folder's mode) and mount points for the host's
    libraries, so a database running as its own uid can reach them."""
    eng = eng or E.engine()
    if eng.docker("image", "inspect", OPEN_IMAGE, check=False).returncode == 0:
        return
    busybox = "/bin/busybox"
    applets = E.run([busybox, "--list"], timeout=10).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        def add(name, kind=tarfile.DIRTYPE, mode=0o755, target="", data=None):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname, info.mtime = kind, mode, target, int(time.time())
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        add(".")
        for folder in ("bin", "etc", "root", "run", "var", "var/lib", "usr", "lib", "lib64",
                       "proc", "sys", "dev", "app", "acks", "mosquitto"):
            add(folder)
        add("tmp", mode=0o1777)
        with open(busybox, "rb") as f:
            add("bin/busybox", tarfile.REGTYPE, 0o755, data=f.read())
        for applet in applets:
            if applet != "busybox" and "/" not in applet:
                add("bin/" + applet, tarfile.SYMTYPE, 0o777, target="busybox")
        for name in ("passwd", "group"):
            add("etc/" + name, tarfile.REGTYPE, 0o644, data=b"")
    eng.docker("import", "-c", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "-c", 'CMD ["/bin/sh"]', "-c", "LABEL org.iotstack.test-image=busybox-open",
               "-", OPEN_IMAGE, input=buf.getvalue(), timeout=60)


HOST_MOUNTS = ["/usr:/usr:ro", "/lib:/lib:ro", "/lib64:/lib64:ro",
               "/etc/passwd:/etc/passwd:ro", "/etc/group:/etc/group:ro"]
MARIADB_OPTIONS = ["--no-defaults", "--datadir=/var/lib/mysql", "--socket=/run/mysqld/mysqld.sock",
                   "--skip-networking", "--innodb-buffer-pool-size=32M",
                   "--innodb-log-file-size=16M", "--pid-file=/run/mysqld/mysqld.pid"]
INFLUX_ENV = {
    "INFLUXDB_META_DIR": "/var/lib/influxdb/meta",
    "INFLUXDB_DATA_DIR": "/var/lib/influxdb/data",
    "INFLUXDB_DATA_WAL_DIR": "/var/lib/influxdb/wal",
    "INFLUXDB_HTTP_BIND_ADDRESS": "127.0.0.1:8086",
    "INFLUXDB_BIND_ADDRESS": "127.0.0.1:8088",
    "INFLUXDB_HTTP_UNIX_SOCKET_ENABLED": "true",
    "INFLUXDB_HTTP_BIND_SOCKET": "/run/influxdb/influxdb.sock",
    "INFLUXDB_HTTP_LOG_ENABLED": "false",
    "INFLUXDB_DATA_QUERY_LOG_ENABLED": "false",
    "INFLUXDB_REPORTING_DISABLED": "true",
}
MOSQUITTO_CONF = """\
persistence true
persistence_location /mosquitto/data/
autosave_interval 1800
max_queued_messages 0
max_queued_bytes 0
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
listener 0 /run/mosquitto/mosquitto.sock
allow_anonymous true
"""


def service_specs(rate: float) -> dict:
    """{service: compose service} of the five databases; the SQLite
    application inserts `rate` rows a second."""
    def spec(service, command, volumes, **extra):
        uid, gid = ids(service)
        return dict({"image": OPEN_IMAGE, "network_mode": "none", "user": "%d:%d" % (uid, gid),
                     "command": command, "volumes": HOST_MOUNTS + volumes,
                     "stop_grace_period": "30s"}, **extra)
    return {
        "influxdb": spec("influxdb", ["/usr/bin/influxd"],
                         ["./volumes/influxdb:/var/lib/influxdb", "./run/influxdb:/run/influxdb"],
                         environment=INFLUX_ENV),
        "mariadb": spec("mariadb", ["/usr/sbin/mariadbd"] + MARIADB_OPTIONS,
                        ["./volumes/mariadb:/var/lib/mysql", "./run/mariadb:/run/mysqld"]),
        "mosquitto": spec("mosquitto", ["/usr/sbin/mosquitto", "-c", "/mosquitto/config/mosquitto.conf"],
                          ["./volumes/mosquitto/config:/mosquitto/config:ro",
                           "./volumes/mosquitto/data:/mosquitto/data",
                           "./run/mosquitto:/run/mosquitto"]),
        "postgres": spec("postgres", [PG_BIN + "/postgres", "-D", "/var/lib/postgresql/data",
                                      "-k", "/run/postgresql", "-c", "listen_addresses="],
                         ["./volumes/postgres:/var/lib/postgresql/data",
                          "./run/postgres:/run/postgresql"],
                         stop_signal="SIGINT"),
        "sqlite": spec("sqlite", ["/usr/bin/python3", "/app/recorder.py",
                                  "/config/home-assistant_v2.db", "/acks/sqlite.log", str(rate)],
                       ["./volumes/sqlite:/config", "./services/sqlite:/app:ro", "./acks:/acks"]),
    }


def write_compose(stack: str, specs: dict) -> str:
    """docker-compose.yml for specs (JSON scalars are YAML; `$` escaped)."""
    lines = ['version: "3.6"', "services:"]
    for name, spec in specs.items():
        lines.append("  %s:" % name)
        for key, value in spec.items():
            if key == "command":
                value = [part.replace("$", "$$") for part in value]
            lines.append("    %s: %s" % (key, json.dumps(value)))
    path = os.path.join(stack, "docker-compose.yml")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return path


# The SQLite application: Home Assistant's recorder in miniature (WAL, one
# commit per row); it closes the database cleanly on SIGTERM.
RECORDER = r'''
import os, signal, sqlite3, sys, time
db, acks, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
stopping = []
signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
con = sqlite3.connect(db, isolation_level=None)
con.execute("PRAGMA journal_mode=WAL")
con.execute("PRAGMA synchronous=FULL")
con.execute("CREATE TABLE IF NOT EXISTS readings (n INTEGER PRIMARY KEY, at REAL, pad TEXT)")
n = max(0, con.execute("SELECT coalesce(max(n), 0) FROM readings").fetchone()[0])
out = open(acks, "a", buffering=1)
tick = time.monotonic()
while not stopping:
    if rate > 0:
        n += 1
        con.execute("INSERT INTO readings VALUES (?, ?, ?)", (n, time.time(), "%s"))
        out.write("%%d %%.6f\n" %% (n, time.time()))
        tick += 1 / rate
    else:
        tick += 0.5
    time.sleep(max(0.0, tick - time.monotonic()))
con.close()
''' % PAD


# ---------------------------------------------------------------------------
# Building the stack

def run_as(user: str, argv: list, timeout: float = 120) -> subprocess.CompletedProcess:
    """argv as a host user (runuser), output captured; EngineError if it fails."""
    return E.run(["runuser", "-u", user, "--"] + argv, timeout=timeout)


def prepare_runtime(stack: str) -> None:
    """The folders outside the backup items: sockets and acknowledgements."""
    for service in SERVICES:
        uid, gid = ids(service)
        if service != "sqlite":
            path = os.path.join(stack, "run", service)
            os.makedirs(path, exist_ok=True)
            os.chown(path, uid, gid)
    acks = os.path.join(stack, "acks")
    os.makedirs(acks, exist_ok=True)
    os.chown(acks, SQLITE_UID, SQLITE_UID)
    os.chmod(stack, 0o755)


def build_stack(stack: str, rate: float) -> None:
    """A fresh IOTstack folder with the five databases initialised (not started)."""
    os.makedirs(os.path.join(stack, "volumes"), exist_ok=True)
    os.makedirs(os.path.join(stack, "services", "sqlite"), exist_ok=True)
    with open(os.path.join(stack, "services", "sqlite", "recorder.py"), "w") as f:
        f.write(RECORDER)
    write_compose(stack, service_specs(rate))
    prepare_runtime(stack)
    volumes = os.path.join(stack, "volumes")
    for service in SERVICES:
        path = os.path.join(volumes, service)
        os.makedirs(path, exist_ok=True)
        os.chown(path, *ids(service))
    E.run(["mariadb-install-db", "--no-defaults", "--user=mysql",
           "--datadir=" + os.path.join(volumes, "mariadb"), "--skip-test-db",
           "--auth-root-authentication-method=socket", "--innodb-log-file-size=16M"],
          timeout=180)
    run_as("postgres", [PG_BIN + "/initdb", "-D", os.path.join(volumes, "postgres"),
                        "--auth=trust", "--locale=C", "-E", "UTF8", "--no-sync"], timeout=180)
    uid, gid = ids("mosquitto")
    for sub in ("config", "data"):
        os.makedirs(os.path.join(volumes, "mosquitto", sub), exist_ok=True)
        os.chown(os.path.join(volumes, "mosquitto", sub), uid, gid)
    with open(os.path.join(volumes, "mosquitto", "config", "mosquitto.conf"), "w") as f:
        f.write(MOSQUITTO_CONF)


def sockets(stack: str) -> dict:
    """{service: path of its server's socket (postgres: its folder)}."""
    run = os.path.join(stack, "run")
    return {"mariadb": os.path.join(run, "mariadb", "mysqld.sock"),
            "postgres": os.path.join(run, "postgres"),
            "influxdb": os.path.join(run, "influxdb", "influxdb.sock"),
            "mosquitto": os.path.join(run, "mosquitto", "mosquitto.sock")}


# ---------------------------------------------------------------------------
# Clients

def mariadb_sql(stack: str, sql: str, database: str = "", timeout: float = 120) -> str:
    argv = ["mariadb", "--no-defaults", "-S", sockets(stack)["mariadb"], "-u", "root",
            "--batch", "--skip-column-names"]
    return E.run(argv + ([database] if database else []), input=sql, timeout=timeout).stdout


def psql(stack: str, sql: str, database: str = "postgres", timeout: float = 120) -> str:
    argv = [PG_BIN + "/psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
            "-h", sockets(stack)["postgres"], "-U", "postgres", "-d", database]
    return E.run(argv, input=sql, timeout=timeout).stdout


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def influx(stack: str, method: str, path: str, body: bytes = b"", timeout: float = 60):
    """(status, body) of one InfluxDB HTTP API call over its socket."""
    conn = UnixHTTPConnection(sockets(stack)["influxdb"], timeout=timeout)
    try:
        conn.request(method, path, body=body or None)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def influx_query(stack: str, query: str, database: str = "iot") -> dict:
    status, body = influx(stack, "POST", "/query?" + urllib.parse.urlencode(
        {"db": database, "q": query}))
    if status != 200:
        raise DatabaseError("influx %r: HTTP %d %s" % (query, status, body[:200]))
    return json.loads(body)


class Mqtt:
    """A minimal MQTT 3.1.1 client over a unix socket: QoS 1 publish and
    subscribe, for the persistence check (a durable session's queue)."""

    def __init__(self, path: str, client_id: str, clean: bool, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.buffer = b""
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            flags = 0x02 if clean else 0
            body = (_mqtt_str(b"MQTT") + bytes([4, flags]) + struct.pack("!H", 600)
                    + _mqtt_str(client_id.encode()))
            self.send(0x10, body)
            kind, reply = self.receive()
            if kind != 0x20 or reply[1] != 0:
                raise DatabaseError("mosquitto refused the connection: %r" % reply)
        except BaseException:
            self.sock.close()
            raise

    def send(self, first: int, body: bytes) -> None:
        length, rest = len(body), b""
        while True:
            length, digit = divmod(length, 128)
            rest += bytes([digit | (0x80 if length else 0)])
            if not length:
                break
        self.sock.sendall(bytes([first]) + rest + body)

    def receive(self) -> tuple:
        """(first byte, body) of the next packet."""
        while True:
            if len(self.buffer) >= 2:
                length, shift, index = 0, 0, 1
                while index < len(self.buffer):
                    byte = self.buffer[index]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    index += 1
                    if not byte & 0x80:
                        if len(self.buffer) >= index + length:
                            packet = self.buffer[index:index + length]
                            first = self.buffer[0]
                            self.buffer = self.buffer[index + length:]
                            return first, packet
                        break
            more = self.sock.recv(65536)
            if not more:
                raise ConnectionError("mosquitto closed the connection")
            self.buffer += more

    def subscribe(self, topic: str) -> None:
        self.send(0x82, struct.pack("!H", 1) + _mqtt_str(topic.encode()) + b"\x01")
        kind, _ = self.receive()
        if kind != 0x90:
            raise DatabaseError("no SUBACK from mosquitto")

    def publish(self, topic: str, payload: bytes, packet_id: int) -> None:
        """QoS 1: returns once the broker has acknowledged it (PUBACK)."""
        self.send(0x32, _mqtt_str(topic.encode()) + struct.pack("!H", packet_id) + payload)
        kind, body = self.receive()
        if kind != 0x40 or struct.unpack("!H", body)[0] != packet_id:
            raise DatabaseError("no PUBACK for %d" % packet_id)

    def drain(self, quiet: float = 2.0) -> list:
        """The payloads of every message the broker sends until it is quiet."""
        self.sock.settimeout(quiet)
        payloads = []
        try:
            while True:
                first, body = self.receive()
                if first >> 4 != 3:
                    continue
                topic_length = struct.unpack("!H", body[:2])[0]
                at = 2 + topic_length
                if first & 0x06:
                    packet_id = body[at:at + 2]
                    at += 2
                    self.send(0x40, packet_id)
                payloads.append(body[at:])
        except socket.timeout:
            return payloads

    def close(self) -> None:
        try:
            self.send(0xE0, b"")
        except OSError:
            pass
        self.sock.close()


def _mqtt_str(data: bytes) -> bytes:
    return struct.pack("!H", len(data)) + data


# ---------------------------------------------------------------------------
# Starting, schema, preloading

def wait_ready(stack: str, services=SERVICES, timeout: float = READY_TIMEOUT) -> None:
    """Return once each service answers its own client; DatabaseError if not in time."""
    probes = {
        "mariadb": lambda: E.run(["mariadb-admin", "--no-defaults", "-S", sockets(stack)["mariadb"],
                                  "-u", "root", "ping"], timeout=10),
        "postgres": lambda: E.run([PG_BIN + "/pg_isready", "-h", sockets(stack)["postgres"],
                                   "-U", "postgres"], timeout=10),
        "influxdb": lambda: _expect(influx(stack, "GET", "/ping", timeout=5)[0] == 204),
        "mosquitto": lambda: Mqtt(sockets(stack)["mosquitto"], "probe", True).close(),
        "sqlite": lambda: _expect(os.path.exists(os.path.join(
            stack, "volumes", "sqlite", "home-assistant_v2.db"))),
    }
    deadline = time.monotonic() + timeout
    for service in services:
        while True:
            try:
                probes[service]()
                break
            except (OSError, E.EngineError, DatabaseError, http.client.HTTPException) as e:
                if time.monotonic() > deadline:
                    raise DatabaseError("%s is not ready after %d s: %s" % (service, timeout, e))
                time.sleep(0.2)


def _expect(condition: bool) -> None:
    if not condition:
        raise DatabaseError("not yet")


def create_schema(stack: str, preload: int = 0) -> None:
    """Each database's table (and, for the benchmark, `preload` rows in it)
    and the durable MQTT subscription whose queue holds the messages."""
    mariadb_sql(stack, "CREATE DATABASE iot; USE iot; CREATE TABLE readings "
                       "(n BIGINT PRIMARY KEY, at DOUBLE, pad VARCHAR(100), KEY (at));"
                + ("INSERT INTO readings SELECT -seq, 0, '%s' FROM seq_1_to_%d;" % (PAD, preload)
                   if preload else ""), timeout=3600)
    psql(stack, "CREATE DATABASE iot;")
    psql(stack, "CREATE TABLE readings (n BIGINT PRIMARY KEY, at DOUBLE PRECISION, pad TEXT);"
                "CREATE INDEX ON readings (at);"
                + ("INSERT INTO readings SELECT -g, 0, '%s' FROM generate_series(1, %d) g;"
                   % (PAD, preload) if preload else ""), database="iot", timeout=3600)
    influx_query(stack, "CREATE DATABASE iot")
    for start in range(0, preload, 5000):
        lines = "".join("readings n=%di,pad=\"%s\" %d\n" % (-i, PAD, 10**9 + i)
                        for i in range(start + 1, min(preload, start + 5000) + 1))
        _influx_write(stack, lines.encode())
    keeper = Mqtt(sockets(stack)["mosquitto"], "keeper", clean=False)
    keeper.subscribe("readings/#")
    keeper.close()


def _influx_write(stack: str, body: bytes) -> None:
    status, reply = influx(stack, "POST", "/write?db=iot&precision=ns", body)
    if status != 204:
        raise DatabaseError("influx write: HTTP %d %s" % (status, reply[:200]))


def preload_sqlite(stack: str, rows: int) -> None:
    """`rows` old readings in the SQLite database, before its application starts."""
    path = os.path.join(stack, "volumes", "sqlite", "home-assistant_v2.db")
    E.run(["/usr/bin/sqlite3", path],
          input="PRAGMA journal_mode=WAL;\nCREATE TABLE readings (n INTEGER PRIMARY KEY, "
                "at REAL, pad TEXT);\nWITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 "
                "FROM c WHERE x < %d) INSERT INTO readings SELECT -x, 0, '%s' FROM c;\n"
                % (rows, PAD), timeout=3600)
    os.chown(path, SQLITE_UID, SQLITE_UID)


# ---------------------------------------------------------------------------
# Writers

Ack = collections.namedtuple("Ack", "n time")


class Writer(threading.Thread):
    """Inserts numbered rows (1, 2, ...) at `rate` a second into one
    database from the host, and records each acknowledgement with its time;
    a row whose insert fails (the database is down) is lost, with every row
    due while that attempt failed, and the next tick reconnects."""

    service = ""

    def __init__(self, stack: str, rate: float, first: int = 1):
        super().__init__(name="writer-" + self.service, daemon=True)
        self.stack, self.rate, self.first = stack, rate, first
        self.acks: list = []
        self.lost: list = []   # times of the rows that could not be written
        self._halt = threading.Event()
        self.error = None

    def run(self):
        n, tick = self.first - 1, time.monotonic()
        try:
            while not self._halt.is_set():
                n += 1
                try:
                    self.insert(n)
                    self.acks.append(Ack(n, time.time()))
                except (OSError, ValueError, DatabaseError, http.client.HTTPException):
                    self.lost.append(time.time())
                    self.disconnect()
                    # The rows due while this attempt failed are lost too.
                    while tick + 2 / self.rate < time.monotonic():
                        tick += 1 / self.rate
                        n += 1
                        self.lost.append(time.time())
                tick += 1 / self.rate
                self._halt.wait(max(0.0, tick - time.monotonic()))
        except BaseException as e:  # noqa: B902 - reported by stop()
            self.error = e
        finally:
            self.disconnect()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)
        if self.error is not None:
            raise DatabaseError("the %s writer failed: %r" % (self.service, self.error))

    def insert(self, n: int) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        pass


class CliWriter(Writer):
    """Through one long-running command-line client fed statements on its
    stdin; a statement is acknowledged when the SELECT after it answers."""

    def argv(self) -> list:
        raise NotImplementedError

    proc = None

    def insert(self, n):
        if self.proc is None:
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, universal_newlines=True,
                                         bufsize=1)
        self.proc.stdin.write("INSERT INTO readings VALUES (%d, %f, '%s'); SELECT %d;\n"
                              % (n, time.time(), PAD, n))
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if line.strip() != str(n):
            raise DatabaseError("no acknowledgement of row %d: %r" % (n, line))

    def disconnect(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None


class MariadbWriter(CliWriter):
    service = "mariadb"

    def argv(self):
        return ["mariadb", "--no-defaults", "-S", sockets(self.stack)["mariadb"], "-u", "root",
                "--batch", "--skip-column-names", "--unbuffered", "--skip-reconnect", "iot"]


class PostgresWriter(CliWriter):
    service = "postgres"

    def argv(self):
        return [PG_BIN + "/psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
                "-h", sockets(self.stack)["postgres"], "-U", "postgres", "-d", "iot"]


class InfluxWriter(Writer):
    service = "influxdb"

    def insert(self, n):
        _influx_write(self.stack, b"readings n=%di,pad=\"%s\" %d\n" % (n, PAD.encode(), 2 * 10**9 + n))


class MosquittoWriter(Writer):
    service = "mosquitto"
    client = None

    def insert(self, n):
        if self.client is None:
            self.client = Mqtt(sockets(self.stack)["mosquitto"], "writer", clean=True, timeout=5)
        self.client.publish("readings/%d" % n, b"%d" % n, n % 65535 + 1)

    def disconnect(self):
        if self.client is not None:
            self.client.sock.close()
            self.client = None


WRITERS = (InfluxWriter, MariadbWriter, MosquittoWriter, PostgresWriter)


def start_writers(stack: str, rate: float, first: int = 1) -> list:
    """One running Writer per server, numbering its rows from `first`."""
    writers = [cls(stack, rate, first) for cls in WRITERS]
    for writer in writers:
        writer.start()
    return writers


def sqlite_acks(stack: str) -> list:
    """The SQLite application's acknowledgements, from its ./acks file."""
    acks = []
    try:
        with open(os.path.join(stack, "acks", "sqlite.log")) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    acks.append(Ack(int(parts[0]), float(parts[1])))
    except FileNotFoundError:
        pass
    return acks


def acknowledged(writers: list, stack: str) -> dict:
    """{service: [Ack]} of every writer, the SQLite application's included."""
    found = {w.service: list(w.acks) for w in writers}
    found["sqlite"] = sqlite_acks(stack)
    return found


# ---------------------------------------------------------------------------
# Checks of a restored stack

def crash_traces_before_start(stack: str) -> list:
    """What a database that did not shut down cleanly leaves in its files,
    read before the restored databases start: PostgreSQL's control file not
    "shut down", an SQLite write-ahead log or journal not merged back."""
    found = []
    state = E.run([PG_BIN + "/pg_controldata", os.path.join(stack, "volumes", "postgres")],
                  timeout=30).stdout
    line = next((l for l in state.splitlines() if l.startswith("Database cluster state")), "")
    if not line.endswith("shut down"):
        found.append("postgres: %s" % line.strip())
    sqlite_dir = os.path.join(stack, "volumes", "sqlite")
    for name in sorted(os.listdir(sqlite_dir)):
        path = os.path.join(sqlite_dir, name)
        if name.endswith(("-wal", "-journal")) and os.path.getsize(path):
            found.append("sqlite: %s of %d bytes left" % (name, os.path.getsize(path)))
    return found


# Log lines of a database that had to recover from a crash at its start.
CRASH_MARKERS = {
    "mariadb": ("crash recovery", "was not shut down normally", "Recovering after a crash",
                "recovery: ", "corrupt"),
    "postgres": ("not properly shut down", "automatic recovery in progress", "was interrupted",
                 "redo starts at"),
    "influxdb": ("corrupt", "panic", "lvl=eror"),
    "mosquitto": ("Error", "corrupt"),
    "sqlite": ("Traceback", "malformed"),
}


def crash_lines(service: str, log: str) -> list:
    return [line for line in log.splitlines()
            if any(marker in line for marker in CRASH_MARKERS[service])]


def integrity_checks(stack: str) -> dict:
    """{service: the database's own verdict}: raises DatabaseError on a failure."""
    verdicts = {}
    check = E.run(["mariadb-check", "--no-defaults", "-S", sockets(stack)["mariadb"], "-u", "root",
                   "--extended", "--all-databases"], check=False, timeout=600)
    bad = [l for l in check.stdout.splitlines() if l.strip() and not l.rstrip().endswith("OK")
           and "Table is already up to date" not in l]
    if check.returncode or bad:
        raise DatabaseError("mariadb-check --extended: %s%s" % (check.stdout, check.stderr))
    verdicts["mariadb"] = "mariadb-check --extended: OK"
    amcheck = E.run([PG_BIN + "/pg_amcheck", "-h", sockets(stack)["postgres"], "-U", "postgres",
                     "--all", "--heapallindexed", "--install-missing"], check=False, timeout=600)
    if amcheck.returncode:
        raise DatabaseError("pg_amcheck --heapallindexed: %s%s" % (amcheck.stdout, amcheck.stderr))
    verdicts["postgres"] = "pg_amcheck --heapallindexed: OK"
    db = os.path.join(stack, "volumes", "sqlite", "home-assistant_v2.db")
    sqlite = E.run(["/usr/bin/sqlite3", db, "PRAGMA integrity_check;"], check=False, timeout=600)
    if sqlite.stdout.strip() != "ok":
        raise DatabaseError("sqlite integrity_check: %s%s" % (sqlite.stdout, sqlite.stderr))
    verdicts["sqlite"] = "PRAGMA integrity_check: ok"
    return verdicts


def stored_numbers(stack: str, mqtt_messages: list) -> dict:
    """{service: set of row numbers the database holds}, by a full scan of each."""
    found = {
        "mariadb": mariadb_sql(stack, "SELECT n FROM readings WHERE n > 0;", "iot", timeout=600),
        "postgres": psql(stack, "SELECT n FROM readings WHERE n > 0;", "iot", timeout=600),
        "sqlite": E.run(["/usr/bin/sqlite3", os.path.join(stack, "volumes", "sqlite",
                                                          "home-assistant_v2.db"),
                         "SELECT n FROM readings WHERE n > 0;"], timeout=600).stdout,
    }
    numbers = {s: {int(x) for x in text.split()} for s, text in found.items()}
    result = influx_query(stack, "SELECT n FROM readings WHERE time >= 2000000000")
    series = result["results"][0].get("series") or [{"values": []}]
    numbers["influxdb"] = {row[1] for row in series[0]["values"]}
    numbers["mosquitto"] = {int(payload) for payload in mqtt_messages}
    return numbers


def missing_rows(acks: dict, deaths: dict, stored: dict) -> dict:
    """{service: numbers acknowledged before its container died that the
    restored database does not hold} (pure: acks {service: [Ack]}, deaths
    {service: seconds since the epoch}, stored {service: set})."""
    missing = {}
    for service, service_acks in acks.items():
        lost = sorted(a.n for a in service_acks
                      if a.time < deaths[service] and a.n not in stored[service])
        if lost:
            missing[service] = lost
    return missing


def restored_logs(project) -> dict:
    """{service: its container's log since it started} of a restored project."""
    logs = {}
    for service in SERVICES:
        name = project.container_name(service)
        out = project.engine.docker("logs", name, check=False, timeout=60)
        logs[service] = out.stdout + out.stderr
    return logs


def check_restored(stack: str, acks: dict, deaths: dict) -> dict:
    """Start the databases of a restored IOTstack folder and prove each
    consistent; returns {service: verdict}, raises DatabaseError naming
    every database that fails.  The project is left running (the caller
    removes it)."""
    prepare_runtime(stack)
    traces = crash_traces_before_start(stack)
    project = E.ComposeProject(stack)
    project.up()
    wait_ready(stack)
    verdicts = integrity_checks(stack)
    keeper = Mqtt(sockets(stack)["mosquitto"], "keeper", clean=False)
    try:
        messages = keeper.drain()
    finally:
        keeper.close()
    stored = stored_numbers(stack, messages)
    verdicts["influxdb"] = "full scan: %d readings" % len(stored["influxdb"])
    verdicts["mosquitto"] = "durable session: %d queued messages" % len(stored["mosquitto"])
    problems = ["crash traces before the start: %s" % trace for trace in traces]
    for service, lines in sorted(restored_logs(project).items()):
        problems += ["%s needed recovery: %s" % (service, line)
                     for line in crash_lines(service, lines)]
    for service, lost in sorted(missing_rows(acks, deaths, stored).items()):
        problems.append("%s lost %d acknowledged rows: %s" % (service, len(lost), lost[:10]))
    if problems:
        raise DatabaseError("\n".join(problems))
    return verdicts
