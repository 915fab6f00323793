"""Issue 20, Must 5 and Must 9: nothing after the backup changes its exit
code, and no secret reaches a log.

Real servers on 127.0.0.1: one that answers something that is not HTTP,
one that hangs up, one that answers 500, a small MQTT broker whose second
connection gets garbage.  A notify URL that cannot work is exit 2 before
anything happens.  Logs are created 0640 and never hold a password or a
ping token."""
import os
import socket
import socketserver
import stat
import threading
import unittest
from unittest import mock

from iotstack_backup import mqtt, redact, settings
from tests.plainstack import PlainStackTestCase

TOKEN = "0f3c2a4e-1b2c-4d5e-8f9a-0123456789ab"


class Answer(socketserver.BaseRequestHandler):
    """Answers every connection with the server's `reply` bytes, then hangs up."""

    def handle(self):
        self.request.settimeout(5)
        try:
            self.request.recv(65536)
        except OSError:
            pass
        self.server.hits += 1
        if self.server.reply:
            self.request.sendall(self.server.reply)


class TinyBroker(socketserver.BaseRequestHandler):
    """An MQTT broker for one report: the first connection is answered as
    MQTT 3.1.1 asks (CONNACK, PUBACK); later ones (the discovery configs)
    get bytes that are not MQTT."""

    def handle(self):
        self.request.settimeout(5)
        self.server.hits += 1
        if self.server.hits > 1:
            self.request.recv(65536)
            self.request.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            return
        buffer = b""
        while True:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            buffer += chunk
            while True:
                split = mqtt.split_packet(buffer, 1 << 20)
                if split is None:
                    break
                packet, buffer = split
                kind = packet[0] >> 4
                if kind == 1:  # CONNECT
                    self.request.sendall(b"\x20\x02\x00\x00")
                elif kind == 3:  # PUBLISH, QoS 1: the packet id follows the topic
                    start = packet.index(b"iotstack")  # after the length prefix
                    topic_length = int.from_bytes(packet[start - 2:start], "big")
                    packet_id = packet[start + topic_length:start + topic_length + 2]
                    self.server.topics.append(packet[start:start + topic_length].decode())
                    self.request.sendall(b"\x40\x02" + packet_id)
                elif kind == 14:  # DISCONNECT
                    return


