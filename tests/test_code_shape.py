"""Issue 19's limits on function shape, as a ratchet: no function may grow
past them unless it is in tests/code_shape_debt.txt, and a listed function
that is back within them must leave the list."""
from __future__ import annotations

import os
import unittest

from tests import code_shape

DEBT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_shape_debt.txt")


def listed_debt() -> set[str]:
    with open(DEBT, encoding="utf-8") as f:
        return {line.strip() for line in f if line.strip() and not line.startswith("#")}


class MeasureTest(unittest.TestCase):
    def shape(self, source: str) -> code_shape.FunctionShape:
        return next(code_shape.shapes_of(source, "m"))

    def test_table(self) -> None:
        rows = [
            ("def f():\n    return 1\n", (2, 0, 1)),
            ("def f(self, a, b=1, *c, d, **e):\n    pass\n", (2, 5, 1)),
            ("def f(a):\n    if a and a > 1 or not a:\n        pass\n", (3, 1, 4)),
            ("def f(a):\n    for x in a:\n        while x:\n            x -= 1\n", (4, 1, 3)),
            ("def f(a):\n    try:\n        pass\n    except OSError:\n        pass\n"
             "    except ValueError:\n        pass\n", (7, 1, 3)),
            ("def f(a):\n    return [x for x in a if x if x > 2]\n", (2, 1, 4)),
            ("def f(a):\n    def g():\n        if a:\n            pass\n    return g\n", (5, 1, 1)),
        ]
        for source, (lines, params, complexity) in rows:
            with self.subTest(source=source):
                s = self.shape(source)
                self.assertEqual((s.lines, s.parameters, s.complexity),
                                 (lines, params, complexity))

    def test_names_of_methods_and_nested_functions(self) -> None:
        source = "class A:\n    def m(self):\n        def inner():\n            pass\n"
        self.assertEqual([s.name for s in code_shape.shapes_of(source, "mod")],
                         ["mod.A.m", "mod.A.m.inner"])


class PackageTest(unittest.TestCase):
    def test_no_new_function_past_the_limits(self) -> None:
        past = {s.name: s.excess() for s in code_shape.package_shapes() if s.excess()}
        new = sorted(set(past) - listed_debt())
        self.assertEqual(new, [], "past issue 19's limits and not in %s: %s" % (
            DEBT, "; ".join("%s (%s)" % (n, ", ".join(past[n])) for n in new)))

    def test_the_debt_list_only_shrinks(self) -> None:
        names = {s.name for s in code_shape.package_shapes()}
        past = {s.name for s in code_shape.package_shapes() if s.excess()}
        paid = sorted(listed_debt() - past)
        self.assertEqual(paid, [], "within the limits now (or gone): remove from %s: %s"
                         % (DEBT, ", ".join(paid)))
        self.assertTrue(past <= names)


if __name__ == "__main__":
    unittest.main()
