"""`result_problems`, the one validator of a result.json: what the schema says, and what it cannot."""

from __future__ import annotations

import json

import pytest
from publish_support import INCONSISTENT, make_run

from evaluator.results import parse_utc, result_problems


def test_a_result_as_the_run_writes_it_is_valid(tmp_path):
    assert result_problems(json.loads((make_run(tmp_path, "plain") / "result.json").read_text())) == []


@pytest.mark.parametrize("kind, edit, reason", INCONSISTENT.values(), ids=INCONSISTENT.keys())
def test_a_result_whose_fields_disagree_with_its_status_is_refused_by_the_validator_itself(
    tmp_path, kind, edit, reason
):
    # `evaluator batch` accepts a node's result.json on result_problems, and publish and verify refuse
    # what it refuses: a result batch accepts is one publish accepts.
    run_dir = make_run(tmp_path, "odd", track="cpu-target" if kind else "cpu-1min", val_loss=4.08, **kind)
    result = json.loads((run_dir / "result.json").read_text())
    assert result_problems(result) == []
    edit(result)
    problems = result_problems(result)
    assert len(problems) == 1 and problems[0].startswith(reason)


@pytest.mark.parametrize("field", ["started_at", "ended_at"])
def test_a_time_without_its_utc_offset_is_refused_by_the_validator(tmp_path, field):
    result = json.loads((make_run(tmp_path, "local-time") / "result.json").read_text())
    result[field] = "2026-12-01T20:55:34"
    problems = result_problems(result)
    # "is not an RFC 3339 date-time", or jsonschema's own "is not a 'date-time'" where it checks the format.
    assert len(problems) == 1 and problems[0].startswith(f"{field}: '2026-12-01T20:55:34' is not a")


@pytest.mark.parametrize("moment", ["2026-12-01T20:55:34Z", "2026-12-01T20:55:34.25+01:00"])
def test_result_times_are_rfc_3339_on_every_python(moment):
    assert parse_utc(moment).utcoffset() is not None


@pytest.mark.parametrize(
    "moment", ["20261201T205534Z", "2026-W48-2T20:55:34Z", "2026-12-01T20:55:34", "2026-12-01 20:55:34Z"]
)
def test_iso_forms_that_only_some_pythons_read_are_refused(moment):
    # Python 3.11's fromisoformat reads the first two and 3.10's does not: a result must verify alike on both.
    with pytest.raises(ValueError):
        parse_utc(moment)
