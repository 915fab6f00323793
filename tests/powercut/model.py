"""What a disk may show after a power cut, rebuilt from fs.py's record.

durable_at() says, for each recorded call, the first later call that made
it durable (the model in tests/powercut/__init__.py); a cut after call k
keeps every call whose durable point is at or before k, and may keep any
other call made before the cut.  kept_strict/kept_names/kept_random pick
the calls a state keeps; replay() applies them, in order, to the tree as
it was at mount, skipping a kept call whose preconditions the dropped ones
took away (a create in a folder whose own name was lost, a rename of a
name that is not there): its effect is lost with them, as on a disk.
fingerprint() names a state (to run each distinct state once) and
materialize() writes it into a plain directory.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import stat

DATA = {"write", "truncate"}
META = {"chmod", "chown", "utimens", "setxattr", "removexattr"}
NAMES = {"create", "link", "unlink", "rmdir", "rename"}
BARRIERS = {"fsync", "fsyncdir", "syncbegin", "syncend"}
# Cut after each of these, at least (issue 22: the durable points).
DURABLE_POINTS = {"fsync", "fsyncdir", "syncend", "rename", "unlink", "rmdir", "link",
                  "create"}
NEVER = 1 << 62


def name_dirs(op: tuple) -> list:
    """The folders whose fsync makes a name change durable."""
    if op[0] == "rename":
        return sorted({op[1], op[3]})
    return [op[1]]


def inode_of_op(op: tuple) -> int:
    return op[1]


def durable_at(ops: list) -> list:
    """For each call, the index of the call that made it durable (NEVER if
    none did); barriers are durable at themselves."""
    result = [NEVER] * len(ops)
    data: dict = {}     # inode -> indices of unsynced writes and truncates
    meta: dict = {}     # inode -> indices of unsynced attribute changes
    names: dict = {}    # folder -> indices of unsynced name changes
    waiting: dict = {}  # rename index -> folders still to be fsynced
    begins: dict = {}

    def settle(indices: list, at: int) -> None:
        for i in indices:
            if ops[i][0] == "rename":
                waiting[i] -= 1
                if waiting[i]:
                    continue
            result[i] = at

    for i, op in enumerate(ops):
        kind = op[0]
        if kind in DATA:
            data.setdefault(op[1], []).append(i)
        elif kind in META:
            meta.setdefault(op[1], []).append(i)
        elif kind in NAMES:
            dirs = name_dirs(op)
            if kind == "rename":
                waiting[i] = len(dirs)
            for folder in dirs:
                names.setdefault(folder, []).append(i)
        elif kind == "fsync":
            result[i] = i
            settle(data.pop(op[1], []), i)
            if not op[2]:
                settle(meta.pop(op[1], []), i)
        elif kind == "fsyncdir":
            result[i] = i
            settle(names.pop(op[1], []), i)
            settle(meta.pop(op[1], []), i)
            settle(data.pop(op[1], []), i)
        elif kind == "syncbegin":
            result[i] = i
            begins[op[1]] = i
        elif kind == "syncend":
            result[i] = i
            before = begins.get(op[1], -1)
            for table in (data, meta, names):
                for key in list(table):
                    done = [j for j in table[key] if j < before and result[j] == NEVER]
                    for j in done:
                        result[j] = i
                        waiting.pop(j, None)
                    table[key] = [j for j in table[key] if result[j] == NEVER]
    return result


def cut_points(ops: list, minimum: int = 100, seed: int = 0, sample: int | None = None) -> list:
    """The calls to cut after: every durable point and the last call, then
    calls between them chosen by a seeded draw until there are `minimum`
    (all of them if fewer); `sample` keeps only that many of those (the
    small runs of the non-heavy passes), always with the first and last."""
    points = {i for i, op in enumerate(ops) if op[0] in DURABLE_POINTS}
    points.add(len(ops) - 1)
    points.add(-1)  # cut before anything was written
    rest = sorted(set(range(len(ops))) - points)
    rng = random.Random(seed)
    if len(points) < minimum and rest:
        points.update(rng.sample(rest, min(len(rest), minimum - len(points))))
    chosen = sorted(points)
    if sample is not None and len(chosen) > sample:
        inner = sorted(rng.sample(chosen[1:-1], sample - 2))
        chosen = [chosen[0]] + inner + [chosen[-1]]
    return chosen


def kept_strict(ops: list, durable: list, cut: int) -> set:
    return {i for i in range(cut + 1) if durable[i] <= cut}


def kept_names(ops: list, durable: list, cut: int) -> set:
    """Every name change and attribute kept, unsynced data lost."""
    return kept_strict(ops, durable, cut) | {
        i for i in range(cut + 1) if ops[i][0] in NAMES or ops[i][0] in META}


def kept_random(ops: list, durable: list, cut: int, seed: int) -> set:
    rng = random.Random("%d/%d" % (seed, cut))
    return kept_strict(ops, durable, cut) | {
        i for i in range(cut + 1) if durable[i] > cut and rng.random() < 0.5}


class Tree:
    """Inodes by id (dicts as fs.inode_of makes them), copied on write."""

    def __init__(self, initial: dict):
        self.inodes = dict(initial)
        self.owned: set = set()

    def get(self, ident: int) -> dict | None:
        return self.inodes.get(ident)

    def mutable(self, ident: int) -> dict | None:
        node = self.inodes.get(ident)
        if node is None or ident in self.owned:
            return node
        node = dict(node, entries=dict(node["entries"]), xattrs=dict(node["xattrs"]))
        self.inodes[ident] = node
        self.owned.add(ident)
        return node

    def folder(self, ident: int) -> dict | None:
        node = self.get(ident)
        return self.mutable(ident) if node is not None and node["kind"] == "dir" else None


def _set_times(node: dict | None, times: tuple) -> None:
    if node is not None:
        node["atime"], node["mtime"] = times


def apply(tree: Tree, op: tuple, kept: bool) -> None:
    """One recorded call on the tree; a call not kept only allocates the
    inode it made (its data may still be kept, unreachable)."""
    kind = op[0]
    if kind == "create":
        _, parent, name, ident, node, ptimes = op
        tree.inodes[ident] = dict(node, entries={}, xattrs=dict(node["xattrs"]))
        tree.owned.add(ident)
        folder = tree.folder(parent) if kept else None
        if folder is not None and name not in folder["entries"]:
            folder["entries"][name] = ident
            _set_times(folder, ptimes)
        return
    if not kept or kind in BARRIERS:
        return
    if kind in ("write", "truncate"):
        node = tree.mutable(op[1])
        if node is None or node["kind"] != "file":
            return
        data = bytearray(node["data"])
        if kind == "write":
            _, _, offset, chunk, times = op
            if len(data) < offset:
                data.extend(bytes(offset - len(data)))
            data[offset:offset + len(chunk)] = chunk
        else:
            _, _, size, times = op
            del data[size:]
            data.extend(bytes(size - len(data)))
        node["data"] = bytes(data)
        _set_times(node, times)
    elif kind in META:
        node = tree.mutable(op[1])
        if node is None:
            return
        if kind == "chmod":
            node["mode"] = stat.S_IFMT(node["mode"]) | op[2]
        elif kind == "chown":
            node["uid"], node["gid"] = op[2], op[3]
        elif kind == "utimens":
            node["atime"], node["mtime"] = op[2], op[3]
        elif kind == "setxattr":
            node["xattrs"][op[2]] = op[3]
        else:
            node["xattrs"].pop(op[2], None)
    elif kind == "link":
        _, parent, name, ident, ptimes = op
        folder = tree.folder(parent)
        if folder is not None and ident in tree.inodes and name not in folder["entries"]:
            folder["entries"][name] = ident
            _set_times(folder, ptimes)
    elif kind in ("unlink", "rmdir"):
        _, parent, name, ident, ptimes = op
        folder = tree.folder(parent)
        if folder is None or folder["entries"].get(name) != ident:
            return
        # A durable rmdir takes the name away even where the removals of
        # the entries below it were lost: they are unreachable orphans then.
        del folder["entries"][name]
        _set_times(folder, ptimes)
    elif kind == "rename":
        _, src, src_name, dst, dst_name, ident, src_times, dst_times = op
        source, target = tree.folder(src), tree.folder(dst)
        if source is None or target is None or source["entries"].get(src_name) != ident:
            return
        replaced = tree.get(target["entries"].get(dst_name, -1))
        if replaced is not None and replaced["kind"] == "dir" and replaced["entries"]:
            return
        del source["entries"][src_name]
        target = tree.folder(dst)
        target["entries"][dst_name] = ident
        _set_times(source, src_times)
        _set_times(target, dst_times)


def replay(record: dict, kept: set, cut: int) -> Tree:
    tree = Tree(record["initial"])
    for i, op in enumerate(record["ops"][:cut + 1]):
        apply(tree, op, i in kept)
    return tree


def walk(tree: Tree, ident: int = 0, rel: str = ""):
    """(rel, id, inode) of every reachable entry, parents first."""
    node = tree.get(ident)
    yield rel, ident, node
    if node["kind"] == "dir":
        for name in sorted(node["entries"]):
            yield from walk(tree, node["entries"][name], rel + "/" + name)


def fingerprint(tree: Tree) -> str:
    digest = hashlib.sha256()
    first_path: dict = {}
    for rel, ident, node in walk(tree):
        link = first_path.setdefault(ident, rel)
        content = hashlib.sha256(node["data"]).hexdigest() if node["kind"] == "file" else ""
        digest.update(repr((rel, node["kind"], node["mode"], node["uid"], node["gid"],
                            node["mtime"], content, node["target"], link,
                            sorted(node["xattrs"].items()))).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def materialize(tree: Tree, dest: str, fresh: bool = True) -> None:
    """Write the state into dest (emptied first): names, data, modes,
    owners, xattrs, hard links; times last, folders after their contents.
    fresh=False keeps the folder dest itself (a mount point) and empties it."""
    if fresh:
        if os.path.lexists(dest):
            shutil.rmtree(dest)
        os.mkdir(dest)
    else:
        for name in os.listdir(dest):
            path = os.path.join(dest, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
    first_path: dict = {}
    folders = []
    for rel, ident, node in walk(tree):
        path = dest + rel
        if ident in first_path:
            os.link(first_path[ident], path, follow_symlinks=False)
            continue
        first_path[ident] = path
        kind = node["kind"]
        if kind == "dir":
            if rel:
                os.mkdir(path)
            folders.append((path, node))
        elif kind == "file":
            with open(path, "xb") as f:
                f.write(node["data"])
        elif kind == "symlink":
            os.symlink(node["target"], path)
        else:
            os.mknod(path, node["mode"], node["rdev"])
        os.lchown(path, node["uid"], node["gid"])
        if kind != "symlink":
            os.chmod(path, stat.S_IMODE(node["mode"]))
        for name, value in node["xattrs"].items():
            os.setxattr(path, name, value, follow_symlinks=False)
        if kind != "dir":
            os.utime(path, ns=(node["atime"], node["mtime"]), follow_symlinks=False)
    for path, node in reversed(folders):
        os.utime(path, ns=(node["atime"], node["mtime"]), follow_symlinks=False)
