"""Which dated backups to keep: calendar retention with restic's rules.

The caller lists its dated backups as (key, stamp) pairs: the key is
whatever it needs to find the backup again (usually the file name), the
stamp the naive local datetime from that name.  Pairs rather than bare
datetimes, because two backups of one minute ("..._0200" and
"..._0200-2") share a stamp yet are two files.  A backup is kept if any rule
keeps it (keep_last, daily, weekly, monthly, as in `restic forget`).

Deleting is the one thing here that can lose data, so the rules lean to
keeping: every function is pure (no clock, no files), a rule that is None
or 0 is off, and when every rule is off everything is kept, so that a typo
in a config file can never empty the backup folder.  Backups that are not
listed (other files, the archive just written if the caller leaves it out)
are never chosen; the caller must still exclude the archive it just wrote,
since a clock set back could make it look older than the rest.
"""
from __future__ import annotations

# typing is only read by the type checker (mypy treats this name as True):
# the annotations are strings, so nothing of it is imported at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from datetime import date, datetime
    from typing import Callable, Hashable, Iterable, Optional, Sequence, TypeVar

    # A backup's key: whatever the caller finds it again by (a file name).
    Key = TypeVar("Key", bound=Hashable)

RULES = ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")


def _day(stamp: datetime) -> date:
    return stamp.date()


def _iso_week(stamp: datetime) -> tuple[int, int]:
    # ISO weeks, not calendar ones: 2026-12-31 and 2027-01-01 are both in
    # 2026-W53, so a week never splits at New Year.
    iso = stamp.isocalendar()
    return iso[0], iso[1]


def _month(stamp: datetime) -> tuple[int, int]:
    return stamp.year, stamp.month


def _count(name: str, value: object) -> int:
    """The rule's count, with None meaning off (0 is off as well)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("%s must be a whole number of 0 or more, not %r" % (name, value))
    return value


def newest_first(backups: Iterable[tuple[Key, datetime]]) -> list[tuple[Key, datetime]]:
    """The (key, stamp) pairs, newest first.  Equal stamps keep the caller's
    order reversed: the later pair in the input counts as the newer, so a
    caller listing "_0200" before "_0200-2" gets the right order."""
    pairs = list(backups)
    keys = [key for key, _stamp in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("each backup must have its own key")
    order = sorted(range(len(pairs)), key=lambda i: (pairs[i][1], i), reverse=True)
    return [pairs[i] for i in order]


def _newest_of_each_period(ordered: Sequence[tuple[Key, datetime]], count: int,
                           period_of: Callable[[datetime], Hashable]) -> set[Key]:
    """Keys of the newest backup in each of the `count` newest periods that
    have a backup; periods without one do not count."""
    kept: set[Key] = set()
    periods: set[Hashable] = set()
    for key, stamp in ordered:
        period = period_of(stamp)
        if period in periods:
            continue  # an older backup of a period already kept
        if len(periods) == count:
            break
        periods.add(period)
        kept.add(key)
    return kept


def _kept_keys(ordered: Sequence[tuple[Key, datetime]], keep_last: Optional[int],
               keep_daily: Optional[int], keep_weekly: Optional[int],
               keep_monthly: Optional[int]) -> set[Key]:
    counts = [_count(name, value) for name, value in
              zip(RULES, (keep_last, keep_daily, keep_weekly, keep_monthly))]
    if not any(counts):
        return {key for key, _stamp in ordered}
    last, daily, weekly, monthly = counts
    kept = {key for key, _stamp in ordered[:last]}
    for count, period_of in ((daily, _day), (weekly, _iso_week), (monthly, _month)):
        if count:
            kept |= _newest_of_each_period(ordered, count, period_of)
    return kept


def backups_to_keep(backups: Iterable[tuple[Key, datetime]], keep_last: Optional[int] = None,
                    keep_daily: Optional[int] = None, keep_weekly: Optional[int] = None,
                    keep_monthly: Optional[int] = None) -> set[Key]:
    """The set of keys kept from `backups`, an iterable of (key, datetime).

    keep_last N: the newest N.  keep_daily N: for the last N days that have
    backups, the newest backup of each day; keep_weekly by ISO week,
    keep_monthly by calendar month, alike.  The union is kept; None or 0
    turns a rule off; with every rule off, all are kept.
    """
    return _kept_keys(newest_first(backups), keep_last, keep_daily, keep_weekly, keep_monthly)


def backups_to_remove(backups: Iterable[tuple[Key, datetime]], keep_last: Optional[int] = None,
                      keep_daily: Optional[int] = None, keep_weekly: Optional[int] = None,
                      keep_monthly: Optional[int] = None) -> list[Key]:
    """The keys not kept by `backups_to_keep`, as a list, oldest first."""
    ordered = newest_first(backups)
    kept = _kept_keys(ordered, keep_last, keep_daily, keep_weekly, keep_monthly)
    return [key for key, _stamp in reversed(ordered) if key not in kept]
