"""`cavmae`: from raw videos to a model's answer, composing `preprocess` (decoding) and `train` (the model).

Exit status: 0 when every video was scored, 1 when some could not be decoded (named on stderr), 2 for bad arguments,
config, checkpoint or label index (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from cavmae.shards.config import Config, load_config
from cavmae.shards.errors import Parser, UserError, examples_for, report
from cavmae.shards.frozen import SAMPLE_SECTIONS
from cavmae.shards.process import finish
from cavmae.shards.store import check_out_file, publish_file
from cavmae.train.cli import add_mode_arg

from .settings import register_sections

EXAMPLES = """examples:
  cavmae predict clip.mp4 other.mkv --checkpoint runs/ft/model.pth --labels class_labels_indices.csv
  cavmae predict videos/*.mp4 --checkpoint runs/ft/model.pth --labels labels.csv --prep-config shards/pipeline.yaml \\
      --top-k 3 --out predictions.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cavmae", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="top-k labels of video files with a finetuned checkpoint",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples_for(EXAMPLES, "predict"),
                       description="Decode each video as ingest would (in memory), score it with a finetuned "
                                   "checkpoint with eval's frames choice, and print its top-k labels by display "
                                   "name with their scores (sigmoid for finetune.metric mAP, softmax for acc).")
    p.add_argument("videos", nargs="+", help="video files")
    p.add_argument("--checkpoint", required=True, metavar="PTH", help="finetuned weights (ours or official)")
    p.add_argument("--labels", required=True, metavar="CSV", help="the label index CSV index,mid,display_name "
                                                                  "the checkpoint was finetuned with")
    p.add_argument("--top-k", type=int, default=5, help="labels per video (default 5)")
    p.add_argument("--config", metavar="FILE", help="the training run's config (default: config.yaml beside the "
                                                    "checkpoint, when there is one)")
    p.add_argument("--prep-config", metavar="PIPELINE_YAML", help="take audio/video/clip (how videos become "
                                                                  "samples) from this file: the pipeline.yaml of "
                                                                  "the shards the model was trained on")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting (repeatable)")
    add_mode_arg(p)
    p.add_argument("--frames", help="all | middle | a frame index (default: eval.frames)")
    p.add_argument("--out", metavar="FILE.json", help="also write the predictions as JSON")
    return parser


def predict_config(args: argparse.Namespace) -> Config:
    """The run's config (or --config), the sample sections from --prep-config, then --set."""
    config = args.config
    if config is None and (Path(args.checkpoint).parent / "config.yaml").is_file():
        config = Path(args.checkpoint).parent / "config.yaml"
    run = load_config(config)
    data = run.to_dict()
    if args.prep_config:
        prep = load_config(args.prep_config, sections=SAMPLE_SECTIONS).to_dict()
        data.update({section: prep[section] for section in SAMPLE_SECTIONS})
    return Config(data, run.explicit).with_overrides(args.sets)  # what the run set (the model's length) stays


def main(argv: list[str] | None = None) -> int:
    register_sections()  # both stages' sections: predict decodes as preprocess does and runs train's model
    args = build_parser().parse_args(argv)
    from cavmae.preprocess.inputs import LabelIndex
    from cavmae.train.cli import frame_choice
    from cavmae.train.stage import UsageError

    from .predict import Prediction, predict_videos

    try:
        if args.top_k < 1:
            raise UsageError(f"--top-k must be >= 1; got {args.top_k}")
        if args.out is not None:  # written after every video is scored: a bad --out is said first
            check_out_file(args.out)
        cfg = predict_config(args)
        index = LabelIndex.read(args.labels)
        display = index.display_names()
        names = {i: display.get(mid, mid) for mid, i in index.index.items()}
        frames = frame_choice(args.frames or cfg.eval.frames, "--frames" if args.frames else "eval.frames")
        results, failed = [], 0
        for got in predict_videos(args.videos, cfg, args.checkpoint, top_k=args.top_k,
                                  mode=args.mode or cfg.finetune.mode, frames=frames):
            if not isinstance(got, Prediction):
                failed += 1
                print(f"cavmae: failed: {got[0]}: {got[1]}", file=sys.stderr)
                continue
            top = [{"index": i, "label": names.get(i, str(i)), "score": round(score, 6)} for i, score in got.top]
            window = f" [window {got.window}]" if got.window is not None else ""
            print(f"{got.source}{window}: " + ", ".join(f"{t['label']} {t['score']:.3f}" for t in top))
            results.append({"source": got.source, "video_id": got.video_id, "window": got.window, "top": top})
    except UserError as exc:
        return report("cavmae", exc)
    if args.out is not None:
        with publish_file(args.out) as up:
            up.write((json.dumps(results, indent=1) + "\n").encode())
    return 1 if failed else 0


def run() -> NoReturn:
    """The process entry (console script, `python -m`): `main`, then `shards.process.finish`, which exits without
    the interpreter's teardown of native thread pools (it could abort a run whose work is done)."""
    finish(main())


if __name__ == "__main__":
    run()
