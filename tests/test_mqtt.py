"""iotstack_backup.mqtt: packet bytes against the MQTT 3.1.1 specification,
then publishing to a real mosquitto broker started here, and to fake servers
that refuse, stay silent, trickle or answer garbage, to prove that every
failure is one MqttError and that the whole call keeps to its deadline.

The broker listens on 127.0.0.1 only, with a password file; what arrived is
checked with mosquitto_sub.  Without mosquitto installed those tests skip.
"""
import contextlib
import datetime
import io
import json
import shutil
import socket
import tempfile
import threading
import time
import unittest

from iotstack_backup import mqtt
from iotstack_backup.mqtt import MqttError, MqttTarget
from tests.mosquitto_broker import (
    MISSING,
    PASSWORD,
    PASSWORD_IN_URL,
    USER,
    Mosquitto,
    free_port,
    silent_listener,
)


def h(text):
    """Bytes from spaced hex, as written in the specification's tables."""
    return bytes.fromhex(text)


# ---------------------------------------------------------------------------
# Pure parts


class ParseUrlTest(unittest.TestCase):
    def test_valid_urls(self):
        cases = [
            ("mqtt://broker/iotstack/backup",
             MqttTarget("broker", 1883, "iotstack/backup")),
            ("mqtt://broker:1884/t",
             MqttTarget("broker", 1884, "t")),
            ("MQTT://broker/t",
             MqttTarget("broker", 1883, "t")),
            ("mqtt://me@broker/a/b/c",
             MqttTarget("broker", 1883, "a/b/c", "me")),
            ("mqtt://me:secret@10.0.0.2:1883/a/b",
             MqttTarget("10.0.0.2", 1883, "a/b", "me", "secret")),
            ("mqtt://me:@broker/t",  # an empty password is a password
             MqttTarget("broker", 1883, "t", "me", "")),
            ("mqtt://%40me:" + PASSWORD_IN_URL + "@broker/t",
             MqttTarget("broker", 1883, "t", "@me", PASSWORD)),
            ("mqtt://u:a@b@broker/t",  # the last @ ends the user part
             MqttTarget("broker", 1883, "t", "u", "a@b")),
            ("mqtt://[::1]:1885/t",
             MqttTarget("::1", 1885, "t")),
            ("mqtt://[fe80::1]/t",
             MqttTarget("fe80::1", 1883, "t")),
            ("mqtt://broker/home/pi4%20backup/status?",  # ? is part of the topic
             MqttTarget("broker", 1883, "home/pi4 backup/status?")),
            ("mqtt://broker//leading",
             MqttTarget("broker", 1883, "/leading")),
            ("mqtt://broker/caf%C3%A9",
             MqttTarget("broker", 1883, "caf\u00e9")),
            ("mqtt://broker:65535/t",
             MqttTarget("broker", 65535, "t")),
        ]
        for text, expected in cases:
            with self.subTest(text=text):
                self.assertEqual(mqtt.parse_mqtt_url(text), expected)

    def test_invalid_urls_name_the_problem(self):
        cases = [
            ("http://broker/t", "mqtt://"),
            ("mqtts://broker/t", "mqtt://"),
            ("broker/t", "mqtt://"),
            ("mqtt:/broker/t", "mqtt://"),
            ("mqtt:///t", "no host"),
            ("mqtt://me:pw@/t", "no host"),
            ("mqtt://:1883/t", "no host"),
            ("mqtt://broker", "no topic"),
            ("mqtt://broker/", "no topic"),
            ("mqtt://broker:1883", "no topic"),
            ("mqtt://broker/a/+/c", "wildcard '+'"),
            ("mqtt://broker/a/#", "wildcard '#'"),
            ("mqtt://broker/a/%23", "wildcard '#'"),
            ("mqtt://broker/%24SYS/x", "reserved"),
            ("mqtt://broker/a%00b", "NUL"),
            ("mqtt://broker:0/t", "bad port"),
            ("mqtt://broker:65536/t", "bad port"),
            ("mqtt://broker:x/t", "bad port"),
            ("mqtt://broker:/t", "bad port"),
            ("mqtt://broker:-1/t", "bad port"),
            ("mqtt://broker: 1/t", "bad port"),
            ("mqtt://::1/t", "brackets"),
            ("mqtt://[::1/t", "bracketed"),
            ("mqtt://[::1]x/t", "bracketed"),
            ("mqtt://@broker/t", "no user name"),
            ("mqtt://:pw@broker/t", "no user name"),
            ("mqtt://bro ker/t", "white space"),
            ("mqtt://broker/%ff", "topic is not UTF-8"),
            ("mqtt://u:%ff@broker/t", "password is not UTF-8"),
        ]
        for text, fragment in cases:
            with self.subTest(text=text):
                with self.assertRaises(ValueError) as caught:
                    mqtt.parse_mqtt_url(text)
                message = str(caught.exception)
                self.assertIn(fragment, message)
                self.assertNotIn("\n", message)

    def test_repr_and_str_hide_the_password(self):
        target = mqtt.parse_mqtt_url("mqtt://me:hunter2@broker:1884/a/b c")
        for shown in (repr(target), str(target), "%s" % target, "%r" % target,
                      str([target]), "{}".format(target)):
            with self.subTest(shown=shown):
                self.assertNotIn("hunter2", shown)
                self.assertIn("broker:1884", shown)
                self.assertIn("me:***@", shown)
        self.assertEqual(str(target), "mqtt://me:***@broker:1884/a/b%20c")
        self.assertEqual(str(MqttTarget("::1", 1883, "t")), "mqtt://[::1]:1883/t")
        self.assertEqual(str(MqttTarget("b", 1883, "t", "me")), "mqtt://me@b:1883/t")

    def test_str_parses_back_to_the_same_target_without_password(self):
        for text in ["mqtt://broker/a/b", "mqtt://%40me@[::1]:99/x%25y/%3F"]:
            target = mqtt.parse_mqtt_url(text)
            self.assertEqual(mqtt.parse_mqtt_url(str(target)), target)

    def test_target_is_frozen(self):
        target = MqttTarget("broker", 1883, "t")
        with self.assertRaises(AttributeError):
            target.host = "other"


