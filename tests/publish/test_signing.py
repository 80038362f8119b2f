"""keygen, key ids and DSSE's pre-authentication encoding, with real Ed25519 keys."""

from __future__ import annotations

import hashlib
import stat

from cryptography.hazmat.primitives import serialization
from publish_support import run_cli

from evaluator.signing import generate_key_pair, keyid_of, load_private_key, pae


def test_keygen_writes_private_key_0600_and_never_overwrites(tmp_path, monkeypatch, capsys):
    out = tmp_path / "keys"
    code, stdout, _ = run_cli(monkeypatch, capsys, "keygen", "--out", out, "--name", "alice")
    assert code == 0
    private, public = out / "alice.key", out / "alice.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_private_key(private)
    assert keyid_of(key.public_key()) in stdout
    before = private.read_bytes(), public.read_bytes()

    code, _, stderr = run_cli(monkeypatch, capsys, "keygen", "--out", out, "--name", "alice")
    assert code == 2
    assert "refusing to overwrite" in stderr and "alice.key" in stderr
    assert (private.read_bytes(), public.read_bytes()) == before


def test_keygen_refuses_when_only_the_public_half_exists(tmp_path, monkeypatch, capsys):
    (tmp_path / "bob.pub").write_text("someone else's key\n")
    code, _, stderr = run_cli(monkeypatch, capsys, "keygen", "--out", tmp_path, "--name", "bob")
    assert code == 2 and "bob.pub" in stderr
    assert not (tmp_path / "bob.key").exists()


def test_keyid_is_sha256_of_the_raw_public_key(tmp_path):
    private, public, keyid = generate_key_pair(tmp_path, "carol")
    loaded = serialization.load_pem_public_key(public.read_bytes())
    raw = loaded.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert keyid == hashlib.sha256(raw).hexdigest() == keyid_of(load_private_key(private).public_key())


def test_pae_is_dsse_v1_encoding():
    # The example from the DSSE protocol description.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
