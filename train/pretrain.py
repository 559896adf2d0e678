"""CAV-MAE pretraining over streamed shards (official recipe, reference §4.1).

The contrastive negatives are, by default, those of each rank's micro-batch (`pretrain.contrast: local`), which is
the official semantics when a rank's batch equals an official DataParallel chunk (4 GPUs x 12 for the base
recipe); `model.contrast_chunks` reproduces the chunking on fewer devices. `pretrain.contrast: global` gathers the
pooled vectors from every rank (with gradients) and computes one InfoNCE over the global batch instead.
Under DDP the gradients are averaged over ranks where DataParallel summed the per-GPU losses: a constant factor
that Adam normalises away, up to its epsilon and the (tiny) L2 weight decay.
"""

from __future__ import annotations

from typing import Any

import torch

from cavmae.shards.config import Config
from cavmae.train import distributed as dist
from cavmae.train import stage as st
from cavmae.train.checkpoint import load_pretrained_into, official_state_dict, pretrain_init_state, save_atomic
from cavmae.train.evaluate import pretrain_losses
from cavmae.train.loaders import train_loader
from cavmae.train.loop import Schedule, train
from cavmae.train.lr_schedule import make_optimizer, make_scheduler
from cavmae.train.model import build_pretrain_model


def step_fn(contrast: str):
    """Forward pass returning (loss, logged metrics); 'global' recomputes the contrastive term over all ranks."""
    def step(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(batch["audio"], batch["image"])
        loss, loss_c, c_acc = out["loss"], out["loss_c"], out["c_acc"]
        if contrast == "global":
            core = dist.unwrap(model)
            nce, c_acc = core.contrastive_loss(dist.all_gather_with_grad(out["c_a"]),
                                               dist.all_gather_with_grad(out["c_v"]), chunks=1)
            loss_c = core.contrast_loss_weight * nce
            loss = out["loss_mae"] + loss_c
        return loss, {"loss": loss.detach(), "loss_mae_a": out["loss_mae_a"].detach(),
                      "loss_mae_v": out["loss_mae_v"].detach(), "loss_c": loss_c.detach(), "c_acc": c_acc}
    return step


def run(cfg: Config, *, shards: str, out: str, val_shards: str | None = None, init: str | None = None,
        resume: bool = False, stop_after: int | None = None) -> dict[str, Any]:
    device = dist.init()
    p = cfg.pretrain
    cfg, urls, val_urls = st.shard_sets(cfg, shards, val_shards)
    run_dir = st.run_folder(out, cfg)
    index, plan = st.epoch_plan(urls, cfg, p, "pretrain")
    steps, micro = plan.steps, plan.micro
    st.warn_audio_cut(cfg)

    torch.manual_seed(cfg.data.seed)
    model = build_pretrain_model(st.model_settings(cfg))
    if init:
        load_pretrained_into(model, pretrain_init_state(init, st.model_settings(cfg)), source=f"--init {init}")
    unused = model.unused_parameter_names()
    for name, param in model.named_parameters():  # DDP needs every trainable parameter to get a gradient
        if name in unused:
            param.requires_grad_(False)
    model.to(device)
    optimizer = make_optimizer([{"params": [q for q in model.parameters() if q.requires_grad]}], p)
    scheduler = make_scheduler(optimizer, p, steps)

    def loader(epoch: int, first: int, count: int):
        tf = st.transform(cfg, st.augmentation(p), frame="random")
        return train_loader(index, tf, plan, epoch=epoch, first=first, count=count, num_workers=cfg.data.num_workers)

    def end_epoch(epoch: int) -> dict[str, Any]:
        save_atomic(run_dir / f"model.{epoch}.pth", official_state_dict(model))  # the official per-epoch file
        if val_urls is None:
            return {}
        tf = st.transform(cfg, st.NO_AUGMENTATION, frame="middle")
        return pretrain_losses(model, val_urls, tf, batch_size=micro, num_workers=cfg.data.num_workers,
                               device=device, precision=p.precision)

    result = train(model=model, step_fn=step_fn(p.contrast), optimizer=optimizer, scheduler=scheduler, loader=loader,
                   run=Schedule.of(p, plan, stop_after), device=device, out=run_dir, resume=resume,
                   end_epoch=end_epoch)
    if not result["stopped"]:
        save_atomic(run_dir / "model.pth", official_state_dict(model))
    return result
