"""A power-cut file system for the tests (issue 22), and the sweeps built on it.

Why: after `kill -9` the kernel still writes every page a process wrote;
after a power cut only what was made durable is there, and the rest may be
lost in any combination.  So, as LazyFS (Jepsen) and CrashMonkey do, a
command runs once on `fs.py`, a FUSE passthrough file system (fuse3 and the
PyPI binding mfusepy, tests only) that records every mutating call in
order with the data needed to replay it.  `model.py` then rebuilds, from
that record, the state a disk may show after a cut after call k, into a
plain directory, under the weakest durability model POSIX allows:

- a file's data (write, truncate) is durable only up to its last fsync or
  fdatasync; its mode, owner, times and xattrs only up to its last fsync;
- a name change (create, mknod, mkdir, symlink, link, unlink, rmdir,
  rename) is durable only once its directory was fsynced (a rename between
  two directories: once both were); a rename is atomic (old or new name,
  never neither);
- sync() and syncfs() make everything before them durable (the fs cannot
  see them: `harness.py` tells it, by a lookup of a reserved name, when a
  sync began and when it returned).

Besides that strictest state, each cut is also built as a disk may show it:
every name change (and inode attribute) kept but the unsynced data lost
(ext4's zero-length files), and seeded random subsets of the unsynced
changes kept.  `harness.py` mounts the fs, runs a command there, and
sweeps the cut points: each state is built where the mount was (the same
absolute path, as journals hold absolute paths), the next run is made
there with no FUSE, and the caller checks its invariants.

Needs root, /dev/fuse, fuse3 (`fusermount3`) and mfusepy; without them the
tests that use it skip with the reason.
"""
