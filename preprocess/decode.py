"""One pass over a video file with PyAV: the clip's frames (official picks) and its 16 kHz mono audio.

The file is opened once and its video and audio packets are demuxed together, in file order. Decoding
stops as soon as the clip is covered (`clip.mode: first`), or runs once over the whole file yielding each
consecutive window as soon as it is complete (`clip.mode: windows`). At any time only the kept frames
(already resized and cropped) and the audio of the open windows are held.

Frames, as the official CAV-MAE extractor picks them (OpenCV): for a clip of N frames,
N = min(frame count, int(fps * clip.length_s)), frame i of k is index int(i * (N / k)) - 1 (clamped at 0;
`video.official_frame_offset: false` drops the -1). Indices count decoded frames in presentation order, as
OpenCV numbers them on constant-frame-rate files. A window starting at t uses the same rule over its own
frames, from frame round(t * fps). Only the kept frames are converted: the decoder's scaler (swscale)
resizes the short side to `video.image_size` while converting to RGB, then the centre is cropped, as
torchvision's Resize(int) + CenterCrop do. Display rotation (the display matrix) is honoured.

Speed: decoding is single-threaded by default (ingest runs one task per core; on one core a threaded decoder
measured no faster). For H.264 and HEVC with timestamps and a constant frame rate, packets of frames that are
not picks are sent with the decoder's skip_frame at NONREF: the decoder drops them only when no other frame
refers to them, so every kept frame is bit-identical to a full decode while the non-reference B-frames are
never decoded. `video.skip_nonref: true` instead drops every non-reference frame, picks included: a pick
then moves to the next decoded (reference) frame. Video decoding stops at the last pick. MP4/MOV/Matroska
files are opened with a minimal stream probe (their header already says what the probe would decode a frame
to learn); other formats, or a header missing basic parameters, get FFmpeg's default probe.

Raw inputs are untrusted and FFmpeg picks a demuxer by the bytes, not the name: an `evil.mp4` that is an ffconcat
script or an HLS playlist would make FFmpeg open the files or URLs it names. So every input is opened with an
allow-list of container demuxers (`ALLOWED_DEMUXERS`, the formats ingest documents) and the `file` protocol only;
anything else is a BadInput before any header is read.

If the video stream ends before a pick because the file is truncated or damaged, the input is a BadInput; when
the file is whole and only its frame count was overstated, the remaining picks repeat the last decoded frame
(visible in frame_times_s). Nothing decodable at all is a BadInput.

Segments: an input may name a segment [start, end) of its original video (a dataset list's row, `Segment`). The
clip (`first`) or the windows (`windows`) then start at the segment's start and end at its end, in the file, unless
the file's duration is within SEGMENT_TOLERANCE of the segment's length: then the file is that segment already cut
(as downloaders save AudioSet and VGGSound clips) and is taken from its own start. Each clip says which
(`Clip.segment_s`, `Clip.file_is_segment`). The file is decoded from its start (no seek), so frame numbers keep
the official rule's meaning.

Audio, as the official route (ffmpeg -ar 16000 to a 16-bit wav, then sox remix 1, torchaudio.load): the first
audio stream through libswresample (the same `aresample` the ffmpeg CLI inserts) to `audio.sample_rate` as
s16, divided by 32768. `audio.channel_policy: first` keeps channel 0 after resampling; `mix` asks the
resampler for a mono layout (= ffmpeg -ac 1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import av
import numpy as np
from PIL import Image

from cavmae.shards.config import Config, ConfigError
from cavmae.shards.schema import one_line

# Codecs whose NONREF skipping is known to leave every other frame untouched (checked by the tests).
_SKIP_SAFE_CODECS = ("h264", "hevc")


class BadInput(Exception):
    """An input that cannot become a sample. The message is one line and does not name the file."""


SEGMENT_TOLERANCE_S = 1.0  # or 10 % of the segment's length, whichever is more


@dataclass(frozen=True)
class Segment:
    """[start_s, end_s) of an input's original video, as a dataset list names it."""

    start_s: float
    end_s: float

    def place(self, file_duration_s: float | None) -> tuple[float, float, bool]:
        """(start, end) to decode in a file of that duration, and whether the file is the segment already cut
        (its duration within SEGMENT_TOLERANCE_S or 10 % of the segment's length; an unknown duration: not cut)."""
        length = self.end_s - self.start_s
        if file_duration_s is not None and abs(file_duration_s - length) <= max(SEGMENT_TOLERANCE_S, 0.1 * length):
            return 0.0, length, True
        if file_duration_s is not None and self.start_s >= file_duration_s:
            raise BadInput(f"the file ({file_duration_s:.2f} s) ends before the segment's start ({self.start_s:g} s)")
        return self.start_s, self.end_s, False


