"""preprocess.decode on real ffmpeg-generated clips and the bundled real clip."""

from __future__ import annotations

import math
import os
import subprocess

import av
import numpy as np
import pytest
import torchvision.transforms as T
from PIL import Image

from cavmae.preprocess import decode as decode
from cavmae.preprocess.decode import BadInput, decode_clips, official_picks
from cavmae.shards.config import load_config
from tests.clips import bigbuckbunny, corrupt_corpus, make_clip

CFG = load_config()
SIZE = (321, 179)  # odd on purpose

FORMATS = {
    "mp4_h264_aac": dict(container="mp4"),
    "mkv_vp9_opus": dict(container="mkv", vcodec="libvpx-vp9", acodec="libopus"),
    "webm_vp8_vorbis": dict(container="webm", vcodec="libvpx", acodec="libvorbis"),
    "avi_mpeg4_mp3": dict(container="avi", vcodec="mpeg4", acodec="libmp3lame", extra=["-bf", "2"]),
    "mov_h264_aac": dict(container="mov"),
    "mp4_hevc_aac": dict(container="mp4", vcodec="libx265", extra=["-x265-params", "log-level=error"]),
    "mkv_h264_aac": dict(container="mkv"),                 # NONREF skipping with Matroska timestamps
}


def reference_frames(path, num=10, length_s=10.0, offset=1):
    """The official picks from a plain full decode (every frame, no skipping), as full-size RGB frames."""
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        fps = float(vs.average_rate)
        count = vs.frames or int(math.floor(c.duration / 1e6 * fps + 0.5))
        picks = official_picks(min(count, int(fps * length_s)), num, offset)
        frames = {}
        for i, frame in enumerate(c.decode(vs)):
            if i in picks:
                frames[i] = frame
            if i >= max(picks):
                break
        return picks, [frames[p] for p in picks], fps


def converted(frames):
    """Our resize + crop (the same scaler call) of full-decode frames, to compare picks bit-exactly."""
    dec = object.__new__(decode._Decoder)
    dec.s = decode.DecodeSettings.from_config(CFG)
    return [dec._convert(f) for f in frames]


def official_transform(rgb: np.ndarray) -> np.ndarray:
    """torchvision Resize(224) + CenterCrop(224) on a PIL image, as the official extractor does."""
    tf = T.Compose([T.Resize(224), T.CenterCrop(224)])
    return np.asarray(tf(Image.fromarray(rgb)))


@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_frames_match_official_picks(clips_dir, name):
    path = make_clip(clips_dir, f"fmt_{name}", seconds=3.0, size=SIZE, **FORMATS[name])
    (clip,) = decode_clips(path, CFG)
    assert clip.has_video and clip.has_audio and clip.window is None and clip.clip_start_s == 0.0
    assert len(clip.frames) == 10
    assert all(f.shape == (224, 224, 3) and f.dtype == np.uint8 and f.flags.c_contiguous for f in clip.frames)
    assert clip.fps == pytest.approx(25.0)
    assert clip.duration_s == pytest.approx(3.0, abs=0.1)
    picks, ref, _ = reference_frames(path)
    if FORMATS[name]["container"] in ("mp4", "mov"):         # frame count in the header: 75 frames
        assert picks == [0, 6, 14, 21, 29, 36, 44, 51, 59, 66]
    for ours, theirs in zip(clip.frames, converted(ref)):
        np.testing.assert_array_equal(ours, theirs)      # bit-exact: NONREF skipping changed nothing
    assert clip.frame_times_s == sorted(clip.frame_times_s)
    assert clip.waveform.dtype == np.float32 and clip.waveform.ndim == 1
    assert abs(clip.waveform.size - 3 * 16000) < 1600     # codec priming/padding only
    assert np.abs(clip.waveform).max() <= 1.0


def test_short_clip_spreads_frames_over_real_length(clips_dir):
    path = make_clip(clips_dir, "short2s", seconds=2.0, size=(160, 120))
    (clip,) = decode_clips(path, CFG)
    assert len(clip.frames) == 10
    assert clip.frame_times_s == pytest.approx([0.0, 0.16, 0.36, 0.56, 0.76, 0.96, 1.16, 1.36, 1.56, 1.76])
    assert 31000 < clip.waveform.size < 33000


def test_long_clip_stops_at_length(clips_dir, monkeypatch):
    path = make_clip(clips_dir, "long25s", seconds=25.0, size=(160, 120))
    decoded = []
    real = decode._Decoder._video_frame
    monkeypatch.setattr(decode._Decoder, "_video_frame",
                        lambda self, frame: (decoded.append(frame.pts), real(self, frame))[1])
    (clip,) = decode_clips(path, CFG)
    assert max(clip.frame_times_s) < 10.0
    assert clip.frame_times_s[-1] == pytest.approx(8.96)
    assert clip.waveform.size == 160000
    assert clip.duration_s == pytest.approx(25.0, abs=0.1)
    assert len(decoded) < 250                             # never decoded past the last pick (frame 224)


