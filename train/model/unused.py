"""Which trainable parameters get no gradient in a given forward pass.

DistributedDataParallel fails on a trainable parameter that gets no gradient (unless find_unused_parameters=True,
which costs a graph traversal per step), so the stages freeze these before wrapping. Three kinds exist:
  - the dead `_a`/`_v` norms of modality-specific and decoder blocks (every Block owns all six norms, for the
    official checkpoint layout; see train/model/blocks.py::Block), never used by any pass;
  - the parameters of a modality that is not fed in (finetuning modes that take audio or video alone);
  - the joint-block norms and final norms of joint passes that do not run, and the decoder when the MAE loss is off.
The model classes' `unused_parameter_names` methods say which inputs and passes they run and call this module.
"""

import re

import torch.nn as nn

# Parameters no forward pass ever uses: the `_a`/`_v` norms of modality-specific and decoder blocks.
_DEAD_NORM = re.compile(r"^(blocks_a|blocks_v|decoder_blocks)\.\d+\.norm[12]_[av]\.")
# Parameters of one modality's own path, before the joint block.
_MODALITY_PATH = re.compile(r"^(modality|pos_embed|patch_embed|blocks)_([av])\b")


def unused_parameter_names(
    model: nn.Module, inputs: str, joint_paths: "set[str | None]", decoder_runs: bool = False
) -> "set[str]":
    """Trainable parameters of `model` that get no gradient when it embeds the modalities in `inputs` ('a', 'v' or
    'av'), runs the joint block with the norms of each of `joint_paths` (None: the shared norms, 'a', 'v') and,
    when `decoder_runs`, the decoder (decoder* and mask_token parameters)."""
    unused = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        m = _MODALITY_PATH.match(name)
        other_modality = m is not None and m.group(2) not in inputs
        skipped_decoder = not decoder_runs and (name.startswith("decoder") or name == "mask_token")
        if _DEAD_NORM.match(name) or other_modality or skipped_decoder or not _joint_param_used(name, joint_paths):
            unused.add(name)
    return unused


def _joint_param_used(name: str, joint_paths: "set[str | None]") -> bool:
    """Whether a blocks_u / final-norm parameter is touched when the joint block runs with these modality paths."""
    suffix = {None: "", "a": "_a", "v": "_v"}
    if name.startswith("blocks_u."):
        m = re.match(r"^blocks_u\.\d+\.norm[12](_[av])?\.", name)
        return m is None or any((m.group(1) or "") == suffix[p] for p in joint_paths)
    m = re.match(r"^norm(_[av])?\.", name)
    if m:
        return any((m.group(1) or "") == suffix[p] for p in joint_paths)
    return True
