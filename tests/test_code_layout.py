"""The package's rooms: the run directory's file names live in rundir.py only, and no function is long
without saying why."""

from __future__ import annotations

import ast
import re

from .conftest import ROOT

PACKAGE = ROOT / "dglstm_lm"
RUN_FILES = ("metrics.json", "history.jsonl", "config.json", "overrides.yaml")


def test_the_run_directory_file_names_are_written_in_rundir_only():
    found = {
        str(p.relative_to(ROOT)): name
        for p in PACKAGE.rglob("*.py")
        for name in RUN_FILES
        if name in p.read_text() and p.name != "rundir.py"
    }
    assert found == {}
    text = (PACKAGE / "rundir.py").read_text()
    assert all(name in text for name in RUN_FILES)


def test_no_function_is_over_80_lines_unless_it_says_why():
    long = []
    for p in PACKAGE.rglob("*.py"):
        source = p.read_text()
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 <= 80:
                    continue
                first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                head = "\n".join(lines[max(0, first - 4) : node.body[0].end_lineno])
                if not re.search(r"long on purpose", head, re.IGNORECASE):
                    long.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert long == []


def test_the_entry_point_is_thin_and_no_function_is_long():
    """train.py is the run (≤ 400 lines; the Hydra application is app.py, sweep control sweep.py), and no
    function in dglstm_lm/ is over 100 lines (the config's rules are a table, config.VALIDATION)."""
    assert len((PACKAGE / "train.py").read_text().splitlines()) <= 400
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > 100:
                    long.append(f"{path.name}:{node.name}")
    assert not long, long


def test_no_module_defines_a_top_level_name_twice():
    """A second `def` of a name at module level silently replaces the first, and every caller of the first
    then calls the second (a test helper redefined further down a test file broke 16 slow tests once)."""
    twice = []
    for p in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        seen: dict[str, int] = {}
        for node in ast.parse(p.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name in seen:
                    twice.append(
                        f"{p.relative_to(ROOT)}:{node.lineno} {node.name} (first at {seen[node.name]})"
                    )
                seen.setdefault(node.name, node.lineno)
    assert twice == []
