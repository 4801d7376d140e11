"""The library's functions stay short enough to read as what they do: measured with ``ast``.

Limits (docstrings excluded, from the first statement of the body to the last line): 100 lines
for any function in ``rl_mismatch/``, 40 for a function nested in another. A function that grows
past them is split into named pieces, as ``train_step._train_step`` is.
"""

import ast
import pathlib

import pytest

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / "rl_mismatch"
TOP_LEVEL_LIMIT = 100
NESTED_LIMIT = 40


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # the docstring
    return body[-1].end_lineno - body[0].lineno + 1 if body else 0


def function_lengths(source: str) -> list[tuple[str, int, bool]]:
    """``(name, body lines, nested)`` of every function and method in ``source``."""
    out = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((f"{child.name}:{child.lineno}", _body_lines(child), nested))
                visit(child, True)
            else:
                visit(child, nested)

    visit(ast.parse(source), False)
    return out


def test_the_measure_on_a_hand_counted_case():
    source = '''
def outer(x):
    """Doc
    string."""
    y = x + 1

    def inner(z):
        return z
    return inner(y)


class C:
    def method(self):
        pass
'''
    assert function_lengths(source) == [("outer:2", 5, False), ("inner:7", 1, True), ("method:13", 1, False)]


@pytest.mark.parametrize("path", sorted(LIBRARY.rglob("*.py")), ids=lambda p: str(p.relative_to(LIBRARY)))
def test_no_library_function_is_too_long(path):
    too_long = [(name, n) for name, n, nested in function_lengths(path.read_text())
                if n > (NESTED_LIMIT if nested else TOP_LEVEL_LIMIT)]
    assert not too_long, (f"{path.name}: functions over {TOP_LEVEL_LIMIT} lines (nested: {NESTED_LIMIT}), "
                          f"docstrings excluded: {too_long}. Split them into named pieces.")