@dataclass
class Clip:
    """One decoded clip (clip.mode first) or window (clip.mode windows)."""

    frames: list[np.ndarray]          # image_size x image_size x 3 uint8 RGB, video.num_frames of them
    frame_times_s: list[float]        # presentation time of each kept frame, seconds from the file's start
    waveform: np.ndarray | None       # float32 mono at audio.sample_rate, or None when has_audio is False
    duration_s: float                 # of the input: the whole file (container metadata, else what was decoded),
                                      # or the part of it a segment covers (a dataset list's row of a longer file)
    fps: float
    clip_start_s: float
    window: int | None                # window index in windows mode, None in first mode
    has_audio: bool
    has_video: bool
    sample_rate: int = 16000
    audio_start_s: float | None = None  # how late the audio's first sample comes after the file's start; the
                                        # waveform begins there (it is not padded), so a late start is recorded
    segment_s: tuple[float, float] | None = None  # the input's segment as decoded, seconds in the file
    file_is_segment: bool | None = None           # the file was the segment already cut (see `Segment.place`)


@dataclass(frozen=True)
class DecodeSettings:
    num_frames: int
    image_size: int
    frame_offset: int
    pil_resize: bool
    skip_nonref: bool
    video_allow_missing: bool
    sample_rate: int
    channel_policy: str
    min_audio_samples: int
    audio_allow_missing: bool
    windows: bool
    length_s: float
    hop_s: float
    min_window_s: float

    @classmethod
    def from_config(cls, c: Config) -> "DecodeSettings":
        a, v, k = c.audio, c.video, c.clip
        mode = k.mode
        if k.length_s <= 0 or (mode == "windows" and k.hop_s <= 0):
            raise ConfigError("config 'clip.length_s' and 'clip.hop_s' must be positive")
        return cls(
            num_frames=int(v.num_frames), image_size=int(v.image_size),
            frame_offset=1 if v.official_frame_offset else 0, pil_resize=v.resize == "pil",
            skip_nonref=bool(v.skip_nonref),
            video_allow_missing=bool(v.allow_missing), sample_rate=int(a.sample_rate),
            channel_policy=a.channel_policy,
            min_audio_samples=int(round(a.sample_rate * a.frame_length_ms / 1000.0)),
            audio_allow_missing=bool(a.allow_missing), windows=mode == "windows",
            length_s=float(k.length_s), hop_s=float(k.hop_s), min_window_s=float(k.min_window_s),
        )


def official_picks(n_frames: int, num: int, offset: int = 1) -> list[int]:
    """Frame indices the official extractor reads for a clip of `n_frames` frames (before its start)."""
    if n_frames <= 0:
        return [0] * num
    return [max(int(i * (n_frames / num)) - offset, 0) for i in range(num)]


def decode_clips(path: str | os.PathLike, cfg: Config, *, threads: int = 1,
                 segment: Segment | None = None) -> list[Clip]:
    """All clips of `path` (one in first mode, one per window in windows mode). Raises BadInput."""
    return list(iter_clips(path, cfg, threads=threads, segment=segment))


def iter_clips(path: str | os.PathLike, cfg: Config, *, threads: int = 1,
               segment: Segment | None = None) -> Iterator[Clip]:
    """Yield each clip as soon as it is complete, from a single pass over the file (within `segment` when
    given). Raises BadInput."""
    settings = DecodeSettings.from_config(cfg)
    container = open_media(path)
    try:
        yield from _Decoder(container, settings, threads, segment).run()
    except av.FFmpegError as exc:
        raise BadInput(f"decode failed ({_av_reason(exc)})") from None
    except ValueError as exc:                    # PyAV's own checks, e.g. an audio format change mid-stream
        raise BadInput(f"decode failed ({_av_reason(exc)})") from None
    finally:
        container.close()


