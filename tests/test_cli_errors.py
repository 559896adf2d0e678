"""The bad-input sweep: every subcommand of `cavmae-prep`, `cavmae-train` and `cavmae`, given bad input (missing
files, bad values, wrong modes, empty sets), prints one line "PROG: error: ..." on stderr and exits 2, never a
traceback. The CLIs run in-process (`main(argv)`): an exception that escapes fails the test with its traceback."""

import argparse
import os
from pathlib import Path

import pytest
import torch

from cavmae import cli as cavmae_cli
from cavmae.preprocess import cli as prep_cli
from cavmae.shards.config import load_config
from cavmae.train import cli as train_cli
from cavmae.train.model import build_finetune_model, build_pretrain_model
from cavmae.train.stage import model_settings
from tests.train_fixtures import TINY, label_index_csv, write_synthetic_shards

HUGE = "1" + "0" * 30


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The things the cases name: a small shard set, checkpoints, a label index, empty and hostile folders."""
    root = tmp_path_factory.mktemp("bad-inputs")
    write_synthetic_shards(root / "shards", 8, 4)
    settings = model_settings(load_config(None, TINY))
    torch.save(build_finetune_model(settings, 4).state_dict(), root / "ft.pth")
    torch.save(build_finetune_model(settings, 4, audio_only=True).state_dict(), root / "ft-audio.pth")
    torch.save(build_pretrain_model(settings).state_dict(), root / "pt.pth")
    ft = build_finetune_model(settings, 4).state_dict()  # pos_embed_a claiming 2^20 times the tokens, 1 row stored
    _, tokens, dim = ft["pos_embed_a"].shape
    torch.save({**ft, "pos_embed_a": torch.zeros(dim).as_strided((1, tokens << 20, dim), (0, 0, 1))},
               root / "inflated.pth")
    (root / "empty").mkdir()
    (root / "hostile").mkdir()
    (root / "hostile" / "pipeline.yaml").write_text(f"video:\n  num_frames: {HUGE}\n")
    big = "".join(f"# {i:07d} a config past the 1 MiB limit is refused unparsed\n" for i in range(20000))
    (root / "big.yaml").write_text(big)
    (root / "big").mkdir()  # a downloaded shard folder whose pipeline.yaml is too large to be a config
    for shard in (root / "shards").glob("*.tar"):
        (root / "big" / shard.name).write_bytes(shard.read_bytes())
    (root / "big" / "pipeline.yaml").write_text(big)
    os.mkfifo(root / "fifo.pth")  # torch.load would wait for a writer forever
    (root / "junk.tar").write_bytes(b"not a tar file at all" * 100)
    (root / "a-folder").mkdir()
    (root / "a-file").write_text("keep me\n")
    (root / "vggsound.csv").write_text("AAAAAAAAAAA,3,dog,train\nBBBBBBBBBBB,4,cat,test\n")
    (root / "meta").mkdir()
    (root / "meta" / "esc50.csv").write_text("filename,fold,target,category\n1-1-A-0.wav,1,0,dog\n")
    return {"root": str(root), "shards": str(root / "shards"), "ft": str(root / "ft.pth"),
            "ft_audio": str(root / "ft-audio.pth"), "pt": str(root / "pt.pth"),
            "inflated": str(root / "inflated.pth"), "fifo": str(root / "fifo.pth"), "empty": str(root / "empty"),
            "hostile": str(root / "hostile"), "big": str(root / "big"),
            "big_yaml": str(root / "big.yaml"), "junk": str(root / "junk.tar"), "folder": str(root / "a-folder"),
            "file": str(root / "a-file"), "missing": str(root / "missing"),
            "labels": str(label_index_csv(root / "labels.csv")), "out": str(root / "out"),
            "vgg": str(root / "vggsound.csv"), "esc": str(root / "meta" / "esc50.csv")}


def tiny(*extra: str) -> list[str]:
    return [a for s in TINY + list(extra) for a in ("--set", s)]


PREP = [
    ("ingest {missing} --out {out}", "missing"),
    ("ingest {folder} --out {file}", "not a folder"),
    ("ingest {folder} --out zz://bucket/out", "zz://bucket/out: unsupported storage URI"),
    ("ingest {folder} --out {out} --set video.num_frames=" + HUGE, "'video.num_frames' must be <= 100"),
    ("ingest {folder} --out {out} --set audio.frame_shift_ms=0", "'audio.frame_shift_ms' must be >= 1.0"),
    ("ingest {folder} --out {out} --labels {missing}.csv", "missing.csv"),
    ("ingest {folder} --out {out} --label-index {missing}.csv", "missing.csv"),
    ("ingest {folder} --out {out} --workers 0", "--workers"),
    ("ingest {folder} --out {out} --config {missing}.yaml", "cannot read config"),
    ("ingest {vgg} --split trian --out {out}", "--split trian: not a split of"),
    ("ingest {esc} --split 6 --videos-dir {folder} --out {out}", "--split 6: not a fold"),
    ("ingest {vgg} --split , --out {out}", "--split ',': names no split"),
    ("ingest {folder} --split train --out {out}", "none of the inputs is a dataset list"),
    ("ingest {vgg} --list-format kinetics --out {out}", "needs the column(s) youtube_id, time_start, time_end"),
    ("ingest {folder} --out {out} --label-index {vgg}", "needs the column(s) index, mid"),
    ("fetch {vgg} --split trian --out {out}", "--split trian: not a split of"),
    ("fetch {esc} --split 6 --out {out}", "--split 6: not a fold"),
    ("fetch {vgg} --list-format esc50 --out {out}", "needs the column(s) filename, fold, target, category"),
    ("ingest {folder} --out {out} --config {big_yaml}", "big.yaml: larger than 1 MiB"),
    ("reprocess {big} --out {out}", "pipeline.yaml: larger than 1 MiB"),
    ("verify {big}", "pipeline.yaml: larger than 1 MiB"),
    ("reprocess {missing} --out {out}", "not a shard folder"),
    ("reprocess {shards} --out {out}", "not a shard folder"),
    ("reprocess {hostile} --out {out}", "'video.num_frames' must be <= 100"),
    ("stats {missing}", "no shards found"),
    ("stats {empty}", "no shards found"),
    ("stats {shards} --batch-size 0", "--batch-size"),
    ("inspect {missing} --random 2 --out {out}.png", "no shards found"),
    ("inspect {shards} --key nope --out {out}.png", "nope"),
    ("inspect {shards} --random 0 --out {out}.png", "--random"),
    ("inspect {junk} --random 1 --out {out}.png", "junk.tar"),
    ("nosuch", "invalid choice"),
]
TRAIN = [
    ("pretrain --shards {missing} --out {out}", "no shards found"),
    ("pretrain --shards {empty} --out {out}", "no shards found"),
    ("pretrain --shards {shards} --out {out} --set model.mask_ratio_a=1.0", "'model.mask_ratio_a' must be < 1.0"),
    ("pretrain --shards {shards} --out {out} --init {missing}.pth", "missing.pth"),
    ("pretrain --shards {shards} --out {file}", "not a folder"),
    ("pretrain --shards {big} --out {out}", "big/pipeline.yaml: larger than 1 MiB"),
    ("pretrain --shards {shards} --out {out} --config {big_yaml}", "big.yaml: larger than 1 MiB"),
    ("pretrain --shards {shards} --out {out} --init {inflated}", "inflated.pth: tensors claim more values"),
    ("pretrain --shards {shards} --out {out} --init {fifo}", "fifo.pth: not a regular file"),
    ("finetune --shards {shards} --out {out} --labels {labels} --init {inflated}",
     "inflated.pth: tensors claim more values"),
    ("pretrain --shards {shards} --out {out} --set pretrain.epoch_samples=100000000000000", "epoch_samples"),
    ("pretrain --shards {shards} --out {out} --set pretrain.batch_size=3 --set pretrain.accum_steps=2",
     "not divisible"),
    ("pretrain --shards {shards} --out {out} --stop-after-steps 0", "--stop-after-steps"),
    ("pretrain --shards {shards} --out {out} --set model.mask_ratio_a=0", "model.mask_ratio_a=0 leaves nothing"),
    ("pretrain --shards {shards} --out {out} --set model.mae_loss_weight=0 --set model.contrast_loss_weight=0",
     "both 0"),
    ("pretrain --shards {shards} --out {out} --set model.contrast_chunks=3", "x model.contrast_chunks = 3"),
    ("finetune --shards {shards} --out {out} --mode bogus", "invalid choice: 'bogus'"),
    ("finetune --shards {shards} --out {out} --labels {missing}.csv", "missing.csv"),
    ("finetune --shards {shards} --out {out} --set finetune.label_smooth=3", "'finetune.label_smooth' must be < 1.0"),
    ("finetune --shards {shards} --out {out} --set finetune.mode=bogus", "'finetune.mode' must be one of"),
    ("eval --shards {shards} --checkpoint {missing}.pth", "missing.pth"),
    ("eval --shards {shards} --checkpoint {ft} --mode bogus", "invalid choice: 'bogus'"),
    ("eval --shards {shards} --checkpoint {pt}", "not a finetuned checkpoint"),
    ("eval --shards {shards} --checkpoint {ft} --frames last", "--frames"),
    ("eval --shards {shards} --checkpoint {ft_audio} --mode multimodal", "audio-only model"),
    ("eval --shards {shards} --checkpoint {ft} --out {folder}", "not a regular file"),
    ("eval --shards {junk} --checkpoint {ft}", "no decodable sample"),
    ("eval --shards {shards} --checkpoint {ft} --set data.std=0", "'data.std' must be > 0.0"),
    ("eval --shards {shards} --checkpoint {inflated}", "inflated.pth: tensors claim more values"),
    ("order --shards {shards} --epoch 1 --rank 5", "--rank"),
    ("order --shards {missing} --epoch 1", "no shards found"),
    ("order --shards {shards} --epoch 0", "--epoch"),
    ("retrieve --shards {shards} --checkpoint {missing}.pth", "missing.pth"),
    ("retrieve --shards {shards} --checkpoint {ft_audio}", "audio-only model"),
    ("retrieve --shards {shards} --checkpoint {inflated}", "inflated.pth: tensors claim more values"),
    ("retrieve --shards {shards} --checkpoint {pt} --out {folder}", "not a regular file"),
    ("embed --shards {shards} --checkpoint {pt} --out {folder}", "not a regular file"),
    ("embed --shards {shards} --checkpoint {pt} --out {out}.parquet --frames last", "--frames"),
    ("embed --shards {empty} --checkpoint {pt} --out {out}.parquet", "no shards found"),
    ("embed --shards {shards} --checkpoint {inflated} --out {out}.parquet", "inflated.pth: tensors claim more values"),
]
CAVMAE = [
    ("predict {missing}.mp4 --checkpoint {missing}.pth --labels {labels}", "missing.pth"),
    ("predict {missing}.mp4 --checkpoint {ft} --labels {missing}.csv", "missing.csv"),
    ("predict {missing}.mp4 --checkpoint {ft} --labels {labels} --mode bogus", "invalid choice: 'bogus'"),
    ("predict {missing}.mp4 --checkpoint {ft} --labels {labels} --top-k 0", "--top-k"),
    ("predict {missing}.mp4 --checkpoint {ft} --labels {labels} --set data.std=0", "'data.std' must be > 0.0"),
    ("predict {missing}.mp4 --checkpoint {ft} --labels {labels} --config {missing}.yaml", "cannot read config"),
    ("predict {missing}.mp4 --checkpoint {ft} --labels {labels} --prep-config {hostile}/pipeline.yaml",
     "'video.num_frames' must be <= 100"),
    ("predict {missing}.mp4 --checkpoint {ft} --labels {labels} --out {folder}", "not a regular file"),
    ("predict {missing}.mp4 --checkpoint {ft} --labels {labels} --prep-config {big}/pipeline.yaml",
     "pipeline.yaml: larger than 1 MiB"),
    ("predict {missing}.mp4 --checkpoint {ft_audio} --labels {labels} --mode videoonly", "audio-only model"),
    ("predict {missing}.mp4 --checkpoint {inflated} --labels {labels}", "inflated.pth: tensors claim more values"),
    ("predict", "required"),
]
CASES = ([("cavmae-prep", prep_cli.main, line, needle) for line, needle in PREP]
         + [("cavmae-train", train_cli.main, line, needle) for line, needle in TRAIN]
         + [("cavmae", cavmae_cli.main, line, needle) for line, needle in CAVMAE])


@pytest.mark.parametrize("prog, main, line, needle", CASES, ids=[f"{c[0]} {c[2].split()[0]}: {c[3]}" for c in CASES])
def test_bad_input_is_one_line_and_exit_2(inputs, capsys, prog, main, line, needle):
    argv = [part.format(**inputs) for part in line.split()]
    if prog != "cavmae-prep":  # the tiny model, before the case's own settings (a later --set wins)
        argv[1:1] = tiny("pretrain.batch_size=4", "finetune.batch_size=4", "pretrain.epochs=1", "finetune.epochs=1",
                         "finetune.wa=false")
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith(f"{prog}") and ": error: " in err and "\n" not in err, err
    assert needle in err, err
    assert Path(inputs["file"]).read_text() == "keep me\n" and not list(Path(inputs["folder"]).iterdir())


def test_contradictory_settings_write_nothing(inputs, capsys):
    """A rule between settings (a mask ratio of 0 while the MAE loss runs) is checked with the settings: one line,
    exit 2, and no run folder, not a traceback from the model after config.yaml was written."""
    out = Path(inputs["root"]) / "never-written"
    argv = ["pretrain", "--shards", inputs["shards"], "--out", str(out), *tiny("model.mask_ratio_v=0")]
    assert train_cli.main(argv) == 2
    assert "model.mask_ratio_v=0" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("words", [["--key", "-PJHxphWEs"], ["--key=-PJHxphWEs"], ["--key", "--PJHxphWEs"],
                                   ["--key=--PJHxphWEs"]])
def test_inspect_takes_a_key_starting_with_a_dash(inputs, capsys, words):
    """YouTube ids may start with '-' (or two): `--key ID` and `--key=ID` both hand the id to the lookup (here: no
    such sample) rather than argparse reading it as an unknown option; `--key --out` still lacks its value."""
    key = words[-1].split("=")[-1]
    assert prep_cli.main(["inspect", inputs["shards"], *words, "--out", inputs["out"] + ".png"]) == 2
    assert capsys.readouterr().err.strip() == f"cavmae-prep: error: --key {key}: no such sample in the 2 shard(s)"
    with pytest.raises(SystemExit):
        prep_cli.main(["inspect", inputs["shards"], "--key", "--out", inputs["out"] + ".png"])
    assert "argument --key: expected one argument" in capsys.readouterr().err


@pytest.mark.parametrize("cli", [prep_cli, train_cli, cavmae_cli], ids=["cavmae-prep", "cavmae-train", "cavmae"])
def test_each_subcommand_help_shows_its_own_examples(cli):
    """`PROG SUB --help` ends with SUB's examples only (continued lines kept), `PROG --help` with all of them."""
    parser = cli.build_parser()
    (subs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    every = cli.EXAMPLES.strip().splitlines()[1:]
    shown = []
    for name, sub in subs.choices.items():
        lines = sub.format_help().split("\nexamples:\n", 1)[1].rstrip().splitlines()
        entries = [line.split() for line in lines if not line.startswith("   ")]
        assert entries and all(any(word == name and "cavmae" in before for before, word in zip(words, words[1:]))
                               for words in entries), (name, lines)
        shown += lines
    assert sorted(shown) == sorted(every) and all(line in parser.format_help() for line in every)


@pytest.mark.parametrize("cli", [prep_cli, train_cli, cavmae_cli])
def test_each_cli_catches_user_errors_alone(cli):
    """The one error contract: a user-caused problem is a `UserError` (its one line, its exit status), raised where
    it is found; a CLI catches nothing else (but an interrupt), so any other exception is a bug with its traceback,
    never an error line that hides it."""
    import ast
    import inspect

    handled = {ast.unparse(handler.type) for handler in ast.walk(ast.parse(inspect.getsource(cli)))
               if isinstance(handler, ast.ExceptHandler)}
    assert handled <= {"UserError", "KeyboardInterrupt"}, handled


def test_a_user_error_reports_its_own_exit_status(capsys):
    """A diverged run is a user error (the recipe) with the exit status docs/train.md documents for it: 1, not 2."""
    from cavmae.shards.errors import UserError, report
    from cavmae.train.loop import Diverged

    assert report("p", Diverged("the loss was not finite")) == 1
    assert report("p", UserError("bad")) == 2
    assert capsys.readouterr().err.splitlines() == ["p: error: the loss was not finite", "p: error: bad"]


def test_stats_of_shards_with_different_mel_widths_is_a_user_error():
    """Shard sets of different fbank widths given to one `stats` run are the user's input, not a bad sample."""
    from cavmae.preprocess.stats import merge
    from cavmae.shards.errors import UserError

    parts = [{"url": "a/shard-000000.tar", "rows": 9, "bins": 64},
             {"url": "b/shard-000000.tar", "rows": 9, "bins": 128}]
    with pytest.raises(UserError, match=r"different widths \(\[64, 128\] mel bins\)"):
        merge(parts, target_length=16, batch_size=4)
