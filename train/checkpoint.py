"""Checkpoint I/O in the official CAV-MAE layout, and the ImageNet-MAE initialisation of the pretraining model.

Official checkpoints are nn.DataParallel state dicts (every key prefixed `module.`). Our models use the same key
names without the prefix, so loading is a prefix strip plus a check that the only mismatches are the documented ones:

  CAVMAE        <- pretrained                      strict
  CAVMAEFT      <- finetuned (has mlp_head.*)      strict
  CAVMAEFT      <- pretrained                      missing mlp_head.*; unexpected decoder*, mask_token
  CAVMAEFTAudio <- any of the above                additionally: every visual key is unexpected
  CAVMAESync    <- a Sync pretrained checkpoint     strict (CAVMAESync subclasses CAVMAE)
  CAVMAESyncFT  <- a Sync pretrained checkpoint     as CAVMAEFT, and its contrastive heads (if any) unexpected

A checkpoint of another clip length (target_length) or image size loads too: its position tables are fitted to the
model's grid first (`fit_position_tables`).

Files are read with torch.load(weights_only=True) only: no arbitrary pickle is ever executed. Nothing read can make
the loader hold more than the file's bytes (`read_checkpoint`), nor fitting a position table more than a bounded
multiple of the model's (`MAX_TABLE_RATIO`).
"""

import logging
import math
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from cavmae.shards.errors import UserError
from cavmae.shards.store import open_regular, publish_file
from cavmae.train import distributed as dist
from cavmae.train.model import CAVMAE, CAVMAEFT, CAVMAEFTAudio, CAVMAESyncFT, ModelSize, resolve_size
from cavmae.train.pos_embed import cut_or_interpolate_pos_embed, get_2d_sincos_pos_embed, is_sincos_pos_embed

log = logging.getLogger(__name__)

MODULE_PREFIX = "module."
_VISUAL_PREFIXES = ("modality_v", "pos_embed_v", "patch_embed_v.", "blocks_v.", "norm_v.")
_DECODER_PREFIXES = ("decoder", "mask_token")
_POSITION_TABLES = ("pos_embed_a", "pos_embed_v", "decoder_pos_embed_a", "decoder_pos_embed_v")
# A checkpoint's position table is fitted to the model only when it has at most this many times the model's tokens
# (the official 1024-row table into a 16-row model is 64 times): fitting costs in proportion to the table, so a
# table claiming 2^20 times the model's grid is a shape error, never a gigabyte sin-cos table.
MAX_TABLE_RATIO = 64


class LoadResult(NamedTuple):
    missing: "list[str]"
    unexpected: "list[str]"


def strip_module_prefix(sd: "dict[str, torch.Tensor]") -> "OrderedDict[str, torch.Tensor]":
    """Drop the DataParallel/DDP `module.` prefix from every key that has it."""
    return OrderedDict((k[len(MODULE_PREFIX):] if k.startswith(MODULE_PREFIX) else k, v) for k, v in sd.items())


class CheckpointError(UserError):
    """A checkpoint that cannot be read safely: missing, truncated, not a torch file, or holding pickled objects
    beyond tensors and plain containers (the message is one line and names the file)."""


def save_atomic(path: Path, obj: Any) -> None:
    """torch.save by rank 0 into a new file beside `path`, renamed over it (`shards.store.publish_file`): a crash
    never leaves half a file under `path`, and a link left under either name is replaced, never written through."""
    if not dist.is_main():
        return
    with publish_file(path) as up:
        torch.save(obj, up.file)


