#!/usr/bin/env bash
# Issue #13's time targets on a GPU: `looptune profile` of the LoopCoder-V2 7B shape over
# R = 1..4 x (plt, sequential) at batch 1, set-up included (target: 5 minutes on an H200), then
# optionally `looptune pareto` on it (PARETO=1; target: 15 minutes, longer than one device call
# of 10 minutes, so run it on its own). A separate call from gpu_check.sh, which it would push
# past 10 minutes.
#
#     OUT=/some/folder bash benchmarks/gpu_profile.sh       # default OUT: ./gpu_profile_out
#
# It writes a random bf16 checkpoint of the preset (15.2 GB at 7B) under $CKPT (default
# /tmp/looptune-7b; kept and reused by a rerun), then times each command as a user runs it. On a
# machine without a GPU it runs the tiny preset, to check the script end to end. Files under
# $OUT: gpu_profile.log (each stage's wall time), profile.json (`profile --json`), profile.txt
# (its table), and with PARETO=1 pareto.json, pareto.yaml.
set -u
OUT=${OUT:-$PWD/gpu_profile_out}
source "$(dirname "$0")/stages.sh"
if has_cuda; then
    PRESET=${PRESET:-loopcoder-v2-7b} DEVICE=cuda HOW=${HOW:---graphs} LENGTHS=""
else  # the tiny preset holds 512 positions
    PRESET=${PRESET:-tiny} DEVICE=cpu HOW=${HOW:-} LENGTHS="--prompt-len 128 --gen-len 32"
fi
CKPT=${CKPT:-/tmp/looptune-${PRESET}}
LT="$PY -m looptune"
log "gpu_profile: preset $PRESET on $DEVICE ${HOW:-eager}, checkpoint $CKPT"
install_wheels

if [ ! -f "$CKPT/config.json" ]; then
    stage "init" 240 $LT init "$CKPT" --preset "$PRESET" --device "$DEVICE" --json \
        >"$OUT/init.json" || exit 1
fi
# The target's command: every candidate measured afresh, with what loading and capture cost.
stage "profile" 420 $LT profile "$CKPT" --loops 1,2,3,4 --mode plt,sequential --batch 1 \
    --device "$DEVICE" $HOW $LENGTHS --fresh --json >"$OUT/profile.json" 2>"$OUT/profile.txt"
tail -30 "$OUT/profile.txt" | tee -a "$LOG"

if [ "${PARETO:-0}" = 1 ]; then
    stage "pareto" 900 $LT pareto "$CKPT" --budget-ms "${BUDGET_MS:-12}" --device "$DEVICE" \
        $LENGTHS --out "$OUT/pareto.yaml" --json >"$OUT/pareto.json" 2>"$OUT/pareto.txt"
    tail -30 "$OUT/pareto.txt" | tee -a "$LOG"
fi
log "gpu_profile: done"