def serve(handler, reply=b""):
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.hits, server.reply, server.topics = 0, reply, []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class NotifyNeverChangesTheCodeTest(PlainStackTestCase):
    def serve(self, handler, reply=b""):
        server = serve(handler, reply)
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        return server

    def log(self):
        logs = os.path.join(self.backups, "logs")
        newest = max((os.path.join(logs, n) for n in os.listdir(logs)), key=os.path.getmtime)
        with open(newest) as f:
            return f.read()

    def written(self):
        """Archives and logs under backups/ (the tree holds an unrelated note),
        but the log of a run that failed before it began (issue 21: every
        failure is logged), which must hold no secret."""
        found = [os.path.join(root, n) for root, _dirs, names in os.walk(self.backups)
                 for n in names if n.endswith((".tar.gz", ".log"))]
        for path in found:
            if path.endswith(".failed.log"):
                with open(path, encoding="utf-8") as f:
                    self.assertNotIn(TOKEN, f.read())
        return [path for path in found if not path.endswith(".failed.log")]

    def url_of(self, server, path="/ping/" + TOKEN):
        return "http://127.0.0.1:%d%s" % (server.server_address[1], path)

    def test_replies_that_are_not_http(self):
        cases = [
            ("not HTTP (BadStatusLine)", b"SSH-2.0-OpenSSH_9.2\r\n"),
            ("hangs up (RemoteDisconnected)", b""),
            ("HTTP 500", b"HTTP/1.0 500 Oops\r\nContent-Length: 0\r\n\r\n"),
            ("garbage status", b"HTTP/1.1 abc\r\n\r\n"),
        ]
        for what, reply in cases:
            with self.subTest(what):
                server = self.serve(Answer, reply)
                code, out, err = self.backup("1", "--notify-url", self.url_of(server))
                self.assertEqual((code, err), (0, ""), out)
                self.assertEqual(server.hits, 1)
                log = self.log()
                warnings = [line for line in log.splitlines() if line.startswith("Warning:")]
                self.assertEqual(len(warnings), 1, log)
                self.assertIn("Warning: notification to http://127.0.0.1:%d/ping/*** failed"
                              % server.server_address[1], warnings[0])
                self.assertNotIn(TOKEN, log)
                os.unlink(os.path.join(self.backups, "good-backups.json"))

    def test_a_failed_or_warning_run_keeps_its_code(self):
        server = self.serve(Answer, b"not http at all\r\n")
        with open(os.path.join(self.stack, "pre_backup.sh"), "w") as f:
            f.write("exit 5\n")
        code, _out, err = self.backup("1", "--notify-url", self.url_of(server))
        self.assertEqual(code, 1)
        self.assertIn("pre_backup.sh failed with status 5", err)
        self.assertEqual(len(err.strip().splitlines()), 1, err)
        os.unlink(os.path.join(self.stack, "pre_backup.sh"))
        # A warning run (exit 3: a dangling volumes/) stays 3.
        os.rename(os.path.join(self.stack, "volumes"), os.path.join(self.tmp, "v"))
        os.symlink("/nonexistent-ssd/volumes", os.path.join(self.stack, "volumes"))
        code, _out, err = self.backup("1", "--notify-url", self.url_of(server))
        self.assertEqual((code, err), (3, ""))

    def test_mqtt_discovery_that_fails_is_one_warning(self):
        broker = self.serve(TinyBroker)
        url = "mqtt://backup:s3cret@127.0.0.1:%d/iotstack/backup" % broker.server_address[1]
        code, out, err = self.backup("1", "--notify-mqtt", url)
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(broker.topics, ["iotstack/backup"])
        log = self.log()
        warnings = [line for line in log.splitlines() if line.startswith("Warning:")]
        self.assertEqual(len(warnings), 1, log)
        self.assertIn("Home Assistant discovery configs failed", warnings[0])
        self.assertNotIn("s3cret", log)

    def test_a_socket_that_cannot_be_created(self):
        """A Pi booted with IPv6 off: socket(AF_INET6) fails with
        EAFNOSUPPORT while localhost resolves to ::1 first.  The kernel here
        has IPv6, so socket() is made to fail for AF_INET6 only; the
        report still reaches the broker over 127.0.0.1."""
        broker = self.serve(TinyBroker)
        port = broker.server_address[1]
        web = self.serve(Answer, b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
        real_socket, real_getaddrinfo = socket.socket, socket.getaddrinfo

        def no_ipv6(family=socket.AF_INET, *args, **kwargs):
            if family == socket.AF_INET6:
                raise OSError(97, "Address family not supported by protocol")
            return real_socket(family, *args, **kwargs)

        def v6_first(host, *args, **kwargs):
            return (real_getaddrinfo("::1", *args, **kwargs)
                    + real_getaddrinfo("127.0.0.1", *args, **kwargs))

        url = "mqtt://localhost:%d/iotstack/backup" % port
        with mock.patch.object(socket, "socket", no_ipv6), \
                mock.patch.object(socket, "getaddrinfo", v6_first):
            code, out, err = self.backup("1", "--notify-mqtt", url, "--no-mqtt-discovery",
                                         "--notify-url",
                                         "http://localhost:%d/x" % web.server_address[1])
        self.assertEqual((code, err), (0, ""), out)
        self.assertEqual(broker.topics[:1], ["iotstack/backup"])
        self.assertIn("Reported ok to", self.log())
        self.assertIn("Notified http://localhost:%d/x: HTTP 200" % web.server_address[1],
                      self.log())

    def test_urls_that_cannot_work_are_exit_2_before_anything(self):
        for url in ("ftp://example.com/x", "http://127.0.0.1:99999/", "http://host:abc/",
                    "http:///nohost", "http://exa mple.com/", "http://[zz]/", "http://-bad/",
                    "http://h:0/"):
            with self.subTest(url):
                code, _out, err = self.backup("1", "--notify-url", url)
                self.assertEqual(code, 2, err)
                self.assertIn("--notify-url", err.strip().splitlines()[-1])
                self.assertEqual(self.written(), [])
        for url in ("mqtt://-bad/topic", "mqtt://[zz]/topic", "mqtt://h:0/topic",
                    "mqtt://h:70000/topic", "mqtt://a..b/topic", "http://h/topic"):
            with self.subTest(url):
                code, _out, err = self.backup("1", "--notify-mqtt", url)
                self.assertEqual(code, 2, err)
                self.assertIn("--notify-mqtt", err.strip().splitlines()[-1])
                self.assertEqual(self.written(), [])
        with open(os.path.join(self.stack, "backup.ini"), "w") as f:
            f.write("[backup]\nnotify-url = http://127.0.0.1:70000/%s\n" % TOKEN)
        code, _out, err = self.backup("1")
        self.assertEqual(code, 2)
        self.assertIn("bad value for 'notify-url'", err)
        self.assertNotIn(TOKEN, err)
        self.assertEqual(self.written(), [])


class SecretsTest(PlainStackTestCase):
    def test_logs_are_0640_and_hold_no_secret(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # nobody listens: the notification fails
        url = "http://user:pa55word@127.0.0.1:%d/ping/%s?token=t0ken" % (port, TOKEN)
        with open(os.path.join(self.stack, "backup.ini"), "w") as f:
            f.write("[backup]\nnotify-url = %s\n" % url)
        code, out, err = self.backup("1", "--print-config")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("http://user:***@127.0.0.1:%d/ping/***?token=***" % port, out)
        code, out, err = self.backup("1")
        self.assertEqual((code, err), (0, ""))
        logs = os.path.join(self.backups, "logs")
        for log_name in os.listdir(logs):
            path = os.path.join(logs, log_name)
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640, log_name)
            with open(path) as f:
                text = f.read()
            for secret in ("pa55word", TOKEN, "t0ken"):
                self.assertNotIn(secret, text)
            self.assertIn("Warning: notification to http://user:***@127.0.0.1", text)
        for secret in ("pa55word", TOKEN, "t0ken"):
            self.assertNotIn(secret, out)

    def test_restore_log_is_0640(self):
        self.assertEqual(self.backup("1")[0], 0)
        code, out, err = self.restore("backup/backup_2026-11-26_0200.tar.gz", "noask")
        self.assertIn(code, (0, 3), err)  # 3: --no-stop, and no engine to ask
        self.assertIn("Restored", out)
        logs = os.path.join(self.backups, "logs")
        restore_logs = [n for n in os.listdir(logs) if n.startswith("restore_")]
        self.assertEqual(len(restore_logs), 1)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(logs, restore_logs[0])).st_mode),
                         0o640)


