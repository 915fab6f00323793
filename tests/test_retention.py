"""iotstack_backup.retention: table tests of restic's keep rules, and a
comparison with a plain restatement of the rules on random backup sets."""
import datetime
import random
import unittest

from iotstack_backup.retention import backups_to_keep, backups_to_remove


def at(text):
    """A (key, stamp) pair whose key is the stamp as written."""
    return text, datetime.datetime.strptime(text, "%Y-%m-%d %H:%M")


def nightly(first, last):
    """One backup at 02:00 on every day from `first` to `last`."""
    day, end = datetime.date.fromisoformat(first), datetime.date.fromisoformat(last)
    pairs = []
    while day <= end:
        pairs.append(at("%s 02:00" % day.isoformat()))
        day += datetime.timedelta(days=1)
    return pairs


def keys(*texts):
    return set(texts)


SEVERAL_A_DAY = [  # 11-22 has no backup: a gap
    at("2026-11-20 02:00"), at("2026-11-20 14:00"),
    at("2026-11-21 01:00"), at("2026-11-21 02:00"), at("2026-11-21 23:59"),
    at("2026-11-23 02:00"),
    at("2026-11-24 02:00"),
]
NEW_YEAR = [  # Mon 12-28 to Sun 01-03 is 2026-W53; Mon 01-04 starts 2027-W01
    at("2026-12-27 02:00"),  # Sunday of 2026-W52
    at("2026-12-28 02:00"), at("2026-12-31 02:00"), at("2027-01-01 02:00"),
    at("2027-01-03 02:00"),
    at("2027-01-04 02:00"),
]
MONTHS = [  # February and May have no backup
    at("2026-01-05 02:00"), at("2026-01-20 02:00"),
    at("2026-03-01 02:00"),
    at("2026-04-02 02:00"), at("2026-04-30 23:00"),
    at("2026-06-15 02:00"),
]
YEAR_2026 = nightly("2026-01-01", "2026-12-31")  # ends on a Thursday


