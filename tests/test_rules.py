"""A rule written in a module docstring is a test: every ``Rule N`` has a ``test_MODULE_rule_N_...``.

The module docstrings under ``monkestream/`` are read with ``ast`` (nothing is
imported), and so are the test files, for the names of their tests. MODULE is
the file's stem, or its package's name for an ``__init__.py`` (``bench``).
A rule no test is named after fails, and so does a test named after a rule
that is no longer in its module's docstring.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "monkestream"
TESTS = ROOT / "tests"
RULE = re.compile(r"^Rule (\d+):", re.MULTILINE)
RULE_TEST = re.compile(r"test_(\w+?)_rule_(\d+)_")


def module_name(path: Path) -> str:
    return path.parent.name if path.name == "__init__.py" else path.stem


def rules_in(package: Path) -> dict[str, set[int]]:
    """Module name -> the numbers of the rules its docstring states."""
    rules: dict[str, set[int]] = {}
    where: dict[str, Path] = {}
    for path in sorted(package.rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path))) or ""
        numbers = {int(n) for n in RULE.findall(docstring)}
        if not numbers:
            continue
        name = module_name(path)
        assert name not in where, f"{path} and {where[name]} both state rules as module {name!r}"
        where[name] = path
        rules[name] = numbers
    return rules


def defined_tests(tests: Path) -> dict[str, str]:
    """Test name -> the file defining it: top-level test functions and the test methods of top-level classes."""
    names: dict[str, str] = {}
    for path in sorted(tests.rglob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        nodes = list(tree.body)
        nodes += [node for cls in tree.body if isinstance(cls, ast.ClassDef) for node in cls.body]
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_"):
                names[node.name] = path.relative_to(tests.parent).as_posix()
    return names


def missing_tests(rules: dict[str, set[int]], tests: dict[str, str]) -> list[str]:
    proven = {(m.group(1), int(m.group(2))) for name in tests if (m := RULE_TEST.match(name))}
    return [f"{module} Rule {n}: no test named test_{module}_rule_{n}_..."
            for module, numbers in sorted(rules.items()) for n in sorted(numbers) if (module, n) not in proven]


def stale_tests(rules: dict[str, set[int]], tests: dict[str, str]) -> list[str]:
    stale = []
    for name, path in sorted(tests.items()):
        m = RULE_TEST.match(name)
        if m is not None and int(m.group(2)) not in rules.get(m.group(1), set()):
            stale.append(f"{path}::{name}: {m.group(1)} has no Rule {m.group(2)}")
    return stale


def test_every_rule_in_a_module_docstring_has_a_test_named_after_it():
    rules = rules_in(PACKAGE)
    assert rules, "no module states a rule: the docstrings were not found"
    missing = missing_tests(rules, defined_tests(TESTS))
    assert not missing, "rules without a test:\n  " + "\n  ".join(missing)


def test_every_test_named_after_a_rule_names_one_that_exists():
    stale = stale_tests(rules_in(PACKAGE), defined_tests(TESTS))
    assert not stale, "tests named after rules that are gone:\n  " + "\n  ".join(stale)


def test_the_check_finds_missing_and_stale_rule_tests(tmp_path):
    package, tests = tmp_path / "pkg", tmp_path / "tests"
    (package / "sub").mkdir(parents=True)
    tests.mkdir()
    (package / "alpha.py").write_text('"""Alpha.\n\nRule 1: one.\nRule 2: two.\n    Rule 9: indented, not a rule.\n"""\n')
    (package / "sub" / "__init__.py").write_text('"""Sub.\n\nRule 1: one.\n"""\n')
    (package / "plain.py").write_text('"""No rules; Rule 1: mid-line is none either."""\n')
    (tests / "test_alpha.py").write_text(
        "def test_alpha_rule_1_holds(): pass\n"
        "def test_alpha_rule_3_is_gone(): pass\n"
        "class TestSub:\n    def test_sub_rule_1_holds(self): pass\n"
        "def helper():\n    def test_alpha_rule_2_nested_is_no_test(): pass\n"
    )
    rules = rules_in(package)
    assert rules == {"alpha": {1, 2}, "sub": {1}}
    found = defined_tests(tests)
    assert missing_tests(rules, found) == ["alpha Rule 2: no test named test_alpha_rule_2_..."]
    assert stale_tests(rules, found) == ["tests/test_alpha.py::test_alpha_rule_3_is_gone: alpha has no Rule 3"]
