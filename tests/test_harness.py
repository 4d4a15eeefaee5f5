"""The suite's own switches: an optional peer that cannot be imported skips its tests, except
under CI=true, where it fails them (a comparison that never runs proves nothing)."""
import pytest

from conftest import require_peer

MISSING = "cattn_peer_that_does_not_exist"


def outcome(module):
    """What require_peer does to a test: 'fail', 'skip' or 'import'."""
    try:
        require_peer(module)
    except pytest.fail.Exception:
        return "fail"
    except pytest.skip.Exception:
        return "skip"
    return "import"


def test_a_missing_peer_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert outcome(MISSING) == "skip"


@pytest.mark.parametrize("value", ["true", "True"])
def test_a_missing_peer_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert outcome(MISSING) == "fail"


def test_a_present_peer_is_imported(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert outcome("math") == "import"
