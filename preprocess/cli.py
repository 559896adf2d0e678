"""`cavmae-prep`: turn videos into CAV-MAE training shards.

Exit status: 0 when the run processed something (or had nothing left to do), 1 when not one input could be
processed (every one failed or skipped, or the inputs held none), 2 for bad arguments, config or input lists (a one-line
message on stderr: an unknown --split, a list without the columns of its format), 130 when interrupted (re-run the
same command to resume).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from typing import NoReturn

from cavmae.shards.config import ConfigError, load_config
from cavmae.shards.errors import NoSamples, Parser, UserError, examples_for, report
from cavmae.shards.process import finish
from cavmae.shards.store import check_out_file, check_out_folder

from .datasets import FORMATS
from .fetch import LIMITS, FetchOptions, out_of_range
from .settings import register_sections

PROG = "cavmae-prep"

MAX_PROBLEMS = 50
MAX_IGNORED_NAMED = 5
EXAMPLES = """examples:
  cavmae-prep ingest ./videos --out shards/
  cavmae-prep ingest list.txt more_videos/ --out shards/ --labels labels.csv --label-index class_labels_indices.csv
  cavmae-prep ingest ./videos --out shards/ --set audio.num_mel_bins=64 --set clip.mode=windows
  cavmae-prep ingest balanced_train_segments.csv --videos-dir videos/ --out as20k/ --label-index labels.csv
  cavmae-prep ingest vggsound.csv --split test --videos-dir vgg/ --out vgg_test/ --label-index vgg_labels.csv
  cavmae-prep ingest ESC-50-master/meta/esc50.csv --split 5 --out esc_fold5/ --set video.allow_missing=true
  cavmae-prep fetch balanced_train_segments.csv --out videos/ --jobs 4 --rate 1    # needs cavmae[fetch]
  cavmae-prep fetch vggsound.csv --out vgg/ --url-template 'https://mirror.example/{id}.mp4' --whole
  RAY_ADDRESS=head:6379 cavmae-prep ingest /data/videos --out /data/shards
  RAY_ADDRESS=ray://head:10001 cavmae-prep ingest /data/videos --out /data/shards
  cavmae-prep ingest s3://bucket/videos/ --out s3://bucket/shards/ --address auto
  cavmae-prep reprocess shards/ --out shards_64mel/ --set audio.num_mel_bins=64
  cavmae-prep reprocess shards/ --out shards_16f/ --set video.num_frames=16
  ray job submit --working-dir . -- cavmae-prep ingest s3://bucket/videos/ --out s3://bucket/shards/
  cavmae-prep stats shards/ --label-index class_labels_indices.csv        # stats.json + stats.png beside the shards
  cavmae-prep inspect shards/ --random 4 --out look.png                    # frames over log-mel, 4 samples
  cavmae-prep inspect shards/ --key VIDEO_ID --out one.png
  cavmae-prep verify downloaded/shards/                                    # one line per problem, exit 1 if any
  cavmae-prep verify downloaded/shards/ --list > members.jsonl             # name, size, sha256 of every member
