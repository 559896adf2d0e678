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

It reads top to bottom as MAE's `main_pretrain.py` / `engine_pretrain.py`: `train` makes a `TrainState` (`new_state`),
`resume_state`s it from `last.pt`, then per epoch calls `train_one_epoch` (micro-batches: `forward_backward`; each
step's end: `optimizer_step`; the non-finite policy: `stop_if_nonfinite`), `end_epoch` and `save_state`. What a run
is configured with travels as one `Schedule`.
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm import tqdm

from cavmae.shards.errors import NoSamples, UserError
from cavmae.shards.store import open_append
from cavmae.train import distributed as dist
from cavmae.train.augment import device_augment
from cavmae.train.checkpoint import CheckpointError, check_shapes, read_checkpoint, save_atomic
from cavmae.train.epochs import EpochPlan, step_seed
from cavmae.train.precision import WorkingWeights, step_autocast
from cavmae.train.stage import UsageError, order_key

LAST = "last.pt"
NONFINITE_PATIENCE = 10  # consecutive optimizer steps with a non-finite loss before the run stops


class Diverged(UserError):
    """The loss was not finite for `NONFINITE_PATIENCE` optimizer steps in a row: the recipe (learning rate,
    precision, data) diverges. One line, exit 1: the run stopped without finishing, not a bad argument."""

    exit_status = 1


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


@dataclass(frozen=True)
class Schedule:
    """How a run steps: a stage's settings section (`pretrain.` / `finetune.`) with its epoch plan and seed."""
    epochs: int
    steps_per_epoch: int
    accum_steps: int
    precision: str
    compile: str
    log_every: int
    save_every: int
    seed: int
    order: dict[str, int]  # what fixes the data order besides the epoch (`stage.order_key`)
    stop_after: int | None = None  # --stop-after-steps

    @classmethod
    def of(cls, section: Any, plan: EpochPlan, stop_after: int | None = None) -> "Schedule":
        return cls(epochs=section.epochs, steps_per_epoch=plan.steps, accum_steps=section.accum_steps,
                   precision=section.precision, compile=section.compile, log_every=section.log_every,
                   save_every=section.save_every, seed=plan.seed, order=order_key(plan), stop_after=stop_after)

    @property
    def per_epoch(self) -> int:
        """Micro-batches per epoch."""
        return self.steps_per_epoch * self.accum_steps


class NonFinite:
    """Optimizer steps with a non-finite loss, counted on the device (no host sync per step): in all, the current
    and the longest run of them in a row, and whether the step under way has one among its micro-batches."""

    def __init__(self, device: torch.device):
        self.total, self.streak, self.longest = (torch.zeros((), dtype=torch.int64, device=device) for _ in range(3))
        self.bad = torch.zeros((), dtype=torch.bool, device=device)

    def see(self, loss: torch.Tensor) -> None:
        self.bad |= ~torch.isfinite(loss.detach())

    def end_step(self) -> None:
        self.total += self.bad
        self.streak.copy_((self.streak + 1) * self.bad)
        torch.maximum(self.longest, self.streak, out=self.longest)
        self.bad.zero_()


def stop_if_nonfinite(counts: NonFinite, step: int, epoch: int, bar: tqdm) -> None:
    """The policy: a non-finite step is skipped (by the GradScaler) and counted; `NONFINITE_PATIENCE` of them in a
    row on any rank stop the run, every rank together, with a one-line error."""
    worst = int(dist.all_reduce_max(counts.longest))
    if worst >= NONFINITE_PATIENCE:
        bar.close()  # the error gets a line of its own
        raise Diverged(f"the loss was not finite for {worst} optimizer steps in a row "
                       f"(by step {step}, epoch {epoch + 1}); {int(counts.total)} steps skipped in all")


@dataclass
class TrainState:
    """Everything a run carries from step to step. `model` is what a step calls (working weights, DDP, compile
    applied: `training_model`); the position is `step` (optimizer steps so far), `epoch` (0-based) and `done`
    (micro-batches done in it), which with the model, optimizer, scheduler and scaler is all `last.pt` holds."""
    model: torch.nn.Module
    working: WorkingWeights | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    dynamic: bool  # the scaler's loss scale adapts (fp16 on CUDA); otherwise it stays 1
    nonfinite: NonFinite
    step: int = 0
    epoch: int = 0
    done: int = 0
    # since this process (re)started: samples skipped, mixups by kind (waveform | fbank)
    skipped: int = 0
    mixups: Counter = field(default_factory=Counter)
    compiling: bool = False  # the first forward + backward of this process compiles: timed on its own

    def checkpoint(self, order: dict[str, int]) -> dict[str, Any]:
        return {"model": dist.unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "epoch": self.epoch, "batches_done": self.done, "order": order}


def new_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: torch.optim.lr_scheduler.LRScheduler, run: Schedule, device: torch.device) -> TrainState:
    """The state at step 0: the bare `model` wrapped for training, a GradScaler for every optimizer step (fp16: the
    official dynamic loss scale; otherwise a fixed scale of 1, which still skips a step whose gradients are not
    finite)."""
    wrapped, working = training_model(model, run.precision, run.compile)
    dynamic = device.type == "cuda" and run.precision == "fp16"
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 16 if dynamic else 1.0)
    return TrainState(model=wrapped, working=working, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                      dynamic=dynamic, nonfinite=NonFinite(device), compiling=run.compile != "eager")