class KeepTest(unittest.TestCase):
    CASES = [
        # (description, backups, rules, kept keys)
        ("last 2", SEVERAL_A_DAY, dict(keep_last=2),
         keys("2026-11-24 02:00", "2026-11-23 02:00")),
        ("last more than there are", SEVERAL_A_DAY, dict(keep_last=50),
         {key for key, _ in SEVERAL_A_DAY}),
        ("daily 3: newest of each day, the gap day does not count", SEVERAL_A_DAY,
         dict(keep_daily=3),
         keys("2026-11-24 02:00", "2026-11-23 02:00", "2026-11-21 23:59")),
        ("daily 4 reaches the day before the gap", SEVERAL_A_DAY, dict(keep_daily=4),
         keys("2026-11-24 02:00", "2026-11-23 02:00", "2026-11-21 23:59",
              "2026-11-20 14:00")),
        ("daily more than there are days", SEVERAL_A_DAY, dict(keep_daily=10),
         keys("2026-11-24 02:00", "2026-11-23 02:00", "2026-11-21 23:59",
              "2026-11-20 14:00")),
        ("weekly 1: 12-31 and 01-01 share 2026-W53", NEW_YEAR, dict(keep_weekly=1),
         keys("2027-01-04 02:00")),
        ("weekly 2: the Sunday ends 2026-W53", NEW_YEAR, dict(keep_weekly=2),
         keys("2027-01-04 02:00", "2027-01-03 02:00")),
        ("weekly 3: the Sunday before is 2026-W52", NEW_YEAR, dict(keep_weekly=3),
         keys("2027-01-04 02:00", "2027-01-03 02:00", "2026-12-27 02:00")),
        ("monthly 2 splits the ISO week at New Year", NEW_YEAR, dict(keep_monthly=2),
         keys("2027-01-04 02:00", "2026-12-31 02:00")),
        ("monthly 3: months without backups do not count", MONTHS, dict(keep_monthly=3),
         keys("2026-06-15 02:00", "2026-04-30 23:00", "2026-03-01 02:00")),
        ("monthly 1", MONTHS, dict(keep_monthly=1), keys("2026-06-15 02:00")),
        ("a year: daily 7, weekly 4, monthly 6", YEAR_2026,
         dict(keep_daily=7, keep_weekly=4, keep_monthly=6),
         keys(*("2026-12-%02d 02:00" % day for day in range(25, 32)),
              "2026-12-20 02:00", "2026-12-13 02:00",  # Sundays ending W51, W50
              "2026-11-30 02:00", "2026-10-31 02:00", "2026-09-30 02:00",
              "2026-08-31 02:00", "2026-07-31 02:00")),
        ("a year: last 10 widens the daily seven", YEAR_2026,
         dict(keep_last=10, keep_daily=7, keep_weekly=4, keep_monthly=6),
         keys(*("2026-12-%02d 02:00" % day for day in range(22, 32)),
              "2026-12-20 02:00", "2026-12-13 02:00",
              "2026-11-30 02:00", "2026-10-31 02:00", "2026-09-30 02:00",
              "2026-08-31 02:00", "2026-07-31 02:00")),
        ("union of last 1 and monthly 2", MONTHS, dict(keep_last=1, keep_monthly=2),
         keys("2026-06-15 02:00", "2026-04-30 23:00")),
        ("union of daily 2 and monthly 3", SEVERAL_A_DAY + MONTHS,
         dict(keep_daily=2, keep_monthly=3),
         keys("2026-11-24 02:00", "2026-11-23 02:00", "2026-06-15 02:00",
              "2026-04-30 23:00")),
        ("a rule at 0 is off", SEVERAL_A_DAY, dict(keep_last=0, keep_daily=1),
         keys("2026-11-24 02:00")),
        ("all off keeps everything", SEVERAL_A_DAY, dict(),
         {key for key, _ in SEVERAL_A_DAY}),
        ("all 0 keeps everything", SEVERAL_A_DAY,
         dict(keep_last=0, keep_daily=0, keep_weekly=0, keep_monthly=0),
         {key for key, _ in SEVERAL_A_DAY}),
        ("nothing to keep from nothing", [], dict(keep_last=3), set()),
    ]

    def test_table(self):
        for description, backups, rules, expected in self.CASES:
            with self.subTest(description):
                self.assertEqual(backups_to_keep(backups, **rules), expected)
                # The input order does not matter (stamps are distinct here).
                self.assertEqual(backups_to_keep(list(reversed(backups)), **rules), expected)

    def test_remove_is_the_rest_oldest_first(self):
        for description, backups, rules, expected in self.CASES:
            with self.subTest(description):
                removed = backups_to_remove(random.Random(1).sample(backups, len(backups)),
                                            **rules)
                stamp = dict(backups)
                self.assertEqual(set(removed), {key for key, _ in backups} - expected)
                self.assertEqual(removed, sorted(removed, key=stamp.__getitem__))

    def test_year_counts(self):
        removed = backups_to_remove(YEAR_2026, keep_daily=7, keep_weekly=4, keep_monthly=6)
        self.assertEqual(len(removed), 365 - 14)
        self.assertEqual(removed[0], "2026-01-01 02:00")

    def test_same_minute_later_in_input_is_newer(self):
        stamp = datetime.datetime(2026, 11, 26, 2, 0)
        plain, second = "backup_2026-11-26_0200.tar.gz", "backup_2026-11-26_0200-2.tar.gz"
        older = ("backup_2026-11-25_0200.tar.gz", datetime.datetime(2026, 11, 25, 2, 0))
        backups = [older, (plain, stamp), (second, stamp)]
        self.assertEqual(backups_to_keep(backups, keep_last=1), {second})
        self.assertEqual(backups_to_keep(backups, keep_daily=1), {second})
        self.assertEqual(backups_to_remove(backups, keep_last=1), [older[0], plain])
        self.assertEqual(backups_to_keep(backups, keep_daily=2), {second, older[0]})
        swapped = [older, (second, stamp), (plain, stamp)]
        self.assertEqual(backups_to_keep(swapped, keep_last=1), {plain})

    def test_any_iterable_and_any_hashable_key(self):
        pairs = ((index, stamp) for index, (_, stamp) in enumerate(SEVERAL_A_DAY))
        self.assertEqual(backups_to_keep(pairs, keep_last=2), {5, 6})
        pairs = ((index, stamp) for index, (_, stamp) in enumerate(SEVERAL_A_DAY))
        self.assertEqual(backups_to_remove(pairs, keep_last=5), [0, 1])

    def test_bad_rules_are_refused(self):
        for rules in (dict(keep_last=-1), dict(keep_daily=1.5), dict(keep_weekly="3"),
                      dict(keep_monthly=True)):
            with self.subTest(rules=rules):
                with self.assertRaises(ValueError):
                    backups_to_keep(SEVERAL_A_DAY, **rules)
                with self.assertRaises(ValueError):
                    backups_to_remove(SEVERAL_A_DAY, **rules)

    def test_duplicate_keys_are_refused(self):
        with self.assertRaises(ValueError):
            backups_to_keep([at("2026-11-20 02:00"), at("2026-11-20 02:00")], keep_last=1)

    def test_inputs_are_not_changed(self):
        backups = list(SEVERAL_A_DAY)
        backups_to_remove(backups, keep_daily=1)
        self.assertEqual(backups, SEVERAL_A_DAY)


