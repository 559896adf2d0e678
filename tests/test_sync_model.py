"""CAV-MAE Sync model: the released checkpoint layout loads strictly, and on the released class's weights, inputs
and masking noise our losses, masks and features equal its outputs within 1e-4 (or 1e-5 relative: the MAE loss
without norm_pix_loss is ~40). The reference is tests/data/cavmae_sync_ref.npz, made by tests/make_sync_reference.py
from the released code, which this test does not need."""

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from cavmae.train.checkpoint import official_state_dict, strip_module_prefix
from cavmae.train.model import CAVMAESync

DATA = Path(__file__).parent / "data"
REF = np.load(DATA / "cavmae_sync_ref.npz", allow_pickle=False)
CONFIGS = sorted(k.split("/")[0] for k in REF.files if k.endswith("/options"))


def released_keys():
    rows = []
    for line in (DATA / "cavmae_sync_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("[]").split(","))))
    return rows


def model_for(name):
    """Our model built with the released keywords of configuration `name`, loaded strictly with its weights."""
    opts = json.loads(str(REF[f"{name}/options"]))
    size = dict(embed_dim=opts.pop("embed_dim"), num_heads=opts.pop("num_heads"), depth=12,
                modality_specific_depth=11, decoder_embed_dim=opts.pop("decoder_embed_dim"),
                decoder_depth=opts.pop("decoder_depth"), decoder_num_heads=opts.pop("decoder_num_heads"))
    model = CAVMAESync(size=size, image_size=224, num_mel_bins=128, **opts).eval()
    prefix = f"{name}/state/"
    sd = OrderedDict((k[len(prefix):], torch.from_numpy(REF[k]).float()) for k in REF.files if k.startswith(prefix))
    model.load_state_dict(sd, strict=True)
    return model


def test_released_checkpoint_layout_loads_strictly_with_or_without_module_prefix():
    rows = released_keys()
    assert len(rows) == 650
    with torch.device("meta"):
        ours = CAVMAESync(audio_length=416, modality_specific_depth=11, num_register_tokens=8, cls_token=True,
                          total_frame=16, contrastive_heads=False)
    # same keys, shapes and order as the released class saves them
    assert [(k, tuple(v.shape)) for k, v in official_state_dict(ours).items()] == rows
    g = torch.Generator().manual_seed(0)
    sd = OrderedDict((k, torch.randn(shape, generator=g)) for k, shape in rows)
    model = CAVMAESync(size=dict(embed_dim=768, num_heads=12, depth=12, modality_specific_depth=11,
                                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16))
    for state in (sd, strip_module_prefix(sd)):
        model.load_state_dict(strip_module_prefix(state), strict=True)
    assert torch.equal(model.register_tokens, sd["module.register_tokens"])


@pytest.mark.parametrize("name", CONFIGS)
def test_losses_masks_and_features_equal_the_released_code(name):
    model = model_for(name)
    audio = torch.from_numpy(REF["audio_x16"]).float() / 16
    image = torch.from_numpy(REF["image_x16"]).float() / 16
    noise = (torch.from_numpy(REF["noise_a"]), torch.from_numpy(REF["noise_v"]))
    with torch.no_grad():
        out = model(audio, image, noise=noise)
        feats = model.sync_features(audio, image)
    checked = 0
    for key in ("loss", "loss_mae", "loss_mae_a", "loss_mae_v", "loss_c", "c_acc", "mask_a", "mask_v"):
        torch.testing.assert_close(out[key], torch.from_numpy(REF[f"{name}/output/{key}"]), atol=1e-4, rtol=1e-5)
        checked += 1
    for key in ("tokens_a", "tokens_v", "global_a", "global_v"):
        if f"{name}/output/{key}" in REF.files:
            torch.testing.assert_close(feats[key], torch.from_numpy(REF[f"{name}/output/{key}"]), atol=1e-4, rtol=1e-5)
            checked += 1
    assert checked >= 8 and float(out["loss_c"]) > 0 and float(out["loss_mae"]) > 0


def test_extra_tokens_stay_out_of_decoder_and_features():
    """Registers and cls tokens stay out of the decoder's and the features' token counts."""
    model = model_for("cls_registers")
    audio = torch.from_numpy(REF["audio_x16"]).float() / 16
    image = torch.from_numpy(REF["image_x16"]).float() / 16
    with torch.no_grad():
        out = model(audio, image)
        feats = model.sync_features(audio, image)
    assert out["pred_a"].shape == (3, 32, 256) and out["pred_v"].shape == (3, 196, 768)
    assert feats["tokens_a"].shape == (3, 32, 16) and feats["global_a"].shape == (3, 16)
    assert out["c_a"].shape == (3, 16) and not torch.equal(out["c_a"], feats["global_a"])  # masked vs not


def test_sync_options_are_checked():
    with pytest.raises(ValueError, match="global_local_losses needs cls_token"):
        CAVMAESync(size="tiny", audio_length=64, image_size=64, cls_token=False, global_local_losses=True)
    with pytest.raises(ValueError, match="num_register_tokens"):
        CAVMAESync(size="tiny", audio_length=64, image_size=64, num_register_tokens=-1)


def test_builders_pick_the_variant():
    from cavmae.train.model import CAVMAE, build_finetune_model, build_pretrain_model

    cfg = dict(size="tiny", target_length=128, audio_length=64, num_mel_bins=128, image_size=64,
               num_register_tokens=3, tr_pos=True)
    assert type(build_pretrain_model(cfg)) is CAVMAE
    sync = build_pretrain_model({**cfg, "variant": "sync"})
    assert isinstance(sync, CAVMAESync) and sync.register_tokens.shape == (6, 64)
    assert sync.pos_embed_a.shape[1] == 8 * 4  # audio_length, not target_length
    with pytest.raises(ValueError, match="not implemented"):
        build_finetune_model({**cfg, "variant": "sync"}, 5)
    with pytest.raises(ValueError, match="variant"):
        build_pretrain_model({**cfg, "variant": "cavmae2"})
