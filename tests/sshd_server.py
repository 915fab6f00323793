"""A throwaway OpenSSH server on 127.0.0.1 for the off-site copy tests.

    with SshServer() as server:
        with unittest.mock.patch.dict(os.environ, server.env):
            ...  # `ssh root@127.0.0.1` now reaches this server

The server runs as root on a free loopback port with its own host key,
config and authorized key (a throwaway client key); nothing outside its
temporary directory is touched except creating /run/sshd, the privilege
separation directory sshd insists on.  Clients reach it through a wrapper
named `ssh`, first on PATH in `env`, that adds `-F <its ssh_config>`, the
same way a user's ~/.ssh/config sets ports and keys.  `rclone_env` points
RCLONE_CONFIG at a config with an sftp remote `loopsftp:` to the server.

stop() only stops sshd (the configs stay, so clients then meet a closed
port); close(), also on leaving the with block, removes everything.
SshServer.start() raises SshdUnavailable with the reason when it cannot
run here (not root, sshd or ssh-keygen missing, sshd refusing to start),
so a test class can turn that into a skip; start_sshd() does.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import unittest

LOOPBACK = "127.0.0.1"
RCLONE_REMOTE = "loopsftp"
START_TIMEOUT = 10.0


class SshdUnavailable(Exception):
    """sshd cannot run here; str(e) says why."""


def free_loopback_port():
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def port_accepts(port):
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def find_sshd():
    # sshd lives in sbin, which is not always on a root PATH in containers.
    return shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)


class SshServer:
    def __init__(self):
        self.tmp = None
        self.proc = None
        self.port = None
        self.user_host = "root@%s" % LOOPBACK
        self.env = {}
        self.rclone_env = {}
        self.rclone_remote = RCLONE_REMOTE

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            raise SshdUnavailable("the loopback sshd needs root (it logs in as root)")
        sshd, keygen, ssh = find_sshd(), shutil.which("ssh-keygen"), shutil.which("ssh")
        for name, path in (("sshd (openssh-server)", sshd), ("ssh-keygen", keygen),
                           ("ssh (openssh-client)", ssh)):
            if not path:
                raise SshdUnavailable("%s is not installed" % name)
        self.tmp = tempfile.mkdtemp(prefix="offsite-sshd-")
        try:
            self._write_keys(keygen)
            self.port = free_loopback_port()
            self._write_sshd_config()
            self._write_client_config(ssh)
            self._write_rclone_config()
            self._launch(sshd)
            self._check_login()
        except BaseException:
            self.close()
            raise

    def stop(self):
        """Stop sshd; its files stay, so clients now meet a closed port."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
            self._log.close()

    def close(self):
        """Stop sshd and remove its keys, configs and wrapper."""
        self.stop()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    # -- files ---------------------------------------------------------------

    def path(self, name):
        return os.path.join(self.tmp, name)

    def _write_keys(self, keygen):
        for name in ("host_key", "client_key"):
            run = subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", "offsite-test",
                                  "-f", self.path(name)],
                                 stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
            if run.returncode != 0:
                raise SshdUnavailable("ssh-keygen failed: %s" % run.stderr.strip())
        self.client_key = self.path("client_key")
        shutil.copyfile(self.path("client_key.pub"), self.path("authorized_keys"))

    def _write_sshd_config(self):
        self.sshd_config = self.path("sshd_config")
        lines = [
            "ListenAddress %s" % LOOPBACK,
            "HostKey %s" % self.path("host_key"),
            "PidFile %s" % self.path("sshd.pid"),
            "AuthorizedKeysFile %s" % self.path("authorized_keys"),
            "StrictModes no",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            # scp (SFTP protocol since OpenSSH 9) and rclone's sftp backend need it.
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
        ]
        write_text(self.sshd_config, "\n".join(lines) + "\n")

    def _write_client_config(self, real_ssh):
        self.ssh_config = self.path("ssh_config")
        lines = [
            "Host *",
            "    Port %d" % self.port,
            "    IdentityFile %s" % self.client_key,
            "    IdentitiesOnly yes",
            "    UserKnownHostsFile /dev/null",
            "    StrictHostKeyChecking no",
            "    BatchMode yes",
            "    LogLevel ERROR",
            # The post-quantum default key exchange costs ~0.1 s of CPU per
            # connection, and the tests open a hundred.
            "    KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org",
        ]
        write_text(self.ssh_config, "\n".join(lines) + "\n")
        self.wrapper_dir = self.path("bin")
        os.mkdir(self.wrapper_dir)
        wrapper = os.path.join(self.wrapper_dir, "ssh")
        write_text(wrapper, '#!/bin/sh\nexec %s -F %s "$@"\n' % (real_ssh, self.ssh_config))
        os.chmod(wrapper, 0o755)
        self.env = {"PATH": self.wrapper_dir + os.pathsep + os.environ.get("PATH", os.defpath)}

    def _write_rclone_config(self):
        self.rclone_config = self.path("rclone.conf")
        lines = [
            "[%s]" % RCLONE_REMOTE,
            "type = sftp",
            "host = %s" % LOOPBACK,
            "port = %d" % self.port,
            "user = root",
            "key_file = %s" % self.client_key,
            # Without these rclone's sftp backend offers no hash to check copies with.
            "shell_type = unix",
            "md5sum_command = md5sum",
            "sha1sum_command = sha1sum",
        ]
        write_text(self.rclone_config, "\n".join(lines) + "\n")
        self.rclone_env = {"RCLONE_CONFIG": self.rclone_config}

    # -- process -------------------------------------------------------------

    def _launch(self, sshd):
        # sshd refuses to start without its privilege separation directory.
        try:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        except OSError as error:
            raise SshdUnavailable("cannot create /run/sshd: %s" % error)
        self._log = open(self.path("sshd.log"), "w+")
        self.proc = subprocess.Popen(
            [sshd, "-D", "-e", "-f", self.sshd_config, "-p", str(self.port),
             "-o", "ListenAddress=%s" % LOOPBACK],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while not port_accepts(self.port):
            if self.proc.poll() is not None:
                raise SshdUnavailable("sshd exited with %d: %s" % (self.proc.returncode, self.log_tail()))
            if time.monotonic() > deadline:
                raise SshdUnavailable("sshd did not accept connections on port %d within %ds: %s"
                                      % (self.port, START_TIMEOUT, self.log_tail()))
            time.sleep(0.05)

    def _check_login(self):
        # A listening sshd is not enough: root may be locked, keys refused...
        run = subprocess.run(["ssh", self.user_host, "true"], env=dict(os.environ, **self.env),
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
        if run.returncode != 0:
            raise SshdUnavailable("cannot log in to the loopback sshd: %s %s"
                                  % (run.stderr.strip(), self.log_tail()))

    def log_tail(self):
        try:
            with open(self.path("sshd.log")) as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-3:])


def write_text(path, text):
    with open(path, "w") as f:
        f.write(text)


def start_sshd():
    server = SshServer()
    try:
        server.start()
    except SshdUnavailable as reason:
        raise unittest.SkipTest("no loopback sshd: %s" % reason)
    return server