def reference_keep(backups, keep_last, keep_daily, keep_weekly, keep_monthly):
    """The rules as the documentation states them, by grouping rather than by
    the module's single pass: for each rule, group by period, take the newest
    backup of each group and keep those of the N newest groups."""
    order = {key: (stamp, index) for index, (key, stamp) in enumerate(backups)}
    if not any((keep_last, keep_daily, keep_weekly, keep_monthly)):
        return set(order)
    kept = set(sorted(order, key=order.get, reverse=True)[:keep_last or 0])
    period_rules = [
        (keep_daily, lambda stamp: stamp.date()),
        (keep_weekly, lambda stamp: tuple(stamp.isocalendar())[:2]),
        (keep_monthly, lambda stamp: (stamp.year, stamp.month)),
    ]
    for count, period_of in period_rules:
        newest_in = {}
        for key, (stamp, index) in order.items():
            period = period_of(stamp)
            if period not in newest_in or order[newest_in[period]] < (stamp, index):
                newest_in[period] = key
        for period in sorted(newest_in, reverse=True)[:count or 0]:
            kept.add(newest_in[period])
    return kept


class ReferenceTest(unittest.TestCase):
    def test_random_backup_sets(self):
        rng = random.Random(20261126)
        start = datetime.datetime(2025, 11, 1)
        for trial in range(300):
            count = rng.randint(0, 60)
            spread_minutes = rng.choice([60 * 24 * 10, 60 * 24 * 100, 60 * 24 * 800])
            stamps = [start + datetime.timedelta(minutes=rng.randrange(spread_minutes))
                      for _ in range(count)]
            if stamps and rng.random() < 0.3:
                stamps.append(rng.choice(stamps))  # a same-minute run
            backups = [("b%d" % index, stamp) for index, stamp in enumerate(stamps)]
            rules = {name: rng.choice([None, 0, 1, 2, 3, 7, 12])
                     for name in ("keep_last", "keep_daily", "keep_weekly", "keep_monthly")}
            with self.subTest(trial=trial, rules=rules):
                expected = reference_keep(backups, **rules)
                self.assertEqual(backups_to_keep(backups, **rules), expected)
                self.assertEqual(set(backups_to_remove(backups, **rules)),
                                 set(key for key, _ in backups) - expected)


if __name__ == "__main__":
    unittest.main()
