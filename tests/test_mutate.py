"""tools/mutate.py: the mutation list is checked before anything runs, and a mutation is caught
exactly when a test fails (on a tiny git repository of its own)."""
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import mutate  # noqa: E402


def test_shipped_mutations_all_apply_once_and_compile():
    mutations = mutate.load_mutations(mutate.MUTATIONS)
    assert len(mutations) >= 60
    for m in mutations:
        mutate.check_mutation(m, ROOT)  # raises on a stale `old` or a syntax error


@pytest.mark.parametrize("entry, match", [
    ({"name": "x", "file": "f.py", "new": "y"}, "exactly one of `old` and `regex`"),
    ({"name": "x", "file": "f.py", "old": "a", "regex": "a", "new": "y"}, "exactly one"),
    ({"name": "x", "file": "f.py", "old": "a"}, "needs a string new"),
    ({"name": "x", "file": "f.py", "old": "a", "new": "b", "test": ["t"]},
     r"unknown keys \[.test.\]"),
    ({"name": "x", "file": "f.py", "old": "a", "new": "b", "tests": []}, "`tests` must be"),
])
def test_bad_entries_are_named(entry, match):
    with pytest.raises(ValueError, match=match):
        mutate.parse_mutation(entry, 0)


def test_old_and_regex_must_match_exactly_once():
    twice = mutate.Mutation(name="m", file="f.py", old="a = 1", new="a = 2")
    with pytest.raises(ValueError, match="occurs 2 times"):
        twice.apply("a = 1\na = 1\n")
    regex = mutate.Mutation(name="r", file="f.py", regex=r"^(\s*)b = (\d)$", new=r"\1b = -\2")
    assert regex.apply("a = 1\n    b = 3\n") == "a = 1\n    b = -3\n"
    with pytest.raises(ValueError, match="matches 0 times"):
        regex.apply("a = 1\n")


@pytest.fixture
def tiny_repo(tmp_path):
    """A git repository with one function, a test that pins it, and two mutations: one the
    test catches, one it cannot see."""
    (tmp_path / "tools").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "calc.py").write_text("def double(x):\n    return 2 * x\n\n\n"
                                      "def unused():\n    return 1\n")
    (tmp_path / "tests" / "test_calc.py").write_text(textwrap.dedent("""\
        import sys, pathlib
        sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
        import calc
        def test_double():
            assert calc.double(3) == 6
        """))
    (tmp_path / "tools" / "mutations.yaml").write_text(textwrap.dedent("""\
        - {name: double-adds, file: calc.py, old: "return 2 * x", new: "return 2 + x",
           tests: [tests/test_calc.py]}
        - {name: unused-changed, file: calc.py, old: "return 1", new: "return 2",
           tests: [tests/test_calc.py]}
        """))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    return tmp_path


def test_caught_and_survived_on_a_tiny_repo(tiny_repo, monkeypatch, capsys):
    monkeypatch.setattr(mutate, "ROOT", tiny_repo)
    args = ["--mutations", str(tiny_repo / "tools" / "mutations.yaml")]
    assert mutate.main(args + ["--only", "double-adds"]) == 0
    assert mutate.main(args) == 1
    out = capsys.readouterr().out
    assert "caught" in out and "tests/test_calc.py::test_double" in out
    assert "SURVIVED" in out and "1 of 2 mutations caught" in out
    # the repository itself is never touched: the mutations ran on a copy
    assert "return 2 * x" in (tiny_repo / "calc.py").read_text()


def test_failing_tests_stop_before_any_mutation(tiny_repo, monkeypatch, capsys):
    monkeypatch.setattr(mutate, "ROOT", tiny_repo)
    (tiny_repo / "tests" / "test_calc.py").write_text("def test_broken():\n    assert False\n")
    assert mutate.main(["--mutations", str(tiny_repo / "tools" / "mutations.yaml")]) == 2
    assert "fail without any mutation" in capsys.readouterr().err


def test_a_stale_mutation_is_named_before_anything_runs(tiny_repo, monkeypatch, capsys):
    monkeypatch.setattr(mutate, "ROOT", tiny_repo)
    (tiny_repo / "calc.py").write_text("def double(x):\n    return x + x\n")
    assert mutate.main(["--mutations", str(tiny_repo / "tools" / "mutations.yaml")]) == 2
    assert "'double-adds': `old` occurs 0 times in calc.py" in capsys.readouterr().err
