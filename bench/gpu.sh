#!/usr/bin/env bash
# The trainer on a GPU (issues 11, 22), every measurement in one script with a time budget:
#
#   OUT=/some/folder bash bench/gpu.sh            # on the card: full-size base model, official geometry
#   OUT=/tmp/gpu-out bash bench/gpu.sh --tiny     # on a CPU: the tiny model, every section, a few minutes
#   bash bench/gpu.sh model e2e                   # only these sections (names below), e.g. for a rerun
#
# Three setups of the trainer (pretrain./finetune.precision and .compile): eager (bf16 autocast), compiled (bf16
# autocast, compile default) and compiled + bf16 weights (precision bf16: bf16 working weights, fp32 masters), for
# the pretraining and the finetuning step, at batch 48 and at the best batch (the fastest of those that fit, found
# by the maxbatch section), model-only (bench/model.py) and end to end (`cavmae-train`).
# Sections, in order (most wanted first, as the budget may end the run): preflight, model (eager: autocast and bf16
# weights, batches 48 and 256), sync (the CAV-MAE Sync pretraining step, `--preset sync`: 416-row segments, cls and
# 8 register tokens; eager bf16 weights, batches 48 and 256), maxbatch (pretrain and finetune, bf16 weights: the largest and the fastest batch),
# fast (compiled + bf16 weights at the best batch and 48), numerics beside shards (GPU and CPU work, none of it
# timed), e2e (eager at 48 with several loader worker counts; compiled + bf16 weights at 48 and the best batch;
# finetuning), compile (compiled autocast), ddp (torchrun, 1 process, compiled + bf16 weights), profile (compiled
# + bf16 weights at the best batch). Each runs under its own timeout, cut further so the whole stays within
# GPU_BUDGET_S (default 570 s); every result is appended to $OUT/results.jsonl the moment it exists, so a hang or
# OOM in one section loses nothing else. $OUT also gets log.txt (everything printed), profile.txt and tables.md
# (the markdown tables for BENCHMARKS.md, printed at the end too). --tiny compiles with the aot_eager backend
# (inductor builds on a CPU but takes minutes). Wheels in .whl/ (webdataset, braceexpand, tqdm) are installed into
# $SITE first for a machine without them; PYTHON picks the interpreter (default python3).
set -u -o pipefail
cd "$(dirname "$0")/.."
TINY=0
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; shift; fi
ONLY=" $* "
OUT=${OUT:-/tmp/gpu-out}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
SCALE=$(( TINY ? 3 : 1 ))  # --tiny runs on a (possibly busy) CPU: three times the timeouts and budget
BUDGET=${GPU_BUDGET_S:-$(( 570 * SCALE ))}
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
        SYNC=(--set model.audio_length=64)
        GEOM=(--set video.image_size=64 --set video.num_frames=4 "${MODEL[@]}")
        BATCHES=(2 4); STEPS=(--steps 1 --warmup 1); NUM_B=2; CURVE=(--steps 4 --every 2 --curve-batch 2)
        SAMPLES=48; PER_SHARD=12; E2E_STEPS=6; E2E_SKIP=2; LOG=2; WORKERS=(1 2); COMPILE=aot_eager
    else
        MODEL=(); GEOM=(); SYNC=()
        BATCHES=(48 256); STEPS=(--steps 6 --warmup 2); NUM_B=8; CURVE=(--steps 300 --every 25)
        SAMPLES=768; PER_SHARD=96; E2E_STEPS=35; E2E_SKIP=10; LOG=5; WORKERS=(8 4 12); COMPILE=default
    fi
    B48=${BATCHES[0]}  # "batch 48" (the paper's) in the tiny run: its smallest batch
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
from cavmae import shards, train
import webdataset, braceexpand
for pkg in (train, shards):
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "__main__":
            importlib.import_module(f"{pkg.__name__}.{m.name}")
