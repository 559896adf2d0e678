"""The step loop shared by pretraining and finetuning: precision, accumulation, DDP, logging, checkpoints, resume.

An epoch is `steps_per_epoch` optimizer steps on every rank (each of `accum_steps` micro-batches), never "until the
data runs out", so ranks stay in lock-step whatever their shards hold. The data of every step is a function of
(seed, epoch, step) (`train.epochs`) and so is the model's own randomness (torch is seeded per micro-batch with
`step_seed`), so `last.pt` needs only the position (epoch, step, micro-batches done in the epoch) beside the model,
optimizer, scheduler and scaler: `--resume` reloads it and the loader starts reading at the next micro-batch, with
nothing replayed, and the run ends bit-identical to one never interrupted (on the CPU; on a GPU up to the
nondeterminism of its kernels), on the same or another number of GPUs. `last.pt` also records what fixes the order
(`order`: seed, global batch, epoch length, sample count); resuming with any of them changed is refused.
`stop_after` (`--stop-after-steps`) stops cleanly after that many optimizer steps, `last.pt` written.

The step body never waits for the device: the metrics are summed as device tensors and read (one sync) only when a
record is logged, and a non-finite loss is handled on the device too. Every optimizer step goes through a GradScaler
(fp16: the official dynamic loss scale; otherwise a fixed scale of 1, reset each step), which skips a step whose
gradients are not finite without asking the host (the fused CUDA optimizer takes the flag on the device). Such steps
are counted (`nonfinite` in metrics.jsonl: optimizer steps with a non-finite loss) and the run stops with a one-line
error once `NONFINITE_PATIENCE` of them came in a row; that is checked whenever a record is logged and at epoch ends.

Precision (`train.precision`: bf16 autocast, or bf16 working weights with fp32 masters) and `compile` are applied
here to the bare model (`training_model`). A compiled model compiles in the first forward + backward of each
process: that time is printed, written once as a `compile` record (one device sync) and left out of samples/s.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from cavmae.shards.errors import NoSamples
from cavmae.shards.store import open_append, publish_file
from cavmae.train import distributed as dist
from cavmae.train.checkpoint import CheckpointError, check_shapes, read_checkpoint
from cavmae.train.augment import device_augment
from cavmae.train.epochs import step_seed
from cavmae.train.precision import WorkingWeights, step_autocast
from cavmae.train.stage import UsageError

LAST = "last.pt"
NONFINITE_PATIENCE = 10  # consecutive optimizer steps with a non-finite loss before the run stops


class MetricsLog:
    """Rank 0 appends one JSON object per record to `metrics.jsonl` (the complete record, easy to parse) and writes
    the numeric values as TensorBoard scalars (`{kind}/{name}`) to an events file in the same folder, so
    `tensorboard --logdir runs/` shows every run."""

    def __init__(self, out: Path):
        self.path = out / "metrics.jsonl"
        self.tb = None
        if dist.is_main():
            from torch.utils.tensorboard import SummaryWriter  # imported late: it pulls in tensorboard/protobuf

            self.tb = SummaryWriter(str(out))

    def write(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not dist.is_main():
            return
        with open_append(self.path) as f:  # (never through a link left under the name)
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        if self.tb is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"{kind}/{name}", value, step)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save (a new file beside, then renamed over `path`: `shards.store.publish_file`), rank 0 only."""
    if not dist.is_main():
        return
    with publish_file(path) as up:
        torch.save(state, up.file)


def training_model(model: torch.nn.Module, precision: str, compile: str
                   ) -> tuple[torch.nn.Module, WorkingWeights | None]:
    """The model a training step calls, and its working weights (precision 'bf16', else None).

    bf16 working weights replace the parameters before DDP sees them (DDP then reduces bf16 gradients); torch.compile
    wraps DDP last, as torch recommends (its DDPOptimizer splits the graph at the gradient buckets). The wrappers
    leave the state dict's keys alone: `dist.unwrap` reaches the bare model through them."""
    working = WorkingWeights(model) if precision == "bf16" else None
    if dist.world_size() > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    if compile == "aot_eager":
        model = torch.compile(model, backend="aot_eager")
    elif compile != "eager":
        model = torch.compile(model, mode=None if compile == "default" else compile)
    return model, working


