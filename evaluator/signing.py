"""Signed results: `evaluator keygen`, `evaluator publish` and `evaluator verify`.

A published result is an in-toto Statement v1 whose subject is the submission's tree hash and whose
predicate is the run's `result.json` plus the training-loss curve it logged. The two curves differ in
whose word they are: the result's `val_curve` is what the evaluator measured on the models it took,
the loss curve is what the submission reported through ctx.log, unverified. The Statement travels
as the payload of a DSSE envelope signed with Ed25519 over DSSE's pre-authentication encoding
(PAE), which binds the payload type to the signed bytes. Trusted public keys are the `*.pub` files
in `spec/keys/`, one per signer; a key's name is its file name without the suffix.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from evaluator.errors import UserError
from evaluator.fsutil import atomic_write_bytes, sha256_file, tree_sha256
from evaluator.paths import KEYS_DIR, RESULTS_DIR, RUNS_DIR, WORKSPACE, shown
from evaluator.results import parse_utc, result_problems
from evaluator.tracks import available_tracks, track_path

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://speedrun-evaluator.invalid/result/v1"
PRIVATE_KEY_SUFFIX = ".key"
PUBLIC_KEY_SUFFIX = ".pub"
# Enough points to draw a smooth curve; a run that logs every step would otherwise bloat the envelope.
LOSS_CURVE_MAX_POINTS = 1000
LOSS_METRIC = "loss"
# What is published: scored runs. not_reached is one too: on a time-to-target track, a run that was
# scored and whose models all missed the target is an honest result, which the board lists as such.
PUBLISHABLE_STATUSES = ("ok", "not_reached")

_KEY_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --- keys -------------------------------------------------------------------------------------


def keyid_of(public_key: Ed25519PublicKey) -> str:
    """The SHA-256 of the raw 32-byte public key, in hex: stable across file formats."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def _create_exclusively(path: Path, data: bytes, mode: int) -> None:
    """Create a new file with `mode` from the start (O_EXCL), so it is never world-readable, even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def generate_key_pair(out_dir: Path, name: str) -> tuple[Path, Path, str]:
    """Write `NAME.key` (PKCS#8 PEM, mode 0600) and `NAME.pub` (PEM) into `out_dir`; refuse to replace either."""
    if not _KEY_NAME.match(name):
        raise UserError(
            f"key name {name!r} is not allowed: use lowercase letters, digits, '.', '_' or '-' (at most 64)"
        )
    private_path = out_dir / f"{name}{PRIVATE_KEY_SUFFIX}"
    public_path = out_dir / f"{name}{PUBLIC_KEY_SUFFIX}"
    existing = [str(p) for p in (private_path, public_path) if p.exists() or p.is_symlink()]
    if existing:
        raise UserError(
            f"refusing to overwrite existing key file(s): {', '.join(existing)}; "
            "pick another --name or --out, or move them away yourself"
        )
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        _create_exclusively(private_path, private_pem, 0o600)
        _create_exclusively(public_path, public_pem, 0o644)
    except FileExistsError as exc:
        raise UserError(f"refusing to overwrite {exc.filename}: it appeared while the key was generated") from None
    return private_path, public_path, keyid_of(private_key.public_key())


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read private key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{path} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path} is not an Ed25519 private key (make one with `evaluator keygen`)")
    return key


@dataclass(frozen=True)
class TrustedKey:
    name: str
    keyid: str
    public_key: Ed25519PublicKey