class PacketTest(unittest.TestCase):
    def test_remaining_length_table(self):
        # MQTT 3.1.1, table 2.4 and the boundaries around it.
        cases = [
            (0, "00"), (1, "01"), (127, "7f"), (128, "80 01"), (321, "c1 02"),
            (16383, "ff 7f"), (16384, "80 80 01"), (2097151, "ff ff 7f"),
            (2097152, "80 80 80 01"), (268435455, "ff ff ff 7f"),
        ]
        for length, encoded in cases:
            with self.subTest(length=length):
                self.assertEqual(mqtt.encode_remaining_length(length), h(encoded))
                data = b"\x30" + h(encoded)
                self.assertEqual(mqtt.decode_remaining_length(data), (length, len(data)))

    def test_remaining_length_out_of_range(self):
        for length in (-1, 268435456):
            with self.subTest(length=length), self.assertRaises(ValueError):
                mqtt.encode_remaining_length(length)

    def test_decode_remaining_length_incomplete_and_malformed(self):
        self.assertIsNone(mqtt.decode_remaining_length(b"\x30"))
        self.assertIsNone(mqtt.decode_remaining_length(h("30 80")))
        self.assertIsNone(mqtt.decode_remaining_length(h("30 ff ff ff")))
        with self.assertRaises(ValueError):
            mqtt.decode_remaining_length(h("30 ff ff ff ff 01"))

    def test_connect_packet_table(self):
        header = "00 04 4d 51 54 54 04"  # protocol name "MQTT", level 4
        cases = [
            # client id "abc", no credentials, keepalive 60: clean session only.
            (("abc", None, None, 60),
             "10 0f" + header + "02 00 3c 00 03 61 62 63"),
            # user "u" and password "pw", keepalive 10: flags 0x80|0x40|0x02.
            (("abc", "u", "pw", 10),
             "10 16" + header + "c2 00 0a 00 03 61 62 63 00 01 75 00 02 70 77"),
            # user name alone: 0x80|0x02.
            (("abc", "u", None, 60),
             "10 12" + header + "82 00 3c 00 03 61 62 63 00 01 75"),
            # an empty password is still sent, with its flag.
            (("abc", "u", "", 60),
             "10 14" + header + "c2 00 3c 00 03 61 62 63 00 01 75 00 00"),
            # password as bytes, keepalive 0 (off).
            (("", "u", b"\x00\xff", 0),
             "10 13" + header + "c2 00 00 00 00 00 01 75 00 02 00 ff"),
            # UTF-8: "é" is two bytes.
            (("c", "\u00e9", None, 300),
             "10 11" + header + "82 01 2c 00 01 63 00 02 c3 a9"),
        ]
        for args, expected in cases:
            with self.subTest(args=args):
                self.assertEqual(mqtt.connect_packet(*args), h(expected))

    def test_connect_packet_rejects(self):
        with self.assertRaises(ValueError):
            mqtt.connect_packet("abc", None, "pw", 60)  # 3.1.2.9
        with self.assertRaises(ValueError):
            mqtt.connect_packet("abc", None, None, 65536)
        with self.assertRaises(ValueError):
            mqtt.connect_packet("abc", "u" * 65536, None, 60)

    def test_publish_packet_table(self):
        cases = [
            (("a/b", b"hi", 1, True, 1), "33 09 00 03 61 2f 62 00 01 68 69"),
            (("a/b", b"hi", 1, False, 0x1234), "32 09 00 03 61 2f 62 12 34 68 69"),
            (("a/b", b"hi", 0, False, None), "30 07 00 03 61 2f 62 68 69"),
            (("a/b", b"hi", 0, True, None), "31 07 00 03 61 2f 62 68 69"),
            (("a/b", b"", 1, True, 65535), "33 07 00 03 61 2f 62 ff ff"),
            (("t", b"x" * 200, 1, True, 1), "33 cd 01 00 01 74 00 01" + "78" * 200),
            (("\u00e9", b"", 0, False, None), "30 04 00 02 c3 a9"),
        ]
        for args, expected in cases:
            with self.subTest(args=args[:2] if len(args[1]) < 10 else args[0]):
                self.assertEqual(mqtt.publish_packet(*args), h(expected))

    def test_publish_packet_rejects(self):
        cases = [
            ("a/#", b"", 1, True, 1),  # wildcard
            ("a/+/b", b"", 1, True, 1),
            ("", b"", 1, True, 1),  # empty topic
            ("t", b"", 2, True, 1),  # QoS 2 is not supported
            ("t", b"", 1, True, 0),  # packet id 0 is not allowed
            ("t", b"", 1, True, 65536),
            ("t", b"", 1, True, None),
            ("t", b"", 0, True, 1),  # QoS 0 has no packet id
        ]
        for args in cases:
            with self.subTest(args=args), self.assertRaises(ValueError):
                mqtt.publish_packet(*args)

    def test_disconnect_packet(self):
        self.assertEqual(mqtt.disconnect_packet(), h("e0 00"))

    def test_parse_connack_table(self):
        cases = [
            ("20 02 00 00", (False, 0)),
            ("20 02 01 00", (True, 0)),
            ("20 02 00 04", (False, 4)),
            ("20 02 00 05", (False, 5)),
        ]
        for packet, expected in cases:
            with self.subTest(packet=packet):
                self.assertEqual(mqtt.parse_connack(h(packet)), expected)

    def test_parse_connack_rejects(self):
        cases = [
            ("", "empty"),
            ("40 02 00 01", "expected CONNACK, got PUBACK"),
            ("48 54 54 50", "expected CONNACK, got PUBACK"),  # "HTTP"
            ("21 02 00 00", "malformed"),  # reserved flags set
            ("20 03 00 00 00", "malformed"),
            ("20 02 00", "malformed"),
            ("20 02 02 00", "malformed"),  # reserved acknowledge flag
        ]
        for packet, fragment in cases:
            with self.subTest(packet=packet):
                with self.assertRaises(ValueError) as caught:
                    mqtt.parse_connack(h(packet))
                self.assertIn(fragment, str(caught.exception))

    def test_parse_puback_table(self):
        self.assertEqual(mqtt.parse_puback(h("40 02 00 01")), 1)
        self.assertEqual(mqtt.parse_puback(h("40 02 12 34")), 0x1234)
        for packet in ("20 02 00 00", "40 03 00 01 00", "42 02 00 01", "40 02 00"):
            with self.subTest(packet=packet), self.assertRaises(ValueError):
                mqtt.parse_puback(h(packet))

    def test_connack_refusals(self):
        self.assertEqual(mqtt.connack_refusal(1), "unacceptable protocol version")
        self.assertEqual(mqtt.connack_refusal(2), "client identifier rejected")
        self.assertEqual(mqtt.connack_refusal(3), "server unavailable")
        self.assertEqual(mqtt.connack_refusal(4), "bad user name or password")
        self.assertTrue(mqtt.connack_refusal(5).startswith("not authorized"))
        self.assertIn("99", mqtt.connack_refusal(99))

    def test_split_packet(self):
        connack = h("20 02 00 00")
        cases = [
            (b"", None),
            (h("20"), None),
            (h("20 02 00"), None),
            (connack, (connack, b"")),
            (connack + h("40 02"), (connack, h("40 02"))),
            (h("e0 00 e0 00"), (h("e0 00"), h("e0 00"))),
        ]
        for buffer, expected in cases:
            with self.subTest(buffer=buffer):
                self.assertEqual(mqtt.split_packet(buffer), expected)
        with self.assertRaises(ValueError):
            mqtt.split_packet(h("30 ff ff ff ff 01"))
        with self.assertRaises(ValueError):  # 2 MB announced: not a reply
            mqtt.split_packet(h("30 ff ff 7f"))

    def test_default_client_id(self):
        ids = {mqtt.default_client_id() for _ in range(20)}
        self.assertEqual(len(ids), 20)
        for client_id in ids:
            self.assertRegex(client_id, r"^[0-9a-zA-Z]{1,23}$")

    def test_mqtt_error_is_one_line(self):
        self.assertEqual(str(MqttError("a\nb\r\n  c ")), "a b c")