def test_windows_mode_one_pass(clips_dir, monkeypatch):
    path = make_clip(clips_dir, "long25s", seconds=25.0, size=(160, 120))
    opened = []
    real_open = av.open
    monkeypatch.setattr(decode.av, "open", lambda *a, **k: (opened.append(a[0]), real_open(*a, **k))[1])
    cfg = CFG.with_overrides(["clip.mode=windows"])
    clips = decode_clips(path, cfg)
    assert len(opened) == 1
    assert [c.window for c in clips] == [0, 1, 2]
    assert [c.clip_start_s for c in clips] == [0.0, 10.0, 20.0]
    assert [c.waveform.size for c in clips] == [160000, 160000, pytest.approx(80000, abs=1200)]
    for c in clips:
        assert len(c.frames) == 10
        assert c.clip_start_s <= min(c.frame_times_s) and max(c.frame_times_s) < c.clip_start_s + 10.0
    assert clips[1].frame_times_s[0] == pytest.approx(10.0)
    # trailing 5 s window: 125 frames spread as for a short clip
    assert clips[2].frame_times_s == pytest.approx([20 + (max(int(i * 12.5) - 1, 0)) / 25 for i in range(10)])
    # a trailing window shorter than min_window_s is dropped
    cfg = CFG.with_overrides(["clip.mode=windows", "clip.min_window_s=6.0"])
    assert [c.window for c in decode_clips(path, cfg)] == [0, 1]
    # overlapping windows
    cfg = CFG.with_overrides(["clip.mode=windows", "clip.hop_s=5.0"])
    assert [c.clip_start_s for c in decode_clips(path, cfg)] == [0.0, 5.0, 10.0, 15.0, 20.0]


def test_frame_offset_and_skip_nonref(clips_dir):
    path = make_clip(clips_dir, "fmt_mp4_h264_aac", seconds=3.0, size=SIZE, **FORMATS["mp4_h264_aac"])
    (base,) = decode_clips(path, CFG)
    (no_off,) = decode_clips(path, CFG.with_overrides(["video.official_frame_offset=false"]))
    assert no_off.frame_times_s == pytest.approx([i * 7.5 // 1 / 25 for i in range(10)])
    picks, ref, _ = reference_frames(path, offset=0)
    for ours, theirs in zip(no_off.frames, converted(ref)):
        np.testing.assert_array_equal(ours, theirs)
    (fast,) = decode_clips(path, CFG.with_overrides(["video.skip_nonref=true"]))
    assert len(fast.frames) == 10
    # picks may move forward to the next reference frame, never backwards, and not far
    for t_fast, t_base in zip(fast.frame_times_s, base.frame_times_s):
        assert t_base <= t_fast <= t_base + 0.2


def test_channel_policy_first_vs_mix(clips_dir):
    path = make_clip(clips_dir, "surround51", seconds=2.0, size=(160, 120), channels=6, sample_rate=48000)
    (first,) = decode_clips(path, CFG)
    (mix,) = decode_clips(path, CFG.with_overrides(["audio.channel_policy=mix"]))
    assert first.waveform.shape == mix.waveform.shape
    assert np.abs(first.waveform - mix.waveform).max() > 0.05
    # 'first' is channel 0 of the official route (ffmpeg -ar 16000 to s16 PCM; sox remix 1 = channel 0)
    official = official_pcm(path, 6)
    n = min(official.shape[0], first.waveform.size)
    assert abs(official.shape[0] - first.waveform.size) <= 160
    assert np.abs(official[:n, 0] - first.waveform[:n]).max() <= 2 / 32768
    # 'mix' is the ffmpeg -ac 1 down-mix
    official = official_pcm(path, 1, ["-ac", "1"])
    n = min(official.shape[0], mix.waveform.size)
    assert np.abs(official[:n, 0] - mix.waveform[:n]).max() <= 2 / 32768


def official_pcm(path, channels, extra=()):
    """The ffmpeg CLI's `-vn -ar 16000` s16 PCM (what the official wav holds), as float [n, channels]."""
    out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-vn", "-ar", "16000", *extra,
                          "-f", "s16le", "-c:a", "pcm_s16le", "-"], check=True, capture_output=True).stdout
    return np.frombuffer(out, "<i2").reshape(-1, channels).astype(np.float32) / 32768


