"""The shape of the package's functions, measured with `ast` (issue 19).

A newcomer reads a function whole: past 60 lines, five parameters or a
cyclomatic complexity of 15 it no longer fits in the head.  This module
measures every function and method of `iotstack_backup/`; the test in
tests/test_code_shape.py fails for any function past a limit that is not
in the debt list below it (tests/code_shape_debt.txt), and for any listed
one that is back within the limits (so the list only shrinks).

    python3 -m tests.code_shape            # every function past a limit
    python3 -m tests.code_shape --debt     # the same, in the debt list's format

Complexity is McCabe's count, close to flake8's mccabe plugin: one, plus
one per `if`/`elif`, loop, `except`, conditional expression, `assert`,
comprehension and comprehension `if`, and one per extra operand of
`and`/`or`; nested functions and classes count on their own.
"""
from __future__ import annotations

import ast
import os
import sys
from typing import Iterator, NamedTuple

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "iotstack_backup")
MAX_LINES = 60
MAX_PARAMETERS = 5
MAX_COMPLEXITY = 15

_BRANCHES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.IfExp,
             ast.Assert)


class FunctionShape(NamedTuple):
    name: str            # module.Class.function
    lines: int
    parameters: int      # self and cls not counted
    complexity: int

    def excess(self) -> list[str]:
        """What is past a limit, in words ([] when none is)."""
        found = []
        if self.lines > MAX_LINES:
            found.append("%d lines" % self.lines)
        if self.parameters > MAX_PARAMETERS:
            found.append("%d parameters" % self.parameters)
        if self.complexity > MAX_COMPLEXITY:
            found.append("complexity %d" % self.complexity)
        return found


def complexity(function: ast.AST) -> int:
    """McCabe's number of the function's own body (nested functions apart)."""
    count = 1
    stack = list(ast.iter_child_nodes(function))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        if isinstance(node, _BRANCHES):
            count += 1
        elif isinstance(node, ast.BoolOp):
            count += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            count += 1 + len(node.ifs)
        stack.extend(ast.iter_child_nodes(node))
    return count


def parameters(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = function.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    if names and names[0] in ("self", "cls"):
        names = names[1:]
    return len(names) + (a.vararg is not None) + (a.kwarg is not None)


def shapes_of(source: str, module: str) -> Iterator[FunctionShape]:
    """Every function and method in one module's source."""
    def visit(node: ast.AST, prefix: str) -> Iterator[FunctionShape]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                end = getattr(child, "end_lineno", child.lineno)
                yield FunctionShape(name, end - child.lineno + 1, parameters(child),
                                    complexity(child))
                yield from visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, prefix + child.name + ".")
    yield from visit(ast.parse(source), module + ".")


def package_shapes(package: str = PACKAGE) -> list[FunctionShape]:
    found: list[FunctionShape] = []
    for entry in sorted(os.listdir(package)):
        if entry.endswith(".py"):
            with open(os.path.join(package, entry), encoding="utf-8") as f:
                found.extend(shapes_of(f.read(), entry[:-3]))
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    past = [s for s in package_shapes() if s.excess()]
    for s in past:
        print(s.name if "--debt" in argv else "%s: %s" % (s.name, ", ".join(s.excess())))
    if "--debt" not in argv:
        print("%d functions past a limit (lines > %d, parameters > %d, complexity > %d)"
              % (len(past), MAX_LINES, MAX_PARAMETERS, MAX_COMPLEXITY))
    return 0


if __name__ == "__main__":
    sys.exit(main())