def synchronized(device: torch.device) -> float:
    """time.time() once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


def train(*, model: torch.nn.Module, step_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
          optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          loader: Callable[[int, int, int], Iterable[dict]], epochs: int, steps_per_epoch: int, accum_steps: int,
          device: torch.device, precision: str, out: Path, resume: bool, log_every: int, save_every: int,
          seed: int, order: dict[str, int], stop_after: int | None = None, compile: str = "eager",
          end_epoch: Callable[[int], dict[str, Any]] | None = None, extra_state: dict[str, Any] | None = None) -> dict:
    """Run (or resume) training to `epochs`, or for `stop_after` optimizer steps, and return the final counters
    (`stopped` says whether it stopped early).

    `model` is the bare model on `device`, `optimizer` built over its parameters; here it gets bf16 working weights
    (precision 'bf16'), the DDP wrapper (several processes) and torch.compile (`compile`: eager | default |
    max-autotune | aot_eager), in that order (`training_model`). step_fn(model, batch) -> (loss, metrics) runs the
    forward pass of the wrapped model; loader(epoch, first_batch, num_batches) gives this rank's batches of `epoch`
    starting at micro-batch `first_batch`; end_epoch(epoch) (1-based) may evaluate and save per-epoch weights (with
    the bare model: its state dict holds the fp32 weights under any precision), and its result is logged. `order` is
    what fixes the data order besides the epoch.
    """
    model, working = training_model(model, precision, compile)
    dynamic = device.type == "cuda" and precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if dynamic else 1.0)
    log = MetricsLog(out)
    step, epoch, done = 0, 0, 0  # optimizer steps so far; current 0-based epoch; micro-batches done in it
    if resume and (out / LAST).exists():
        state = read_checkpoint(out / LAST, need=("model", "optimizer", "scheduler", "scaler", "step", "epoch",
                                                  "batches_done"))
        check_shapes(dist.unwrap(model), state["model"], str(out / LAST))
        try:
            dist.unwrap(model).load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state["scaler"]:  # empty when saved by a run whose scaler was disabled
                scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # another model, optimizer or schedule
            raise CheckpointError(f"{out / LAST}: does not fit this run (another model or settings?): "
                                  f"{' '.join(str(exc).split())[:300]}") from None
        step, epoch, done = state["step"], state["epoch"], state["batches_done"]
        if state.get("order", order) != order:
            raise UsageError(f"{out / LAST} was written with {state['order']}, this run has {order}: resuming would "
                             f"not continue the same epochs")
        if dist.is_main():
            print(f"resumed from {out / LAST}: step {step}, epoch {epoch + 1}, batch {done}")

    def checkpoint(epoch: int, done: int) -> None:
        save_state(out / LAST, {"model": dist.unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "step": step,
                                "epoch": epoch, "batches_done": done, "order": order, **(extra_state or {})})

    per_epoch = steps_per_epoch * accum_steps
    skipped, mixups = 0, Counter()  # samples skipped; mixups by kind (waveform | fbank), since this (re)start
    # on the device: optimizer steps with a non-finite loss, the current and the longest run of them in a row
    nonfinite, streak, longest = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))
    bad = torch.zeros((), dtype=torch.bool, device=device)  # a non-finite loss among this step's micro-batches

    def check_nonfinite(bar: tqdm) -> None:
        worst = int(dist.all_reduce_max(longest))  # every rank stops together
        if worst >= NONFINITE_PATIENCE:
            bar.close()  # the error gets a line of its own
            raise FloatingPointError(f"the loss was not finite for {worst} optimizer steps in a row "
                                     f"(by step {step}, epoch {epoch + 1}); {int(nonfinite)} steps skipped in all")
    start, stop = step, False
    learned = False  # a micro-batch of this optimizer step ran forward and backward
    compiling = compile != "eager"  # the first forward + backward of this process compiles: timed on its own
    while epoch < epochs and not stop:
        model.train()
        batches = loader(epoch, done, per_epoch - done)
        bar = tqdm(total=steps_per_epoch, initial=done // accum_steps, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not dist.is_main(), dynamic_ncols=True, leave=False)
        t0, seen, count, sums = time.time(), 0, 0, {}
        for batch in batches:
            micro = done % accum_steps
            sync = micro == accum_steps - 1
            empty = batch.get("empty", False)  # every sample skipped (`Transform.filler`): nothing to learn from
            done += 1
            skipped += batch["skipped"]
            if not empty or dist.world_size() > 1:  # DDP: every rank takes part in each all-reduce (a loss of 0)
                ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
                inputs = device_augment(batch, device)  # SpecAugment, normalisation, noise, roll: batched, on device
                torch.manual_seed(step_seed(seed, step, dist.rank(), micro))  # masking / dropout: a function of it
                tc = time.time()
                with ctx, step_autocast(device, precision):
                    loss, metrics = step_fn(model, inputs)
                loss = loss * 0 if empty else loss
                bad |= ~torch.isfinite(loss.detach())
                with ctx:
                    scaler.scale(loss / accum_steps).backward()
                learned = True
            if not empty:
                count += 1
                seen += batch["audio"].shape[0]
                mixups.update(batch.get("mixup", {}))
                for name, value in metrics.items():  # device tensors: read only when a record is logged
                    sums[name] = sums.get(name, 0.0) + (value.detach() if torch.is_tensor(value) else value)
            if compiling and learned:  # the compilation is reported once and left out of the rate
                compiling = False
                compile_s = synchronized(device) - tc
                if dist.is_main():
                    print(f"torch.compile ({compile}): the first forward + backward took {compile_s:.1f} s")
                log.write("compile", step, {"mode": compile, "seconds": compile_s})
                t0 += compile_s
            if not sync:
                continue
            if learned:  # (not when every micro-batch of the step was skipped on this one process)
                if working is not None:
                    working.grads_to_masters()
                scaler.step(optimizer)  # skipped, on the device, when a gradient is not finite
                scaler.update(None if dynamic else 1.0)
                optimizer.zero_grad(set_to_none=True)
                if working is not None:
                    working.refresh()
            learned = False
            with warnings.catch_warnings():  # the schedule counts steps, also one whose every sample was skipped
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                scheduler.step()
            nonfinite += bad
            streak.copy_((streak + 1) * bad)
            torch.maximum(longest, streak, out=longest)
            bad.zero_()
            step += 1
            bar.update(1)
            stop = stop_after is not None and step - start >= stop_after
            if step % log_every == 0 or done == per_epoch or stop:  # an epoch's last step too: a short run logs
                means = {k: float(v) / count for k, v in sums.items()}  # the one device sync per record
                rate = seen * dist.world_size() / max(time.time() - t0, 1e-9)
                if "loss" in means:
                    bar.set_postfix(loss=f"{means['loss']:.4f}", samples_s=f"{rate:.1f}")
                log.write("train", step, {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"],
                                          "samples_per_s": rate, "skipped": skipped, "nonfinite": int(nonfinite),
                                          **{f"mixup_{k}": v for k, v in mixups.items()}, **means})
                check_nonfinite(bar)
            if stop and done < per_epoch:
                break
            if save_every and step % save_every == 0 and done < per_epoch:
                checkpoint(epoch, done)
        bar.close()
        check_nonfinite(bar)
        if not int(dist.all_reduce_max(torch.tensor(count, device=device))):  # skipped, every sample of every rank
            raise NoSamples(f"epoch {epoch + 1}: no decodable sample in {done} batches ({skipped} samples skipped); "
                            f"see the log")
        if stop and done < per_epoch:
            checkpoint(epoch, done)
            if dist.is_main():
                print(f"stopped after {step - start} steps at step {step}: run again with --resume to continue")
            break
        if done != per_epoch:
            raise RuntimeError(f"epoch {epoch + 1}: the data stream ended after {done} of {per_epoch} batches")
        epoch, done = epoch + 1, 0
        results = end_epoch(epoch) if end_epoch is not None else {}
        log.write("epoch", step, {"epoch": epoch, "skipped": skipped, "nonfinite": int(nonfinite), **results})
        checkpoint(epoch, 0)
        dist.barrier()
    log.close()
    return {"step": step, "epoch": epoch, "skipped": skipped, "stopped": stop and epoch < epochs}