print("train/ and shards/ import without av, ray, torchaudio; webdataset", webdataset.__file__)
EOF

    wanted model && section model 100 "$PY" bench/model.py "${MODEL[@]}" --batch "${BATCHES[@]}" \
        --precision auto bf16 --finetune "$B48" "${STEPS[@]}" --json "$R"
    wanted sync && section sync 60 "$PY" bench/model.py "${MODEL[@]}" --set model.variant=sync "${SYNC[@]}" \
        --set model.num_register_tokens=8 --batch "${BATCHES[@]}" --precision bf16 "${STEPS[@]}" --json "$R"
    if wanted maxbatch; then
        section "maxbatch pretrain" 60 "$PY" bench/model.py "${MODEL[@]}" --max-batch pretrain --precision bf16 \
            --json "$R"
        section "maxbatch finetune" 50 "$PY" bench/model.py "${MODEL[@]}" --max-batch finetune --precision bf16 \
            --json "$R"
    fi
    best() {  # the fastest batch the maxbatch section found for step $1 (else $2)
        "$PY" -c 'import json, sys
found = [r["best_batch"] for r in map(json.loads, open(sys.argv[1])) if r["section"] == "max_batch"
         and r.get("step", "pretrain") == sys.argv[2] and r.get("best_batch")]
print(found[-1] if found else sys.argv[3])' "$R" "$1" "$2" 2>/dev/null || echo "$2"
    }
    local bp bf
    bp=$(best pretrain "${BATCHES[-1]}"); bf=$(best finetune "$B48")
    stamp "best batch: pretraining $bp, finetuning $bf"
    wanted fast && section "fast: compiled + bf16 weights" 200 "$PY" bench/model.py "${MODEL[@]}" \
        --batch "$bp" "$B48" --precision bf16 --compile "$COMPILE" --finetune "$bf" "$B48" "${STEPS[@]}" --json "$R"

    # numerics (GPU, untimed) runs beside the shard writing (CPU processes): neither is a timing
    if wanted numerics; then
        { section "numerics grads" 45 "$PY" bench/numerics.py grads "${MODEL[@]}" --batch "$NUM_B" \
              --precision auto bf16 --json "$R"
          section "numerics curve" 90 "$PY" bench/numerics.py curve "${CURVE[@]}" --precision auto bf16 \
              --json "$R"; } &
    fi
    if wanted shards || wanted e2e || wanted ddp; then
        [[ -f $SHARDS/manifest.parquet ]] || section shards 60 "$PY" bench/shardset.py "$SHARDS" \
            --samples "$SAMPLES" --per-shard "$PER_SHARD" --workers 12 "${GEOM[@]}"
    fi
    wait  # the numerics, before anything is timed again
    local device
    device=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")')
    # e2e STEP BATCH PRECISION COMPILE WORKERS LIMIT_S: one `cavmae-train STEP` epoch of E2E_STEPS steps, its rate
    e2e() {
        local step=$1 b=$2 precision=$3 compile=$4 w=$5 limit=$6
        local extra=(); [[ $step == finetune ]] && extra=(--set finetune.num_classes=527 --set finetune.wa=false)
        rm -rf "$WORK/run"
        section "e2e $step batch $b $precision $compile workers=$w" "$limit" "$PY" -m cavmae.train "$step" \
            --shards "$SHARDS" "${GEOM[@]}" "${extra[@]}" --out "$WORK/run" --set "data.num_workers=$w" \
            --set "$step.batch_size=$b" --set "$step.epochs=1" --set "$step.epoch_samples=$(( b * E2E_STEPS ))" \
            --set "$step.log_every=$LOG" --set "$step.precision=$precision" --set "$step.compile=$compile" \
            && [[ -f $WORK/run/metrics.jsonl ]] && "$PY" bench/gpu_report.py loop "$WORK/run" --step "$step" \
            --label "workers $w" --batch "$b" --precision "$precision" --compile "$compile" --skip "$E2E_SKIP" \
            --device "$device" --json "$R"
    }
    if wanted e2e; then
        e2e pretrain "$B48" bf16 "$COMPILE" "${WORKERS[0]}" 120
        e2e pretrain "$bp" bf16 "$COMPILE" "${WORKERS[0]}" 150
        for w in "${WORKERS[@]}"; do
            e2e pretrain "$B48" auto eager "$w" 75
        done
        e2e finetune "$B48" bf16 "$COMPILE" "${WORKERS[0]}" 120
    fi
    wanted compile && section "compiled autocast" 200 "$PY" bench/model.py "${MODEL[@]}" --batch "$bp" "$B48" \
        --precision auto --compile "$COMPILE" --finetune "$B48" "${STEPS[@]}" --json "$R"
    if wanted ddp; then
        rm -rf "$WORK/run"
        NCCL_DEBUG=VERSION section "ddp (torchrun, 1 process)" 120 "$PY" -m torch.distributed.run \
            --nproc-per-node 1 -m cavmae.train pretrain --shards "$SHARDS" "${GEOM[@]}" --out "$WORK/run" \
            --set "data.num_workers=${WORKERS[0]}" --set "pretrain.batch_size=$B48" --set pretrain.epochs=1 \
            --set "pretrain.epoch_samples=$(( B48 * (E2E_SKIP + 2 * LOG) ))" --set "pretrain.log_every=$LOG" \
            --set pretrain.precision=bf16 --set "pretrain.compile=$COMPILE" \
            && [[ -f $WORK/run/metrics.jsonl ]] && "$PY" bench/gpu_report.py loop "$WORK/run" \
            --label "DDP torchrun 1 proc, workers ${WORKERS[0]}" --batch "$B48" --precision bf16 \
            --compile "$COMPILE" --skip "$E2E_SKIP" --device "$device" --json "$R"
        rm -rf "$WORK/run"
    fi
    wanted profile && section profile 120 "$PY" bench/model.py "${MODEL[@]}" --batch "$bp" --precision bf16 \
        --compile "$COMPILE" --profile "$OUT/profile.txt"

    stamp "== tables (also in $OUT/tables.md)"
    "$PY" bench/gpu_report.py tables "$R" > "$OUT/tables.md"
    cat "$OUT/tables.md"
    stamp "finished"
}

run 2>&1 | tee "$OUT/log.txt"
