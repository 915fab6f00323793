"""Where a container's mount lands in the stack, with paths compared as the kernel sees them.

A stack is often reached through a symlink (~/IOTstack on an SSD folder,
volumes/ or one database's folder moved to another disk) or by another path
than the one compose was started from, and a mount's source may be such a
path too, or a folder that holds the whole stack from above (a file browser
on /home/pi), or a named volume whose driver options bind a folder of the
stack.  Comparing path strings would read such data while its service
writes it.  So every place of the stack (the stack, each top-level item,
each folder of volumes/) is known by what the kernel says it is, (st_dev,
st_ino) after following symlinks, and so are the folders above them; a
mount's source is resolved (realpath) and climbed until one of its folders
is such a place.

How it keeps data safe: a mount is either placed in the stack (its
stack-relative path), holding places from above (the places it holds), or
outside; a volume whose options cannot be read or whose driver is not
docker's local one is "unknown", and the caller stops its service with
everything.  The decisions (locate, volume_source) are pure given the
`identity` and `realpath` functions; places_of gathers the facts.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

Identity = Tuple[int, int]
IdentityOf = Callable[[str], Optional[Identity]]
RealPath = Callable[[str], str]


def identity(path: str) -> Optional[Identity]:
    """(st_dev, st_ino) of what path leads to, or None when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def same_folder(a: str, b: str, ident: IdentityOf = identity) -> bool:
    """Whether two paths lead to the same folder (by identity; by their real
    paths when one cannot be stat'ed, e.g. a folder since deleted)."""
    first, second = ident(a), ident(b)
    if first is not None and second is not None:
        return first == second
    return bool(os.path.realpath(a) == os.path.realpath(b))


class Places:
    """inside: {identity: stack-relative path} of the places of a stack;
    above: {identity: the places it holds} of every folder above them."""

    __slots__ = ("inside", "above")

    def __init__(self, inside: Dict[Identity, str],
                 above: Dict[Identity, Tuple[str, ...]]) -> None:
        self.inside, self.above = inside, above


def place_names(item_names: Iterable[str], volume_folders: Iterable[str]) -> List[str]:
    """The stack ("") first, then each top-level item, then each folder of volumes/."""
    tops = [item for item in item_names if "/" not in item]
    return [""] + tops + ["volumes/" + name for name in sorted(volume_folders)]


def places_of(stack: str, item_names: Iterable[str], ident: IdentityOf = identity,
              realpath: RealPath = os.path.realpath,
              listdir: Callable[[str], List[str]] = os.listdir) -> Places:
    """The Places of the stack: each place as what it resolves to, and the
    folders above its real path, up to /."""
    try:
        folders = listdir(os.path.join(stack, "volumes"))
    except OSError:
        folders = []
    inside: Dict[Identity, str] = {}
    above: Dict[Identity, Set[str]] = {}
    for rel in place_names(item_names, folders):
        path = os.path.join(stack, rel) if rel else stack
        key = ident(path)
        if key is None:
            continue
        inside.setdefault(key, rel)
        parent = realpath(path)
        while parent != "/":
            parent = os.path.dirname(parent)
            up = ident(parent)
            if up is not None:
                above.setdefault(up, set()).add(rel)
    return Places(inside, {key: outermost(rels) for key, rels in above.items()})


def outermost(rels: Iterable[str]) -> Tuple[str, ...]:
    """The paths no other one holds ("" holds everything), sorted."""
    rels = set(rels)
    return tuple(sorted(rel for rel in rels
                        if not any(other != rel and (other == "" or rel.startswith(other + "/"))
                                   for other in rels)))


def locate(source: str, places: Places, ident: IdentityOf = identity,
           realpath: RealPath = os.path.realpath) -> Tuple[str, ...]:
    """The stack-relative paths a mount of `source` covers: (its path,)
    when it lies in the stack (its folders climbed until one is a place),
    the places it holds when it is a folder above them, () when outside."""
    path = realpath(source)
    below: List[str] = []
    while True:
        key = ident(path)
        if key is not None:
            rel = places.inside.get(key)
            if rel is not None:
                return ("/".join(([rel] if rel else []) + below[::-1]),)
            if not below and key in places.above:
                return places.above[key]
        if path in ("/", ""):
            return ()
        below.append(os.path.basename(path))
        path = os.path.dirname(path)


# What docker's local driver mounts that cannot be a folder of the stack.
REMOTE_OR_MEMORY = ("nfs", "nfs4", "cifs", "smb3", "tmpfs", "ramfs", "sshfs")


def volume_source(driver: Optional[str], options: Optional[Dict[str, Any]],
                  mountpoint: str) -> Tuple[str, Optional[str]]:
    """Where a named volume keeps its data: ("path", folder) for docker's own
    folder or a local bind (`o: bind`, `device: ...`), ("outside", None) for
    a network or memory file system, ("unknown", why) for anything else."""
    if driver is None:
        return "unknown", "docker could not describe the volume"
    if driver != "local":
        return "unknown", "volume driver %s" % driver
    options = options or {}
    device = options.get("device")
    if not device:
        return "path", mountpoint
    if {"bind", "rbind"} & set(str(options.get("o", "")).split(",")):
        if os.path.isabs(device):
            return "path", device
        return "unknown", "bind of a relative device %s" % device
    if str(options.get("type", "")).lower() in REMOTE_OR_MEMORY:
        return "outside", None
    return "unknown", "a %s file system on %s" % (options.get("type") or "device", device)