class StatusMessageTest(unittest.TestCase):
    FINISHED = datetime.datetime(2026, 11, 26, 2, 3, 4, 500000,
                                 tzinfo=datetime.timezone(datetime.timedelta(hours=1)))

    def test_ok_report(self):
        payload = mqtt.status_message(
            "ok", "pi4", archive="backup_2026-11-26_0200.tar.gz", size_bytes=123456789,
            duration_seconds=61.26, downtime_seconds=12.04, finished=self.FINISHED)
        report = json.loads(payload.decode("utf-8"))
        finished = datetime.datetime.fromisoformat(report.pop("finished"))
        self.assertEqual(report, {
            "archive": "backup_2026-11-26_0200.tar.gz",
            "downtime_seconds": 12.0,
            "duration_seconds": 61.3,
            "error": None,
            "host": "pi4",
            "size_bytes": 123456789,
            "status": "ok",
            "warnings": [],
        })
        # The same instant, written in this machine's zone, to the second.
        self.assertEqual(finished, self.FINISHED.replace(microsecond=0))
        self.assertEqual(finished.utcoffset(), self.FINISHED.astimezone().utcoffset())

    def test_keys_are_stable_and_sorted(self):
        keys = ["archive", "downtime_seconds", "duration_seconds", "error", "finished",
                "host", "size_bytes", "status", "warnings"]
        for status in mqtt.STATUSES:
            payload = mqtt.status_message(status, "pi4", finished=self.FINISHED)
            decoded = json.loads(payload)
            self.assertEqual(list(decoded), keys)
            self.assertEqual(payload, json.dumps(decoded, sort_keys=True,
                                                  ensure_ascii=False).encode("utf-8"))

    def test_failed_report_has_nulls_and_error(self):
        report = json.loads(mqtt.status_message(
            "failed", "pi4", error="disk full", warnings=("one", "two"),
            duration_seconds=3, finished=self.FINISHED))
        self.assertEqual(report["status"], "failed")
        self.assertEqual(report["error"], "disk full")
        self.assertEqual(report["warnings"], ["one", "two"])
        self.assertIsNone(report["archive"])
        self.assertIsNone(report["size_bytes"])
        self.assertIsNone(report["downtime_seconds"])
        self.assertEqual(report["duration_seconds"], 3.0)

    def test_naive_and_default_finished_are_local_with_offset(self):
        naive = datetime.datetime(2026, 6, 1, 12, 0, 0)
        report = json.loads(mqtt.status_message("warning", "pi4", finished=naive))
        finished = datetime.datetime.fromisoformat(report["finished"])
        self.assertIsNotNone(finished.utcoffset())
        self.assertEqual(finished.replace(tzinfo=None), naive)
        before = datetime.datetime.now().astimezone().replace(microsecond=0)
        report = json.loads(mqtt.status_message("ok", "pi4"))
        finished = datetime.datetime.fromisoformat(report["finished"])
        self.assertLessEqual(before, finished)
        self.assertLess(finished - before, datetime.timedelta(seconds=5))

    def test_non_ascii_is_utf8(self):
        payload = mqtt.status_message("warning", "pi4", warnings=["caf\u00e9: unreadable"],
                                      finished=self.FINISHED)
        self.assertIn("caf\u00e9".encode("utf-8"), payload)

    def test_unknown_status_is_refused(self):
        for status in ("OK", "error", "", None):
            with self.subTest(status=status), self.assertRaises(ValueError):
                mqtt.status_message(status, "pi4")


