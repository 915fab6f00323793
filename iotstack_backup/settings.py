"""backup.py's settings: the command line, backup.ini, and the defaults.

Every long option of backup.py except --dir, --dry-run and --print-config
can be set in backup.ini's [backup] section; the command line wins over the
file, which wins over the defaults.  How it keeps runs safe: a file with an
unknown section or key, or a value that does not parse, stops the run
before anything is stopped or written, with one line naming the file and
the key, rather than running with a setting the user did not mean.
"""
from __future__ import annotations

import argparse
import configparser
import ipaddress
import os
import re
import urllib.parse
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, TextIO, Tuple

from . import pgzip, run

if TYPE_CHECKING:
    from .mqtt import MqttTarget
    from .offsite import Destination

# A key of backup.ini: (attribute of args, parse one value, repeatable,
# default); what parse returns differs from key to key.
Setting = Tuple[str, Callable[[str], object], bool, object]


def backup_type(text: str) -> int:
    if text not in ("1", "2", "3"):
        raise argparse.ArgumentTypeError("TYPE can only be 1, 2 or 3, not %r" % text)
    return int(text)


def whole_number(text: str, least: int, most: Optional[int] = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least or (most is not None and value > most):
        bound = "from %d to %d" % (least, most) if most is not None else "of at least %d" % least
        raise argparse.ArgumentTypeError("%r is not a whole number %s" % (text, bound))
    return value


def jobs_count(text: str) -> int:
    return whole_number(text, 1)


def keep_count(text: str) -> int:
    return whole_number(text, 1)


def gzip_level(text: str) -> int:
    return whole_number(text, 0, 9)


def destination(text: str) -> Destination:
    from . import offsite
    try:
        return offsite.parse_destination(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def recipient(text: str) -> str:
    from . import encryption
    try:
        return encryption.check_recipient(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def notify_url(text: str) -> str:
    """An http(s) URL that urllib can call: scheme, host and port checked
    here, so that a URL that cannot work is exit 2 before anything
    happens, not a notification that fails after the backup."""
    problem = notify_url_problem(text)
    if problem:
        from . import redact
        raise argparse.ArgumentTypeError("%r %s" % (redact.url(text), problem))
    return text


_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})"
                        r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def host_problem(host: str, bracketed: bool) -> "str | None":
    """Why host cannot be a host of a URL (notify-url, notify-mqtt), or None."""
    if not host:
        return "has no host"
    if bracketed:
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            return "has a bad IPv6 address %r" % host
        return None
    if not _HOST_NAME.match(host):
        return "has a bad host name %r" % host
    return None


def notify_url_problem(text: str) -> "str | None":
    """Why text cannot be used as --notify-url, or None."""
    if any(ord(c) <= 32 or ord(c) == 127 for c in text):
        return "holds a space or a control character (%-encode it)"
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as e:
        return "has a bad port or host (%s)" % e
    if parts.scheme not in ("http", "https"):
        return "is not an http:// or https:// URL"
    host = parts.hostname or ""
    # 3.9's urlsplit lets "[zz]" through: a bracketed host must be IPv6.
    problem = host_problem(host, ":" in host or "[" in parts.netloc)
    if problem:
        return problem
    if port is not None and not 0 < port < 65536:
        return "has a bad port %d" % port
    if parts.netloc.endswith(":"):
        return "has an empty port"
    return None


def mqtt_url(text: str) -> MqttTarget:
    from . import mqtt
    try:
        return mqtt.parse_mqtt_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def stop_mode(text: str) -> str:
    if text not in ("each", "all", "none"):
        raise argparse.ArgumentTypeError("%r is not each, all or none" % text)
    return text


def boolean(text: str) -> bool:
    value = {"yes": True, "true": True, "on": True, "1": True,
             "no": False, "false": False, "off": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError("%r is not yes or no" % text)
    return value


# Keys of backup.ini: the long options' names without dashes.  Each is
# (attribute, parse one value, repeatable, default).
SETTINGS: Dict[str, Setting] = {
    "type": ("type", backup_type, False, 3),
    "user": ("user", str, False, None),
    "exclude": ("exclude", str, True, []),
    "stop": ("stop", stop_mode, False, "each"),
    "no-stop": ("no_stop", boolean, False, False),
    "no-verify": ("no_verify", boolean, False, False),
    "keep": ("keep", keep_count, False, None),
    "keep-daily": ("keep_daily", keep_count, False, None),
    "keep-weekly": ("keep_weekly", keep_count, False, None),
    "keep-monthly": ("keep_monthly", keep_count, False, None),
    "copy-to": ("copy_to", destination, True, []),
    "encrypt-to": ("encrypt_to", recipient, True, []),
    "notify-url": ("notify_url", notify_url, False, None),
    # str() of the parsed URL hides the password, for --print-config too.
    "notify-mqtt": ("notify_mqtt", mqtt_url, False, None),
    "no-mqtt-discovery": ("no_mqtt_discovery", boolean, False, False),
    "level": ("level", gzip_level, False, 6),
    "jobs": ("jobs", jobs_count, False, pgzip.default_jobs()),
}


CONFIG_NAME = "backup.ini"


def parse_config(text: str, path: str) -> Dict[str, object]:
    """{key: value} from backup.ini's text; UserError naming key and file."""
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    try:
        parser.read_string(text, source=path)
    except configparser.Error as e:
        raise run.UserError("%s: %s" % (path, " ".join(str(e).split())), run.EXIT_USAGE) from None
    values: Dict[str, object] = {}
    for section in parser.sections():
        if section != "backup":
            raise run.UserError("%s: unknown section [%s]; only [backup] is read"
                                % (path, section), run.EXIT_USAGE)
    if not parser.has_section("backup"):
        return values
    for key, raw in parser.items("backup"):
        if key not in SETTINGS:
            raise run.UserError("%s: unknown key %r in [backup] (known: %s)"
                                % (path, key, ", ".join(sorted(SETTINGS))), run.EXIT_USAGE)
        _attr, parse, repeatable, _default = SETTINGS[key]
        lines = [line.strip() for line in raw.splitlines() if line.strip()]
        if not repeatable and len(lines) != 1:
            raise run.UserError("%s: key %r takes one value" % (path, key), run.EXIT_USAGE)
        try:
            parsed = [parse(line) for line in lines]
        except argparse.ArgumentTypeError as e:
            raise run.UserError("%s: bad value for %r: %s" % (path, key, e), run.EXIT_USAGE) \
                from None
        values[key] = parsed if repeatable else parsed[0]
    return values


def merge_settings(args: argparse.Namespace, config: Mapping[str, object]) -> Dict[str, str]:
    """Apply the settings in force to args; return {key: source}.  The
    command line wins over backup.ini, which wins over the defaults."""
    sources: Dict[str, str] = {}
    for key, (attr, _parse, _repeatable, default) in SETTINGS.items():
        given = getattr(args, attr)
        if given is not None:
            sources[key] = "command line"
        elif key in config:
            setattr(args, attr, config[key])
            sources[key] = CONFIG_NAME
        else:
            setattr(args, attr, default)
            sources[key] = "default"
    return sources


def load_settings(stack: str, args: argparse.Namespace) -> Dict[str, str]:
    path = os.path.join(stack, CONFIG_NAME)
    config: Dict[str, object] = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise run.UserError("%s: cannot read it: %s" % (path, e), run.EXIT_USAGE) from None
        config = parse_config(text, path)
    return resolve_no_stop(args, merge_settings(args, config))


def resolve_no_stop(args: argparse.Namespace, sources: Dict[str, str]) -> Dict[str, str]:
    """no-stop is the older spelling of stop = none: it applies unless stop
    itself was set (--no-stop on the command line already set stop)."""
    if args.no_stop and sources["stop"] == "default":
        args.stop = "none"
        return dict(sources, stop=sources["no-stop"])
    return sources


def print_config(args: argparse.Namespace, sources: Mapping[str, str], out: TextIO,
                 stack: Optional[str] = None) -> None:
    """The settings in force and where each came from; with stack, first
    the backup.ini that was read (or that none is there), and the user
    the output would belong to when USER is not given."""
    width = max(len(key) for key in SETTINGS)

    def show(key: str, value: str, source: str) -> None:
        out.write("%-*s = %-40s (%s)\n" % (width, key, value, source))

    if stack is not None:
        path = os.path.join(stack, CONFIG_NAME)
        state = "read" if os.path.isfile(path) else "not present: defaults and command line"
        show("file", path, state)
    for key, (attr, _parse, repeatable, _default) in SETTINGS.items():
        value = getattr(args, attr)
        if key == "user" and value is None and stack is not None:
            from . import iotstack
            name, how = iotstack.default_owner_name(stack, os.environ)
            note = "" if os.geteuid() == 0 else "; used only as root"
            show(key, name, "default: %s%s" % (how, note))
            continue
        show(key, shown_value(key, value, repeatable), sources[key])


# value is Any: an attribute of args, a list for a repeatable key, else
# whatever that key's parse returned (or None, or a bool).
def shown_value(key: str, value: Any, repeatable: bool) -> str:
    """A setting as --print-config shows it: secrets of URLs masked
    (str() of a destination or an MQTT target masks its own)."""
    if repeatable:
        return ", ".join(str(v) for v in value) or "(none)"
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return str(value).lower()
    if key == "notify-url":
        from . import redact
        return redact.url(value)
    return str(value)
