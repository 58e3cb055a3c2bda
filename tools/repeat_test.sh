#!/usr/bin/env bash
# Runs one test N times in a row and counts its failures: how a flaky test is shown fixed.
#
#   tools/repeat_test.sh 20 tests/test_faults.py::test_wandb_dying_mid_run_does_not_stop_training
#
# Each run is a fresh pytest process (the flakiness this hunts lives in process exit). Prints one line per
# run and the total; exit status 1 if any run failed. Logs of failed runs stay under ${LOGDIR:-/tmp/repeat_test}.
set -euo pipefail
if [[ $# -ne 2 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: tools/repeat_test.sh N TEST_ID" >&2
  exit 2
fi
count=$1 test_id=$2 failed=0
logdir=${LOGDIR:-/tmp/repeat_test}
mkdir -p "$logdir"
cd "$(dirname "$0")/.." || exit 2
for ((i = 1; i <= count; i++)); do
  start=$SECONDS
  if python3 -m pytest -q -p no:cacheprovider "$test_id" >"$logdir/run$i.log" 2>&1; then
    echo "run $i: passed in $((SECONDS - start)) s"
    rm -f "$logdir/run$i.log"
  else
    failed=$((failed + 1))
    echo "run $i: FAILED in $((SECONDS - start)) s (log: $logdir/run$i.log)"
  fi
done
echo "$failed of $count runs failed"
[[ $failed -eq 0 ]]