# FFmpeg demuxer names of the documented input formats (mp4/mov/m4a/m4v, mkv/webm, avi, flv, wav, flac, mp3, ogg).
# Never concat, hls, image2 or any other demuxer that opens further files or URLs.
ALLOWED_DEMUXERS = ("mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "flv", "wav", "flac", "mp3",
                    "ogg")


def _allow_only(**extra: str) -> dict[str, str]:
    """FFmpeg options that hold an open to those demuxers and to the local file protocol (plus `extra`)."""
    return {"format_whitelist": ",".join(ALLOWED_DEMUXERS), "protocol_whitelist": "file", **extra}


NOT_ALLOWED = ("not a media file of an allowed container format "
               "(mp4/mov, matroska/webm, avi, flv, wav, flac, mp3, ogg)")


def open_media(path: str | os.PathLike) -> av.container.InputContainer:
    """Open `path` for demuxing (allowed demuxers and the file protocol only), turning every way it can fail into a
    one-line BadInput."""
    path = os.path.abspath(os.fspath(path))   # absolute: a name like `concat:x.mp4` is a path, not a protocol
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BadInput("file not found") from None
    except PermissionError:
        raise BadInput("permission denied") from None
    except OSError as exc:
        raise BadInput(f"cannot stat file ({exc.strerror or exc})") from None
    if not os.path.isfile(path):
        raise BadInput("not a regular file")
    if st.st_size == 0:
        raise BadInput("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise BadInput("permission denied")
    try:
        container = av.open(path, mode="r", metadata_errors="replace", options=_allow_only(**_FAST_PROBE))
    except PermissionError:
        raise BadInput("permission denied") from None
    except (av.FFmpegError, OSError):
        container = None                          # judged by the default open below
    if container is not None:
        if _header_complete(container):
            return container
        container.close()
    try:
        return av.open(path, mode="r", metadata_errors="replace", options=_allow_only())
    except PermissionError:
        raise BadInput("permission denied") from None
    except av.ArgumentError:                      # what FFmpeg answers for a demuxer not on the allow-list
        raise BadInput(NOT_ALLOWED) from None
    except av.InvalidDataError:
        raise BadInput("not a media file, or truncated beyond repair (no readable container)") from None
    except av.FFmpegError as exc:
        raise BadInput(f"cannot open as media ({_av_reason(exc)})") from None
    except OSError as exc:
        raise BadInput(f"cannot read file ({exc.strerror or exc})") from None


# avformat_find_stream_info decodes the first frame of each stream to learn what the container header already
# says for these formats (10 ms for a 720p H.264 + 5.1 AAC file: 5% of its whole ingest). A minimal probe skips
# that; formats whose header may be incomplete, or any stream left without its basic parameters, are opened
# again with FFmpeg's default probing.
_FAST_PROBE = {"probesize": "32", "analyzeduration": "0", "fpsprobesize": "0"}
_FAST_PROBE_FORMATS = {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm"}


def _header_complete(container: av.container.InputContainer) -> bool:
    names = set((container.format.name or "").split(","))
    if not names & _FAST_PROBE_FORMATS:
        return False
    for st in container.streams:
        cc = st.codec_context if st.type in ("video", "audio") else None
        if cc is None:
            continue
        if st.type == "video" and (not cc.width or not cc.height or st.start_time is None):
            return False                          # (start_time numbers frames by pts for NONREF skipping)
        if st.type == "audio" and (not cc.sample_rate or not cc.layout.nb_channels):
            return False
    return True


def _av_reason(exc: Exception) -> str:
    return one_line(getattr(exc, "strerror", None) or exc)


def _resize_dims(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision Resize(size) on a width x height image: short side to `size`, long side truncated."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


@dataclass
class _Window:
    index: int
    start_s: float
    start_frame: int
    picks: list[int]
    a0: int                           # first audio sample (at the output rate)
    a1: int                           # one past the last
    frames: list[np.ndarray] = field(default_factory=list)
    times: list[float] = field(default_factory=list)

    @property
    def video_done(self) -> bool:
        return len(self.frames) == len(self.picks)


class _Decoder:
    def __init__(self, container: av.container.InputContainer, s: DecodeSettings, threads: int,
                 segment: Segment | None = None):
        self.c = container
        self.s = s
        self.vs = next((st for st in container.streams.video
                        if not (st.disposition & av.stream.Disposition.attached_pic)), None)
        self.as_ = container.streams.audio[0] if container.streams.audio else None
        if self.vs is None and self.as_ is None:
            raise BadInput("no audio or video stream")
        if self.vs is None and not s.video_allow_missing:
            raise BadInput("no video stream")
        if self.as_ is None and not s.audio_allow_missing:
            raise BadInput("no audio stream")
        self.duration_s = self._duration()
        self.seg_start, self.seg_end, self.file_is_segment = (
            segment.place(self.duration_s) if segment is not None else (0.0, None, None))
        self.fps = 0.0
        self.frame_count: int | None = None
        if self.vs is not None:
            self._setup_video(threads)
        if self.as_ is not None:
            self._setup_audio(threads)
        self.windows: list[_Window] = []
        self.next_window = 0
        self.finished = False         # first mode: the one clip has been emitted
        self.last_planned = False     # windows mode in a segment: no window starts after the open ones

    # ---- metadata ---------------------------------------------------------------------------------
    def _duration(self) -> float | None:
        if self.c.duration is not None and self.c.duration > 0:
            return self.c.duration / 1_000_000
        best = None
        for st in (self.vs, self.as_):
            if st is not None and st.duration is not None and st.time_base is not None and st.duration > 0:
                d = float(st.duration * st.time_base)
                best = d if best is None else max(best, d)
        return best

    def _setup_video(self, threads: int) -> None:
        vs = self.vs
        for rate in (vs.average_rate, vs.guessed_rate, vs.base_rate):
            if rate is not None and rate > 0:
                self.fps = float(rate)
                break
        else:
            raise BadInput("video stream has no frame rate")
        # OpenCV's CAP_PROP_FRAME_COUNT: the stream's frame count, else round(duration * fps).
        if vs.frames and vs.frames > 0:
            self.frame_count = int(vs.frames)
        elif self.duration_s:
            self.frame_count = int(math.floor(self.duration_s * self.fps + 0.5))
        cc = vs.codec_context
        cc.thread_count = threads
        cc.thread_type = "SLICE" if threads == 1 else "AUTO"
        self.vtb = vs.time_base
        self.origin = vs.start_time
        cfr = (vs.average_rate is not None and vs.base_rate is not None and vs.average_rate == vs.base_rate)
        # pts-based frame numbers are needed whenever the decoder may drop frames.
        # Per-packet skip_frame needs a synchronous decoder (frame threads would apply it late).
        self.partial_skip = (threads == 1 and not self.s.skip_nonref and cc.name in _SKIP_SAFE_CODECS and cfr
                             and self.origin is not None and self.vtb is not None)
        self.by_pts = self.s.skip_nonref or self.partial_skip
        if self.s.skip_nonref:
            cc.skip_frame = "NONREF"
        self.skip_state = "DEFAULT"
        self.counter = 0
        self.frames_seen = 0
        self.video_eof = False
        self.last_frame: av.VideoFrame | None = None
        self.last_index = -1
        self.video_error: str | None = None

    def _setup_audio(self, threads: int) -> None:
        cc = self.as_.codec_context
        cc.thread_count = 1
        layout = "mono" if self.s.channel_policy == "mix" else None
        self.resampler = av.AudioResampler(format="s16", layout=layout, rate=self.s.sample_rate)
        self.audio_chunks: list[np.ndarray] = []
        self.audio_base = 0          # sample index of audio_chunks[0][0]
        self.audio_total = 0         # samples received so far
        self.audio_eof = False
        self.audio_error: str | None = None
        self.audio_start_s: float | None = None  # of the first decoded audio frame, from the file's start

    # ---- windows ----------------------------------------------------------------------------------
    def _window_plan(self, k: int) -> _Window:
        s = self.s
        start_s = self.seg_start + (k * s.hop_s if s.windows else 0.0)
        length_s = s.length_s if self.seg_end is None else min(s.length_s, self.seg_end - start_s)
        start_frame = int(round(start_s * self.fps)) if self.vs is not None else 0
        if self.vs is not None:
            n = int(self.fps * length_s)
            if self.frame_count is not None:
                n = min(n, self.frame_count - start_frame)
            picks = [start_frame + p for p in official_picks(n, s.num_frames, s.frame_offset)]
        else:
            picks = []
        a0 = int(round(start_s * s.sample_rate))
        return _Window(k, start_s, start_frame, picks, a0, a0 + int(round(length_s * s.sample_rate)))

    def _open_windows_until(self, frame_index: int | None = None, audio_sample: int | None = None) -> None:
        """Open every window whose start has been reached by the video or the audio."""
        while not self.finished:
            if not self.s.windows and self.next_window > 0:
                return
            plan = self._window_plan(self.next_window)
            if (self.next_window > 0 and self.seg_end is not None
                    and self.seg_end - plan.start_s < max(self.s.min_window_s, 1e-6)):
                self.last_planned = True          # the segment's end: this window would be too short
                return
            reached = ((frame_index is not None and frame_index >= plan.start_frame)
                       or (audio_sample is not None and audio_sample > plan.a0))
            if not reached:
                return
            self.windows.append(plan)
            self.next_window += 1

    def _is_pick(self, j: int) -> bool:
        for w in self.windows:
            if j in w.picks:
                return True
        if self.s.windows or self.next_window == 0:
            # Windows not opened yet: look ahead at the plans that could contain frame j.
            t = j / self.fps - self.seg_start
            k_lo = max(self.next_window, int(math.floor((t - self.s.length_s) / self.s.hop_s)) if self.s.windows else 0)
            k_hi = int(math.floor(t / self.s.hop_s)) + 1 if self.s.windows else 0
            for k in range(k_lo, k_hi + 1):
                if j in self._window_plan(k).picks:
                    return True
        return False

    # ---- the pass ---------------------------------------------------------------------------------
    def run(self) -> Iterator[Clip]:
        streams = [st for st in (self.vs, self.as_) if st is not None]
        demux = self.c.demux(*streams)
        demux_error = None
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.FFmpegError as exc:        # truncated or damaged container: treat as the end
                demux_error = _av_reason(exc)
                break
            if packet.size == 0 and packet.dts is None:
                continue                         # PyAV's flush packets; flushing happens below
            if self.vs is not None and packet.stream_index == self.vs.index:
                if not self._video_needed():
                    continue
                self._video_packet(packet)
            elif self.as_ is not None and packet.stream_index == self.as_.index:
                if not self._audio_needed():
                    continue
                self._audio_packet(packet)
            yield from self._emit_ready()
            if self.finished:
                return
        # End of file: drain the decoders, then close every open window.
        if self.vs is not None and self._video_needed():
            self._video_packet(None)
        self.video_eof = True
        if self.as_ is not None and self._audio_needed():
            self._audio_packet(None)
        self.audio_eof = True
        yield from self._finish(demux_error)

    def _video_needed(self) -> bool:
        if self.video_eof:
            return False
        if self.s.windows:
            return True
        return not (self.windows and self.windows[0].video_done)

    def _audio_needed(self) -> bool:
        if self.audio_eof:
            return False
        if self.s.windows:
            return True
        return not (self.windows and self.audio_total >= self.windows[0].a1)

    def _video_packet(self, packet: av.Packet | None) -> None:
        cc = self.vs.codec_context
        if packet is not None and self.partial_skip:
            want = "DEFAULT"
            if packet.pts is not None:
                j = int(round(float((packet.pts - self.origin) * self.vtb) * self.fps))
                if not self._is_pick(j):
                    want = "NONREF"
            if want != self.skip_state:
                cc.skip_frame = want
                self.skip_state = want
        try:
            frames = cc.decode(packet)
        except av.FFmpegError as exc:            # a damaged packet: skip it, as the ffmpeg CLI does
            self.video_error = _av_reason(exc)
            return
        for frame in frames:
            self._video_frame(frame)

    def _frame_index(self, frame: av.VideoFrame) -> int:
        if self.by_pts and frame.pts is not None:
            return int(round(float((frame.pts - self.origin) * self.vtb) * self.fps))
        return self.counter

    def _frame_time(self, frame: av.VideoFrame, j: int) -> float:
        if frame.pts is not None and self.vtb is not None:
            origin = self.origin if self.origin is not None else 0
            return float((frame.pts - origin) * self.vtb)
        return j / self.fps

    def _video_frame(self, frame: av.VideoFrame) -> None:
        j = self._frame_index(frame)
        self.counter += 1
        self.frames_seen += 1
        if j < self.last_index:                  # out of order (broken timestamps): number by count
            j = self.last_index + 1
        self.last_index = j
        self.last_frame = frame
        self._open_windows_until(frame_index=j)
        rgb = None
        for w in self.windows:
            while not w.video_done and w.picks[len(w.frames)] <= j:
                if rgb is None:
                    rgb = self._convert(frame)
                w.frames.append(rgb)
                w.times.append(self._frame_time(frame, j))

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        size = self.s.image_size
        try:
            rotation = int(frame.rotation or 0)
        except Exception:                        # no display matrix support: keep the coded orientation
            rotation = 0
        quarter = int(round(rotation / 90.0)) % 4
        width, height = frame.width, frame.height
        if quarter % 2:
            width, height = height, width          # display dimensions
        new_w, new_h = _resize_dims(width, height, size)
        coded_w, coded_h = (new_h, new_w) if quarter % 2 else (new_w, new_h)
        if self.s.pil_resize:  # the official pixels: full-size RGB, then PIL's (antialiased) bilinear resize
            image = frame.to_image().resize((coded_w, coded_h), Image.BILINEAR)
            rgb = np.asarray(image)
        else:
            rgb = frame.reformat(width=coded_w, height=coded_h, format="rgb24",
                                 interpolation="BILINEAR").to_ndarray()
        if quarter:
            rgb = np.rot90(rgb, k=quarter)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        return np.ascontiguousarray(rgb[top:top + size, left:left + size])

    def _audio_packet(self, packet: av.Packet | None) -> None:
        cc = self.as_.codec_context
        try:
            frames = cc.decode(packet)
        except av.FFmpegError as exc:
            self.audio_error = _av_reason(exc)
            return
        try:
            if packet is None:
                frames = list(frames) + [None]   # flush the resampler too
            for frame in frames:
                if self.audio_start_s is None and frame is not None and frame.pts is not None:
                    start = self.c.start_time / av.time_base if self.c.start_time is not None else 0.0
                    self.audio_start_s = max(0.0, float(frame.pts * frame.time_base) - start)
                for out in self.resampler.resample(frame):
                    self._audio_samples(out)
        except (av.FFmpegError, ValueError) as exc:
            self.audio_error = _av_reason(exc)

    def _audio_samples(self, frame: av.AudioFrame) -> None:
        data = frame.to_ndarray()
        channels = frame.layout.nb_channels
        mono = data.reshape(-1, channels)[:, 0] if channels > 1 else data.reshape(-1)
        if mono.size == 0:
            return
        self.audio_chunks.append(mono)
        self.audio_total += mono.size
        self._open_windows_until(audio_sample=self.audio_total)

    def _audio_slice(self, a0: int, a1: int) -> np.ndarray:
        a1 = min(a1, self.audio_total)
        if a1 <= a0:
            return np.zeros(0, np.float32)
        buf = np.concatenate(self.audio_chunks) if len(self.audio_chunks) > 1 else self.audio_chunks[0]
        self.audio_chunks = [buf]
        out = buf[a0 - self.audio_base:a1 - self.audio_base]
        return out.astype(np.float32) / np.float32(32768.0)

    def _trim_audio(self) -> None:
        keep_from = min([w.a0 for w in self.windows]
                        + [self._window_plan(self.next_window).a0 if self.s.windows else self.audio_total])
        if keep_from <= self.audio_base or not self.audio_chunks:
            return
        buf = np.concatenate(self.audio_chunks)
        cut = min(keep_from - self.audio_base, buf.size)
        self.audio_chunks = [buf[cut:]] if buf.size > cut else []
        self.audio_base += cut

    def _emit_ready(self) -> Iterator[Clip]:
        """During the pass: emit the oldest open windows once both their frames and audio are in."""
        while self.windows:
            w = self.windows[0]
            v_ok = self.vs is None or w.video_done
            a_ok = self.as_ is None or self.audio_total >= w.a1
            if not (v_ok and a_ok):
                return
            self.windows.pop(0)
            clip = self._make_clip(w, final=False)
            if clip is not None:
                yield clip
            if not self.s.windows or (self.last_planned and not self.windows):
                self.finished = True
                return
            if self.as_ is not None:
                self._trim_audio()

    def _finish(self, demux_error: str | None) -> Iterator[Clip]:
        if not self.windows and self.next_window == 0:
            # Nothing decoded at all.
            why = self._why(demux_error, self.video_error, self.audio_error)
            if self.vs is not None and not self.s.video_allow_missing:
                raise BadInput("no decodable video frames" + why)
            if self.as_ is not None and not self.s.audio_allow_missing:
                raise BadInput("no decodable audio" + why)
            raise BadInput("no decodable audio or video" + why)
        for w in list(self.windows):
            self.windows.remove(w)
            clip = self._make_clip(w, final=True, reason=demux_error)
            if clip is not None:
                yield clip
            if self.as_ is not None:
                self._trim_audio()

    def _why(self, *reasons: str | None) -> str:
        """' (reason)' for an error message: the first decoder error, and a hint when the file looks cut."""
        parts = [r for r in reasons if r][:1]
        if self._looks_truncated():
            end = self._content_end_s()
            parts.append(f"file looks truncated: {end:.2f} s of {self.duration_s:.2f} s decodable")
        return f" ({'; '.join(parts)})" if parts else ""

    def _looks_truncated(self) -> bool:
        return bool(self.duration_s) and self._content_end_s() < 0.9 * self.duration_s

    def _content_end_s(self) -> float:
        ends = []
        if self.vs is not None and self.frames_seen:
            ends.append((self.last_index + 1) / self.fps)
        if self.as_ is not None:
            ends.append(self.audio_total / self.s.sample_rate)
        return max(ends) if ends else 0.0

    def _make_clip(self, w: _Window, final: bool, reason: str | None = None) -> Clip | None:
        s = self.s
        first = w.index == 0
        if final and not first and self._content_end_s() - w.start_s < s.min_window_s:
            return None                           # trailing window too short
        has_video = self.vs is not None
        if has_video and not w.video_done:
            if self.last_frame is None:
                if s.video_allow_missing:
                    has_video = False
                else:
                    raise BadInput("no decodable video frames" + self._why(reason, self.video_error))
            else:
                # The stream ended before the picks. A truncated or damaged file is a failure, never a sample
                # padded with copies; a frame count overstated by the container (the file is whole) lets the
                # remaining picks repeat the last decoded frame (visible in frame_times_s).
                if reason is not None or self._looks_truncated():
                    raise BadInput("video ends before the clip's frames" + self._why(reason, self.video_error))
                rgb = self._convert(self.last_frame)
                t = self._frame_time(self.last_frame, self.last_index)
                while not w.video_done:
                    w.frames.append(rgb)
                    w.times.append(t)
        waveform = None
        has_audio = self.as_ is not None
        if has_audio:
            waveform = self._audio_slice(w.a0, w.a1)
            if waveform.size < s.min_audio_samples:
                if s.audio_allow_missing:
                    has_audio, waveform = False, None
                elif first:
                    if self.audio_total == 0:
                        raise BadInput("no decodable audio" + self._why(reason, self.audio_error))
                    raise BadInput(f"audio shorter than one fbank window ({waveform.size} samples at "
                                   f"{s.sample_rate} Hz < {s.min_audio_samples})")
                else:
                    return None                   # a trailing window with no usable audio
        if not has_video and not has_audio:
            if first:
                raise BadInput("no decodable audio or video")
            return None
        duration = self.duration_s if self.duration_s else self._content_end_s()
        if self.seg_end is not None and not self.file_is_segment:  # the input is that part of the file
            duration = max(0.0, min(self.seg_end, duration) - self.seg_start)
        return Clip(
            frames=w.frames if has_video else [], frame_times_s=w.times if has_video else [],
            waveform=waveform, duration_s=float(duration), fps=self.fps, clip_start_s=w.start_s,
            window=w.index if s.windows else None, has_audio=has_audio, has_video=has_video,
            sample_rate=s.sample_rate, audio_start_s=(self.audio_start_s or 0.0) if has_audio else None,
            segment_s=None if self.seg_end is None else (self.seg_start, self.seg_end),
            file_is_segment=self.file_is_segment,
        )
