"""bench/gpu.sh's bookkeeping: the loop rate of a training run, and the markdown tables of every result.

    python bench/gpu_report.py loop RUN_DIR --label "workers 8" --batch 48 --skip 10 --json results.jsonl \\
        [--step finetune] [--precision bf16] [--compile default]
    python bench/gpu_report.py tables results.jsonl > tables.md

`loop` reads a run's metrics.jsonl (records every `log_every` steps carry the samples/s since the epoch began) and
derives the rate between the first record at or after step `--skip` and the last one, so start-up, worker
spawn and shuffle-buffer filling stay out of it. `tables` renders the JSON-lines results of
bench/model.py, bench/numerics.py and `loop` as the tables of BENCHMARKS.md's GPU section.
"""

import argparse
import json
import sys
from pathlib import Path


def loop_rate(run: Path, batch: int, skip: int) -> dict:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in records if r["kind"] == "train"]
    compile_s = next((r["seconds"] for r in records if r["kind"] == "compile"), None)  # not in the rates
    if not rows:
        raise SystemExit(f"{run / 'metrics.jsonl'}: no train records")
    first = next((r for r in rows if r["step"] >= skip and r is not rows[-1]), rows[0])
    last = rows[-1]

    def clock(r):  # seconds since the epoch began, from the cumulative rate
        return r["step"] * batch / r["samples_per_s"]

    rate = (last["step"] - first["step"]) * batch / max(clock(last) - clock(first), 1e-9) \
        if last is not first else last["samples_per_s"]
    return {"steps": last["step"], "from_step": first["step"], "samples_s": rate,
            "samples_s_whole": last["samples_per_s"], "loss": last.get("loss"), "nonfinite": last.get("nonfinite"),
            "compile_s": compile_s}


PRECISION = {"auto": "bf16 autocast", "bf16": "bf16 weights", "fp16": "fp16 autocast", "fp32": "fp32"}


def setup(r: dict) -> str:
    """`precision, compile` in words: what the trainer's pretrain.precision / pretrain.compile were."""
    compiled = "" if r.get("compile", "eager") == "eager" else f", compile {r['compile']}"
    return PRECISION.get(r["precision"], r["precision"]) + compiled


def md_tables(records: list[dict]) -> str:
    out = []
    model = [r for r in records if r["section"] == "model"]
    if model:
        out += [f"torch {model[0]['torch']}, device {model[0]['device']}, MFU against "
                f"{model[0].get('peak_tflops') or '?'} TFLOP/s dense bf16", "",
                "| card | step | batch | precision, compile | samples/s | TFLOP/s | MFU % | peak memory GiB |",
                "|---|---|--:|---|--:|--:|--:|--:|"]
        for r in model:
            if r.get("status", "ok") != "ok":
                out.append(f"| {r['device']} | {r['step']} | {r['batch']} | {setup(r)} | {r['status']} | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f}" if r.get("mfu") is not None else "-"
            mem = f"{r['peak_mem_gib']:.1f}" if r.get("peak_mem_gib") is not None else "-"
            extra = f" (compile + warm-up {r['warmup_s']:.0f} s)" if r.get("compile", "eager") != "eager" else ""
            out.append(f"| {r['device']} | {r['step']} | {r['batch']} | {setup(r)}{extra} | {r['samples_s']:.1f} | "
                       f"{r['tflops']:.1f} | {mfu} | {mem} |")
    for r in records:
        if r["section"] == "max_batch":
            rates = ", ".join(f"{b}: {v:.0f}" for b, v in sorted(r.get("rates", {}).items(), key=lambda kv: int(kv[0])))
            what = f"{PRECISION.get(r.get('precision', 'auto'))} {r.get('step', 'pretrain')}"
            oom = r["first_oom"] or "none up to the search limit"
            out += ["", f"largest {what} batch that fits ({r['device']}, eager): {r['max_batch']} (first out of "
                        f"memory: {oom}); fastest: {r.get('best_batch', '?')} (samples/s by batch: {rates})"]
    loops = [r for r in records if r["section"] == "loop"]
    if loops:
        rate = {(r["step"], r["batch"], r["precision"], r.get("compile", "eager")): r["samples_s"] for r in model
                if r.get("status", "ok") == "ok"}
        out += ["", "| card | run | batch | precision, compile | loader | samples/s | model-only samples/s | "
                    "loop / model |", "|---|---|--:|---|---|--:|--:|--:|"]
        for r in loops:
            ref = rate.get((r.get("step", "pretrain"), r["batch"], r["precision"], r.get("compile", "eager")))
            ratio = f"{100 * r['samples_s'] / ref:.0f}%" if ref else "-"
            out.append(f"| {r['device']} | end-to-end {r.get('step', 'pretrain')} | {r['batch']} | {setup(r)} | "
                       f"{r['label']} | {r['samples_s']:.1f} | {f'{ref:.1f}' if ref else '-'} | {ratio} |")
    for r in records:
        other = PRECISION.get(r.get("precision", "auto"))
        if r["section"] == "numerics_grads":
            worst = min(r["groups"].items(), key=lambda kv: kv[1]["cos"])
            terms = ", ".join(f"{k} {v:.1e}" for k, v in r["rel_diff"].items())
            out += ["", f"numerics ({other} vs fp32, batch {r['batch']}, same weights/batch/masks): relative "
                        f"difference of the loss terms: {terms}; contrastive loss computed in "
                        f"{r['other']['loss_c_dtype']}; gradient cosine per parameter group: lowest "
                        f"{worst[1]['cos']:.5f} ({worst[0]}), median "
                        f"{sorted(g['cos'] for g in r['groups'].values())[len(r['groups']) // 2]:.5f}"]
        if r["section"] == "numerics_curve":
            out += ["", f"tiny model, {r['steps']} steps, batch {r['batch']}: loss fp32 {r['fp32'][0]:.4f} -> "
                        f"{r['fp32'][-1]:.4f}, {other} {r['other'][0]:.4f} -> {r['other'][-1]:.4f}; largest "
                        f"relative gap per step {r['max_step_gap']:.2e}, of {r['every']}-step means "
                        f"{r['max_mean_gap']:.2e}"]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("loop")
    p.add_argument("run")
    p.add_argument("--label", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--step", default="pretrain", choices=("pretrain", "finetune"))
    p.add_argument("--precision", default="auto", help="the run's precision setting")
    p.add_argument("--compile", default="eager", help="the run's compile setting")
    p.add_argument("--device", default="")
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--json", required=True)
    p = sub.add_parser("tables")
    p.add_argument("json")
    args = ap.parse_args()
    if args.command == "loop":
        cpu_fp32 = args.device == "cpu" and args.precision == "auto"  # precision auto: fp32 on a CPU
        r = {"section": "loop", "label": args.label, "step": args.step, "batch": args.batch,
             "precision": "fp32" if cpu_fp32 else args.precision, "compile": args.compile, "device": args.device,
             **loop_rate(Path(args.run), args.batch, args.skip)}
        print(f"{args.label}: {r['samples_s']:.1f} samples/s over steps {r['from_step']}-{r['steps']} "
              f"(whole epoch {r['samples_s_whole']:.1f}), last loss {r['loss']}, non-finite steps {r['nonfinite']}")
        with open(args.json, "a") as f:
            f.write(json.dumps(r) + "\n")
    else:
        path = Path(args.json)
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.exists() else []
        sys.stdout.write(md_tables(records))


if __name__ == "__main__":
    main()