def load_trusted_keys(keys_dir: Path) -> dict[str, TrustedKey]:
    """Every `*.pub` in `keys_dir`, by keyid. A key file that does not load is a configuration error."""
    keys_dir = Path(keys_dir)
    if not keys_dir.is_dir():
        raise UserError(f"trusted-keys directory {keys_dir} does not exist")
    trusted: dict[str, TrustedKey] = {}
    for path in sorted(keys_dir.glob(f"*{PUBLIC_KEY_SUFFIX}")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise UserError(f"trusted key {path} does not load: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise UserError(f"trusted key {path} is not an Ed25519 public key")
        keyid = keyid_of(key)
        trusted.setdefault(keyid, TrustedKey(path.stem, keyid, key))
    return trusted


# --- DSSE -------------------------------------------------------------------------------------


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what is actually signed."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(type_bytes), type_bytes, len(payload), payload)


def _b64decode(text: str) -> bytes:
    """Standard or URL-safe base64, as DSSE allows either; anything else raises ValueError."""
    try:
        return base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from None


def sign_statement(statement: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    signature = private_key.sign(pae(PAYLOAD_TYPE, payload))
    return {
        "payloadType": PAYLOAD_TYPE,
        "payload": base64.b64encode(payload).decode("ascii"),
        "signatures": [
            {"keyid": keyid_of(private_key.public_key()), "sig": base64.b64encode(signature).decode("ascii")}
        ],
    }


def envelope_bytes(envelope: dict[str, Any]) -> bytes:
    return (json.dumps(envelope, indent=2) + "\n").encode("utf-8")


# --- results ----------------------------------------------------------------------------------


def _reject_non_finite(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 is valid JSON and overflows to infinity
        raise ValueError(f"{text[:40]} does not fit a 64-bit float")
    return value


def _int64(text: str) -> int:
    if len(text) > 20 or not -(2**63) <= int(text) < 2**63:  # the length test first: int() of 10**6 digits is slow
        raise ValueError(f"{text[:40]} does not fit a 64-bit integer")
    return int(text)


def strict_json_loads(data: bytes | str) -> Any:
    """JSON as the standard defines it: Python's NaN/Infinity extensions are refused, and so are
    numbers no 64-bit float or integer holds (1e999 would become an infinity, and 10**400 cannot
    become a float at all)."""
    return json.loads(data, parse_constant=_reject_non_finite, parse_float=_finite_float, parse_int=_int64)


def result_problem(result: Any) -> str | None:
    """Why `result` is not a valid, publishable-shaped result record, or None if it is."""
    problems = result_problems(result)
    if problems:
        first = problems[0] if len(problems[0]) <= 200 else problems[0][:200] + "..."
        return first + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
    # The schema's date-time format is not enforced by jsonschema without extra packages; the
    # leaderboard compares these times, so they must parse and carry a UTC offset.
    for field in ("started_at", "ended_at"):
        try:
            moment = parse_utc(result[field])
        except ValueError:
            return f"{field}: {result[field]!r} is not an RFC 3339 date-time"
        if moment.tzinfo is None:
            return f"{field}: {result[field]!r} has no UTC offset"
    return _consistency_problem(result)


def _consistency_problem(result: dict[str, Any]) -> str | None:
    """What the schema cannot say: which fields a status implies. The leaderboard ranks on metrics,
    draws val_curve and, on a time-to-target track, ranks on target.time_s; each must be there, and
    agree with the status, whenever the status says the run was scored."""
    status, target = result["status"], result["target"]
    if status in PUBLISHABLE_STATUSES:
        for field in ("metrics", "val_curve"):
            if result[field] is None:
                return f"status is {status} but {field} is null"
    if status == "not_reached":
        if target is None:
            return "status is not_reached but target is null: only a time-to-target track has a target to miss"
        if target["reached"] is not False:
            return f"status is not_reached but target.reached is {json.dumps(target['reached'])}, not false"
        if target["time_s"] is not None:
            return "status is not_reached but target.time_s is set: a target not reached has no time"
    if status == "ok" and target is not None:
        if target["reached"] is not True:
            return f"status is ok on a time-to-target track but target.reached is {json.dumps(target['reached'])}, not true"
        if target["time_s"] is None:
            return "status is ok on a time-to-target track but target.time_s is null: the time is its score"
        first = next((point for point in result["val_curve"] if point["scored"] == "ok"
                      and point["val_loss"] <= target["val_loss"]), None)
        if first is None or first["time_s"] != target["time_s"]:
            return "target.time_s is not the time of the val_curve's first model at or below the target"
    return None


def submission_folder(result: dict[str, Any]) -> Path:
    """Where the run found the submission: relative paths are relative to the current folder."""
    path = Path(result["submission"]["path"])
    return path if path.is_absolute() else WORKSPACE / path


def track_drift(result: dict[str, Any]) -> str | None:
    """Why this repository's file for the run's track is no longer the one the run had, or None.

    A track file pins the budget, the limits and the data; a result from an older version of it is
    not comparable with today's. A track not defined here has nothing to compare against."""
    track = result["track"]
    if track["id"] not in available_tracks():
        return None
    path = track_path(track["id"])
    current = sha256_file(path)
    if current == track["sha256"]:
        return None
    return (
        f"track file {shown(path)} changed since the run "
        f"(now {current[:12]}..., the run had {track['sha256'][:12]}...)"
    )


def empty_loss_curve() -> dict[str, Any]:
    return {"metric": LOSS_METRIC, "logged_points": 0, "time_s": [], "step": [], "value": []}


def read_loss_curve(metrics_path: Path) -> dict[str, Any]:
    """The `loss` rows of a run's metrics.parquet, in clock order, thinned to at most LOSS_CURVE_MAX_POINTS."""
    try:
        table = pq.read_table(metrics_path, columns=["time_s", "step", "key", "value"])
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"cannot read {metrics_path}: {exc}") from None
    columns = (table.column(name).to_pylist() for name in ("time_s", "step", "key", "value"))
    points = sorted(
        (float(time_s), int(step), float(value))
        for time_s, step, key, value in zip(*columns)
        if key == LOSS_METRIC
        and None not in (time_s, step, value)
        and math.isfinite(time_s)
        and math.isfinite(value)
    )
    logged = len(points)
    if logged > LOSS_CURVE_MAX_POINTS:
        # Evenly spaced indices that always keep the first and the last point.
        last = logged - 1
        points = [points[round(i * last / (LOSS_CURVE_MAX_POINTS - 1))] for i in range(LOSS_CURVE_MAX_POINTS)]
    return {
        "metric": LOSS_METRIC,
        "logged_points": logged,
        "time_s": [p[0] for p in points],
        "step": [p[1] for p in points],
        "value": [p[2] for p in points],
    }


def build_statement(result: dict[str, Any], loss_curve: dict[str, Any]) -> dict[str, Any]:
    submission = result["submission"]
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": submission["name"], "digest": {"sha256": submission["tree_sha256"]}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {"official": result["official"], "result": result, "loss_curve": loss_curve},
    }


def envelope_path(results_dir: Path, result: dict[str, Any]) -> Path:
    track_id = result["track"]["id"]
    if not _PATH_COMPONENT.match(track_id) or track_id == RUNS_DIR.name:
        raise UserError(f"track id {track_id!r} cannot name a results folder")
    return Path(results_dir) / track_id / result["submission"]["name"] / f"{result['run_id']}.json"


def read_run_result(run_dir: Path) -> dict[str, Any]:
    result_path = Path(run_dir) / "result.json"
    try:
        result = strict_json_loads(result_path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{run_dir} is not a run directory: it has no result.json") from None
    except OSError as exc:
        raise UserError(f"cannot read {result_path}: {exc.strerror}") from None
    except ValueError as exc:
        raise UserError(f"{result_path} is not valid JSON: {exc}") from None
    problem = result_problem(result)
    if problem:
        raise UserError(f"{result_path} is not a valid result: {problem}")
    return result


def publish(
    run_dir: Path, private_key: Ed25519PrivateKey, results_dir: Path, allow_unofficial: bool
) -> tuple[Path, bool, list[str]]:
    """Sign one run's result into `results_dir`. Returns (path, newly written, warnings)."""
    run_dir = Path(run_dir)
    result = read_run_result(run_dir)
    if result["status"] not in PUBLISHABLE_STATUSES:
        raise UserError(
            f"refusing to publish run {result['run_id']}: status is {result['status']}, only scored runs "
            "(ok, or not_reached on a time-to-target track) are published"
        )
    if result["smoke"]:
        raise UserError(
            f"refusing to publish run {result['run_id']}: it is a smoke run (--smoke), scored on "
            f"{result['metrics']['val_documents']} documents: a check of the contract, not a score"
        )
    if not result["official"] and not allow_unofficial:
        reasons = "; ".join(result["unofficial_reasons"]) or "no reason recorded"
        raise UserError(
            f"refusing to publish run {result['run_id']}: it is unofficial ({reasons}); "
            "pass --unofficial to publish it marked as unofficial"
        )
    warnings = []
    folder = submission_folder(result)
    recorded_tree = result["submission"]["tree_sha256"]
    if folder.is_dir():
        current_tree = tree_sha256(folder)
        if current_tree != recorded_tree:
            raise UserError(
                f"refusing to publish run {result['run_id']}: submission folder {folder} changed since the run "
                f"(tree hash now {current_tree[:12]}..., the run had {recorded_tree[:12]}...); rerun it"
            )
    else:
        warnings.append(f"submission folder {folder} is not here, so its tree hash was not re-checked")
    drift = track_drift(result)
    if drift:
        raise UserError(f"refusing to publish run {result['run_id']}: {drift}; rerun it")
    metrics_path = run_dir / "metrics.parquet"
    if metrics_path.is_file():
        loss_curve = read_loss_curve(metrics_path)
        if loss_curve["logged_points"] == 0:
            warnings.append("the run logged no 'loss' metric: the leaderboard will show no curve for it")
    else:
        warnings.append(f"{metrics_path} is missing: the result is published without a loss curve")
        loss_curve = empty_loss_curve()

    envelope = sign_statement(build_statement(result, loss_curve), private_key)
    data = envelope_bytes(envelope)
    target = envelope_path(results_dir, result)
    if target.exists():
        if target.read_bytes() == data:
            return target, False, warnings
        raise UserError(
            f"refusing to overwrite {target}: a different envelope for run {result['run_id']} is already there; "
            "remove it first if you mean to replace it"
        )
    atomic_write_bytes(target, data)
    return target, True, warnings


# --- verification -----------------------------------------------------------------------------


class VerificationError(Exception):
    """Why an envelope is not trusted; one line, shown next to the envelope's path."""


@dataclass(frozen=True)
class VerifiedResult:
    path: Path
    result: dict[str, Any]
    loss_curve: dict[str, Any]
    signer: str


def _signer_of(envelope: dict[str, Any], payload: bytes, trusted: dict[str, TrustedKey]) -> str:
    """The name of a trusted key whose signature over the PAE verifies; raise with the reason otherwise."""
    message = pae(envelope["payloadType"], payload)
    mismatched = []
    unknown = []
    for entry in envelope["signatures"]:
        key = trusted.get(entry["keyid"])
        if key is None:
            unknown.append(entry["keyid"])
            continue
        try:
            key.public_key.verify(_b64decode(entry["sig"]), message)
        except (ValueError, InvalidSignature):
            mismatched.append(key.name)
            continue
        return key.name
    if mismatched:
        raise VerificationError(
            f"signature by trusted key {mismatched[0]!r} does not match the payload (payload or signature altered)"
        )
    # keyids come from the file: repr() keeps a hostile one on one line.
    shown = ", ".join(repr(keyid[:16] + ("..." if len(keyid) > 16 else "")) for keyid in unknown)
    raise VerificationError(f"signed only by unknown key(s): keyid {shown}")


def _check_envelope_shape(envelope: Any) -> None:
    if not isinstance(envelope, dict):
        raise VerificationError("not a DSSE envelope: the file is not a JSON object")
    for field in ("payloadType", "payload"):
        if not isinstance(envelope.get(field), str):
            raise VerificationError(f"not a DSSE envelope: {field} is missing or not a string")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise VerificationError("not a DSSE envelope: it has no signatures")
    for entry in signatures:
        if not (isinstance(entry, dict) and isinstance(entry.get("keyid"), str) and isinstance(entry.get("sig"), str)):
            raise VerificationError("not a DSSE envelope: a signature lacks a string keyid or sig")
    if envelope["payloadType"] != PAYLOAD_TYPE:
        raise VerificationError(f"payloadType is {envelope['payloadType']!r}, expected {PAYLOAD_TYPE!r}")


def _check_loss_curve(curve: Any) -> None:
    if not isinstance(curve, dict) or curve.get("metric") != LOSS_METRIC:
        raise VerificationError("predicate.loss_curve is missing or not a loss curve")
    columns = [curve.get(name) for name in ("time_s", "step", "value")]
    if not all(isinstance(column, list) for column in columns) or len({len(c) for c in columns}) != 1:
        raise VerificationError("predicate.loss_curve needs time_s, step and value lists of one length")
    if len(columns[0]) > LOSS_CURVE_MAX_POINTS:
        raise VerificationError(f"predicate.loss_curve has more than {LOSS_CURVE_MAX_POINTS} points")
    time_s, step, value = columns
    numbers_ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in time_s + value)
    if not numbers_ok or not all(isinstance(s, int) and not isinstance(s, bool) for s in step):
        raise VerificationError("predicate.loss_curve holds something other than numbers")


def _check_statement(statement: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Statement and predicate shape; returns (result, loss_curve)."""
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise VerificationError(f"payload is not an in-toto Statement (_type must be {STATEMENT_TYPE})")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise VerificationError(f"predicateType is {statement.get('predicateType')!r}, expected {PREDICATE_TYPE!r}")
    subject = statement.get("subject")
    if not (
        isinstance(subject, list)
        and len(subject) == 1
        and isinstance(subject[0], dict)
        and isinstance(subject[0].get("name"), str)
        and isinstance(subject[0].get("digest"), dict)
        and isinstance(subject[0]["digest"].get("sha256"), str)
    ):
        raise VerificationError("statement subject must be one entry with a name and a sha256 digest")
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict) or "result" not in predicate:
        raise VerificationError("statement predicate has no result")
    result = predicate["result"]
    problem = result_problem(result)
    if problem:
        raise VerificationError(f"payload is not a valid result: {problem}")
    if result["status"] not in PUBLISHABLE_STATUSES:
        raise VerificationError(f"the signed result has status {result['status']}, not ok or not_reached")
    if result["smoke"]:
        raise VerificationError("the signed result is a smoke run, scored on a few documents only")
    submission = result["submission"]
    if subject[0]["name"] != submission["name"] or subject[0]["digest"]["sha256"] != submission["tree_sha256"]:
        raise VerificationError("statement subject does not match the result's submission name and tree hash")
    if predicate.get("official") is not result["official"]:
        raise VerificationError("predicate.official does not match the result's official flag")
    _check_loss_curve(predicate.get("loss_curve"))
    return result, predicate["loss_curve"]


def verify_envelope(path: Path, trusted: dict[str, TrustedKey]) -> VerifiedResult:
    """Every check `evaluator verify` makes, in order; the first failure raises VerificationError."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise VerificationError(f"cannot read it: {exc.strerror}") from None
    try:
        envelope = strict_json_loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"not valid JSON (truncated or corrupted?): {exc}") from None
    _check_envelope_shape(envelope)
    try:
        payload = _b64decode(envelope["payload"])
    except ValueError as exc:
        raise VerificationError(f"payload is not base64: {exc}") from None
    # Authenticate before interpreting: nothing in an unsigned payload is parsed further.
    signer = _signer_of(envelope, payload, trusted)
    try:
        statement = strict_json_loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"signed payload is not valid JSON: {exc}") from None
    result, loss_curve = _check_statement(statement)
    folder = submission_folder(result)
    if folder.is_dir():
        current_tree = tree_sha256(folder)
        if current_tree != result["submission"]["tree_sha256"]:
            raise VerificationError(
                f"submission folder {folder} no longer matches the signed tree hash "
                f"(now {current_tree[:12]}..., signed {result['submission']['tree_sha256'][:12]}...)"
            )
    drift = track_drift(result)
    if drift:
        raise VerificationError(drift)
    return VerifiedResult(Path(path), result, loss_curve, signer)


def envelope_paths(results_dir: Path) -> list[Path]:
    """The published layout `<track>/<submission>/<run-id>.json`; run directories are not envelopes."""
    results_dir = Path(results_dir)
    return sorted(p for p in results_dir.glob("*/*/*.json") if p.relative_to(results_dir).parts[0] != RUNS_DIR.name)


def json_files_under(folder: Path) -> list[Path]:
    """Every `*.json` below `folder`, except inside a `runs/` folder directly under it (unsigned run records)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*.json") if p.relative_to(folder).parts[0] != RUNS_DIR.name)


def verify_paths(
    paths: list[Path], trusted: dict[str, TrustedKey]
) -> tuple[list[VerifiedResult], list[tuple[Path, str]]]:
    verified, rejected = [], []
    for path in paths:
        try:
            verified.append(verify_envelope(path, trusted))
        except VerificationError as exc:
            rejected.append((path, str(exc)))
    return verified, rejected


# --- command line -----------------------------------------------------------------------------


def _run_keygen(args: argparse.Namespace) -> int:
    private_path, public_path, keyid = generate_key_pair(Path(args.out), args.name)
    print(f"wrote private key {private_path} (mode 0600: keep it secret)")
    print(f"wrote public key  {public_path}")
    print(f"keyid {keyid}")
    print(f"To make its signatures trusted, add {public_path.name} to {shown(KEYS_DIR)}/ (one file per signer).")
    return 0


def _run_publish(args: argparse.Namespace) -> int:
    key_path = Path(args.key)
    private_key = load_private_key(key_path)
    target, written, warnings = publish(Path(args.run_dir), private_key, Path(args.results), args.unofficial)
    for warning in warnings:
        sys.stderr.write(f"publish: warning: {warning}\n")
    keyid = keyid_of(private_key.public_key())
    if KEYS_DIR.is_dir() and keyid not in load_trusted_keys(KEYS_DIR):
        sys.stderr.write(
            f"publish: warning: key {key_path.name} (keyid {keyid[:16]}...) is not in {shown(KEYS_DIR)}/, "
            "so `evaluator verify` will reject this envelope until its public key is added\n"
        )
    if written:
        print(f"published {shown(target)} (signed by keyid {keyid[:16]}...)")
    else:
        print(f"already published, identical: {shown(target)}")
    return 0


def score_text(result: dict[str, Any]) -> str:
    """The run's score in a few words: its val_loss, and on a time-to-target track whether and when it got there."""
    loss = f"val_loss {result['metrics']['val_loss']:.4f}"
    target = result["target"]
    if target is None:
        return loss
    if target["reached"]:
        return f"reached val_loss {target['val_loss']:g} at {target['time_s']:.2f} s ({loss})"
    return f"did not reach val_loss {target['val_loss']:g} (final model's {loss})"


def _run_verify(args: argparse.Namespace) -> int:
    trusted = load_trusted_keys(Path(args.trusted_keys))
    if not trusted:
        sys.stderr.write(f"verify: warning: no *.pub keys in {args.trusted_keys}: nothing can verify\n")
    if args.paths:
        paths = []
        for given in map(Path, args.paths):
            paths.extend(json_files_under(given) if given.is_dir() else [given])
    else:
        paths = envelope_paths(RESULTS_DIR)
    if not paths:
        sys.stderr.write("verify: no envelopes found\n")
        return 0
    verified, rejected = verify_paths(paths, trusted)
    failures = dict(rejected)
    by_path = {v.path: v for v in verified}
    for path in paths:
        if path in failures:
            print(f"FAIL  {shown(path)}: {failures[path]}")
        else:
            good = by_path[path]
            mark = "" if good.result["official"] else ", unofficial"
            print(
                f"OK    {shown(path)}: {good.result['submission']['name']} run {good.result['run_id']}, "
                f"{score_text(good.result)}{mark}, signed by {good.signer}"
            )
    sys.stderr.write(f"verify: {len(verified)} verified, {len(rejected)} failed\n")
    return 1 if rejected else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    keygen = subparsers.add_parser(
        "keygen",
        help="make an Ed25519 key pair for signing results",
        description=(
            "Make an Ed25519 key pair: NAME.key (private, PKCS#8 PEM, created with mode 0600) and NAME.pub "
            "(public, PEM). Existing files are never overwritten. Put NAME.pub in spec/keys/ to trust the key."
        ),
    )
    keygen.add_argument(
        "--out", required=True, metavar="DIR", help="directory for the two key files (created if missing)"
    )
    keygen.add_argument("--name", default="signer", help="file name of the pair, without suffix (default: signer)")
    keygen.set_defaults(handler=_run_keygen)

    publish_parser = subparsers.add_parser(
        "publish",
        help="sign a run's result into results/",
        description=(
            "Sign RUN_DIR/result.json as an in-toto Statement inside a DSSE envelope (Ed25519) and write it to "
            "RESULTS/<track>/<submission>/<run-id>.json. Only scored runs are published (ok, or not_reached on "
            "a time-to-target track); unofficial runs only with --unofficial; a run whose submission folder or track file changed since it ran is refused."
        ),
    )
    publish_parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. results/runs/<run-id>")
    publish_parser.add_argument("--key", required=True, metavar="PRIVATE_KEY", help="Ed25519 private key (from keygen)")
    publish_parser.add_argument(
        "--results", default=str(RESULTS_DIR), metavar="DIR", help="where envelopes go (default: results/ in the current folder)"
    )
    publish_parser.add_argument(
        "--unofficial", action="store_true", help="allow an unofficial run; the statement marks it unofficial"
    )
    publish_parser.set_defaults(handler=_run_publish)

    verify = subparsers.add_parser(
        "verify",
        help="check signed results",
        description=(
            "Check each envelope: a signature by a trusted key, the statement's shape, the result against "
            "spec/result.schema.json, the submission's tree hash when its folder is present and the track file's "
            "hash when the track is defined here. One line per "
            "envelope; exit status 1 if any fails."
        ),
    )
    verify.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help=(
            "envelope files, or directories searched for *.json outside their runs/ "
            "(default: every envelope under results/)"
        ),
    )
    verify.add_argument(
        "--trusted-keys",
        default=str(KEYS_DIR),
        metavar="DIR",
        help="directory of trusted *.pub keys, one per signer (default: spec/keys/)",
    )
    verify.set_defaults(handler=_run_verify)