class RedactTableTest(unittest.TestCase):
    def test_table(self):
        cases = [
            ("https://hc-ping.com/%s" % TOKEN, "https://hc-ping.com/***"),
            ("https://hc-ping.com/%s/fail" % TOKEN, "https://hc-ping.com/***/fail"),
            ("http://u:p@h:8080/x?token=abc&y=1", "http://u:***@h:8080/x?token=***&y=***"),
            ("http://u@h/x", "http://u@h/x"),
            ("https://ntfy.sh/my-topic", "https://ntfy.sh/my-topic"),
            ("http://127.0.0.1:80/ping/abc", "http://127.0.0.1:80/ping/abc"),
        ]
        for given, shown in cases:
            with self.subTest(given):
                self.assertEqual(redact.url(given), shown)
        self.assertEqual(redact.rclone_target(":sftp,host=nas,pass=xyz:/b"),
                         ":sftp,host=nas,pass=***:/b")
        self.assertEqual(redact.rclone_target("dropbox:IOTstack"), "dropbox:IOTstack")
        self.assertEqual(str(settings.destination("rclone::s3,secret_access_key=K,"
                                                  "access_key_id=I:bucket")),
                         "rclone::s3,secret_access_key=***,access_key_id=I:bucket")
        self.assertEqual(redact.text("urlopen error http://a:b@c/d"),
                         "urlopen error http://a:***@c/d")


if __name__ == "__main__":
    unittest.main()