def read_checkpoint(path: "str | Path", need: "tuple[str, ...]" = ()) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU, with every failure a one-line CheckpointError: checkpoints
    are untrusted, and torch reports a truncated file or a refused pickle in many (multi-line) ways. `need`: keys
    the loaded dict must have (a training state).

    What is loaded is bounded by the file's size: torch.save writes every record of its zip uncompressed, so a
    compressed record (a few kB that inflate to gigabytes) is refused before loading, and so is a tensor that claims
    more values than its storage holds (a zero-stride view: 3 kB stored, any shape claimed), which any later copy,
    sum or comparison would materialise. torch.load itself refuses a storage larger than its record."""
    try:
        file = open_regular(path)  # a FIFO would block torch.load forever
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror}" if exc.strerror else str(exc)) from None
    try:
        with file:
            if zipfile.is_zipfile(file):
                with zipfile.ZipFile(file) as archive:
                    packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
                if packed:
                    raise CheckpointError(f"{path}: holds compressed records ({_some(packed)}), which torch.save "
                                          f"never writes; refused (they may inflate far beyond the file)")
            file.seek(0)
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: holds pickled objects other than tensors; refused (weights_only)") from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError... for damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or damaged? {first})") from None
    inflated = _inflated_tensors(obj)
    if inflated:
        raise CheckpointError(f"{path}: tensors claim more values than the file stores ({_some(inflated)}); refused")
    missing = [k for k in need if not isinstance(obj, dict) or k not in obj]
    if missing:
        raise CheckpointError(f"{path}: not a training state (no {', '.join(missing)})")
    return obj


def _inflated_tensors(obj: Any, name: str = "") -> "list[str]":
    """The names (dotted paths) of the tensors in `obj` (nested dicts, lists, tuples) whose shape claims more bytes
    than their storage holds."""
    if isinstance(obj, torch.Tensor):
        claimed = obj.numel() * obj.element_size()
        return [f"{name or 'tensor'} {tuple(obj.shape)}"] if claimed > obj.untyped_storage().nbytes() else []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return [bad for k, v in items for bad in _inflated_tensors(v, f"{name}.{k}" if name else str(k))]


def load_state_dict_file(path: str) -> "OrderedDict[str, torch.Tensor]":
    """Read a raw state dict, or a training checkpoint dict holding it under 'model'; strip `module.`."""
    obj = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (nor a dict with a 'model' state dict)")
    return strip_module_prefix(obj)


def _some(items: "list[str]", shown: int = 3) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def check_shapes(model: nn.Module, sd: "dict[str, Any]", source: str) -> None:
    """CheckpointError (one line naming the first keys) when a tensor of `sd` has another shape than the model's
    tensor of that name: another model size, target_length, mel bins or class count. torch would raise a
    RuntimeError of a line per key."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: the model's weights are not a state dict")
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
             if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)]
    if wrong:
        raise CheckpointError(f"{source}: does not fit {type(model).__name__} of this config (another model size, "
                              f"target_length or mel bins?): checkpoint vs model shapes {_some(wrong)}")


def load_pretrained_into(model: nn.Module, sd: "dict[str, torch.Tensor]", source: str = "checkpoint") -> LoadResult:
    """Load an official or our own checkpoint (with or without `module.`) into CAVMAE / CAVMAEFT / CAVMAEFTAudio.

    Raises CheckpointError (one line, starting with `source`) naming the offending keys when anything beyond the
    documented mismatches (module docstring) is missing or unexpected, or when a shape differs (position tables of
    another clip length or image size are fitted first). Returns the tolerated missing/unexpected keys so the
    caller can log them.
    """
    model = dist.unwrap(model)
    sd = fit_position_tables(model, strip_module_prefix(sd))
    allowed_missing: "tuple[str, ...]" = ()
    allowed_unexpected: "tuple[str, ...]" = ()
    if isinstance(model, (CAVMAEFT, CAVMAEFTAudio)):
        allowed_missing = ("mlp_head.",)
        allowed_unexpected = _DECODER_PREFIXES
        if isinstance(model, CAVMAEFTAudio):
            allowed_unexpected += _VISUAL_PREFIXES
        if isinstance(model, CAVMAESyncFT):  # a Sync checkpoint: its contrastive heads, if any, too
            allowed_unexpected += ("constrative_head_",)
    elif not isinstance(model, CAVMAE):
        raise TypeError(f"unsupported model type {type(model).__name__}")

    check_shapes(model, sd, source)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    bad_missing = [k for k in missing if not k.startswith(allowed_missing)]
    bad_unexpected = [k for k in unexpected if not k.startswith(allowed_unexpected)]
    head = [k for k in missing if k.startswith("mlp_head.")]
    if head and len(head) != len([k for k in model.state_dict() if k.startswith("mlp_head.")]):
        bad_missing += head  # a partial head is a broken checkpoint, not a pretrained one
    if bad_missing or bad_unexpected:
        raise CheckpointError(f"{source}: does not fit {type(model).__name__}: missing "
                              f"[{_some(bad_missing)}], unexpected [{_some(bad_unexpected)}]")
    return LoadResult(sorted(missing), sorted(unexpected))


