"""Finetuning CAVMAEFT on labelled shards (official recipe, reference §4.2), and linear probing.

- Two parameter groups: the classification head (`mlp_head.*`) at lr x head_lr_scale, everything else at lr.
- BCE with soft targets (multi-label, AudioSet; metric mAP) or cross-entropy with probability targets (VGGSound;
  metric acc); labels carry label smoothing and mixup weights from the data pipeline.
- Each epoch's weights are saved (official layout) and, with `wa`, the uniform average of epochs
  wa_start..wa_end is the final model (weight averaging, not an ensemble).
- `freeze_base` trains the head only: a linear probe of the pretrained representation.
- Per-epoch validation scores the middle frame only, as the official loop; `eval` does the 10-frame average.
"""

from __future__ import annotations

from typing import Any

import torch

from cavmae.shards.config import Config
from cavmae.train import distributed as dist
from cavmae.train import stage as st
from cavmae.train.checkpoint import load_pretrained_into, load_state_dict_file, official_state_dict, save_atomic
from cavmae.train.evaluate import predict, score
from cavmae.train.loaders import train_loader
from cavmae.train.loop import Schedule, train
from cavmae.train.lr_schedule import make_optimizer, make_scheduler
from cavmae.train.model import build_finetune_model
from cavmae.train.modes import MODES, mode_name

HEAD = "mlp_head."


def loss_fn(kind: str):
    bce, ce = torch.nn.BCEWithLogitsLoss(), torch.nn.CrossEntropyLoss()

    def step(model: torch.nn.Module, batch: dict[str, Any], mode: str) -> tuple[torch.Tensor, dict[str, Any]]:
        logits = model(batch["audio"], batch["image"], mode).float()
        loss = bce(logits, batch["label"]) if kind == "bce" else ce(logits, batch["label"])
        return loss, {"loss": loss.detach()}
    return step


def average_weights(paths: list[str]) -> dict[str, torch.Tensor]:
    """Uniform average of state dicts with identical keys (official `--wa`)."""
    total: dict[str, torch.Tensor] = {}
    for path in paths:
        for k, v in load_state_dict_file(path).items():
            total[k] = total.get(k, 0) + v.double()
    return {k: (v / len(paths)).float() for k, v in total.items()}


def run(cfg: Config, *, shards: str, out: str, val_shards: str | None = None, init: str | None = None,
        labels_csv: str | None = None, mode: str | None = None, resume: bool = False,
        stop_after: int | None = None) -> dict[str, Any]:
    device = dist.init()
    f = cfg.finetune
    mode = mode_name(mode or f.mode, "--mode" if mode else "finetune.mode")
    metric = f.metric
    if cfg.model.variant == "sync" and not MODES[mode].visual:
        raise st.UsageError(f"model.variant sync has no audio-only model: --mode {mode} (use audioonly)")
    if f.wa and max(1, f.wa_start) > min(f.epochs, f.wa_end):
        raise st.UsageError(f"finetune.wa averages epochs {f.wa_start}..{f.wa_end} but there are {f.epochs}")
    cfg, urls, val_urls = st.shard_sets(cfg, shards, val_shards)
    label_map, num_classes = st.labels(cfg, labels_csv, f)
    st.check_manifest_labels(urls + (val_urls or []), cfg, label_map, labels_csv)
    run_dir = st.run_folder(out, cfg)
    index, plan = st.epoch_plan(urls, cfg, f, "finetune", balanced=f.balanced)
    steps = plan.steps
    st.warn_audio_cut(cfg)

    torch.manual_seed(cfg.data.seed)
    model = build_finetune_model(st.model_settings(cfg), num_classes, audio_only=not MODES[mode].visual)
    if init:
        missing, unexpected = load_pretrained_into(model, load_state_dict_file(init), source=f"--init {init}")
        if dist.is_main():
            print(f"loaded {init}: {len(missing)} missing (new head), {len(unexpected)} unexpected (decoder) keys")
    frozen = model.unused_parameter_names(mode)
    for name, param in model.named_parameters():
        if name in frozen or (f.freeze_base and not name.startswith(HEAD)):
            param.requires_grad_(False)
    model.to(device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in trainable if not n.startswith(HEAD)], "lr": f.lr},
              {"params": [p for n, p in trainable if n.startswith(HEAD)], "lr": f.lr * f.head_lr_scale}]
    optimizer = make_optimizer([g for g in groups if g["params"]], f)
    scheduler = make_scheduler(optimizer, f, steps)
    step_loss = loss_fn(f.loss)

    def loader(epoch: int, first: int, count: int):
        tf = st.transform(cfg, st.augmentation(f), frame="random", num_classes=num_classes, label_map=label_map,
                          label_csv=labels_csv, needs=MODES[mode].inputs)
        return train_loader(index, tf, plan, epoch=epoch, first=first, count=count, num_workers=cfg.data.num_workers)

    def validate(net: torch.nn.Module) -> dict[str, Any]:
        tf = st.transform(cfg, st.NO_AUGMENTATION, frame="middle", num_classes=num_classes, label_map=label_map,
                          label_csv=labels_csv, needs=MODES[mode].inputs)
        pred = predict(net, val_urls, tf, mode=mode, metric=metric, batch_size=cfg.eval.batch_size,
                       num_workers=cfg.data.num_workers, device=device, precision=f.precision)
        return {f"val_{metric}": score(pred, metric)[metric]}

    best = {"value": -1.0}

    def end_epoch(epoch: int) -> dict[str, Any]:
        save_atomic(run_dir / f"model.{epoch}.pth", official_state_dict(model))
        if val_urls is None:
            return {}
        result = validate(model)
        if result[f"val_{metric}"] > best["value"]:
            best["value"] = result[f"val_{metric}"]
            save_atomic(run_dir / "best_model.pth", official_state_dict(model))
        return result

    result = train(model=model, step_fn=lambda m, b: step_loss(m, b, mode), optimizer=optimizer,
                   scheduler=scheduler, loader=loader, run=Schedule.of(f, plan, stop_after), device=device,
                   out=run_dir, resume=resume, end_epoch=end_epoch)
    if result["stopped"]:
        return result
    final = official_state_dict(model)
    if f.wa:
        first, last = max(1, f.wa_start), min(f.epochs, f.wa_end)
        final = average_weights([str(run_dir / f"model.{e}.pth") for e in range(first, last + 1)])
        core = dist.unwrap(model)
        core.load_state_dict(final)
        final = official_state_dict(core)
        if val_urls is not None:
            result.update({f"wa_{k}": v for k, v in validate(core).items()})
    save_atomic(run_dir / "model.pth", final)
    if dist.is_main():
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()))
    return result
