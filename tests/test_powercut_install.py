"""Power cuts during `backup.py --install-menu` (issue 22).

An IOTstack git checkout (scripts/backup.sh and scripts/restore.sh
committed) is on the power-cut fs; --install-menu is recorded once; at
every cut point each state a disk may show is built where the checkout
was, and must hold each script whole, IOTstack's own or our wrapper (text
and mode), never empty or cut short.  Then --install-menu runs again
there and must succeed with both wrappers in place.  (git runs with
GIT_OPTIONAL_LOCKS=0: git's own index refresh, which git does not fsync,
is not what is tested.)

--install-cron writes through `crontab -` into cron's own folder, outside
the stack: test_powercut_cron sweeps it.
"""
import os
import subprocess
import unittest

from iotstack_backup import backup
from tests.powercut import harness, model
from tests.powercut.stack import MISSING, SMALL_SAMPLE
from tests.support import IsolatedCase, run_main, write

SCRIPTS = ("scripts/backup.sh", "scripts/restore.sh")
ORIGINAL = "#!/bin/bash\necho old\n"


def git(cwd, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org"] + list(args),
                   cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@unittest.skipIf(MISSING, MISSING)
class InstallMenuPowerCutTest(IsolatedCase):
    def setUp(self):
        super().setUp()
        os.environ["GIT_OPTIONAL_LOCKS"] = "0"
        self.tmp = harness.fast_tmp("powercut-menu-")
        self.addCleanup(subprocess.run, ["rm", "-rf", self.tmp])
        self.backing = os.path.join(self.tmp, "backing")
        self.mount = os.path.join(self.tmp, "mnt")
        stack = os.path.join(self.backing, "IOTstack")
        os.makedirs(stack)
        git(stack, "init", "-q")
        for rel in SCRIPTS:
            write(os.path.join(stack, rel), ORIGINAL, 0o755)
        write(os.path.join(stack, "menu.sh"), "#!/bin/bash\n", 0o755)
        git(stack, "add", "-A")
        git(stack, "commit", "-q", "-m", "IOTstack")
        self.live = os.path.join(self.mount, "IOTstack")

    def scripts(self, stack):
        found = {}
        for rel in SCRIPTS:
            path = os.path.join(stack, rel)
            with open(path) as f:
                found[rel] = (f.read(), os.stat(path).st_mode & 0o7777)
        return found

    def test_install_menu(self):
        (code, out, err), record = harness.record_run(
            self.backing, self.mount,
            lambda mount: run_main(backup, ["--install-menu", "--dir",
                                            os.path.join(mount, "IOTstack")]))
        self.assertEqual(code, 0, err)
        new = self.scripts(os.path.join(self.backing, "IOTstack"))
        old = {rel: (ORIGINAL, 0o755) for rel in SCRIPTS}
        self.assertNotEqual(new, old)
        harness.build_strict(record, len(record["ops"]) - 1, self.mount)
        self.assertEqual(self.scripts(self.live), new, "a finished install is durable")

        def next_run(cut, kind):
            problems = ["%s is neither IOTstack's nor ours: %r" % (rel, state)
                        for rel, state in self.scripts(self.live).items()
                        if state not in (old[rel], new[rel])]
            code, _out, err = run_main(backup, ["--install-menu", "--dir", self.live])
            if code != 0:
                problems.append("the next --install-menu failed (%d): %s" % (code, err.strip()))
            if self.scripts(self.live) != new:
                problems.append("after the next --install-menu the scripts are not ours")
            return problems

        ops = record["ops"]
        sample = None if harness.heavy() else SMALL_SAMPLE
        sweep = harness.Sweep(record, self.mount, seed=22)
        sweep.run(model.cut_points(ops, minimum=100, seed=22, sample=sample), next_run)
        print("\n" + sweep.summary("backup.py --install-menu") + " of %d calls" % len(ops))
        self.assertEqual(sweep.problems[:5], [])


if __name__ == "__main__":
    unittest.main()
