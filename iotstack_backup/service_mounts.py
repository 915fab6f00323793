"""Which services keep their data where a restore --only writes.

`restore.py --only volumes/nodered` should stop only the services whose
data lies there.  Docker knows each container's bind mounts (`docker
inspect`); the compose labels say which service and which project folder a
container belongs to.  services_using() decides from that, purely;
inspect_containers() asks docker.  When docker cannot tell, the caller
stops every running service, as a whole restore does.
"""
import json
import os
import subprocess

PROJECT_DIR = "com.docker.compose.project.working_dir"
SERVICE = "com.docker.compose.service"


def inspect_containers(run=subprocess.run, timeout=60):
    """docker inspect of the running containers, or None if docker cannot tell."""
    try:
        ids = run(["docker", "ps", "-q", "--no-trunc"], stdin=subprocess.DEVNULL,
                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if ids.returncode != 0:
            return None
        names = ids.stdout.decode().split()
        if not names:
            return []
        found = run(["docker", "inspect"] + names, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if found.returncode != 0:
            return None
        return json.loads(found.stdout.decode("utf-8", "replace"))
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None


def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def services_using(containers, stack, only):
    """The services of the project in `stack` with a bind mount that lies
    under, or holds, one of the `only` paths (relative to stack)."""
    roots = {os.path.normpath(stack), os.path.realpath(stack)}
    wanted = set()
    for container in containers:
        labels = (container.get("Config") or {}).get("Labels") or {}
        project = labels.get(PROJECT_DIR)
        service = labels.get(SERVICE)
        if not service or not project or os.path.normpath(project) not in roots:
            continue
        for mount in container.get("Mounts") or ():
            source = mount.get("Source") or ""
            if mount.get("Type") != "bind" or not source:
                continue
            source = os.path.normpath(source)
            for root in roots:
                for rel in only:
                    target = os.path.join(root, rel)
                    if _inside(source, target) or _inside(target, source):
                        wanted.add(service)
    return sorted(wanted)