class DiscoveryTest(unittest.TestCase):
    TARGET = MqttTarget("broker", 1883, "iotstack/backup/pi4", "me", "secret")

    def test_one_device_three_sensors(self):
        messages = mqtt.discovery_messages(self.TARGET, "Pi 4.local")
        self.assertEqual([topic for topic, _ in messages], [
            "homeassistant/sensor/iotstack_backup_pi_4_local/status/config",
            "homeassistant/sensor/iotstack_backup_pi_4_local/finished/config",
            "homeassistant/sensor/iotstack_backup_pi_4_local/size/config",
        ])
        configs = [json.loads(payload) for _, payload in messages]
        for config in configs:
            self.assertEqual(config["state_topic"], "iotstack/backup/pi4")
            self.assertEqual(config["device"]["identifiers"], ["iotstack_backup_pi_4_local"])
            self.assertIn("Pi 4.local", config["device"]["name"])
            self.assertTrue(config["value_template"].startswith("{{ value_json."))
        self.assertEqual(len({config["unique_id"] for config in configs}), 3)
        self.assertEqual(configs[0]["json_attributes_topic"], "iotstack/backup/pi4")
        self.assertEqual(configs[1]["device_class"], "timestamp")
        self.assertEqual(configs[2]["device_class"], "data_size")
        self.assertEqual(configs[2]["unit_of_measurement"], "B")
        for _, payload in messages:
            self.assertNotIn(b"secret", payload)

    def test_templates_read_keys_the_report_has(self):
        report = json.loads(mqtt.status_message("ok", "pi4", size_bytes=1))
        for _, payload in mqtt.discovery_messages(self.TARGET, "pi4"):
            key = json.loads(payload)["value_template"].split("value_json.")[1].split()[0]
            self.assertIn(key, report)

    def test_prefix_and_odd_host_names(self):
        topics = [topic for topic, _ in mqtt.discovery_messages(self.TARGET, "###", prefix="ha")]
        self.assertEqual(topics[0], "ha/sensor/iotstack_backup_host/status/config")
        for topic, _ in mqtt.discovery_messages(self.TARGET, "Über-Pi_1"):
            node = topic.split("/")[2]
            self.assertRegex(node, r"^[a-zA-Z0-9_-]+$")