def save_state(path: Path, state: TrainState, order: dict[str, int]) -> None:
    """`last.pt`: the position and everything it needs to continue (written atomically, by rank 0)."""
    save_atomic(path, state.checkpoint(order))


def resume_state(path: Path, state: TrainState, order: dict[str, int]) -> None:
    """Load `last.pt` into `state`; a checkpoint of another model or settings, or of another data order, is a
    one-line error."""
    saved = read_checkpoint(path, need=("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batches_done"))
    check_shapes(dist.unwrap(state.model), saved["model"], str(path))
    try:
        dist.unwrap(state.model).load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # empty when saved by a run whose scaler was disabled
            state.scaler.load_state_dict(saved["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:  # another model, optimizer or schedule
        raise CheckpointError(f"{path}: does not fit this run (another model or settings?): "
                              f"{' '.join(str(exc).split())[:300]}") from None
    state.step, state.epoch, state.done = saved["step"], saved["epoch"], saved["batches_done"]
    if saved.get("order", order) != order:
        raise UsageError(f"{path} was written with {saved['order']}, this run has {order}: resuming would "
                         f"not continue the same epochs")
    if dist.is_main():
        print(f"resumed from {path}: step {state.step}, epoch {state.epoch + 1}, batch {state.done}")


def forward_backward(state: TrainState, step_fn: Callable, batch: dict, run: Schedule, device: torch.device, *,
                     micro: int, sync: bool, empty: bool) -> dict[str, Any]:
    """One micro-batch: its gradients accumulate (DDP all-reduces them on the step's last one, `sync`). An `empty`
    one (every sample skipped) runs only under DDP, where every rank takes part in each all-reduce, with a loss of 0.
    Returns the step function's metrics."""
    model = state.model
    ctx = model.no_sync() if not sync and hasattr(model, "no_sync") else contextlib.nullcontext()
    inputs = device_augment(batch, device)  # SpecAugment, normalisation, noise, roll: batched, on device
    torch.manual_seed(step_seed(run.seed, state.step, dist.rank(), micro))  # masking / dropout: a function of it
    with ctx, step_autocast(device, run.precision):
        loss, metrics = step_fn(model, inputs)
    loss = loss * 0 if empty else loss
    state.nonfinite.see(loss)
    with ctx:
        state.scaler.scale(loss / run.accum_steps).backward()
    return metrics


def optimizer_step(state: TrainState, learned: bool) -> None:
    """Close an optimizer step: apply the gradients if a micro-batch of it `learned` on this process (the scaler
    skips, on the device, a step whose gradients are not finite), advance the schedule (it counts every step, also
    one whose every sample was skipped) and the non-finite counts."""
    if learned:
        if state.working is not None:
            state.working.grads_to_masters()
        state.scaler.step(state.optimizer)
        state.scaler.update(None if state.dynamic else 1.0)
        state.optimizer.zero_grad(set_to_none=True)
        if state.working is not None:
            state.working.refresh()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        state.scheduler.step()
    state.nonfinite.end_step()
    state.step += 1


class EpochMeter:
    """What an epoch's records report: the metrics summed as device tensors (read, one sync, only when a record is
    logged) over the micro-batches that ran, and the samples seen since `t0` (compilation time left out)."""

    def __init__(self):
        self.t0, self.seen, self.count, self.sums = time.time(), 0, 0, {}

    def add(self, batch: dict, metrics: dict[str, Any]) -> None:
        self.count += 1
        self.seen += batch["audio"].shape[0]
        for name, value in metrics.items():
            self.sums[name] = self.sums.get(name, 0.0) + (value.detach() if torch.is_tensor(value) else value)

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.count for k, v in self.sums.items()}

    def rate(self) -> float:
        return self.seen * dist.world_size() / max(time.time() - self.t0, 1e-9)


def train_one_epoch(state: TrainState, step_fn: Callable, batches: Iterable[dict], run: Schedule, device: torch.device,
                    log: MetricsLog, out: Path, stop_at: int | None) -> bool:
    """The micro-batches of `state.epoch` from `state.done` on, until its end or optimizer step `stop_at`: a `train`
    record every `log_every` steps, at the epoch's last step and at a stop; `last.pt` every `save_every` steps.
    Returns whether it stopped at `stop_at`."""
    bar = tqdm(total=run.steps_per_epoch, initial=state.done // run.accum_steps,
               desc=f"epoch {state.epoch + 1}/{run.epochs}", disable=not dist.is_main(), dynamic_ncols=True,
               leave=False)
    meter, stop = EpochMeter(), False
    learned = False  # a micro-batch of this optimizer step ran forward and backward
    for batch in batches:
        micro = state.done % run.accum_steps
        sync = micro == run.accum_steps - 1
        empty = batch.get("empty", False)  # every sample skipped (`Transform.filler`): nothing to learn from
        state.done += 1
        state.skipped += batch["skipped"]
        if not empty or dist.world_size() > 1:
            tc = time.time()
            metrics = forward_backward(state, step_fn, batch, run, device, micro=micro, sync=sync, empty=empty)
            learned = True
        if not empty:
            meter.add(batch, metrics)
            state.mixups.update(batch.get("mixup", {}))
        if state.compiling and learned:  # the compilation is reported once and left out of the rate
            state.compiling = False
            compile_s = synchronized(device) - tc
            if dist.is_main():
                print(f"torch.compile ({run.compile}): the first forward + backward took {compile_s:.1f} s")
            log.write("compile", state.step, {"mode": run.compile, "seconds": compile_s})
            meter.t0 += compile_s
        if not sync:
            continue
        optimizer_step(state, learned)
        learned = False
        bar.update(1)
        stop = stop_at is not None and state.step >= stop_at
        if state.step % run.log_every == 0 or state.done == run.per_epoch or stop:  # a short run logs its end
            means, rate = meter.means(), meter.rate()
            if "loss" in means:
                bar.set_postfix(loss=f"{means['loss']:.4f}", samples_s=f"{rate:.1f}")
            log.write("train", state.step, {"epoch": state.epoch + 1, "lr": state.optimizer.param_groups[0]["lr"],
                                            "samples_per_s": rate, "skipped": state.skipped,
                                            "nonfinite": int(state.nonfinite.total),
                                            **{f"mixup_{k}": v for k, v in state.mixups.items()}, **means})
            stop_if_nonfinite(state.nonfinite, state.step, state.epoch, bar)
        if stop and state.done < run.per_epoch:
            break
        if run.save_every and state.step % run.save_every == 0 and state.done < run.per_epoch:
            save_state(out / LAST, state, run.order)
    bar.close()
    stop_if_nonfinite(state.nonfinite, state.step, state.epoch, bar)
    if not int(dist.all_reduce_max(torch.tensor(meter.count, device=device))):  # every sample of every rank skipped
        raise NoSamples(f"epoch {state.epoch + 1}: no decodable sample in {state.done} batches "
                        f"({state.skipped} samples skipped); see the log")
    return stop


def train(*, model: torch.nn.Module, step_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict]],
          optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          loader: Callable[[int, int, int], Iterable[dict]], run: Schedule, device: torch.device, out: Path,
          resume: bool, end_epoch: Callable[[int], dict[str, Any]] | None = None) -> dict:
    """Run (or resume) training to `run.epochs`, or for `run.stop_after` optimizer steps, and return the final
    counters (`stopped` says whether it stopped early).

    `model` is the bare model on `device`, `optimizer` built over its parameters; `new_state` wraps it for training.
    step_fn(model, batch) -> (loss, metrics) runs the forward pass of the wrapped model; loader(epoch, first_batch,
    num_batches) gives this rank's batches of `epoch` starting at micro-batch `first_batch`; end_epoch(epoch)
    (1-based) may evaluate and save per-epoch weights (with the bare model: its state dict holds the fp32 weights
    under any precision), and its result is logged.
    """
    state = new_state(model, optimizer, scheduler, run, device)
    log = MetricsLog(out)
    if resume and (out / LAST).exists():
        resume_state(out / LAST, state, run.order)
    start, stop = state.step, False
    stop_at = None if run.stop_after is None else start + run.stop_after
    while state.epoch < run.epochs and not stop:
        state.model.train()
        batches = loader(state.epoch, state.done, run.per_epoch - state.done)
        stop = train_one_epoch(state, step_fn, batches, run, device, log, out, stop_at)
        if stop and state.done < run.per_epoch:
            save_state(out / LAST, state, run.order)
            if dist.is_main():
                print(f"stopped after {state.step - start} steps at step {state.step}: run again with --resume to "
                      f"continue")
            break
        if state.done != run.per_epoch:
            raise RuntimeError(f"epoch {state.epoch + 1}: the data stream ended after {state.done} of "
                               f"{run.per_epoch} batches")
        state.epoch, state.done = state.epoch + 1, 0
        results = end_epoch(state.epoch) if end_epoch is not None else {}
        log.write("epoch", state.step, {"epoch": state.epoch, "skipped": state.skipped,
                                        "nonfinite": int(state.nonfinite.total), **results})
        save_state(out / LAST, state, run.order)
        dist.barrier()
    log.close()
    return {"step": state.step, "epoch": state.epoch, "skipped": state.skipped,
            "stopped": stop and state.epoch < run.epochs}
