"""Data-pipeline unit checks: pad/crop, SpecAugment before normalisation, roll, labels, mixup, corrupt samples,
fixed epoch length; and the metrics (AP, retrieval ranks). Epoch order and resume: tests/test_epochs.py."""

import math
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from train_fixtures import color_frames, tone_fbank, write_synthetic_shards  # noqa: E402

from cavmae.preprocess.features import encode_flac  # noqa: E402
from cavmae.shards.config import load_config  # noqa: E402
from cavmae.shards.fbank import fbank as features_fbank  # noqa: E402
from cavmae.shards.index import sample_index  # noqa: E402
from cavmae.shards.schema import sample_members  # noqa: E402
from cavmae.shards.writer import write_shard  # noqa: E402
from cavmae.train.augment import LOG_SILENCE, device_augment, draw_augmentation, mix_fbanks  # noqa: E402
from cavmae.train.epochs import EpochPlan  # noqa: E402
from cavmae.train.evaluate import average_precision, mean_average_precision  # noqa: E402
from cavmae.train.labels import soft_labels  # noqa: E402
from cavmae.train.loaders import eval_loader, train_loader  # noqa: E402
from cavmae.train.retrieve import ranks, recall_metrics  # noqa: E402
from cavmae.train.transform import Transform  # noqa: E402