def test_rotated_file_is_displayed_upright(clips_dir, tmp_path):
    path = make_clip(clips_dir, "rot90", seconds=1.0, size=(320, 180), rotate=90)
    (clip,) = decode_clips(path, CFG)
    assert len(clip.frames) == 10 and clip.frames[0].shape == (224, 224, 3)
    png = tmp_path / "f0.png"        # the ffmpeg CLI applies the display matrix (autorotate)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(path), "-frames:v", "1", str(png)], check=True)
    upright = np.asarray(Image.open(png).convert("RGB"))
    assert upright.shape[:2] == (320, 180)
    expected = official_transform(upright)
    sideways = official_transform(np.rot90(upright, k=-1).copy())
    err = np.abs(clip.frames[0].astype(int) - expected).mean()
    assert err < 4.0
    assert err < np.abs(clip.frames[0].astype(int) - sideways).mean() / 3


def test_bigbuckbunny_matches_official_transform():
    path = bigbuckbunny()
    (clip,) = decode_clips(path, CFG)
    assert clip.fps == 25.0 and clip.duration_s == pytest.approx(5.312, abs=0.01)
    assert len(clip.frames) == 10 and clip.frame_times_s[-1] == pytest.approx(4.68)
    assert clip.waveform.size == pytest.approx(5.3 * 16000, rel=0.01)
    picks, ref, _ = reference_frames(path)
    assert picks == [0, 12, 25, 38, 51, 65, 78, 91, 104, 117]
    # our scaler path vs the official RGB -> PIL -> Resize(224) bilinear -> CenterCrop(224)
    errs = [np.abs(ours.astype(int) - official_transform(f.to_ndarray(format="rgb24"))).mean()
            for ours, f in zip(clip.frames, ref)]
    assert max(errs) < 2.5, errs


def test_allow_missing(clips_dir):
    bad = corrupt_corpus(clips_dir)
    (clip,) = decode_clips(bad["no_audio"], CFG.with_overrides(["audio.allow_missing=true"]))
    assert clip.has_video and not clip.has_audio and clip.waveform is None and len(clip.frames) == 10
    (clip,) = decode_clips(bad["no_video"], CFG.with_overrides(["video.allow_missing=true"]))
    assert clip.has_audio and not clip.has_video and clip.frames == [] and clip.waveform.size > 30000


CORRUPT_REASONS = {
    "zero_bytes": "empty file",
    "truncated": "not a media file",
    "random_bytes": "not a media file",
    "text_file": "not a media file",
    "no_audio": "no audio stream",
    "no_video": "no video stream",
    "too_short": "shorter than one fbank window",
}


def test_corrupt_corpus_raises_bad_input(clips_dir):
    bad = corrupt_corpus(clips_dir)
    assert set(bad) == set(CORRUPT_REASONS)
    for name, path in bad.items():
        with pytest.raises(BadInput) as info:
            decode_clips(path, CFG)
        msg = str(info.value)
        assert CORRUPT_REASONS[name] in msg, (name, msg)
        assert "\n" not in msg and str(path) not in msg


def test_missing_and_unreadable(tmp_path):
    with pytest.raises(BadInput, match="file not found"):
        decode_clips(tmp_path / "nope.mp4", CFG)
    with pytest.raises(BadInput, match="not a regular file"):
        decode_clips(tmp_path, CFG)
    if os.geteuid() != 0:                                 # root reads anything
        p = tmp_path / "locked.mp4"
        p.write_bytes(b"x" * 100)
        p.chmod(0)
        with pytest.raises(BadInput, match="permission denied"):
            decode_clips(p, CFG)


def test_partly_truncated_file_fails_instead_of_padding(clips_dir, tmp_path):
    """A file cut mid-clip still opens (index at the front) but must not become a sample of repeated frames."""
    whole = make_clip(clips_dir, "faststart_6s", seconds=6.0, size=(160, 120), extra=["-movflags", "+faststart"])
    cut = tmp_path / "cut.mp4"
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    cfg = load_config(sets=["clip.length_s=5.0"])
    assert len(decode_clips(whole, cfg)[0].frames) == 10
    with pytest.raises(BadInput, match="truncated|ends before"):
        decode_clips(cut, cfg)


def test_pil_resize_gives_the_official_pixels():
    """`video.resize: pil` reproduces RGB -> PIL -> Resize(224) -> CenterCrop(224) exactly (same decoded frame)."""
    path = bigbuckbunny()
    (clip,) = decode_clips(path, load_config(sets=["video.resize=pil"]))
    _, ref, _ = reference_frames(path)
    for ours, frame in zip(clip.frames, ref):
        assert np.array_equal(ours, official_transform(frame.to_ndarray(format="rgb24")))
