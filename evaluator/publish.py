"""Publication policy: `evaluator publish` and `evaluator verify`.

A published result is an in-toto Statement v1 whose subject is the submission's tree hash and whose
predicate is the run's `result.json` plus the training-loss curve it logged. The two curves differ in
whose word they are: the result's `val_curve` is what the evaluator measured on the models it took,
the loss curve is what the submission reported through ctx.log, unverified. The Statement travels in
a DSSE envelope (`evaluator/signing.py`, which knows keys and signatures, not results).

Only a valid result (`results.result_problems`, the one validator) is published or verified.
Beyond validity this module decides what may be published: a scored run, not a smoke run, official
unless asked, whose submission folder and track file are those it ran with; `verify` holds a
signed result to the same rules.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from evaluator.errors import UserError
from evaluator.fsutil import atomic_write_bytes, sha256_file, tree_sha256
from evaluator.metrics import LOSS_CURVE_MAX_POINTS, LOSS_METRIC, METRICS_FILE, empty_loss_curve, read_loss_curve
from evaluator.paths import KEYS_DIR, RESULTS_DIR, RUNS_DIR, WORKSPACE, shown
from evaluator.results import PUBLISHED_STATUSES, result_problems, strict_json_loads
from evaluator.signing import (
    TrustedKey,
    VerificationError,
    authenticate_envelope,
    envelope_bytes,
    keyid_of,
    load_private_key,
    load_trusted_keys,
    sign_statement,
)
from evaluator.tracks import available_tracks, track_path

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://speedrun-evaluator.invalid/result/v1"

_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


# --- reading a run's result -------------------------------------------------------------------


def _in_one_line(problems: list[str]) -> str:
    """A result's problems as publish and verify show them: the first (cut at 200 characters), and how many more."""
    first = problems[0] if len(problems[0]) <= 200 else problems[0][:200] + "..."
    return first + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


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
    problems = result_problems(result)
    if problems:
        raise UserError(f"{result_path} is not a valid result: {_in_one_line(problems)}")
    return result


# --- what may have changed since the run ------------------------------------------------------


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
        f"track file {shown(path)} changed since the run (now {current[:12]}..., the run had {track['sha256'][:12]}...)"
    )


# --- what may be published -------------------------------------------------------------------


class Rule(Enum):
    """The publication rules, in the order `publish` checks them."""

    STATUS = "status"
    SMOKE = "smoke"
    UNOFFICIAL = "unofficial"
    SUBMISSION_CHANGED = "submission changed"
    TRACK_CHANGED = "track changed"


@dataclass(frozen=True)
class Unpublishable:
    """The rule a result breaks. `detail` is what its message needs that the result does not hold: the
    submission folder's tree hash now (SUBMISSION_CHANGED), or how the track file drifted (TRACK_CHANGED)."""

    rule: Rule
    detail: str = ""


def recorded_problem(result: dict[str, Any], *, allow_unofficial: bool) -> Unpublishable | None:
    """The first rule that the result's own record breaks, or None."""
    # What is published: scored runs (not_reached is one: on a time-to-target track, a run that was
    # scored and whose models all missed the target is an honest result), and runs that failed through
    # the submission's fault, which the board counts beside them. Not the evaluator's or the
    # sandbox's failures: those are retried with the same seed.
    if result["status"] not in PUBLISHED_STATUSES:
        return Unpublishable(Rule.STATUS)
    if result["smoke"]:
        return Unpublishable(Rule.SMOKE)
    # An unofficial result says so in its statement, so `verify` accepts one; `publish` signs one
    # only when asked, so that nobody signs it by mistake.
    if not result["official"] and not allow_unofficial:
        return Unpublishable(Rule.UNOFFICIAL)
    return None


def drift_problem(result: dict[str, Any]) -> Unpublishable | None:
    """Whether the submission or the track changed since the run, or None. A folder that is not here
    cannot be re-checked, which is no reason to refuse: results are verified far from the submissions."""
    folder = submission_folder(result)
    if folder.is_dir():
        current_tree = tree_sha256(folder)
        if current_tree != result["submission"]["tree_sha256"]:
            return Unpublishable(Rule.SUBMISSION_CHANGED, current_tree)
    drift = track_drift(result)
    if drift:
        return Unpublishable(Rule.TRACK_CHANGED, drift)
    return None


def publication_problem(result: dict[str, Any], *, allow_unofficial: bool) -> Unpublishable | None:
    """The first publication rule a valid result breaks, or None. `verify` holds a signed result to the
    same two halves, with its checks of the statement between them."""
    return recorded_problem(result, allow_unofficial=allow_unofficial) or drift_problem(result)


# --- the statement ----------------------------------------------------------------------------


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


# --- publishing -------------------------------------------------------------------------------


def _refusal(result: dict[str, Any], problem: Unpublishable) -> str:
    """Why `publish` refuses, in its words."""
    match problem.rule:
        case Rule.STATUS:
            return (
                f"status is {result['status']}, the evaluator's or the sandbox's failure, not a verdict on the "
                "submission; run it again with the same seed (--drawn-seed)"
            )
        case Rule.SMOKE:
            return "it is a smoke run (--smoke): a check of the contract, not a score"
        case Rule.UNOFFICIAL:
            reasons = "; ".join(result["unofficial_reasons"]) or "no reason recorded"
            return f"it is unofficial ({reasons}); pass --unofficial to publish it marked as unofficial"
        case Rule.SUBMISSION_CHANGED:
            return (
                f"submission folder {submission_folder(result)} changed since the run (tree hash now "
                f"{problem.detail[:12]}..., the run had {result['submission']['tree_sha256'][:12]}...); rerun it"
            )
        case Rule.TRACK_CHANGED:
            return f"{problem.detail}; rerun it"


