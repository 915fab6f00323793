"""The install line of the README: the files it copies are all the commands need."""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

from tests.support import REPO


class InstallTest(unittest.TestCase):
    def test_the_files_the_readme_says_to_copy_are_all_it_needs(self):
        with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
            line = re.search(r"^cp -r (.*) ~/IOTstack/$", f.read(), re.M)
        listed = line.group(1).split()
        top = sorted(os.path.basename(path) for path in glob.glob(os.path.join(REPO, "*.py")))
        self.assertEqual(sorted(listed), sorted(top + ["iotstack_backup"]))
        package = sorted(os.path.basename(path)[:-3] for path in
                         glob.glob(os.path.join(REPO, "iotstack_backup", "*.py")))
        with tempfile.TemporaryDirectory() as tmp:
            for name in listed:
                source = os.path.join(REPO, name)
                if os.path.isdir(source):
                    shutil.copytree(source, os.path.join(tmp, name),
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(source, tmp)
            env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
            imports = "; ".join("import iotstack_backup.%s" % name for name in package)
            done = subprocess.run([sys.executable, "-c", imports], cwd=tmp, env=env,
                                  stderr=subprocess.PIPE, universal_newlines=True)
            self.assertEqual(done.returncode, 0, done.stderr)
            for script in ("backup.py", "restore.py"):
                # From another folder, as cron runs it: the package is found
                # beside the script.
                done = subprocess.run([sys.executable, os.path.join(tmp, script), "--help"],
                                      cwd="/", env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, universal_newlines=True)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertIn("exit codes:", done.stdout)


if __name__ == "__main__":
    unittest.main()
