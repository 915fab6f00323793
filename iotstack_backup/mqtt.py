"""Report a backup run to an MQTT broker: a tiny MQTT 3.1.1 publisher.

A backup run ends by publishing one retained JSON message (`status_message`)
so that Home Assistant, Node-RED or anything else subscribed to the topic
knows how the last run went.  The protocol is spoken over a plain socket
with the standard library only; the bytes are built and parsed by small pure
functions that are table-tested against the 3.1.1 specification.  Reporting
must never hurt the backup: `publish` is only called once the archive is
finished, touches no file, never prints, is bounded in total by its
`timeout` (DNS, connect, every send and every wait together), and turns
every failure into one `MqttError` with a one-line message that the caller
logs as a warning.  The password never appears in a repr, str or message.

Home Assistant discovery is offered, as the pure `discovery_messages`: most
IOTstack stacks run Home Assistant and Mosquitto side by side, and without
discovery every user has to write the same YAML sensor by hand.  It costs
no I/O here and nothing for those who do not want it: the caller decides
whether to publish the (retained) config messages, and publishing an empty
retained payload to the same topics removes the sensors again.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import re
import secrets
import socket
import struct
import threading
import time
import urllib.parse

# typing is only read by the type checker (as in children.py): the
# annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, List, Optional, Sequence, Tuple, TypedDict, Union

    # One address of getaddrinfo's answer: (family, type, proto, canonname, sockaddr).
    AddressInfo = Tuple[socket.AddressFamily, socket.SocketKind, int, str,
                        Union[Tuple[str, int], Tuple[str, int, int, int], Tuple[int, bytes]]]

    class Resolved(TypedDict, total=False):
        """What the lookup thread leaves: the addresses, or its error."""
        addresses: List[AddressInfo]
        error: Exception

DEFAULT_PORT = 1883
KEEPALIVE_SECONDS = 60  # the whole session lasts `timeout`; any value works
PACKET_ID = 1  # one PUBLISH per session, so its id never needs to change

# Control packet types (MQTT 3.1.1, 2.2.1), high nibble of the first byte.
CONNECT, CONNACK, PUBLISH, PUBACK, DISCONNECT = 1, 2, 3, 4, 14
PACKET_NAMES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC",
    6: "PUBREL", 7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE",
    11: "UNSUBACK", 12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT",
}
# CONNACK return codes 1-5 (3.2.2.3); 0 is "accepted".  Mosquitto (2.0)
# answers a wrong password, or none, with 5 rather than 4, so 5 names that
# likely cause too.
CONNACK_REFUSALS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized (bad user name or password, or this user may not connect)",
}
MAX_REMAINING_LENGTH = 268435455  # four bytes of 7 bits (2.2.3)
MAX_STRING_BYTES = 65535  # UTF-8 strings carry a two-byte length (1.5.3)
# The broker only ever sends us 4-byte CONNACK and PUBACK packets; a reply
# claiming more than this is not a broker talking to us, and is not buffered.
MAX_REPLY_BYTES = 65536

STATUSES = ("ok", "warning", "failed")
DISCOVERY_PREFIX = "homeassistant"


class MqttError(Exception):
    """Publishing failed; the message is one line, fit for a log."""

    def __init__(self, message: object) -> None:
        # Error texts from the OS or a broker may hold newlines; a log line
        # must stay one line.
        super().__init__(" ".join(str(message).split()))


# ---------------------------------------------------------------------------
# Where to publish


@dataclasses.dataclass(frozen=True)
class MqttTarget:
    """Broker and topic from an mqtt:// URL.  repr and str hide the password,
    since targets end up in logs (dataclasses.asdict does not: do not log it)."""
    host: str
    port: int
    topic: str
    username: "str | None" = None
    password: "str | None" = None

    @property
    def where(self) -> str:
        """host:port, for messages."""
        host = "[%s]" % self.host if ":" in self.host else self.host
        return "%s:%d" % (host, self.port)

    def __str__(self) -> str:
        user = ""
        if self.username is not None:
            user = urllib.parse.quote(self.username, safe="")
            user += ":***@" if self.password is not None else "@"
        return "mqtt://%s%s/%s" % (user, self.where, urllib.parse.quote(self.topic, safe="/"))

    def __repr__(self) -> str:
        return "MqttTarget(%r)" % str(self)


def check_topic(topic: str) -> None:
    """Raise ValueError unless `topic` is a topic one may publish to (4.7)."""
    if not topic:
        raise ValueError("MQTT topic is empty")
    for wildcard in "+#":
        if wildcard in topic:
            raise ValueError("MQTT topic %r contains the wildcard %r: a message is published "
                             "to one exact topic" % (topic, wildcard))
    if "\x00" in topic:
        raise ValueError("MQTT topic %r contains a NUL character" % topic)
    if topic.startswith("$"):
        # Brokers silently drop client messages to $SYS and the like.
        raise ValueError("MQTT topic %r starts with '$', which is reserved for the broker" % topic)
    if len(topic.encode("utf-8")) > MAX_STRING_BYTES:
        raise ValueError("MQTT topic is longer than %d bytes" % MAX_STRING_BYTES)


def _percent_decoded(text: str, what: str) -> str:
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("MQTT URL: the %s is not UTF-8 after %%-decoding" % what) from None


def _host_and_port(hostport: str) -> Tuple[str, Optional[str]]:
    """Split HOST[:PORT] or [IPV6][:PORT]; the port is None when not given."""
    if hostport.startswith("["):
        host, bracket, rest = hostport[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError("MQTT URL: bad bracketed host %r" % hostport)
        return host, (rest[1:] if rest else None)
    if hostport.count(":") > 1:
        raise ValueError("MQTT URL: an IPv6 address must be in brackets, like [::1]")
    host, colon, port = hostport.partition(":")
    return host, (port if colon else None)


def _port_number(text: Optional[str]) -> int:
    if text is None:
        return DEFAULT_PORT
    # isdigit() alone would accept "²" and the like; int() would accept " 1".
    if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
        raise ValueError("MQTT URL: bad port %r, expected a number from 1 to 65535" % text)
    return int(text)


def parse_mqtt_url(text: str) -> MqttTarget:
    """MqttTarget from mqtt://[USER[:PASS]@]HOST[:PORT]/TOPIC.

    The topic is everything after the first "/" after the host and may hold
    more "/"; user, password and topic are %-decoded (write "@" as %40, "/"
    as %2F, "%" as %25).  Parsed by hand rather than by urlsplit, because
    "#" and "?" would otherwise vanish into a fragment or query instead of
    being reported (#) or kept as part of the topic (?).
    """
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "mqtt":
        raise ValueError("MQTT URL must start with mqtt:// (got %r)" % text.split("/", 1)[0])
    netloc, slash, raw_topic = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    username = password = None
    if at:
        raw_user, colon, raw_password = userinfo.partition(":")
        if not raw_user:
            raise ValueError("MQTT URL has '@' but no user name before it")
        username = _percent_decoded(raw_user, "user name")
        if colon:
            password = _percent_decoded(raw_password, "password")
    host, port_text = _host_and_port(hostport)
    if not host:
        raise ValueError("MQTT URL has no host: expected mqtt://HOST/TOPIC")
    if any(ch.isspace() for ch in host):
        raise ValueError("MQTT URL: the host %r contains white space" % host)
    from .settings import host_problem  # here: settings imports this module
    problem = host_problem(host, hostport.startswith("["))
    if problem:
        raise ValueError("MQTT URL %s" % problem)
    port = _port_number(port_text)
    if not slash or not raw_topic:
        raise ValueError("MQTT URL has no topic: expected mqtt://HOST[:PORT]/TOPIC")
    topic = _percent_decoded(raw_topic, "topic")
    check_topic(topic)
    return MqttTarget(host=host, port=port, topic=topic, username=username, password=password)


# ---------------------------------------------------------------------------
# Packets (pure)


def encode_remaining_length(length: int) -> bytes:
    """The "Remaining Length" varint: 7 bits a byte, low bits first (2.2.3)."""
    if not 0 <= length <= MAX_REMAINING_LENGTH:
        raise ValueError("MQTT packet too large: %d bytes" % length)
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def decode_remaining_length(data: bytes, start: int = 1) -> Optional[Tuple[int, int]]:
    """(length, index after it) from `data` at `start`; None when more bytes
    are needed.  ValueError when the varint runs past its four bytes."""
    length = 0
    for position in range(4):
        if start + position >= len(data):
            return None
        byte = data[start + position]
        length += (byte & 0x7F) << (7 * position)
        if not byte & 0x80:
            return length, start + position + 1
    raise ValueError("malformed remaining length (more than 4 bytes)")


def split_packet(buffer: bytes, limit: int = MAX_REPLY_BYTES,
                 ) -> Optional[Tuple[bytes, bytes]]:
    """(first whole packet, the bytes after it) from a receive buffer, or
    None while it is incomplete.  ValueError for a malformed length or a
    packet larger than `limit`."""
    decoded = decode_remaining_length(buffer)
    if decoded is None:
        return None
    length, body_start = decoded
    if body_start + length > limit:
        raise ValueError("a %d-byte packet, far more than a broker's reply" % (body_start + length))
    end = body_start + length
    if len(buffer) < end:
        return None
    return bytes(buffer[:end]), bytes(buffer[end:])


def _length_prefixed(data: bytes) -> bytes:
    if len(data) > MAX_STRING_BYTES:
        raise ValueError("MQTT field longer than %d bytes" % MAX_STRING_BYTES)
    return struct.pack("!H", len(data)) + data


def _utf8(text: Union[str, bytes]) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes([first_byte]) + encode_remaining_length(len(body)) + body


def connect_packet(client_id: str, username: Optional[str] = None,
                   password: Optional[str] = None, keepalive: int = KEEPALIVE_SECONDS) -> bytes:
    """CONNECT with a clean session and no will (3.1)."""
    if password is not None and username is None:
        # 3.1.2.9: the password flag needs the user name flag.
        raise ValueError("an MQTT password needs a user name")
    if not 0 <= keepalive <= 0xFFFF:
        raise ValueError("MQTT keepalive must be 0-65535 seconds")
    flags = 0x02  # clean session: the broker keeps no state for us
    payload = _length_prefixed(_utf8(client_id))
    if username is not None:
        flags |= 0x80
        payload += _length_prefixed(_utf8(username))
    if password is not None:
        flags |= 0x40
        payload += _length_prefixed(_utf8(password))
    variable_header = _length_prefixed(b"MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
    return _packet(CONNECT << 4, variable_header + payload)


def publish_packet(topic: str, payload: bytes, qos: int = 1, retain: bool = True,
                   packet_id: Optional[int] = None) -> bytes:
    """PUBLISH (3.3); `packet_id` (1-65535) only with QoS 1."""
    check_topic(topic)
    if qos not in (0, 1):
        raise ValueError("only MQTT QoS 0 and 1 are supported, not %r" % (qos,))
    variable_header = _length_prefixed(topic.encode("utf-8"))
    if qos:
        if not isinstance(packet_id, int) or not 1 <= packet_id <= 0xFFFF:
            raise ValueError("a QoS 1 PUBLISH needs a packet id from 1 to 65535")
        variable_header += struct.pack("!H", packet_id)
    elif packet_id is not None:
        raise ValueError("a QoS 0 PUBLISH has no packet id")
    first_byte = PUBLISH << 4 | qos << 1 | (1 if retain else 0)
    return _packet(first_byte, variable_header + bytes(payload))


def disconnect_packet() -> bytes:
    """DISCONNECT (3.14): tells the broker the session ended on purpose."""
    return _packet(DISCONNECT << 4, b"")


def _packet_name(first_byte: int) -> str:
    return PACKET_NAMES.get(first_byte >> 4, "packet type %d" % (first_byte >> 4))


def _two_byte_reply(packet: bytes, kind: int) -> Tuple[int, int]:
    """The two body bytes of a CONNACK or PUBACK, after checking its header."""
    if not packet:
        raise ValueError("empty packet, expected %s" % PACKET_NAMES[kind])
    if packet[0] >> 4 != kind:
        raise ValueError("expected %s, got %s" % (PACKET_NAMES[kind], _packet_name(packet[0])))
    if packet[0] != kind << 4 or len(packet) != 4 or packet[1] != 2:
        raise ValueError("malformed %s %s" % (PACKET_NAMES[kind], packet.hex()))
    return packet[2], packet[3]


def parse_connack(packet: bytes) -> Tuple[bool, int]:
    """(session present, return code) from a whole CONNACK packet (3.2)."""
    ack_flags, return_code = _two_byte_reply(packet, CONNACK)
    if ack_flags & 0xFE:
        raise ValueError("malformed CONNACK %s" % packet.hex())
    return bool(ack_flags), return_code


def parse_puback(packet: bytes) -> int:
    """The packet id from a whole PUBACK packet (3.4)."""
    high, low = _two_byte_reply(packet, PUBACK)
    return high << 8 | low


def connack_refusal(return_code: int) -> str:
    """Why a broker refused a connection, from CONNACK's return code."""
    return CONNACK_REFUSALS.get(return_code, "unknown CONNACK return code %d" % return_code)


def default_client_id() -> str:
    """A fresh client id: a broker disconnects an older session with the same
    id, so two stacks backing up at once must not share one.  22 letters and
    digits, which every broker must accept (3.1.3.1 guarantees up to 23)."""
    return "iotstackbackup" + secrets.token_hex(4)


# ---------------------------------------------------------------------------
# Messages (pure)


def _local_iso(moment: Optional[datetime.datetime]) -> str:
    """ISO 8601 in local time with its UTC offset, to the second.  A naive
    datetime is taken as local time."""
    if moment is None:
        moment = datetime.datetime.now()
    return moment.astimezone().isoformat(timespec="seconds")


def _seconds_or_none(value: Optional[float]) -> Optional[float]:
    return None if value is None else round(float(value), 1)


def status_message(status: str, host: str, *, archive: Optional[str] = None,
                   size_bytes: Optional[int] = None, duration_seconds: Optional[float] = None,
                   downtime_seconds: Optional[float] = None, warnings: Iterable[object] = (),
                   error: Optional[object] = None,
                   finished: Optional[datetime.datetime] = None) -> bytes:
    """The JSON report of one backup run, as UTF-8 bytes.

    Every key is always present (null when unknown, e.g. no archive after a
    failure), so a template reading `value_json.size_bytes` never breaks; keys
    are sorted so the bytes are stable.  `finished` (a datetime, default now)
    is written as local time with its offset.
    """
    if status not in STATUSES:
        raise ValueError("status must be one of %s, not %r" % (", ".join(STATUSES), status))
    report = {
        "archive": archive,
        "downtime_seconds": _seconds_or_none(downtime_seconds),
        "duration_seconds": _seconds_or_none(duration_seconds),
        "error": None if error is None else str(error),
        "finished": _local_iso(finished),
        "host": host,
        "size_bytes": None if size_bytes is None else int(size_bytes),
        "status": status,
        "warnings": [str(warning) for warning in warnings],
    }
    return json.dumps(report, sort_keys=True, ensure_ascii=False).encode("utf-8")


def _discovery_id(text: str) -> str:
    """Home Assistant accepts only [a-zA-Z0-9_-] in discovery topic ids."""
    return re.sub(r"[^a-z0-9_-]+", "_", text.lower()).strip("_") or "host"


# (object id, entity name, extra config) of each sensor read from the report.
DISCOVERY_SENSORS = (
    ("status", "Status", {"value_template": "{{ value_json.status }}",
                          "icon": "mdi:backup-restore"}),
    ("finished", "Last run", {"value_template": "{{ value_json.finished }}",
                              "device_class": "timestamp"}),
    ("size", "Archive size", {"value_template": "{{ value_json.size_bytes }}",
                              "device_class": "data_size", "unit_of_measurement": "B",
                              "state_class": "measurement"}),
)


def discovery_messages(target: MqttTarget, host: str, prefix: str = DISCOVERY_PREFIX,
                       ) -> List[Tuple[str, bytes]]:
    """[(topic, payload bytes)] of Home Assistant MQTT discovery configs for
    the reports published to `target`: one device per backed-up host with a
    status sensor (the whole report as its attributes), the time of the last
    run and the archive size.  Publish them retained; an empty retained
    payload to the same topics removes the sensors."""
    node = "iotstack_backup_" + _discovery_id(host)
    device = {"identifiers": [node], "name": "IOTstack backup %s" % host,
              "model": "iotstack-backup"}
    messages = []
    for object_id, name, extra in DISCOVERY_SENSORS:
        config = {"name": name, "unique_id": "%s_%s" % (node, object_id),
                  "state_topic": target.topic, "device": device}
        if object_id == "status":
            config["json_attributes_topic"] = target.topic
        config.update(extra)
        topic = "%s/sensor/%s/%s/config" % (prefix, node, object_id)
        payload = json.dumps(config, sort_keys=True, ensure_ascii=False).encode("utf-8")
        messages.append((topic, payload))
    return messages


# ---------------------------------------------------------------------------
# Publishing (I/O)


class _Deadline:
    """One clock for the whole session, so a broker that answers slowly, or
    a byte at a time, cannot stretch it past `timeout`."""

    def __init__(self, timeout: float, where: str) -> None:
        self.timeout, self.where = timeout, where
        self.end = time.monotonic() + timeout

    def left(self, doing: str) -> float:
        """Seconds left, or MqttError when none are."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise self.expired(doing)
        return left

    def expired(self, doing: str) -> MqttError:
        return MqttError("MQTT broker %s: timed out after %g s %s"
                         % (self.where, self.timeout, doing))


def _resolve(target: MqttTarget, deadline: _Deadline) -> List[AddressInfo]:
    """getaddrinfo ignores socket timeouts and can hang for long (an unset
    DNS server, a .local name without mDNS), so it runs in a daemon thread
    that is abandoned if it outlives the deadline."""
    outcome: Resolved = {}

    def lookup() -> None:
        try:
            outcome["addresses"] = socket.getaddrinfo(target.host, target.port,
                                                      type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as e:
            outcome["error"] = e

    thread = threading.Thread(target=lookup, name="mqtt-resolve", daemon=True)
    thread.start()
    thread.join(deadline.left("resolving %s" % target.host))
    if thread.is_alive():
        raise deadline.expired("resolving %s" % target.host)
    if "error" in outcome:
        raise MqttError("MQTT broker %s: cannot resolve %s: %s"
                        % (deadline.where, target.host, _reason(outcome["error"])))
    return outcome["addresses"]


def _reason(error: BaseException) -> str:
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    strerror: Optional[str] = getattr(error, "strerror", None)
    return strerror or str(error) or type(error).__name__


class _Session:
    """A connected socket whose every operation is bounded by the deadline."""

    def __init__(self, target: MqttTarget, deadline: _Deadline) -> None:
        self.deadline, self.where = deadline, deadline.where
        self.buffer = b""
        self.sock = self._connect(_resolve(target, deadline))

    def _connect(self, addresses: Sequence[AddressInfo]) -> socket.socket:
        last_error: Optional[OSError] = None
        for family, kind, proto, _name, address in addresses:
            try:
                # EAFNOSUPPORT: a Pi booted with IPv6 off still resolves
                # localhost to ::1 first; try the next address.
                sock = socket.socket(family, kind, proto)
            except OSError as e:
                last_error = e
                continue
            try:
                sock.settimeout(self.deadline.left("connecting"))
                sock.connect(address)
                return sock
            except socket.timeout:
                sock.close()
                raise self.deadline.expired("connecting") from None
            except OSError as e:
                sock.close()
                last_error = e
        if last_error is None:
            raise MqttError("MQTT broker %s: no address to connect to" % self.where)
        raise MqttError("MQTT broker %s: %s" % (self.where, _reason(last_error)))

    def send(self, data: bytes, doing: str) -> None:
        try:
            self.sock.settimeout(self.deadline.left(doing))
            # Since 3.5 the timeout bounds the whole sendall, not each chunk.
            self.sock.sendall(data)
        except socket.timeout:
            raise self.deadline.expired(doing) from None
        except OSError as e:
            raise MqttError("MQTT broker %s: connection lost %s: %s"
                            % (self.where, doing, _reason(e))) from None

    def receive(self, kind: int) -> bytes:
        """The next whole packet from the broker, which must be of `kind`."""
        doing = "waiting for %s" % PACKET_NAMES[kind]
        while True:
            try:
                # The first byte tells the packet type: a server that is not
                # an MQTT broker (say HTTP on port 1883) fails here at once
                # instead of when the deadline runs out.
                if self.buffer and self.buffer[0] >> 4 != kind:
                    raise ValueError("expected %s, got first byte 0x%02x"
                                     % (PACKET_NAMES[kind], self.buffer[0]))
                split = split_packet(self.buffer)
            except ValueError as e:
                raise self.garbage(e) from None
            if split is not None:
                packet, self.buffer = split
                return packet
            try:
                self.sock.settimeout(self.deadline.left(doing))
                chunk = self.sock.recv(4096)
            except socket.timeout:
                raise self.deadline.expired(doing) from None
            except OSError as e:
                raise MqttError("MQTT broker %s: connection lost %s: %s"
                                % (self.where, doing, _reason(e))) from None
            if not chunk:
                raise MqttError("MQTT broker %s closed the connection while %s"
                                % (self.where, doing))
            self.buffer += chunk

    def garbage(self, error: object) -> MqttError:
        return MqttError("MQTT broker %s: unexpected reply (%s); is it an MQTT broker?"
                         % (self.where, error))

    def say_goodbye(self) -> None:
        """DISCONNECT, best effort: the message is already delivered, so a
        failure here (or no time left) is not a failure of the publish."""
        left = self.deadline.end - time.monotonic()
        if left > 0:
            try:
                self.sock.settimeout(left)
                self.sock.sendall(disconnect_packet())
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def publish(target: MqttTarget, payload: bytes, retain: bool = True, qos: int = 1,
            timeout: float = 5.0, client_id: Optional[str] = None) -> None:
    """Publish `payload` (bytes) to `target` and return once the broker has
    it: with QoS 1, when its PUBACK arrived.  Everything together takes at
    most `timeout` seconds.  Raises MqttError on any failure, ValueError for
    bad arguments (before any connection is made)."""
    if not timeout > 0:
        raise ValueError("timeout must be more than 0 seconds")
    # Every packet is built before connecting, so a bad argument never
    # leaves a half-done session behind.
    hello = connect_packet(client_id or default_client_id(), target.username, target.password)
    message = publish_packet(target.topic, payload, qos, retain, PACKET_ID if qos else None)
    session = _Session(target, _Deadline(timeout, target.where))
    try:
        session.send(hello, "sending CONNECT")
        try:
            _present, return_code = parse_connack(session.receive(CONNACK))
        except ValueError as e:
            raise session.garbage(e) from None
        if return_code:
            raise MqttError("MQTT broker %s refused the connection: %s"
                            % (target.where, connack_refusal(return_code)))
        session.send(message, "sending PUBLISH")
        if qos:
            try:
                acked = parse_puback(session.receive(PUBACK))
            except ValueError as e:
                raise session.garbage(e) from None
            if acked != PACKET_ID:
                raise session.garbage("PUBACK for packet id %d, expected %d" % (acked, PACKET_ID))
        session.say_goodbye()
    finally:
        session.close()