def publish(
    run_dir: Path, private_key: Ed25519PrivateKey, results_dir: Path, allow_unofficial: bool
) -> tuple[Path, bool, list[str]]:
    """Sign one run's result into `results_dir`. Returns (path, newly written, warnings)."""
    run_dir = Path(run_dir)
    result = read_run_result(run_dir)
    problem = publication_problem(result, allow_unofficial=allow_unofficial)
    if problem:
        raise UserError(f"refusing to publish run {result['run_id']}: {_refusal(result, problem)}")
    warnings = []
    folder = submission_folder(result)
    if not folder.is_dir():
        warnings.append(f"submission folder {folder} is not here, so its tree hash was not re-checked")
    metrics_path = run_dir / METRICS_FILE
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


@dataclass(frozen=True)
class VerifiedResult:
    path: Path
    result: dict[str, Any]
    loss_curve: dict[str, Any]
    signer: str


def _check_loss_curve(curve: Any) -> None:
    if not isinstance(curve, dict) or curve.get("metric") != LOSS_METRIC:
        raise VerificationError("predicate.loss_curve is missing or not a loss curve")
    columns: list[Any] = [curve.get(name) for name in ("time_s", "step", "value")]
    if not all(isinstance(column, list) for column in columns) or len({len(c) for c in columns}) != 1:
        raise VerificationError("predicate.loss_curve needs time_s, step and value lists of one length")
    if len(columns[0]) > LOSS_CURVE_MAX_POINTS:
        raise VerificationError(f"predicate.loss_curve has more than {LOSS_CURVE_MAX_POINTS} points")
    time_s, step, value = columns
    numbers_ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in time_s + value)
    if not numbers_ok or not all(isinstance(s, int) and not isinstance(s, bool) for s in step):
        raise VerificationError("predicate.loss_curve holds something other than numbers")


def _raise_if_unpublishable(result: dict[str, Any], problem: Unpublishable | None) -> None:
    """A broken publication rule, in `verify`'s words."""
    if problem is None:
        return
    match problem.rule:
        case Rule.STATUS:
            raise VerificationError(f"the signed result has status {result['status']}, which is never published")
        case Rule.SMOKE:
            raise VerificationError("the signed result is a smoke run, scored on a few documents only")
        case Rule.UNOFFICIAL:  # verify accepts unofficial results: the statement says what they are
            raise AssertionError("verify never asks for an official result")
        case Rule.SUBMISSION_CHANGED:
            raise VerificationError(
                f"submission folder {submission_folder(result)} no longer matches the signed tree hash "
                f"(now {problem.detail[:12]}..., signed {result['submission']['tree_sha256'][:12]}...)"
            )
        case Rule.TRACK_CHANGED:
            raise VerificationError(problem.detail)


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
    problems = result_problems(result)
    if problems:
        raise VerificationError(f"payload is not a valid result: {_in_one_line(problems)}")
    _raise_if_unpublishable(result, recorded_problem(result, allow_unofficial=True))
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
    # Authenticate before interpreting: nothing in an unsigned payload is parsed further.
    payload, signer = authenticate_envelope(envelope, trusted)
    try:
        statement = strict_json_loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise VerificationError(f"signed payload is not valid JSON: {exc}") from None
    # The publication rule in two halves: what the signed record says goes with the statement's shape,
    # and this machine's files are hashed only for a statement that holds together.
    result, loss_curve = _check_statement(statement)
    _raise_if_unpublishable(result, drift_problem(result))
    return VerifiedResult(Path(path), result, loss_curve, signer)


def envelope_paths(results_dir: Path) -> list[Path]:
    """The published layout `<track>/<submission>/<run-id>.json`; run directories are not envelopes."""
    results_dir = Path(results_dir)
    return sorted(p for p in results_dir.glob("*/*/*.json") if p.relative_to(results_dir).parts[0] != RUNS_DIR.name)


def json_files_under(folder: Path) -> list[Path]:
    """Every `*.json` below `folder`, except in a `runs/` folder directly under it (the runs' unsigned results)."""
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
    """The run's score in a few words: its val_loss, and on a time-to-target track whether and when it
    got there; a failed run's status."""
    if result["metrics"] is None:
        return f"{result['status']}, no score"
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
    publish_parser = subparsers.add_parser(
        "publish",
        help="sign a run's result into results/",
        description=(
            "Sign RUN_DIR/result.json as an in-toto Statement inside a DSSE envelope (Ed25519) and write it to "
            "RESULTS/<track>/<submission>/<run-id>.json. Only scored runs are published (ok, or not_reached on "
            "a time-to-target track); unofficial runs only with --unofficial; "
            "a run whose submission folder or track file changed since it ran is refused."
        ),
    )
    publish_parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. results/runs/<run-id>")
    publish_parser.add_argument("--key", required=True, metavar="PRIVATE_KEY", help="Ed25519 private key (from keygen)")
    publish_parser.add_argument(
        "--results",
        default=str(RESULTS_DIR),
        metavar="DIR",
        help="where envelopes go (default: results/ in the current folder)",
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
