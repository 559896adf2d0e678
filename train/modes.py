"""The finetuning modes: one table that the model, DDP's unused-parameter set, eval, predict and every `--mode` use.

A mode says which inputs a sample gives the model (`inputs`), which passes of the joint block run and have their
pooled features averaged before the head (`joint_paths`: None is the shared norms, "a"/"v" the modality norms),
and whether the model has visual parameters at all (`visual`: False builds CAVMAEFTAudio). What follows from that
is derived, never listed again: the parameters that stay unused (`train.model.unused`: the other modality's path,
the norms of passes that do not run), and how eval aggregates frames (`frames_matter`: a mode that reads no video
scores a sample once). Adding a mode is one entry here plus, if it needs one, its forward path in
`train/model/finetuning.py`.

The official code names the two modes for a model finetuned on both modalities and given one at test time
`missingaudioonly` (audio alone: the video is missing) and `missingvideoonly`; they are `multimodal-audioonly` and
`multimodal-videoonly` here, and the official names still work, with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cavmae.shards.errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mode:
    inputs: str                               # "av", "a" or "v": the modalities embedded
    joint_paths: tuple[str | None, ...]       # joint-block passes averaged after pooling (None: the shared norms)
    help: str
    official: str | None = None               # the official code's name, where ours differs
    visual: bool = True                       # False: the model has no visual parameter (CAVMAEFTAudio)

    @property
    def frames_matter(self) -> bool:
        """Whether eval scores every frame (and averages): only a mode that reads video depends on the frame."""
        return "v" in self.inputs

    @property
    def audio_path_only(self) -> bool:
        """Whether the mode runs nothing but the audio path, so the audio-only model (no visual weights) can run it."""
        return (self.inputs, self.joint_paths) == ("a", ("a",))


MODES: dict[str, Mode] = {
    "multimodal": Mode("av", (None,), "audio and video through the joint block (official)"),
    "audioonly": Mode("a", ("a",), "audio alone, the joint block with its audio norms (official; a model finetuned "
                                   "on audio)"),
    "videoonly": Mode("v", ("v",), "video alone, the joint block with its video norms (official)"),
    "multimodal-audioonly": Mode("a", (None, "a"), "audio alone into a model finetuned on both: the mean of the "
                                                   "shared-norm and audio-norm passes", official="missingaudioonly"),
    "multimodal-videoonly": Mode("v", (None, "v"), "video alone into a model finetuned on both: the mean of the "
                                                   "shared-norm and video-norm passes", official="missingvideoonly"),
    "audioonly-lean": Mode("a", ("a",), "audioonly with a model built without visual parameters (less memory; its "
                                        "checkpoints hold audio weights only)", visual=False),
}
ALIASES = {mode.official: name for name, mode in MODES.items() if mode.official}
NAMES = tuple(MODES) + tuple(ALIASES)  # what --mode and finetune.mode accept
HELP = "; ".join(f"{name}: {mode.help}" for name, mode in MODES.items())

_warned: set[str] = set()


def mode_name(name: str, source: str = "--mode") -> str:
    """The table name of `name` (an official alias becomes ours, with a warning once); UserError if unknown."""
    if name in ALIASES:
        if name not in _warned:
            _warned.add(name)
            log.warning("%s: mode '%s' is called '%s' here (the official name still works)", source, name,
                        ALIASES[name])
        return ALIASES[name]
    if name not in MODES:
        raise UserError(f"{source} must be one of {', '.join(MODES)}; got {name!r}")
    return name


def mode_of(name: str, source: str = "--mode") -> Mode:
    return MODES[mode_name(name, source)]
