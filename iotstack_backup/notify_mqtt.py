"""--notify-mqtt: how a backup run went, published to MQTT when it ends.

One retained JSON message (mqtt.status_message) on the URL's topic, then,
unless --no-mqtt-discovery, Home Assistant's discovery configs for it
(retained too), so that a "IOTstack backup HOST" device with a status, a
last-run and a size sensor appears by itself.  Reporting never hurts the
backup: everything here together is bounded by BUDGET seconds, every
failure becomes one warning line for the log (or stderr), and the
password is never part of any text (MqttTarget hides it).
"""
from __future__ import annotations

import dataclasses
import os
import time

from . import mqtt, run

# typing is only read by the type checker (as in children.py): the
# annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, TypedDict

    from .backup import Facts

    class ReportFacts(TypedDict):
        """mqtt.status_message's keyword arguments about the run."""
        archive: Optional[str]
        size_bytes: Optional[int]
        duration_seconds: float
        downtime_seconds: Optional[float]
        warnings: List[str]
        error: Optional[str]

BUDGET = 5.0  # seconds for the whole report, discovery included


def status_of(ok: bool, code: Optional[int]) -> str:
    if not ok:
        return "failed"
    return "warning" if code == 3 else "ok"


def report_facts(facts: Facts, error: Optional[BaseException]) -> ReportFacts:
    """The keyword arguments of mqtt.status_message from what the run found
    (backup.Facts; nothing yet when it failed early)."""
    archive = size = downtime = None
    if facts.written is not None:
        path = facts.written.names[0]
        archive = os.path.relpath(path, os.path.dirname(os.path.dirname(path)))
        size = facts.written.size
    if facts.stats is not None:
        # The longest outage of any service: what a user waits through.
        window = facts.window
        downtime = max(window.downtime().values(), default=0.0) if window is not None else 0.0
    return {
        "archive": archive,
        "size_bytes": size,
        "duration_seconds": time.monotonic() - facts.started,
        "downtime_seconds": downtime,
        "warnings": facts.warnings,
        "error": describe(error),
    }


def describe(error: Optional[BaseException]) -> Optional[str]:
    """The run's error as one line, as the user saw it on stderr."""
    if error is None:
        return None
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, run.Interrupted):
        return "interrupted by %s" % error
    if isinstance(error, run.UserError):
        return str(error)
    if isinstance(error, OSError):
        return run.describe_os_error(error)
    return "unexpected error: %s: %s" % (type(error).__name__, error)


def _one_line(error: BaseException) -> str:
    if isinstance(error, (mqtt.MqttError, ValueError)):
        return " ".join(str(error).split())
    return "%s: %s" % (type(error).__name__, " ".join(str(error).split()))


def publish_report(target: mqtt.MqttTarget, status: str, host: str, run_facts: ReportFacts,
                   discovery: bool = True, budget: float = BUDGET) -> str:
    """Publish the report (and the discovery configs); return one line for
    the log: what was published, or "Warning: ..." saying what failed."""
    deadline = time.monotonic() + budget
    try:
        mqtt.publish(target, mqtt.status_message(status, host, **run_facts), timeout=budget)
    except Exception as e:  # noqa: BLE001 - reporting never hurts the backup
        return "Warning: MQTT report to %s failed: %s" % (target, _one_line(e))
    message = "Reported %s to %s" % (status, target)
    if not discovery:
        return message
    try:
        for topic, payload in mqtt.discovery_messages(target, host):
            left = deadline - time.monotonic()
            if left <= 0:
                raise mqtt.MqttError("no time left within %.0f seconds" % budget)
            mqtt.publish(dataclasses.replace(target, topic=topic), payload, timeout=left)
    except Exception as e:  # noqa: BLE001 - reporting never hurts the backup
        return ("Warning: %s, but its Home Assistant discovery configs failed: %s"
                % (message, _one_line(e)))
    return message + ", with Home Assistant discovery configs"