"""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse turns the ValueError into a usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fetch_number(field: str):
    """argparse type of fetch's number option `field` (int or float as FetchOptions has it), in its LIMITS range:
    inf, nan and a timeout ffmpeg would take as none are usage errors (exit 2), not tracebacks or hangs."""
    cast = type(getattr(FetchOptions(), field))

    def parse(text: str):
        value = cast(text)
        why = out_of_range(field, value)
        if why:
            raise argparse.ArgumentTypeError(why)
        return value

    parse.__name__ = cast.__name__  # (argparse names the type in "invalid int value")
    return parse


def fetch_range(field: str) -> str:
    """The range of fetch's number option `field`, as its --help says it (from LIMITS: never a second copy)."""
    _, low, high = LIMITS[field]
    return f"{low:g} to {high:g}"


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML laid over the defaults of pipeline.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set audio.num_mel_bins=64 (repeatable)")


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Where the work runs (shared by every job subcommand)."""
    p.add_argument("--workers", type=positive_int, help="CPUs of the local Ray instance (default: all cores)")
    p.add_argument("--address", help="join this Ray cluster: host:6379 (a `ray start --head`), auto, or "
                                     "ray://head:10001 (default: RAY_ADDRESS, else start a local Ray); a token "
                                     "in RAY_AUTH_TOKEN or ~/.ray/auth_token is used")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch_defaults = FetchOptions()
    p = sub.add_parser("ingest", help="decode videos into WebDataset shards plus manifest.parquet",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples_for(EXAMPLES, "ingest"),
                       description="Decode videos (folders, files, path lists, official dataset JSONs, the "
                                   "datasets' own lists) into WebDataset tar shards, manifest.parquet and the "
                                   "frozen pipeline.yaml. Re-running into the same --out resumes and adds new inputs.")
    p.add_argument("inputs", nargs="+", help="video files, folders (recursive), .txt/.csv path lists, an "
                                             "official dataset .json, or a dataset's own list: AudioSet segment "
                                             "CSV, VGGSound CSV, Kinetics CSV, ESC-50 meta/esc50.csv")
    p.add_argument("--videos-dir", metavar="DIR", help="where the files of a dataset list are, found by id "
                                                       "({id}.ext or {id}_{start}[_{end}].ext, recursive; default: "
                                                       "the list's folder, ESC-50: ../audio)")
    p.add_argument("--split", help="keep the rows of these splits of a dataset list, comma-separated (train, "
                                   "test, val; ESC-50: folds, e.g. 1,2,3,4)")
    p.add_argument("--list-format", default="auto", choices=("auto", *FORMATS),
                   help="auto (recognised from the first lines) | audioset | vggsound | kinetics | esc50")
    p.add_argument("--out", required=True, help="output folder for shards and manifest")
    p.add_argument("--labels", metavar="CSV", help="video_id,labels CSV (labels comma-separated, quoted)")
    p.add_argument("--label-index", metavar="CSV", help="label index CSV index,mid,display_name; adds .labels.txt "
                                                        "members and rejects unknown labels")
    p.add_argument("--labels-from-folders", action="store_true", help="label each video by its parent folder")
    p.add_argument("--retry-failed", action="store_true", help="process again the inputs recorded as failed or skipped")
    add_run_args(p)
    add_config_args(p)
    p = sub.add_parser("fetch", help="download the videos of a dataset list with yt-dlp (cavmae[fetch])",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples_for(EXAMPLES, "fetch"),
                       description="Download each row of an AudioSet, VGGSound, Kinetics or ESC-50 list with "
                                   "yt-dlp into --out, named so that `ingest LIST --videos-dir OUT` finds it: "
                                   "a row's segment exactly (re-encoded at the cuts) as {id}_{start}_{end}.ext, "
                                   "else (no segment, --whole, or a source yt-dlp cannot cut) the whole video as "
                                   "{id}.ext. Results in OUT/fetch.parquet (ok, gone, failed with yt-dlp's or "
                                   "ffmpeg's reason); re-running skips what is done.")
    p.add_argument("list", help="the dataset list (AudioSet segment CSV, VGGSound, Kinetics, ESC-50 meta/esc50.csv)")
    p.add_argument("--out", required=True, help="folder for the videos and fetch.parquet")
    p.add_argument("--url-template", default=fetch_defaults.url_template,
                   help="URL of an id, {id} replaced (default: %(default)s); a mirror or your own HTTP server")
    p.add_argument("--jobs", type=fetch_number("jobs"), default=fetch_defaults.jobs,
                   help=f"downloads at once (default 4, {fetch_range('jobs')})")
    p.add_argument("--rate", type=fetch_number("rate"), default=fetch_defaults.rate,
                   help=f"downloads started per second per host, at most (default 1, {fetch_range('rate')})")
    p.add_argument("--timeout", type=fetch_number("socket_timeout"), default=fetch_defaults.socket_timeout,
                   metavar="S", help="seconds without data before a download fails (default 30, "
                                     f"{fetch_range('socket_timeout')})")
    p.add_argument("--max-seconds", type=fetch_number("max_seconds"), default=fetch_defaults.max_seconds,
                   metavar="S", help="seconds a row may take in all, however slowly its data comes (default 3600, "
                                     f"{fetch_range('max_seconds')})")
    p.add_argument("--retries", type=fetch_number("retries"), default=fetch_defaults.retries, metavar="N",
                   help=f"yt-dlp's retries of a request that failed (default 3, {fetch_range('retries')})")
    p.add_argument("--format", default=fetch_defaults.format,
                   help="yt-dlp's format selector (default: %(default)s, at most 480p where the height is known)")
    p.add_argument("--whole", action="store_true", help="download whole videos even for rows with a segment "
                                                        "(a mirror that serves the cut clips)")
    p.add_argument("--retry-failed", action="store_true", help="download again the rows recorded as failed "
                                                              "(never the gone ones)")
    p.add_argument("--split", help="only the rows of these splits, comma-separated (as ingest's --split)")
    p.add_argument("--list-format", default="auto", choices=("auto", *FORMATS), help="as ingest's --list-format")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("reprocess", help="re-derive a shard set with changed settings into a new folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples_for(EXAMPLES, "reprocess"),
                       description="Remake the samples of an existing shard folder with the sample settings of "
                                   "SRC's pipeline.yaml (audio, video, clip, shards.pattern; never its ray: or other "
                                   "shards: settings) plus --config/--set: from the stored waveforms when only "
                                   "fbank settings change and SRC kept them, else from the source videos of the "
                                   "manifest (read only inside --sources); members are copied unchanged when only "
                                   "shards.* changes. Re-running resumes.")
    p.add_argument("src", help="existing shard folder (local path or URI)")
    p.add_argument("--out", required=True, help="new output folder for shards and manifest")
    p.add_argument("--sources", action="append", default=[], metavar="DIR|URI",
                   help="a folder or URI prefix the source videos may be read from (repeatable); needed when the "
                        "change means decoding the sources again; a source SRC's manifest names outside them is "
                        "a failed row, never opened")
    add_run_args(p)
    add_config_args(p)
    p = sub.add_parser("stats", help="what the shards hold, and their fbank mean/std for data.mean/data.std",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples_for(EXAMPLES, "stats"),
                       description="Read every sample once (one Ray task per shard) and write stats.json and "
                                   "stats.png: fbank mean/std (unpadded, and AST-style over padded batches), "
                                   "per-mel-bin mean/std, counts and failure reasons from the manifest, "
                                   "durations, label counts and the frames' mean RGB.")
    p.add_argument("shards", help="shard folder, tar, brace pattern, glob or URL (several joined with ::)")
    p.add_argument("--out", help="folder for stats.json and stats.png (default: the shard folder)")
    p.add_argument("--label-index", metavar="CSV", help="label index CSV index,mid,display_name: count labels "
                                                        "by display name and class index")
    p.add_argument("--batch-size", type=int, default=1000,
                   help="samples per batch of the padded-batch figure (AST's get_norm_stats.py: 1000)")
    p.add_argument("--rows", type=positive_int, metavar="N",
                   help="fbank rows each sample is padded or cut to in the padded-batch figure, as the training "
                        "run's model.target_length (default: clip.length_s at audio.frame_shift_ms in whole 16-row "
                        "patches, its default)")
    add_run_args(p)
    add_config_args(p)
    p = sub.add_parser("inspect", help="draw samples: frames in a row over their log-mel, labels in the title",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples_for(EXAMPLES, "inspect"),
                       description="Draw a sample sheet as a PNG: each sample's frames in a row, its log-mel "
                                   "spectrogram under them on a time axis in seconds with the frame times "
                                   "marked, and labels, video id and source as its title.")
    p.add_argument("shards", help="shard folder, tar, brace pattern, glob or URL (several joined with ::)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", help="the sample with this key or video id (one starting with '-' too: "
                                     "--key -PJHxphWEs)")
    p.dash_values.add("--key")
    which.add_argument("--random", type=int, metavar="N", help="a grid of N samples drawn at random")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the picture to write")
    p.add_argument("--seed", type=int, default=0, help="seed of --random (default 0)")
    p.add_argument("--label-index", metavar="CSV", help="label index CSV: show display names")
    add_config_args(p)
    p = sub.add_parser("verify", help="read a shard set through and check every sample before training on it",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples_for(EXAMPLES, "verify"),
                       description="Read every shard through (tar headers, truncation, sparse or compressed "
                                   "files), decode every sample as the trainer does and check it against the "
                                   "settings the shards were made with (their pipeline.yaml, else --config/--set), "
                                   "and check the spans manifest.parquet records. One line per problem, then a "
                                   "summary; exit 0 when clean, 1 with problems, 2 for bad arguments or a set "
                                   "where no sample decodes.")
    p.add_argument("shards", nargs="+", help="shard folders, tars, brace patterns, globs or URLs")
    p.add_argument("--list", action="store_true", help="only list every regular member as one JSON object per line: "
                                                       '{"shard", "name", "size", "sha256"} (as tarfile reads it)')
    add_run_args(p)
    add_config_args(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    register_sections()  # the sections this command checks, whatever else the process imported
    args = build_parser().parse_args(argv)
    try:
        if args.command == "inspect":  # inspect's --out is a picture, not a folder
            check_out_file(args.out)
        elif getattr(args, "out", None) is not None:
            check_out_folder(args.out)
        if args.command == "reprocess":
            return _reprocess(args)
        if args.command == "fetch":
            return _fetch(args)
        cfg = load_config(args.config, args.sets)
        if args.command == "ingest":
            return _ingest(args, cfg)
        if args.command == "stats":
            return _stats(args, cfg)
        if args.command == "inspect":
            return _inspect(args, cfg)
        if args.command == "verify":
            return _verify(args, cfg)
    except UserError as exc:
        return report(PROG, exc)
    except KeyboardInterrupt:
        print("cavmae-prep: interrupted; finished shards are kept: re-run the same command to resume",
              file=sys.stderr)
        return 130
    return 2


def _ingest(args: argparse.Namespace, cfg) -> int:
    from .datasets import ListOptions
    from .ingest import ingest

    lists = ListOptions(args.list_format, args.videos_dir, _split(args.split))
    summary = ingest(args.inputs, args.out, cfg, labels_csv=args.labels, label_index_csv=args.label_index,
                     labels_from_folders=args.labels_from_folders, retry_failed=args.retry_failed,
                     workers=args.workers, address=args.address, progress=not args.no_progress, lists=lists)
    return _report(summary, args.out)


def _split(text: str | None) -> tuple[str, ...] | None:
    """`--split a,b` as its splits; one that names none (`--split ,`) is an error, not a filter that keeps nothing."""
    if text is None:
        return None
    split = tuple(s.strip() for s in text.split(",") if s.strip())
    if not split:
        raise UserError(f"--split {text!r}: names no split")
    return split


def _fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch

    options = FetchOptions(url_template=args.url_template, format=args.format, jobs=args.jobs, rate=args.rate,
                           socket_timeout=args.timeout, retries=args.retries, max_seconds=args.max_seconds,
                           whole=args.whole, retry_failed=args.retry_failed, list_format=args.list_format,
                           split=_split(args.split))
    results = fetch(args.list, args.out, options, log=lambda line: print(f"cavmae-prep: {line}", flush=True),
                    progress=not args.no_progress)
    return 1 if results and not any(r.status == "ok" for r in results) else 0


def _stats(args: argparse.Namespace, cfg) -> int:
    from cavmae.shards.store import Store

    from .stats import compute_stats, write_stats

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1; got {args.batch_size}")
    stats = compute_stats(args.shards, cfg, label_index_csv=args.label_index, batch_size=args.batch_size,
                          rows=args.rows, workers=args.workers, address=args.address,
                          progress=not args.no_progress)
    out = Store.of(args.out or stats["folder"])
    json_path, png_path = write_stats(stats, out)
    fb = stats["fbank"]
    missing = stats["missing"]
    print(f"cavmae-prep: {stats['samples']} samples in {stats['shards']} shard(s), {stats['unreadable']} unreadable, "
          f"{missing['audio']} without audio, {missing['video']} without frames")
    if "mean" in fb:
        print(f"cavmae-prep: fbank mean {fb['mean']:.4f} std {fb['std']:.4f} (unpadded); "
              f"{fb['padded_batches']['mean']:.4f} / {fb['padded_batches']['std']:.4f} (padded batches)")
        print(f"cavmae-prep: train with {stats['use']['unpadded']}")
    print(f"cavmae-prep: wrote {json_path} and {png_path}")
    return 0


def _inspect(args: argparse.Namespace, cfg) -> int:
    from .inspect_shards import inspect

    n = inspect(args.shards, args.out, cfg, key=args.key, count=args.random or 0, seed=args.seed,
                label_index_csv=args.label_index)
    print(f"cavmae-prep: drew {n} sample(s) into {args.out}")
    return 0


def _verify(args: argparse.Namespace, cfg) -> int:
    import json

    from .verify import list_members, verify

    if args.list:
        unreadable: list[str] = []
        for record in list_members(args.shards, unreadable):
            print(json.dumps(record))
        for problem in unreadable:
            print(f"cavmae-prep: problem: {problem}", file=sys.stderr)
        return 1 if unreadable else 0
    problems, done = verify(args.shards, cfg, workers=args.workers, address=args.address,
                            progress=not args.no_progress)
    for problem in problems:
        print(f"cavmae-prep: problem: {problem}")
    print(f"cavmae-prep: verified {done.line()}")
    return 1 if problems else 0


def _reprocess(args: argparse.Namespace) -> int:
    from cavmae.shards.frozen import frozen_config
    from cavmae.shards.store import Store

    from .reprocess import ReprocessSummary, choose_mode, reprocess, reprocess_config

    cfg = reprocess_config(args.src, args.config, args.sets)
    mode, changed = choose_mode(frozen_config(Store.of(args.src)), cfg)
    print(f"cavmae-prep: {ReprocessSummary(mode=mode, changed=tuple(changed)).how()}", flush=True)
    summary = reprocess(args.src, args.out, cfg, sources=args.sources, workers=args.workers, address=args.address,
                        progress=not args.no_progress)
    return _report(summary, args.out, reading=True)


def _report(summary, out: str, reading: bool = False) -> int:
    """Print a job's summary; 1 when no input could be processed (ingest: this run's every input failed or was
    skipped, or the inputs held none, or it had none to do and the manifest holds none of them as ok), NoSamples
    for a `reading` job (reprocess, like every command that reads shards: nothing of its source could be read or
    remade, exit 2)."""
    _report_ignored(getattr(summary, "ignored", []))
    for line in summary.problems[:MAX_PROBLEMS]:
        print(f"cavmae-prep: {line}", file=sys.stderr)
    if len(summary.problems) > MAX_PROBLEMS:
        print(f"cavmae-prep: ... and {len(summary.problems) - MAX_PROBLEMS} more (manifest.parquet has them all)",
              file=sys.stderr)
    print(f"cavmae-prep: {summary.line()}")
    print(f"cavmae-prep: shards and manifest in {out}")
    if summary.already_failed:
        print(f"cavmae-prep: {summary.already_failed} of the inputs already done are recorded as failed or skipped "
              f"(the error column of {out}/manifest.parquet says why); once fixed, re-run with --retry-failed to "
              "take them again", file=sys.stderr)
    if reading:
        if summary.videos and not summary.ok:
            raise NoSamples(f"no sample could be remade (the error column of {out}/manifest.parquet says why)")
        return 0
    held_ok = summary.already - summary.already_failed
    if summary.ok or held_ok:
        return 0
    if summary.videos or summary.skipped or summary.already:
        print("cavmae-prep: error: no input could be processed (see the error column of manifest.parquet)",
              file=sys.stderr)
    else:  # an empty folder, a list of only its header: an empty manifest is no success either
        print("cavmae-prep: error: the inputs hold nothing to ingest (no video file, no list row)", file=sys.stderr)
    return 1


def _report_ignored(ignored: list[tuple[str, str]]) -> None:
    """Files of the input folders that were not taken: a count by reason, and the first few by name."""
    if not ignored:
        return
    reasons = Counter(reason for _, reason in ignored)
    print(f"cavmae-prep: ignored {len(ignored)} file(s) in the input folders ("
          + ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common()) + ")", file=sys.stderr)
    for path, reason in ignored[:MAX_IGNORED_NAMED]:
        print(f"cavmae-prep: ignored: {path}: {reason}", file=sys.stderr)
    if len(ignored) > MAX_IGNORED_NAMED:
        print(f"cavmae-prep: ... and {len(ignored) - MAX_IGNORED_NAMED} more", file=sys.stderr)


def run() -> NoReturn:
    """The process entry (console script, `python -m`): `main`, then `shards.process.finish`, which exits without
    the interpreter's teardown of native thread pools (it could abort a run whose work is done)."""
    finish(main())


if __name__ == "__main__":
    run()