# ---------------------------------------------------------------------------
# Fake servers


@contextlib.contextmanager
def scripted_server(script):
    """Accept one connection on 127.0.0.1 and run script(conn, stop) in a
    thread; `stop` is an Event set when the test is done with the server."""
    stop = threading.Event()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(10)

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            try:
                script(conn, stop)
            except OSError:
                pass  # the client hung up first: that is its right

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(10)


def read_some(conn, stop):
    """Whatever the client sent, up to a moment's silence."""
    conn.settimeout(0.5)
    try:
        return conn.recv(65536)
    except socket.timeout:
        return b""


class FailureTest(unittest.TestCase):
    """Each failure is one MqttError, in time, with nothing printed."""

    def publish_failure(self, port, timeout=1.0, **kwargs):
        target = MqttTarget("127.0.0.1", port, "iotstack/backup", "u", "p")
        out, err = io.StringIO(), io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            with self.assertRaises(MqttError) as caught:
                mqtt.publish(target, b"payload", timeout=timeout, **kwargs)
        elapsed = time.monotonic() - started
        self.assertEqual((out.getvalue(), err.getvalue()), ("", ""))
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        self.assertNotIn("p@", message)
        self.assertIn("127.0.0.1:%d" % port, message)
        return message, elapsed

    def test_nothing_listening_fails_quickly(self):
        message, elapsed = self.publish_failure(free_port(), timeout=5.0)
        self.assertIn("connection refused", message)
        self.assertLess(elapsed, 2.0)

    def test_listener_that_never_answers_hits_the_deadline(self):
        with silent_listener() as port:
            message, elapsed = self.publish_failure(port, timeout=1.0)
        self.assertIn("timed out after 1 s waiting for CONNACK", message)
        self.assertGreater(elapsed, 0.9)
        self.assertLess(elapsed, 4.0)

    def test_trickling_server_cannot_stretch_the_deadline(self):
        # A PUBLISH header announcing 127 bytes, then one byte every 0.2 s:
        # each recv succeeds, so only a deadline for the whole call ends it.
        def trickle(conn, stop):
            read_some(conn, stop)
            conn.sendall(h("20 7f"))
            while not stop.wait(0.2):
                conn.sendall(b"\x00")

        with scripted_server(trickle) as port:
            message, elapsed = self.publish_failure(port, timeout=1.0)
        self.assertIn("timed out after 1 s", message)
        self.assertLess(elapsed, 4.0)

    def test_broker_silent_after_connack_hits_the_same_deadline(self):
        def no_puback(conn, stop):
            read_some(conn, stop)
            time.sleep(0.6)
            conn.sendall(h("20 02 00 00"))
            stop.wait(10)

        with scripted_server(no_puback) as port:
            message, elapsed = self.publish_failure(port, timeout=1.0)
        self.assertIn("timed out after 1 s waiting for PUBACK", message)
        self.assertLess(elapsed, 4.0)

    def test_http_server_is_garbage_at_once(self):
        def http(conn, stop):
            read_some(conn, stop)
            conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
            stop.wait(10)

        with scripted_server(http) as port:
            message, elapsed = self.publish_failure(port, timeout=5.0)
        self.assertIn("unexpected reply", message)
        self.assertIn("expected CONNACK", message)
        self.assertLess(elapsed, 2.0)

    def test_malformed_connack_is_garbage(self):
        def bad_connack(conn, stop):
            read_some(conn, stop)
            conn.sendall(h("20 03 00 00 00"))
            stop.wait(10)

        with scripted_server(bad_connack) as port:
            message, _ = self.publish_failure(port, timeout=5.0)
        self.assertIn("malformed CONNACK", message)

    def test_refusal_code_is_named(self):
        for code, words in [(4, "bad user name or password"), (3, "server unavailable")]:
            def refuse(conn, stop, code=code):
                read_some(conn, stop)
                conn.sendall(bytes([0x20, 2, 0, code]))

            with self.subTest(code=code), scripted_server(refuse) as port:
                message, _ = self.publish_failure(port, timeout=5.0)
                self.assertIn("refused the connection: " + words, message)

    def test_puback_for_another_packet_is_garbage(self):
        def wrong_id(conn, stop):
            read_some(conn, stop)
            conn.sendall(h("20 02 00 00"))
            read_some(conn, stop)
            conn.sendall(h("40 02 00 07"))
            stop.wait(10)

        with scripted_server(wrong_id) as port:
            message, _ = self.publish_failure(port, timeout=5.0)
        self.assertIn("PUBACK for packet id 7, expected 1", message)

    def test_hang_up_before_connack(self):
        with scripted_server(read_some) as port:
            message, elapsed = self.publish_failure(port, timeout=5.0)
        self.assertIn("closed the connection while waiting for CONNACK", message)
        self.assertLess(elapsed, 3.0)

    def test_unresolvable_host_within_the_deadline(self):
        target = MqttTarget("no-such-host.invalid", 1883, "t")
        started = time.monotonic()
        with self.assertRaises(MqttError) as caught:
            mqtt.publish(target, b"x", timeout=1.0)
        self.assertLess(time.monotonic() - started, 4.0)
        self.assertRegex(str(caught.exception), "cannot resolve|timed out after 1 s")

    def test_bad_arguments_are_value_errors_before_connecting(self):
        with silent_listener() as port:
            target = MqttTarget("127.0.0.1", port, "t")
            for kwargs in ({"qos": 2}, {"timeout": 0}, {"timeout": -1}):
                with self.subTest(kwargs=kwargs), self.assertRaises(ValueError):
                    mqtt.publish(target, b"x", **kwargs)


