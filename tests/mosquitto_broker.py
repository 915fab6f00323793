"""A real mosquitto broker for tests: 127.0.0.1, a free port, a password
file with one user, no anonymous access.  Used by test_mqtt and by the
end-to-end --notify-mqtt tests; and silent_listener(), a port where nothing
ever answers."""
import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time

USER = "backup"
PASSWORD = "p@ss:w/rd %25"  # needs %-encoding in a URL
PASSWORD_IN_URL = "p%40ss%3Aw%2Frd%20%2525"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def find_tool(name):
    # mosquitto lives in /usr/sbin, which a normal user's PATH may lack.
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


class Mosquitto:
    """mosquitto on 127.0.0.1, a free port, one user, no anonymous access."""

    def __init__(self, folder):
        self.folder = folder
        self.process = None
        self.port = None

    def start(self):
        passwd = os.path.join(self.folder, "passwd")
        subprocess.run([find_tool("mosquitto_passwd"), "-b", "-c", passwd, USER, PASSWORD],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Started as root, mosquitto would switch to user "mosquitto", which
        # cannot read a private temporary folder; as anyone else it ignores
        # this line.
        me = pwd.getpwuid(os.geteuid()).pw_name
        for _attempt in range(3):  # the free port may be taken in between
            self.port = free_port()
            config = os.path.join(self.folder, "mosquitto.conf")
            with open(config, "w") as f:
                f.write("listener %d 127.0.0.1\n" % self.port)
                f.write("allow_anonymous false\npassword_file %s\n" % passwd)
                f.write("persistence false\nuser %s\n" % me)
                f.write("log_dest file %s\n" % os.path.join(self.folder, "mosquitto.log"))
            with open(os.path.join(self.folder, "output"), "ab") as output:
                self.process = subprocess.Popen([find_tool("mosquitto"), "-c", config],
                                                stdin=subprocess.DEVNULL, stdout=output,
                                                stderr=output)
            if self.wait_until_listening():
                return
            self.stop()
        raise RuntimeError("mosquitto did not start: %s" % self.log_tail())

    def wait_until_listening(self):
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up and self.process.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self):
        text = ""
        for name in ("output", "mosquitto.log"):
            try:
                with open(os.path.join(self.folder, name), errors="replace") as f:
                    text += f.read()
            except OSError:
                pass
        return " | ".join(text.splitlines()[-5:])

    def subscribe(self, topic, count=1, wait=5):
        """What mosquitto_sub -v prints for the first `count` messages on
        `topic` (retained ones arrive at once), waiting at most `wait` s."""
        done = subprocess.run(
            [find_tool("mosquitto_sub"), "-C", str(count), "-W", str(wait),
             "-h", "127.0.0.1", "-p", str(self.port), "-u", USER, "-P", PASSWORD,
             "-t", topic, "-v"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            timeout=wait + 10)
        return done.stdout


MISSING = [tool for tool in ("mosquitto", "mosquitto_passwd", "mosquitto_sub")
           if find_tool(tool) is None]


@contextlib.contextmanager
def silent_listener():
    """A socket that listens and never accepts: the kernel completes the
    handshake, and then nothing ever answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        yield listener.getsockname()[1]