def _checkpoint_grid(name: str, tokens: int, model_grid: "tuple[int, int]") -> "tuple[int, int] | None":
    """The (rows, columns) grid of a checkpoint's position table of `tokens` rows: audio keeps the model's frequency
    rows (the mel bins are a feature of the shards, the clip length is what varies), images are square. None when
    no such grid fits."""
    if name.endswith("_a"):
        rows = model_grid[0]
        return (rows, tokens // rows) if tokens % rows == 0 else None
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


def fit_position_tables(model: nn.Module, sd: "dict[str, torch.Tensor]") -> "dict[str, torch.Tensor]":
    """`sd` with each position table of another grid than `model`'s (another target_length or image size) fitted to
    the model's grid, so a checkpoint trained at one clip length finetunes or evaluates at another.

    A fixed sin-cos table (every pretrained CAV-MAE's, tr_pos=False) is rebuilt for the new grid: it is then exactly
    what the model would have been built with. A table trained away from sin-cos (a finetuned model's, tr_pos=True)
    is cut or interpolated as AST does, with one log line. Tables whose grid cannot be inferred, or of more than
    MAX_TABLE_RATIO times the model's tokens, are left alone (the load then fails on the shape)."""
    out = dict(sd)
    target = model.state_dict()
    for name in _POSITION_TABLES:
        if name not in sd or name not in target or sd[name].shape == target[name].shape:
            continue
        table, new = sd[name], target[name]
        model_grid = model.audio_grid if name.endswith("_a") else model.image_grid
        old_grid = _checkpoint_grid(name, table.shape[1], model_grid) if table.dim() == 3 else None
        if (old_grid is None or table.shape[0] != 1 or table.shape[-1] != new.shape[-1]
                or table.shape[1] > MAX_TABLE_RATIO * new.shape[1]):
            continue
        if is_sincos_pos_embed(table, *old_grid):
            out[name] = get_2d_sincos_pos_embed(new.shape[-1], *model_grid).unsqueeze(0).to(table.dtype)
        else:
            out[name] = cut_or_interpolate_pos_embed(table, old_grid, model_grid)
            log.warning("%s: trained position table fitted from grid %dx%d to %dx%d (centre cut / bilinear, as AST)",
                        name, *old_grid, *model_grid)
    return out


def official_state_dict(model: nn.Module, module_prefix: bool = True) -> "OrderedDict[str, torch.Tensor]":
    """The model's state dict in the official layout (same keys and order; `module.` prefix so the official code,
    which wraps its models in DataParallel, loads it as is)."""
    prefix = MODULE_PREFIX if module_prefix else ""
    return OrderedDict((prefix + k, v) for k, v in dist.unwrap(model).state_dict().items())


def imagenet_mae_init(
    mae_sd: "dict[str, torch.Tensor]",
    size: "str | dict | ModelSize" = "base",
    target_length: int = 1024,
    num_mel_bins: int = 128,
) -> "OrderedDict[str, torch.Tensor]":
    """CAVMAE state dict initialised from an ImageNet MAE *full* checkpoint (encoder + decoder), as the official
    IN-initial.pth was made (facebookresearch/mae `mae_pretrain_vit_base_full.pth`, its 'model' dict).

    MAE blocks 0..d-1 go to both blocks_a and blocks_v (d = modality_specific_depth), the rest to blocks_u with
    their norm1/norm2 also copied into the _a/_v norms; MAE `norm` goes to norm, norm_a and norm_v; the decoder
    loads by name. The audio patch conv is the RGB conv summed over its input channels (a grey image through the
    RGB filter), decoder_pred_a is the first 256 rows of MAE's decoder_pred (as the official script does; the rows are
    pixel-major (p, q, c), so these are the RGB outputs of the first 85 1/3 pixels, an arbitrary start), and the
    visual position tables drop MAE's cls row. Everything MAE lacks (modality tokens, audio position tables,
    unused norms) keeps a fresh CAVMAE initialisation. image_size follows MAE's 224.
    """
    mae_sd = strip_module_prefix(mae_sd)
    s = resolve_size(size)
    depth, specific = s.depth, s.modality_specific_depth
    n_mae_blocks = len({k.split(".")[1] for k in mae_sd if k.startswith("blocks.")})
    if n_mae_blocks != depth:
        raise ValueError(f"MAE checkpoint has {n_mae_blocks} encoder blocks, model size {size!r} needs {depth}")
    out = CAVMAE(size=size, target_length=target_length, num_mel_bins=num_mel_bins, image_size=224).state_dict()

    used = {"cls_token"}  # CAV-MAE has no cls token

    def put(dst: str, src: str, value: "torch.Tensor | None" = None) -> None:
        value = mae_sd[src] if value is None else value
        if dst not in out:
            raise ValueError(f"MAE key {src} maps to {dst}, which CAVMAE does not have")
        if out[dst].shape != value.shape:
            raise ValueError(f"{src} {tuple(value.shape)} does not fit {dst} {tuple(out[dst].shape)}")
        out[dst] = value.detach().clone()
        used.add(src)

    for i in range(depth):
        for name in [k[len(f"blocks.{i}."):] for k in mae_sd if k.startswith(f"blocks.{i}.")]:
            src = f"blocks.{i}.{name}"
            if i < specific:
                put(f"blocks_a.{i}.{name}", src)
                put(f"blocks_v.{i}.{name}", src)
            else:
                put(f"blocks_u.{i - specific}.{name}", src)
                if name.startswith(("norm1.", "norm2.")):
                    norm, param = name.split(".")
                    put(f"blocks_u.{i - specific}.{norm}_a.{param}", src)
                    put(f"blocks_u.{i - specific}.{norm}_v.{param}", src)
    for norm in ("norm", "norm_a", "norm_v"):
        for param in ("weight", "bias"):
            put(f"{norm}.{param}", f"norm.{param}")

    put("patch_embed_v.proj.weight", "patch_embed.proj.weight")
    put("patch_embed_v.proj.bias", "patch_embed.proj.bias")
    put("patch_embed_a.proj.weight", "patch_embed.proj.weight", mae_sd["patch_embed.proj.weight"].sum(1, keepdim=True))
    put("patch_embed_a.proj.bias", "patch_embed.proj.bias")
    put("pos_embed_v", "pos_embed", mae_sd["pos_embed"][:, 1:])
    put("decoder_pos_embed_v", "decoder_pos_embed", mae_sd["decoder_pos_embed"][:, 1:])

    for k in mae_sd:
        if k.startswith(("decoder_embed.", "decoder_blocks.", "decoder_norm.")) or k == "mask_token":
            put(k, k)
    put("decoder_pred_v.weight", "decoder_pred.weight")
    put("decoder_pred_v.bias", "decoder_pred.bias")
    n_a = out["decoder_pred_a.weight"].shape[0]
    put("decoder_pred_a.weight", "decoder_pred.weight", mae_sd["decoder_pred.weight"][:n_a])
    put("decoder_pred_a.bias", "decoder_pred.bias", mae_sd["decoder_pred.bias"][:n_a])

    unused = sorted(set(mae_sd) - used)
    if unused:
        raise ValueError(f"MAE checkpoint keys with no place in CAVMAE: {unused}")
    return out


def pretrain_init_state(path: str, model_cfg: "dict[str, Any]") -> "dict[str, torch.Tensor]":
    """Weights for `pretrain --init PATH`: a CAV-MAE checkpoint (ours or official, e.g. IN-initial.pth) as it is,
    or an ImageNet MAE full checkpoint (facebookresearch/mae layout, recognised by its `blocks.*` keys) turned
    into the official initialisation by `imagenet_mae_init`."""
    sd = load_state_dict_file(path)
    if "blocks.0.attn.qkv.weight" in sd:
        try:
            sd = imagenet_mae_init(sd, size=model_cfg["size"], target_length=model_cfg["target_length"],
                                   num_mel_bins=model_cfg["num_mel_bins"])
        except (ValueError, KeyError, AttributeError, RuntimeError) as exc:  # a damaged or foreign MAE file
            raise CheckpointError(f"{path}: not an ImageNet MAE checkpoint this model can start from "
                                  f"({' '.join(str(exc).split())[:300]})") from None
    return sd