# ---------------------------------------------------------------------------
# A real broker


class BrokerTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        if MISSING:
            raise unittest.SkipTest("needs %s (Debian package mosquitto and mosquitto-clients)"
                                    % " and ".join(MISSING))
        cls.folder = tempfile.mkdtemp(prefix="test-mqtt-")
        cls.broker = Mosquitto(cls.folder)
        try:
            cls.broker.start()
        except BaseException:
            cls.broker.stop()
            shutil.rmtree(cls.folder, ignore_errors=True)
            raise

    @classmethod
    def tearDownClass(cls):
        cls.broker.stop()
        shutil.rmtree(cls.folder, ignore_errors=True)

    def url(self, topic, user=USER, password=PASSWORD_IN_URL):
        credentials = "%s:%s@" % (user, password) if user else ""
        return "mqtt://%s127.0.0.1:%d/%s" % (credentials, self.broker.port, topic)

    def test_retained_report_arrives_exactly(self):
        topic = "iotstack/backup/pi4"
        payload = mqtt.status_message(
            "warning", "pi4", archive="backup_2026-11-26_0200.tar.gz", size_bytes=42,
            duration_seconds=7.5, downtime_seconds=2.25, warnings=["skipped 1 file"])
        target = mqtt.parse_mqtt_url(self.url(topic))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            mqtt.publish(target, payload)
        self.assertEqual((out.getvalue(), err.getvalue()), ("", ""))
        # Subscribing only now: the message must have been retained.
        self.assertEqual(self.broker.subscribe(topic), topic.encode() + b" " + payload + b"\n")

    def test_newer_report_replaces_the_retained_one(self):
        topic = "iotstack/backup/replaced"
        target = mqtt.parse_mqtt_url(self.url(topic))
        mqtt.publish(target, b"first")
        mqtt.publish(target, b"second")
        self.assertEqual(self.broker.subscribe(topic), topic.encode() + b" second\n")

    def test_every_byte_value_arrives(self):
        topic = "iotstack/backup/binary"
        payload = bytes(range(256)) * 600  # 150 kB: a three-byte length
        mqtt.publish(mqtt.parse_mqtt_url(self.url(topic)), payload)
        self.assertEqual(self.broker.subscribe(topic), topic.encode() + b" " + payload + b"\n")

    def test_qos_0_retained_arrives(self):
        topic = "iotstack/backup/qos0"
        mqtt.publish(mqtt.parse_mqtt_url(self.url(topic)), b"fire and forget", qos=0)
        # QoS 0 has no acknowledgement; DISCONNECT after it still means the
        # broker read it first, since it handles one connection in order.
        self.assertEqual(self.broker.subscribe(topic), topic.encode() + b" fire and forget\n")

    def test_not_retained_is_not_kept(self):
        topic = "iotstack/backup/not-retained"
        mqtt.publish(mqtt.parse_mqtt_url(self.url(topic)), b"gone", retain=False)
        self.assertEqual(self.broker.subscribe(topic, wait=1), b"")

    def test_discovery_configs_arrive_retained(self):
        target = mqtt.parse_mqtt_url(self.url("iotstack/backup/pi4"))
        messages = mqtt.discovery_messages(target, "pi4")
        for topic, payload in messages:
            mqtt.publish(mqtt.parse_mqtt_url(self.url(topic)), payload)
        lines = self.broker.subscribe("homeassistant/#", count=len(messages)).splitlines()
        self.assertEqual(sorted(lines),
                         sorted(topic.encode() + b" " + payload for topic, payload in messages))

    def test_wrong_password_is_refused(self):
        target = mqtt.parse_mqtt_url(self.url("iotstack/backup/x", password="wrong"))
        with self.assertRaises(MqttError) as caught:
            mqtt.publish(target, b"x")
        self.assertIn("bad user name or password", str(caught.exception))
        self.assertNotIn("wrong", str(caught.exception))

    def test_anonymous_is_refused(self):
        target = mqtt.parse_mqtt_url(self.url("iotstack/backup/x", user=None))
        with self.assertRaises(MqttError) as caught:
            mqtt.publish(target, b"x")
        self.assertIn("refused the connection: not authorized", str(caught.exception))

    def test_two_publishers_with_default_ids_do_not_collide(self):
        topics = ["iotstack/backup/a", "iotstack/backup/b"]
        errors = []

        def send(topic):
            try:
                mqtt.publish(mqtt.parse_mqtt_url(self.url(topic)), topic.encode())
            except MqttError as e:
                errors.append(e)

        threads = [threading.Thread(target=send, args=(topic,)) for topic in topics]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        self.assertEqual(errors, [])
        for topic in topics:
            self.assertEqual(self.broker.subscribe(topic),
                             topic.encode() + b" " + topic.encode() + b"\n")


if __name__ == "__main__":
    unittest.main()
