#!/usr/bin/env bash
# Re-run the committed example results and publish them with the demo key (developers' guide: a
# change to a track file, the result schema or a committed submission invalidates them).
#
#   make results    # on a quiet machine: 3 seeds x 3 submissions on cpu-1min, ~15 min
#
# Seeds are drawn (--secret-seeds), as an organiser's official runs are. Every run must be `ok`. They
# are development results (no CPU track has a hidden split: any pool this repository could draw one
# from is public), so they are published with --unofficial, and each must be official but for the
# split: nsjail, the track's budget, nothing overridden (checked below). The old envelopes of these
# submissions are replaced, then the leaderboards are rendered again from what verifies.
set -euo pipefail
cd "$(dirname "$0")/.."
evaluator=.venv/bin/evaluator
key=results/demo-key/demo-not-secret.key
# The run directories stay (results/runs/ is not committed): their model.pt files are what a later
# comparison of scoring code needs.
runs=results/runs/examples-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$runs"

for submission in reference submissions/template submissions/seed-moe; do
  echo "== $submission: 3 seeds on cpu-1min" >&2
  "$evaluator" run "$submission" --track cpu-1min --seeds 3 --secret-seeds --sandbox nsjail --out "$runs" >&2
done
rm -rf results/cpu-1min/reference results/cpu-1min/template results/cpu-1min/seed-moe
for run_dir in "$runs"/*/; do
  .venv/bin/python - "$run_dir/result.json" <<'CHECK'
import json, sys
result = json.load(open(sys.argv[1]))
reasons = result["unofficial_reasons"]
if result["data"]["scored_on"] != "public" or len(reasons) != 1:
    sys.exit(f"{sys.argv[1]}: an example result must be official but for the public split: {reasons}")
CHECK
  "$evaluator" publish "$run_dir" --key "$key" --unofficial
done
"$evaluator" verify
"$evaluator" leaderboard --format markdown --out results/LEADERBOARD.md
"$evaluator" leaderboard --format html --out results/leaderboard.html