DATA = {"target_length": 128, "mean": -5.081, "std": 4.4849, "image_size": 64,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
NO_AUG = {"freqm": 0, "timem": 0, "mixup": 0.0, "noise": False, "label_smooth": 0.0}


def pad_or_crop(fbank: torch.Tensor, target_length: int) -> torch.Tensor:
    """The official `_wav2fbank` padding: zero rows at the end, or the first `target_length` rows."""
    n = fbank.shape[0]
    return torch.nn.functional.pad(fbank, (0, 0, 0, target_length - n)) if n < target_length else fbank[:target_length]


def transform(aug=NO_AUG, frame="random", num_classes=4):
    return Transform(DATA, aug, frame=frame, num_frames=4, num_classes=num_classes, label_map=None,
                     label_file=None, seed=0)


def epoch_loader(urls, tf, batch_size, samples=None, seed=0):
    """Epoch 0 of `urls` in global batches of `batch_size` on one rank."""
    index = sample_index(urls)
    plan = EpochPlan(size=len(index), samples=samples or len(index), global_batch=batch_size, accum_steps=1,
                     world_size=1, rank=0, seed=seed)
    return train_loader(index, tf, plan, epoch=0, first=0, count=plan.batches, num_workers=0)


def test_pad_or_crop():
    x = torch.randn(100, 8)
    padded = pad_or_crop(x, 128)
    assert padded.shape == (128, 8) and torch.equal(padded[:100], x) and not padded[100:].any()
    assert torch.equal(pad_or_crop(x, 64), x[:64])


def compact_batch(audio, aug, images=None, **params):
    """A loader-style batch of raw fbanks [B, T, F] with per-sample augmentation parameters drawn as the worker
    does (`draw_augmentation`)."""
    tf = transform(aug)
    rng = np.random.default_rng(params.pop("seed", 0))
    _, t, f = audio.shape
    examples = [{"audio": x, "image": torch.zeros(3, 4, 4, dtype=torch.uint8) if images is None else images[i],
                 "image_mix": None, "lam": 1.0, "key": str(i), "video_id": str(i), "_mixup": None, "_skipped": 0,
                 "aug": draw_augmentation(aug, t, f, rng)} for i, x in enumerate(audio)]
    return tf.collate(examples), [e["aug"] for e in examples]


def reference_augment(fbank, p, noise):
    """The official per-sample route, written out: SpecAugment (zero the bands) on the raw log-mel, normalise,
    + noise·amp, torch.roll along time."""
    x = fbank.clone().float()
    x.narrow(1, *p["freq"]).zero_()
    x.narrow(0, *p["time"]).zero_()
    x = (x - DATA["mean"]) / DATA["std"]
    if "shift" in p:
        x = torch.roll(noise * p["noise"] + x, p["shift"], 0)
    return x


def test_spec_augment_masks_before_normalisation_give_1_133():
    x = torch.full((6, 128, 128), -3.0)
    batch, params = compact_batch(x, dict(NO_AUG, freqm=48, timem=48), seed=1)
    out = device_augment(batch)["audio"]
    masked = (out - 1.1329).abs() < 1e-3
    assert masked.any() and torch.allclose(out[~masked], torch.tensor((-3.0 - DATA["mean"]) / DATA["std"]))
    for y, p in zip(masked, params):  # one frequency band and one time band, each narrower than its parameter
        assert 0 <= y.all(0).sum() < 48 and 0 <= y.all(1).sum() < 48
        assert y.all(0).sum() == p["freq"][1] and y.all(1).sum() == p["time"][1]


def test_noise_and_roll_is_circular_and_small():
    x = torch.zeros(4, 128, 4)
    x[:, 0] = 10.0
    batch, params = compact_batch(x, dict(NO_AUG, noise=True))
    y = device_augment(batch)["audio"]
    base = (x - DATA["mean"]) / DATA["std"]
    for yi, bi, p in zip(y, base, params):
        row = int(yi[:, 0].argmax())
        assert row == p["shift"] % 128
        assert (yi - torch.roll(bi, row, 0)).abs().max() <= 0.1 + 1e-6
        assert (yi - torch.roll(bi, row, 0)).min() >= 0
    assert len({p["shift"] for p in params}) > 1  # per-sample shifts


def test_device_augment_equals_per_sample_reference():
    """The batched path (broadcast masks, gather roll, image mixup + normalisation) equals the per-sample official
    computation for the same parameters and noise; eval batches are normalised only."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 128, 16, generator=gen) * 3 - 5
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8, generator=gen)
    aug = dict(NO_AUG, freqm=8, timem=40, noise=True)
    batch, params = compact_batch(x.half(), aug, images, seed=3)
    assert batch["audio"].dtype == torch.float16 and batch["image"].dtype == torch.uint8
    noise = torch.rand(x.shape, generator=gen)
    out = device_augment(batch, "cpu", noise=noise)
    for i, p in enumerate(params):
        assert torch.allclose(out["audio"][i], reference_augment(x[i].half(), p, noise[i]), atol=1e-6)
    mean, std = torch.tensor(DATA["image_mean"]).view(3, 1, 1), torch.tensor(DATA["image_std"]).view(3, 1, 1)
    assert torch.allclose(out["image"], (images.float() / 255 - mean) / std, atol=1e-5)
    # the drawn noise is reproducible from the batch (its seed), uniform in [0, 0.1)
    again = device_augment(batch)["audio"]
    assert torch.equal(again, device_augment(batch)["audio"]) and not torch.equal(again, out["audio"])
    # mixup: frames mixed with λ in pixel space before normalisation
    batch["image_mix"] = images.flip(0)
    batch["lam"] = torch.linspace(0.2, 1.0, 5)
    lam = batch["lam"].view(5, 1, 1, 1)
    mixed = device_augment(batch, noise=noise)["image"]
    assert torch.allclose(mixed, ((lam * images.float() + (1 - lam) * images.flip(0).float()) / 255 - mean) / std,
                          atol=1e-5)
    # no augmentation: normalisation only
    plain, _ = compact_batch(x, NO_AUG)
    assert torch.allclose(device_augment(plain)["audio"], (x - DATA["mean"]) / DATA["std"], atol=1e-6)


def test_label_smoothing_and_mixup_arithmetic():
    y = soft_labels(4, 0.1, [2])
    assert torch.allclose(y, torch.tensor([0.025, 0.025, 0.9, 0.025]))
    lam = 0.7
    y = soft_labels(4, 0.1, [0], [2, 0], lam)
    expect = torch.tensor([0.025 + 0.7 * 0.9 + 0.3 * 0.9, 0.025, 0.025 + 0.3 * 0.9, 0.025])
    assert torch.allclose(y, expect)
    assert torch.allclose(soft_labels(3, 0.0, [1], [2], 0.25), torch.tensor([0.0, 0.25, 0.75]))


def test_mix_fbanks_in_power_domain():
    a, b = torch.log(torch.full((10, 4), 2.0)), torch.log(torch.full((6, 4), 4.0))
    mixed = mix_fbanks(a, b, 0.25)
    assert mixed.shape == a.shape
    assert torch.allclose(mixed[:6], torch.log(torch.tensor(0.25 * 2 + 0.75 * 4)))
    assert torch.allclose(mixed[6:], torch.log(0.25 * 2 + 0.75 * torch.exp(torch.tensor(LOG_SILENCE))))


def test_transform_order_and_shapes(tmp_path):
    urls = [str(p) for p in write_synthetic_shards(tmp_path, 6, 6)]
    batches = list(eval_loader(urls, transform(frame="all"), batch_size=4, num_workers=0))
    assert [b["audio"].shape[0] for b in batches] == [4, 2]
    assert batches[0]["audio"].dtype == torch.float16 and batches[0]["image"].dtype == torch.uint8
    b = device_augment(batches[0])
    assert b["audio"].shape == (4, 128, 128) and b["image"].shape == (4, 4, 3, 64, 64)
    assert b["label"].shape == (4, 4) and torch.allclose(b["label"].sum(1), torch.ones(4))
    # 130 fbank rows cut to 128, then normalised: padded rows would be 1.133
    assert abs(float(b["audio"].mean())) < 3


def test_epoch_longer_than_the_set_repeats_it_evenly(tmp_path):
    urls = [str(p) for p in write_synthetic_shards(tmp_path, 5, 2)]  # shards of 2, 2, 1 samples
    loader = epoch_loader(urls, transform(), 3, samples=21)  # 7 batches: every sample 4 or 5 times
    keys = [k for b in loader for k in b["key"]]
    assert len(keys) == 21 and sorted(Counter(keys).values()) == [4, 4, 4, 4, 5]
    assert [k for b in loader for k in b["key"]] == keys  # the same order again


def test_mixup_in_the_stream_mixes_labels(tmp_path):
    urls = [str(p) for p in write_synthetic_shards(tmp_path, 8, 8)]
    aug = dict(NO_AUG, mixup=1.0, label_smooth=0.1)
    batch = next(iter(epoch_loader(urls, transform(aug), 8)))
    # every sample is mixed with a partner drawn from the whole set: λ + (1 - λ) of 1 - ls, plus K x ls/K
    assert torch.allclose(batch["label"].sum(1), torch.ones(8))
    assert (batch["label"].max(1).values < 0.9).any()  # at least one mix of two different classes


def test_waveform_mixup_with_flac_equals_fbank_of_mixed_waveform(tmp_path):
    """With a .flac in both samples the mix is the official one: the fbank of the mixed waveform (reference §2.4);
    when the partner has none it falls back to the mel power-domain mix. Each batch says which one ran."""
    audio = load_config(None).audio
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    waves = {"a": 0.5 * np.sin(2 * np.pi * 440 * t) + 0.1, "b": 0.3 * np.sin(2 * np.pi * 1500 * t[:9000]) - 0.2}
    waves = {k: (w + 0.01 * rng.standard_normal(w.size)).astype(np.float32) for k, w in waves.items()}

    def shard(path, flac_b=True):
        members = []
        for label, (key, w) in enumerate(waves.items()):
            flac = encode_flac(w, 16000) if key == "a" or flac_b else None
            members += sample_members(key, {"video_id": key}, features_fbank(w, audio),
                                      color_frames((200, 0, 0), 64, 2, random.Random(label)), flac=flac,
                                      label_indices=[label])
        write_shard(path, members)
        return [str(path)]

    aug = dict(NO_AUG, mixup=1.0)
    tf = Transform(DATA, aug, frame="random", num_frames=2, num_classes=2, label_map=None, label_file=None, seed=0,
                   audio=audio.to_dict())
    batch = device_augment(next(iter(epoch_loader(shard(tmp_path / "w.tar"), tf, 2))))
    assert batch["mixup"] == {"waveform": 2}  # both mixed (a partner may be the sample itself, as officially)
    row = next(i for i in range(2) if 0 < float(batch["label"][i].max()) < 1)  # a sample mixed with the other one
    key, other = batch["key"][row], "ab".replace(batch["key"][row], "")
    own = "ab".index(key)
    lam = float(batch["label"][row, own])  # label λ on its own class, 1-λ on the partner's
    assert 0 < lam < 1 and float(batch["label"][row, 1 - own]) == pytest.approx(1 - lam)
    # the official route, written out: s16 waveforms (what the .flac holds), DC removed, the partner cut/padded
    w1, w2 = (torch.from_numpy(np.round(waves[k] * 32768) / 32768).float() for k in (key, other))
    w1, w2 = w1 - w1.mean(), w2 - w2.mean()
    w2 = torch.nn.functional.pad(w2, (0, max(0, w1.shape[0] - w2.shape[0])))[: w1.shape[0]]
    mix = lam * w1 + (1 - lam) * w2
    expected = torch.from_numpy(features_fbank((mix - mix.mean()).numpy(), audio).astype(np.float32))
    expected = (pad_or_crop(expected, DATA["target_length"]) - DATA["mean"]) / DATA["std"]
    assert torch.allclose(batch["audio"][row], expected, atol=5e-3)  # float32 rounding in near-silent bins
    approx = mix_fbanks(torch.from_numpy(features_fbank(waves[key], audio).astype(np.float32)),
                        torch.from_numpy(features_fbank(waves[other], audio).astype(np.float32)), lam)
    assert not torch.allclose(batch["audio"][row], (pad_or_crop(approx, 128) - DATA["mean"]) / DATA["std"],
                              atol=1e-2)

    batch = next(iter(epoch_loader(shard(tmp_path / "f.tar", flac_b=False), tf, 2)))
    assert batch["mixup"].get("fbank", 0) >= 1  # "b" has no .flac: its mix (at least) is the power-domain one


def test_corrupt_samples_are_counted_skips(tmp_path):
    rng = random.Random(0)
    good = lambda i: sample_members(f"good{i}", {"video_id": f"good{i}"}, tone_fbank(440.0, 1.3, rng),  # noqa: E731
                                    color_frames((200, 0, 0), 64, 2, rng), label_indices=[1])
    bad_jpeg = sample_members("badjpeg", {"video_id": "badjpeg"}, tone_fbank(440.0, 1.3, rng),
                              [b"not a jpeg", b"nor this"], label_indices=[1])
    bad_npy = [(n, b"garbage" if n.endswith(".npy") else d) for n, d in good(9)]
    bad_npy = [(n.replace("good9", "badnpy"), d) for n, d in bad_npy]
    write_shard(tmp_path / "a.tar", good(0) + bad_jpeg + good(1) + bad_npy + good(2))
    batches = list(eval_loader([str(tmp_path / "a.tar")], transform(frame="middle"), batch_size=8, num_workers=0))
    assert sorted(batches[0]["key"]) == ["good0", "good1", "good2"]
    assert sum(b["skipped"] for b in batches) == 2
    assert not (batches[0]["audio"] == 0.01).all(2).all(1).any()  # never a constant stand-in


def test_average_precision_matches_definition():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 1])
    assert math.isclose(average_precision(scores, targets), (1 / 1 + 2 / 3 + 3 / 5) / 3)
    # ties form one threshold: both tied items count at once
    assert math.isclose(average_precision(np.array([0.5, 0.5]), np.array([1, 0])), 0.5)
    s = np.random.default_rng(0).random((50, 3))
    assert math.isclose(mean_average_precision(s, s > 0.5), 1.0)


def test_retrieval_ranks():
    sim = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.1], [0.0, 0.2, 0.1]])
    assert ranks(sim).tolist() == [0, 1, 1]
    m = recall_metrics(sim)
    assert m["R@1"] == pytest.approx(1 / 3) and m["R@5"] == 1.0 and m["MR"] == 2.0


IMPORT_WITHOUT = """
import importlib, pkgutil, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("av", "ray", "torchaudio") or name.startswith("cavmae.preprocess"):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
from cavmae import shards, train
for pkg in (train, shards):
    for m in pkgutil.iter_modules(pkg.__path__):
        if m.name != "__main__":
            importlib.import_module(f"{pkg.__name__}.{m.name}")
print("ok")
"""


def test_trainer_imports_without_pyav_ray_torchaudio():
    """A GPU box with torch but no PyAV, Ray or torchaudio trains from shards without .flac (bench/gpu.sh)."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT], cwd=Path(__file__).parents[1], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
