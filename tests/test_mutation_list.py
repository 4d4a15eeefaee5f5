"""The mutation check's list of mutants stays applicable to the code as it is.

scripts/mutation_check.py finds each mutant's edit by its exact text; a refactoring that
moves or rewrites that code leaves the mutant stale, and the mutation run (hours, not in
the suite) would only say so at its start. This runs its --check in-process: files read,
nothing copied, built or run, and cattn itself is not imported. Skipped where scripts/ is
absent (tests run against an installed wheel).
"""
import dataclasses
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "mutation_check.py")

pytestmark = pytest.mark.skipif(not os.path.isfile(SCRIPT),
                                reason="scripts/mutation_check.py is not here (installed run)")


@pytest.fixture(scope="module")
def mutation_check():
    # Loaded from its file under a private name: no sys.path change, no clash with a
    # module of the same name elsewhere.
    spec = importlib.util.spec_from_file_location("_cattn_mutation_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mutant_applies_exactly_once_in_its_named_file(mutation_check):
    problems = mutation_check.check_mutants(ROOT)
    assert not problems, ("stale mutants in scripts/mutation_check.py (update their edits "
                          "to where the code lives now):\n" + "\n".join(problems))


def test_the_check_option_exits_zero(mutation_check, capsys):
    assert mutation_check.main(["--check"]) == 0
    assert "each applies exactly once" in capsys.readouterr().out


def test_the_check_reports_a_stale_mutant(mutation_check, capsys):
    # A mutant whose text moved elsewhere, one whose text is gone and one naming a
    # missing test file: each is reported, and --check exits non-zero.
    real = mutation_check.MUTANTS[0]
    moved = dataclasses.replace(real, name="moved", edits=[
        dataclasses.replace(real.edits[0], path="cattn/__init__.py")])
    gone = dataclasses.replace(real, name="gone", edits=[
        dataclasses.replace(real.edits[0], find="no such text in any cattn source\n")])
    no_tests = dataclasses.replace(real, name="no-tests", tests=["tests/test_no_such_file.py"])
    problems = mutation_check.check_mutants(ROOT, [moved, gone, no_tests])
    assert [p.split(":")[0] for p in problems] == ["moved", "gone", "no-tests"]
    assert "now in" in problems[0]
    saved = mutation_check.MUTANTS
    mutation_check.MUTANTS = [real, gone]
    try:
        assert mutation_check.main(["--check"]) == 1
    finally:
        mutation_check.MUTANTS = saved
    assert "gone" in capsys.readouterr().out
