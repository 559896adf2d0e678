#!/usr/bin/env bash
# The trainer on a GPU (issue 11), every measurement in one script with a time budget:
#
#   OUT=/some/folder bash bench/gpu.sh            # on the card: full-size base model, official geometry
#   OUT=/tmp/gpu-out bash bench/gpu.sh --tiny     # on a CPU: the tiny model, every section, a couple of minutes
#   bash bench/gpu.sh model e2e                   # only these sections (names below), e.g. for a rerun
#
# Sections, in order: preflight, model, profile, compile (batch 256), numerics beside shards (GPU and CPU work, none
# of it timed), e2e, ddp, maxbatch, compile (batch 48 again). Each runs under its own timeout, cut further so the
# whole stays within GPU_BUDGET_S (default 345 s); every result is appended to
# $OUT/results.jsonl the moment it exists, so a hang or OOM in one section loses nothing else. $OUT also gets
# log.txt (everything printed), profile.txt (top ops of the bf16 batch-256 step) and tables.md (the markdown
# tables for BENCHMARKS.md, printed at the end too). Wheels in .whl/ (webdataset, braceexpand, tqdm) are installed
# into $SITE first for a machine without them; PYTHON picks the interpreter (default python3).
set -u -o pipefail
cd "$(dirname "$0")/.."
TINY=0
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; shift; fi
ONLY=" $* "
OUT=${OUT:-/tmp/gpu-out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
SCALE=$(( TINY ? 3 : 1 ))  # --tiny runs on a (possibly busy) CPU: three times the timeouts and budget
BUDGET=${GPU_BUDGET_S:-$(( 345 * SCALE ))}
WORK=${GPU_WORK:-/tmp/gpu-work}
mkdir -p "$OUT" "$WORK"
R=$OUT/results.jsonl
START=$(date +%s)
export TQDM_MININTERVAL=10 PYTHONUNBUFFERED=1  # the progress bar every 10 s only

stamp() { echo "[$(date -u +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }

wanted() { [[ "$ONLY" == "  " || "$ONLY" == *" $1 "* ]]; }

# section NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, what is left of the budget); never fails the script
section() {
    local name=$1 limit=$(( $2 * SCALE )); shift 2
    local left=$(( START + BUDGET - $(date +%s) ))
    (( limit > left )) && limit=$left
    if (( limit < 10 )); then stamp "== $name: skipped, budget spent"; return 0; fi
    stamp "== $name (timeout ${limit}s): $*"
    timeout -k 10 "$limit" "$@"
    local rc=$?
    if (( rc == 124 || rc == 137 )); then stamp "== $name: TIMED OUT after ${limit}s"
    elif (( rc != 0 )); then stamp "== $name: FAILED (exit $rc)"
    else stamp "== $name: done"; fi
    return 0
}

run() {
    if compgen -G ".whl/*.whl" >/dev/null; then
        stamp "installing carried wheels into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
            || { stamp "pip failed: unpacking the (pure-python) wheels instead"; mkdir -p "$SITE"
                 "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
                     "$SITE" .whl/*.whl; }
        export PYTHONPATH=$SITE:$PWD
    else
        export PYTHONPATH=$PWD
    fi
    if (( TINY )); then
        MODEL=(--set model.size=tiny --set model.target_length=128 --set video.image_size=64)
        GEOM=(--set video.image_size=64 --set video.num_frames=4 "${MODEL[@]}")
        BATCHES=(2 4); FT=2; STEPS=(--steps 1 --warmup 1); PROFILE_B=4; NUM_B=2; CURVE=(--steps 4 --every 2 --curve-batch 2)
        SAMPLES=48; PER_SHARD=12; E2E_B=8; E2E_STEPS=6; E2E_SKIP=2; LOG=2; WORKERS=(1 2)
        COMPILE_B=2; COMPILE_MORE=4
    else
        MODEL=(); GEOM=()
        BATCHES=(48 256); FT=48; STEPS=(--steps 6 --warmup 2); PROFILE_B=256; NUM_B=8; CURVE=(--steps 300 --every 25)
        SAMPLES=768; PER_SHARD=96; E2E_B=48; E2E_STEPS=35; E2E_SKIP=10; LOG=5; WORKERS=(8 4 12)
        COMPILE_B=256; COMPILE_MORE=48
    fi
    SHARDS=$WORK/shards
    stamp "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), out $OUT, budget ${BUDGET}s, tiny=$TINY"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
        --format=csv,noheader
    "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available",
        torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'

    wanted preflight && section preflight 60 "$PY" - <<'EOF'
"""train/ and shards/ import without PyAV, Ray and torchaudio (blocked here), as on the card."""
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("av", "ray", "torchaudio"):
            raise ImportError(f"{name} is blocked (not on the card)")
sys.meta_path.insert(0, Block())
import shards, train, webdataset, braceexpand
for pkg in (train, shards):
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "__main__":
            importlib.import_module(f"{pkg.__name__}.{m.name}")
print("train/ and shards/ import without av, ray, torchaudio; webdataset", webdataset.__file__)
EOF

    wanted model && section model 100 "$PY" bench/model.py "${MODEL[@]}" --batch "${BATCHES[@]}" \
        --precision bf16 fp32 --finetune "$FT" "${STEPS[@]}" --json "$R"
    wanted profile && section profile 50 "$PY" bench/model.py "${MODEL[@]}" --batch "$PROFILE_B" --precision bf16 \
        --profile "$OUT/profile.txt"

    wanted compile && section "compile batch $COMPILE_B" 110 "$PY" bench/model.py "${MODEL[@]}" --batch "$COMPILE_B" \
        --precision bf16 --compile "${STEPS[@]}" --json "$R"

    # numerics (GPU, untimed) runs beside the shard writing (CPU processes): neither is a timing
    if wanted numerics; then
        { section "numerics grads" 45 "$PY" bench/numerics.py grads "${MODEL[@]}" --batch "$NUM_B" --json "$R"
          section "numerics curve" 60 "$PY" bench/numerics.py curve "${CURVE[@]}" --json "$R"; } &
    fi
    if wanted shards || wanted e2e || wanted ddp; then
        [[ -f $SHARDS/manifest.parquet ]] || section shards 60 "$PY" bench/shardset.py "$SHARDS" \
            --samples "$SAMPLES" --per-shard "$PER_SHARD" --workers 12 "${GEOM[@]}"
    fi
    wait  # the numerics, before anything is timed again
    local device
    device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')
    local common=(--shards "$SHARDS" "${GEOM[@]}" --set "pretrain.batch_size=$E2E_B" --set pretrain.epochs=1
                  --set "pretrain.epoch_samples=$(( E2E_B * E2E_STEPS ))" --set "pretrain.log_every=$LOG")
    if wanted e2e; then
        for w in "${WORKERS[@]}"; do
            rm -rf "$WORK/run"
            section "e2e workers=$w" 75 "$PY" -m train pretrain "${common[@]}" --out "$WORK/run" \
                --set "data.num_workers=$w" \
                && [[ -f $WORK/run/metrics.jsonl ]] && "$PY" bench/gpu_report.py loop "$WORK/run" \
                --label "workers $w" --batch "$E2E_B" --skip "$E2E_SKIP" --device "$device" --json "$R"
        done
    fi
    if wanted ddp; then
        rm -rf "$WORK/run"
        NCCL_DEBUG=VERSION section "ddp (torchrun, 1 process)" 75 "$PY" -m torch.distributed.run --nproc-per-node 1 \
            -m train pretrain "${common[@]}" --out "$WORK/run" --set "data.num_workers=${WORKERS[0]}" \
            --set "pretrain.epoch_samples=$(( E2E_B * (E2E_SKIP + 2 * LOG) ))" \
            && [[ -f $WORK/run/metrics.jsonl ]] && "$PY" bench/gpu_report.py loop "$WORK/run" \
            --label "DDP torchrun 1 proc, workers ${WORKERS[0]}" --batch "$E2E_B" --skip "$E2E_SKIP" \
            --device "$device" --json "$R"
        rm -rf "$WORK/run"
    fi
    wanted maxbatch && section maxbatch 60 "$PY" bench/model.py "${MODEL[@]}" --max-batch --json "$R"
    wanted compile && section "compile batch $COMPILE_MORE" 100 "$PY" bench/model.py "${MODEL[@]}" \
        --batch "$COMPILE_MORE" --precision bf16 --compile "${STEPS[@]}" --json "$R"

    stamp "== tables (also in $OUT/tables.md)"
    "$PY" bench/gpu_report.py tables "$R" > "$OUT/tables.md"
    cat "$OUT/tables.md"
    stamp "finished"
}

run 2>&1 | tee "$OUT/log.txt"
