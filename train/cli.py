"""`cavmae-train`: pretrain, finetune, evaluate, retrieve with CAV-MAE over WebDataset shards; show an epoch's order.

One process per device: `torchrun --nproc-per-node N -m cavmae.train pretrain ...` (or `cavmae-train ...` for one
process).
Exit status: 0 on success, 2 for bad arguments, config, shards or labels (a one-line message on stderr),
1 when the loss stayed non-finite, 130 when interrupted (`--resume` carries on from the last checkpoint).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import NoReturn

from cavmae.shards.config import ConfigError, load_config
from cavmae.shards.errors import Parser, UserError, examples_for, report
from cavmae.shards.process import finish
from cavmae.shards.store import check_out_file, publish_file
from cavmae.train.settings import register_sections

PROG = "cavmae-train"

EXAMPLES = """examples:
  cavmae-train pretrain --shards shards/ --out runs/pt --preset scale+
  torchrun --nproc-per-node 4 -m cavmae.train pretrain --shards 's3://b/as2m/shard-{000000..013843}.tar' --out runs/pt
  cavmae-train pretrain --shards shards/ --out runs/pt --resume
  cavmae-train order --shards shards/ --epoch 2 --world-size 4 --rank 3   # what GPU 3 reads in epoch 2
  cavmae-train finetune --shards as20k/ --val-shards eval/ --labels class_labels_indices.csv \\
      --init runs/pt/model.pth --out runs/ft
  cavmae-train finetune --preset vggsound-ft --shards vgg/ --labels vgg_labels.csv \\
      --init cav-mae-scale++.pth --out runs/vgg
  cavmae-train eval --shards eval/ --labels class_labels_indices.csv --checkpoint runs/ft/model.pth --frames all
  cavmae-train retrieve --shards retrieval/ --checkpoint runs/pt/model.pth
  cavmae-train embed --shards shards/ --checkpoint runs/ft/model.pth --out embeddings.parquet
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=examples_for(EXAMPLES, name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--shards", required=True, help="shards: tar path, folder, brace pattern, glob or URL "
                                                       "(several joined with ::)")
        p.add_argument("--config", metavar="FILE", help="YAML laid over the defaults of pipeline.yaml")
        p.add_argument("--preset", dest="presets", action="append", default=[], metavar="NAME",
                       help="a named recipe from the presets: section of pipeline.yaml (repeatable)")
        p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set pretrain.lr=1e-4 (repeatable)")
        return p

    for name, help in (("pretrain", "self-supervised CAV-MAE pretraining"),
                       ("finetune", "finetune a classifier (or a linear probe) on labelled shards")):
        p = command(name, help)
        p.add_argument("--out", required=True, help="run folder: config.yaml, metrics.jsonl, checkpoints")
        p.add_argument("--val-shards", help="validation shards, scored after every epoch")
        p.add_argument("--init", metavar="PTH", help="initial weights: an official checkpoint (module. prefix "
                                                     "or not) or one of ours; for pretrain also an ImageNet MAE "
                                                     "full checkpoint (converted as the official IN-initial)")
        p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
        p.add_argument("--stop-after-steps", type=positive, metavar="N",
                       help="stop cleanly after N optimizer steps of this run, OUT/last.pt written (a preemption "
                            "rehearsal); --resume carries on")
        if name == "finetune":
            p.add_argument("--labels", metavar="CSV", help="label index CSV index,mid,display_name (default: "
                                                           "the .labels.txt members and finetune.num_classes)")
            add_mode_arg(p)

    p = command("eval", "score a finetuned checkpoint: mAP or accuracy, per frame and frame-averaged")
    p.add_argument("--checkpoint", required=True, metavar="PTH", help="finetuned weights (ours or official)")
    p.add_argument("--labels", metavar="CSV", help="label index CSV index,mid,display_name")
    add_mode_arg(p)
    p.add_argument("--frames", help="all (official 10-frame average) | middle | a frame index (default: eval.frames)")
    p.add_argument("--out", help="also write the results as JSON to this file")

    p = command("order", "print the micro-batches one rank reads in one epoch: one line per batch, its sample "
                         "keys in order")
    p.add_argument("--epoch", type=positive, required=True, metavar="E", help="the epoch, 1-based")
    p.add_argument("--world-size", type=positive, default=1, metavar="W", help="number of ranks (default 1)")
    p.add_argument("--rank", type=int, default=0, metavar="R", help="the rank, 0..W-1 (default 0)")
    p.add_argument("--stage", choices=("pretrain", "finetune"), default="pretrain",
                   help="whose batch_size, accum_steps, epoch_samples (and finetune.balanced) apply")

    p = command("retrieve", "audio<->visual retrieval R@1/5/10 and median rank with a pretrained checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="PTH", help="pretrained (or finetuned) weights")
    p.add_argument("--frames", help="middle (official) | all | a frame index (default: eval.feature_frames)")
    p.add_argument("--strategy", choices=("mean", "max", "diagonal_mean", "diagonal_max"),
                   help="CAV-MAE Sync: features of every frame (each with its audio segment), clips compared by "
                        "this aggregate of their frame-pair cosines (released src/retrieval.py)")
    p.add_argument("--local", action="store_true", help="Sync: the mean of the patch tokens, not the global tokens")
    p.add_argument("--out", help="also write the results as JSON to this file")

    p = command("embed", "pooled audio and visual embeddings of every sample into a parquet file")
    p.add_argument("--checkpoint", required=True, metavar="PTH", help="pretrained or finetuned weights")
    p.add_argument("--out", required=True, metavar="FILE.parquet", help="one row per sample: key, video_id, "
                                                                         "audio, visual (list<float32>)")
    p.add_argument("--frames", help="middle | all (visual = mean over the frames) | a frame index "
                                    "(default: eval.feature_frames, as retrieve)")
    p.add_argument("--per-frame", action="store_true", help="every frame's audio and visual vectors (a Sync model: "
                                                            "each frame with its audio segment), list<list<float32>>")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def add_mode_arg(p: argparse.ArgumentParser) -> None:
    """--mode: a finetuning mode of the table in train/modes.py (the official names too)."""
    from cavmae.train.modes import HELP, NAMES

    p.add_argument("--mode", choices=NAMES, metavar="MODE", help=f"input mode (default: finetune.mode). {HELP}")


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (a bad value is a usage error, exit 2)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def frame_choice(value: str, source: str) -> str | int:
    """'all', 'middle' or a frame index (`--frames 3` and `--set eval.frames=3` both arrive as the text "3")."""
    if value in ("all", "middle"):
        return value
    if value.isdigit():
        return int(value)
    raise ConfigError(f"{source} must be all, middle or a frame index (0, 1, ...); got {value!r}")


def main(argv: list[str] | None = None) -> int:
    register_sections()  # the sections this command checks, whatever else the process imported
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("eval", "retrieve", "embed") and args.out is not None:  # a file, written after the work
            check_out_file(args.out)
        cfg = load_config(args.config, args.sets, args.presets)
        from cavmae.train.distributed import cpu_threads

        cpu_threads(cfg.data.num_workers)  # on a CPU: torch's threads beside the loader workers
        result = COMMANDS[args.command](args, cfg)
    except UserError as exc:
        return report(PROG, exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run again with --resume to continue", file=sys.stderr)
        return 130
    finally:
        from cavmae.train import distributed

        distributed.shutdown()
    if result is not None:
        text = json.dumps(result, indent=2)
        print(text)
        if getattr(args, "out", None) is not None and args.command in ("eval", "retrieve"):
            with publish_file(args.out) as up:
                up.write((text + "\n").encode())
    return 0


def _pretrain(args: argparse.Namespace, cfg) -> None:
    from cavmae.train import pretrain

    pretrain.run(cfg, shards=args.shards, out=args.out, val_shards=args.val_shards, init=args.init,
                 resume=args.resume, stop_after=args.stop_after_steps)


def _finetune(args: argparse.Namespace, cfg) -> None:
    from cavmae.train import finetune

    finetune.run(cfg, shards=args.shards, out=args.out, val_shards=args.val_shards, init=args.init,
                 labels_csv=args.labels, mode=args.mode, resume=args.resume, stop_after=args.stop_after_steps)


def _eval(args: argparse.Namespace, cfg) -> dict:
    from cavmae.train import evaluate

    return evaluate.run(cfg, shards=args.shards, checkpoint=args.checkpoint, labels_csv=args.labels,
                        mode=args.mode, frames=_frames(args, cfg))


def _order(args: argparse.Namespace, cfg) -> None:
    from cavmae.train import order

    order.run(cfg, shards=args.shards, epoch=args.epoch, world_size=args.world_size, rank=args.rank,
              stage=args.stage)


def _retrieve(args: argparse.Namespace, cfg) -> dict:
    from cavmae.train import retrieve
    from cavmae.train.stage import UsageError

    if args.strategy and args.frames:
        raise UsageError("--strategy compares every frame: leave out --frames")
    return retrieve.run(cfg, shards=args.shards, checkpoint=args.checkpoint,
                        frames=_frames(args, cfg, "feature_frames"), strategy=args.strategy, local=args.local)


def _embed(args: argparse.Namespace, cfg) -> dict:
    from cavmae.train import embed
    from cavmae.train.stage import UsageError

    if args.per_frame and args.frames not in (None, "all"):
        raise UsageError("--per-frame embeds every frame: leave out --frames")
    return embed.run(cfg, shards=args.shards, checkpoint=args.checkpoint, out=args.out,
                     frames=_frames(args, cfg, "feature_frames"), progress=not args.no_progress,
                     per_frame=args.per_frame)


def _frames(args: argparse.Namespace, cfg, key: str = "frames") -> str | int:
    """--frames, else `eval.<key>`: eval.frames for `eval`, eval.feature_frames for the vectors of `retrieve` and
    `embed` (one setting, so that they agree)."""
    return frame_choice(args.frames, "--frames") if args.frames else frame_choice(cfg.eval[key], f"eval.{key}")


COMMANDS = {"pretrain": _pretrain, "finetune": _finetune, "eval": _eval, "order": _order, "retrieve": _retrieve,
            "embed": _embed}

def run() -> NoReturn:
    """The process entry (console script, `python -m`): `main`, then `shards.process.finish`, which exits without
    the interpreter's teardown of native thread pools (it could abort a run whose work is done)."""
    finish(main())


if __name__ == "__main__":
    run()
