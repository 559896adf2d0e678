"""CAV-MAE model: sizes, embeddings, masking, losses, gradient flow and finetuning modes (CPU)."""

import math

import pytest
import torch
from timm.layers import Attention

from cavmae.train.model import (
    CAVMAE,
    CAVMAEFT,
    FT_MODES,
    Block,
    CAVMAEFTAudio,
    PatchEmbed,
    audio_as_image,
    build_finetune_model,
    build_pretrain_model,
    patchify,
    random_masking,
    structured_audio_noise,
    unpatchify,
)
from cavmae.train.pos_embed import get_2d_sincos_pos_embed

TINY = dict(size="tiny", target_length=128, num_mel_bins=128, image_size=64)


def n_params(model, trainable_only=False):
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def batch(b=4, target_length=128, mel=128, image=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, target_length, mel, generator=g), torch.randn(b, 3, image, image, generator=g)


def set_fused_attn(model, enabled):
    for m in model.modules():
        if isinstance(m, Attention):
            m.fused_attn = enabled


# ---- structure ----


def test_base_parameter_counts_match_official():
    with torch.device("meta"):  # shapes only: no memory, no init time
        pre = CAVMAE()
        ft527 = CAVMAEFT(527)
        ft309 = CAVMAEFT(309)
    assert n_params(pre) == 191_036_160
    assert n_params(pre, trainable_only=True) == 190_129_920
    assert n_params(ft527) == n_params(ft527, trainable_only=True) == 164_907_023
    assert n_params(ft309) == 164_739_381
    assert n_params(pre.blocks_a[0]) == 7_094_016
    assert n_params(pre.decoder_blocks[0]) == 3_156_480
    assert len(pre.state_dict()) == 647 and len(ft527.state_dict()) == 478


def test_audio_only_model_has_only_audio_parameters():
    with torch.device("meta"):
        m = CAVMAEFTAudio(527)
    tops = list(dict.fromkeys(k.split(".")[0] for k in m.state_dict()))
    assert tops == ["modality_a", "pos_embed_a", "patch_embed_a", "blocks_a", "blocks_u", "norm_a", "norm", "mlp_head"]


def test_block_uses_timm_attention_and_mlp_with_official_keys():
    blk = Block(64, 4)
    assert list(blk.state_dict()) == [
        f"{n}.{p}" for n in ("norm1", "norm1_a", "norm1_v") for p in ("weight", "bias")
    ] + ["attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"] + [
        f"{n}.{p}" for n in ("norm2", "norm2_a", "norm2_v") for p in ("weight", "bias")
    ] + ["mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    assert isinstance(blk.attn.q_norm, torch.nn.Identity) and isinstance(blk.attn.k_norm, torch.nn.Identity)
    assert blk.attn.fused_attn is True
    assert blk.attn.scale == pytest.approx(16**-0.5)


def test_block_modality_selects_norms():
    torch.manual_seed(0)
    blk = Block(32, 4).eval()
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        blk.norm1_a.weight.mul_(3.0)
        y_none, y_a, y_v = blk(x), blk(x, "a"), blk(x, "v")
    assert torch.allclose(y_none, y_v)  # norm*_v still equal to norm* (1/0 init)
    assert not torch.allclose(y_none, y_a)


def test_initialisation():
    torch.manual_seed(0)
    m = CAVMAE(**TINY)
    assert torch.all(m.blocks_a[0].attn.qkv.bias == 0)
    bound = math.sqrt(6 / (64 + 3 * 64))  # xavier_uniform over the whole [3D, D] qkv matrix
    w = m.blocks_a[0].attn.qkv.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    pw = m.patch_embed_v.proj.weight
    assert pw.abs().max() <= math.sqrt(6 / (64 + 3 * 256))
    assert torch.all(m.norm.weight == 1) and torch.all(m.norm.bias == 0)
    for token in (m.modality_a, m.modality_v, m.mask_token, m.decoder_modality_a):
        assert token.std().item() == pytest.approx(0.02, rel=0.5)
    assert not m.pos_embed_a.requires_grad and not m.decoder_pos_embed_v.requires_grad
    assert CAVMAEFT(5, **TINY).pos_embed_a.requires_grad
    assert not CAVMAEFT(5, **TINY, tr_pos=False).pos_embed_v.requires_grad


# ---- embeddings and patches ----


def test_sincos_values_at_known_positions():
    # D=8: each half has D/4=2 frequencies w = [1, 10000^-0.5 = 0.01]. Grid 2x3, token 5 = row 1, col 2.
    pe = get_2d_sincos_pos_embed(8, 2, 3)
    assert pe.shape == (6, 8) and pe.dtype == torch.float32
    col = [math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]  # column index 2
    row = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)]  # row index 1
    expected = col + row
    assert pe[5].tolist() == pytest.approx(expected, abs=1e-7)
    assert pe[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_audio_pos_embed_is_column_time_first_row_freq_second():
    pe = get_2d_sincos_pos_embed(768, 8, 64)  # audio grid: 8 freq rows x 64 time columns
    k = 3 * 64 + 10  # freq row 3, time column 10
    w1 = 1 / 10000 ** (1 / 192)  # second frequency of 192 per quarter
    assert pe[k, 0].item() == pytest.approx(math.sin(10))
    assert pe[k, 1].item() == pytest.approx(math.sin(10 * w1))
    assert pe[k, 192].item() == pytest.approx(math.cos(10))
    assert pe[k, 384].item() == pytest.approx(math.sin(3))
    assert pe[k, 576].item() == pytest.approx(math.cos(3))
    m = CAVMAE(size="tiny", target_length=1024, num_mel_bins=128, image_size=224)
    assert torch.equal(m.pos_embed_a[0], get_2d_sincos_pos_embed(64, 8, 64))
    assert torch.equal(m.decoder_pos_embed_v[0], get_2d_sincos_pos_embed(32, 14, 14))


def test_patchify_audio_layout_and_inverse():
    audio = torch.randn(2, 1024, 128)
    img = audio_as_image(audio)
    assert img.shape == (2, 1, 128, 1024)
    x = patchify(img)
    assert x.shape == (2, 512, 256)
    f, t, p, q = 5, 40, 3, 11  # token f*64+t, pixel p*16+q = freq row p, time column q inside the patch
    assert x[1, f * 64 + t, p * 16 + q] == audio[1, t * 16 + q, f * 16 + p]
    assert torch.equal(unpatchify(x, 1, (8, 64)), img)


def test_patchify_image_layout_and_inverse():
    imgs = torch.randn(2, 3, 224, 224)
    x = patchify(imgs)
    assert x.shape == (2, 196, 768)
    h, w, p, q, c = 13, 2, 7, 15, 2
    assert x[0, h * 14 + w, (p * 16 + q) * 3 + c] == imgs[0, c, h * 16 + p, w * 16 + q]
    assert torch.equal(unpatchify(x, 3, (14, 14)), imgs)


def test_patch_conv_token_order_matches_patchify():
    torch.manual_seed(0)
    pe = PatchEmbed(3, 8)
    imgs = torch.randn(2, 3, 64, 48)
    w = pe.proj.weight.permute(0, 2, 3, 1).reshape(8, -1)  # (p, q, c) inner order, like patchify
    with torch.no_grad():
        assert torch.allclose(pe(imgs), patchify(imgs) @ w.T + pe.proj.bias, atol=1e-5)


# ---- masking ----


@pytest.mark.parametrize("n_tokens,kept", [(512, 128), (196, 49)])
def test_random_masking_bookkeeping(n_tokens, kept):
    torch.manual_seed(0)
    x = torch.randn(3, n_tokens, 4)
    x_kept, mask, ids_restore = random_masking(x, 0.75)
    assert x_kept.shape == (3, kept, 4)
    assert mask.sum(1).tolist() == [n_tokens - kept] * 3
    # ids_restore inverts the shuffle: put the kept tokens back, zeros elsewhere
    padded = torch.cat([x_kept, torch.zeros(3, n_tokens - kept, 4)], dim=1)
    restored = torch.gather(padded, 1, ids_restore.unsqueeze(-1).expand(-1, -1, 4))
    visible = (mask == 0).unsqueeze(-1)
    assert torch.equal(restored, torch.where(visible, x, torch.zeros_like(x)))
    assert torch.equal(torch.sort(ids_restore, dim=1).values, torch.arange(n_tokens).expand(3, -1))


def test_masking_keeps_lowest_noise():
    x = torch.arange(6.0).reshape(1, 6, 1)
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2]])
    x_kept, mask, _ = random_masking(x, 0.5, noise)
    assert x_kept.flatten().tolist() == [1, 5, 3]
    assert mask.tolist() == [[1, 0, 1, 0, 1, 0]]


@pytest.mark.parametrize("mode,forced", [("time", 48 * 8), ("freq", 6 * 64), ("tf", 33 * 8 + 4 * 64 - 33 * 4)])
def test_structured_audio_masking(mode, forced):
    torch.manual_seed(0)
    noise = structured_audio_noise(2, (8, 64), 0.75, mode)
    assert (noise == 1.1).sum(1).tolist() == [forced, forced]
    x_kept, mask, _ = random_masking(torch.randn(2, 512, 4), 0.75, noise)
    assert x_kept.shape[1] == 128
    assert torch.all(noise[mask.bool()] == 1.1)  # everything removed is a forced row/column
    grid = (noise == 1.1).reshape(2, 8, 64)
    if mode == "time":
        assert grid.all(1).sum(1).tolist() == [48, 48]
    if mode == "freq":
        assert grid.all(2).sum(1).tolist() == [6, 6]


# ---- losses ----


def direct_infonce(a, v, tau=0.05):
    """Reference: loss_j = -log softmax over audios i of <a_i, v_j>/tau, at i = j (float64, explicit loops)."""
    a = torch.nn.functional.normalize(a.double(), dim=-1)
    v = torch.nn.functional.normalize(v.double(), dim=-1)
    n = a.shape[0]
    total, hits = 0.0, 0
    for j in range(n):
        scores = [float(a[i] @ v[j]) / tau for i in range(n)]
        total += -(scores[j] - math.log(sum(math.exp(s) for s in scores)))
        hits += max(range(n), key=lambda i: scores[i]) == j
    return total / n, hits / n


def test_contrastive_loss_matches_direct_computation():
    torch.manual_seed(0)
    m = CAVMAE(**TINY)
    a, v = torch.randn(6, 16), torch.randn(6, 16)
    v[:3] += 2 * a[:3]  # some correct matches, so accuracy is neither 0 nor 1
    loss, acc = m.contrastive_loss(a, v)
    ref_loss, ref_acc = direct_infonce(a, v)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert acc.item() == pytest.approx(ref_acc)
    assert 0 < ref_acc < 1

    # chunks: negatives only inside each chunk, chunk losses summed, accuracies averaged
    loss2, acc2 = m.contrastive_loss(a, v, chunks=2)
    (l1, c1), (l2, c2) = direct_infonce(a[:3], v[:3]), direct_infonce(a[3:], v[3:])
    assert loss2.item() == pytest.approx(l1 + l2, rel=1e-5)
    assert acc2.item() == pytest.approx((c1 + c2) / 2)

    # bidirectional: mean of visual->audio and audio->visual
    loss_b, acc_b = m.contrastive_loss(a, v, bidirectional=True)
    l_t, c_t = direct_infonce(v, a)
    assert loss_b.item() == pytest.approx((ref_loss + l_t) / 2, rel=1e-5)
    assert acc_b.item() == pytest.approx((ref_acc + c_t) / 2)

    with pytest.raises(ValueError):
        m.contrastive_loss(a, v, chunks=4)


def test_contrastive_loss_uninformative_start_is_chunks_ln_chunk_size():
    # identical vectors: uniform softmax, so each chunk contributes ln(12); the official 4-GPU value at step 0
    m = CAVMAE(**TINY)
    x = torch.ones(48, 16)
    loss, _ = m.contrastive_loss(x, x, chunks=4)
    assert loss.item() == pytest.approx(4 * math.log(12), rel=1e-6)


def test_mae_loss_normalised_pixels_hand_value():
    m = CAVMAE(**TINY)
    target = torch.tensor([[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 9.0]]])
    pred = torch.zeros(1, 2, 4)
    mask = torch.tensor([[1.0, 0.0]])
    # patch 0: mean 2.5, unbiased var 5/3, so sum((t - 2.5)^2) / var = 5 / (5/3) = 3 over 4 pixels
    assert m.mae_loss(target, pred, mask).item() == pytest.approx(0.75, rel=1e-5)
    m.norm_pix_loss = False
    assert m.mae_loss(target, pred, mask).item() == pytest.approx(30 / 4)


def test_mae_loss_ignores_visible_patches():
    torch.manual_seed(0)
    m = CAVMAE(**TINY)
    target, pred = torch.randn(4, 64, 256), torch.randn(4, 64, 256)
    _, mask, _ = random_masking(torch.zeros(4, 64, 1), 0.75)
    base = m.mae_loss(target, pred, mask)
    visible = (mask == 0).unsqueeze(-1)
    changed_visible = torch.where(visible, pred + 100.0, pred)
    changed_masked = torch.where(visible, pred, pred + 1.0)
    assert torch.equal(m.mae_loss(target, changed_visible, mask), base)
    assert m.mae_loss(target, changed_masked, mask) > base + 0.5
    # chunks sum each chunk's mean: equal chunks give chunks x the batch mean
    assert m.mae_loss(target, pred, mask, chunks=2).item() == pytest.approx(2 * base.item(), rel=1e-6)


# ---- forward passes ----


def test_pretrain_forward_outputs_and_loss_composition():
    torch.manual_seed(0)
    m = CAVMAE(**TINY)
    audio, image = batch()
    out = m(audio, image)
    assert out["pred_a"].shape == (4, 64, 256) and out["pred_v"].shape == (4, 16, 768)
    assert out["mask_a"].sum().item() == 4 * 48 and out["mask_v"].sum().item() == 4 * 12
    assert out["c_a"].shape == out["c_v"].shape == (4, 64)
    assert torch.allclose(out["loss_mae"], out["loss_mae_a"] + out["loss_mae_v"])
    assert torch.allclose(out["loss"], out["loss_mae"] + out["loss_c"])
    nce, acc = m.contrastive_loss(out["c_a"], out["c_v"])
    assert torch.allclose(out["loss_c"], 0.01 * nce) and torch.equal(out["c_acc"], acc)
    # a fresh model predicts ~0 for standardised targets: loss ~ 1 per modality
    assert 0.8 < out["loss_mae_a"].item() < 1.6 and 0.8 < out["loss_mae_v"].item() < 1.6


def test_variants_skip_unused_branches():
    audio, image = batch()
    av_mae = CAVMAE(**TINY, contrast_loss_weight=0.0)(audio, image)
    assert av_mae["loss_c"].item() == 0 and "c_a" not in av_mae and "pred_a" in av_mae
    cav = CAVMAE(**TINY, mae_loss_weight=0.0)(audio, image)
    assert cav["loss_mae"].item() == 0 and "pred_a" not in cav and cav["loss"] == cav["loss_c"] > 0


def test_contrast_chunks_scale_both_terms_like_data_parallel():
    audio, image = batch(b=4)
    torch.manual_seed(0)
    one = CAVMAE(**TINY)
    two = CAVMAE(**TINY, contrast_chunks=2)
    two.load_state_dict(one.state_dict())
    torch.manual_seed(1)
    o1 = one(audio, image)
    torch.manual_seed(1)
    o2 = two(audio, image)
    assert o2["loss_mae_a"].item() == pytest.approx(2 * o1["loss_mae_a"].item(), rel=1e-5)
    expected_c = 0.01 * two.contrastive_loss(o1["c_a"], o1["c_v"], chunks=2)[0]
    assert o2["loss_c"].item() == pytest.approx(expected_c.item(), rel=1e-5)


@pytest.mark.parametrize("weights", [(1.0, 0.01), (1.0, 0.0), (0.0, 0.01)])
def test_gradients_reach_exactly_the_used_trainable_parameters(weights):
    torch.manual_seed(0)
    m = CAVMAE(**TINY, mae_loss_weight=weights[0], contrast_loss_weight=weights[1])
    m(*batch())["loss"].backward()
    unused = m.unused_parameter_names()
    for name, p in m.named_parameters():
        if p.requires_grad and name not in unused:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert {"blocks_a.0.norm1_a.weight", "blocks_v.0.norm2_a.bias", "decoder_blocks.0.norm1_v.weight"} <= unused
    assert ("norm_a.weight" in unused) == (weights[1] == 0)
    joint_and_decoder = {"mask_token", "decoder_embed.weight", "norm.bias", "blocks_u.0.norm1.weight"}
    assert (joint_and_decoder <= unused) == (weights[0] == 0)


@pytest.mark.parametrize("mode", sorted(FT_MODES))
def test_finetune_gradients_follow_mode(mode):
    torch.manual_seed(0)
    m = CAVMAEFT(7, **TINY)
    audio, image = batch()
    m(audio, image, mode).sum().backward()
    unused = m.unused_parameter_names(mode)
    for name, p in m.named_parameters():
        assert (p.grad is not None) == (name not in unused), name


def test_audio_only_model_gradients():
    torch.manual_seed(0)
    m = CAVMAEFTAudio(7, size="tiny", target_length=128)
    m(batch()[0]).sum().backward()
    unused = m.unused_parameter_names()
    assert {"norm.weight", "blocks_u.0.norm1.bias", "blocks_u.0.norm2_v.weight", "blocks_a.0.norm1_a.weight"} <= unused
    for name, p in m.named_parameters():
        assert (p.grad is not None) == (name not in unused), name


def test_finetune_modes_semantics():
    torch.manual_seed(0)
    m = CAVMAEFT(7, **TINY).eval()
    audio, image = batch()
    with torch.no_grad():
        for mod in m.modules():  # distinct norms, so every path gives a different answer
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.normal_(1.0, 0.5)
                mod.bias.normal_(0.0, 0.5)
        a = m._specific(m.embed_audio(audio), m.blocks_a)
        v = m._specific(m.embed_image(image), m.blocks_v)
        joint = m.norm(m.blocks_u[0](torch.cat([a, v], 1))).mean(1)
        assert torch.allclose(m(audio, image, "multimodal"), m.mlp_head(joint), atol=1e-6)
        a_only = m.norm_a(m.blocks_u[0](a, "a")).mean(1)
        assert torch.allclose(m(audio, None, "audioonly"), m.mlp_head(a_only), atol=1e-6)
        a_shared = m.norm(m.blocks_u[0](a)).mean(1)
        assert torch.allclose(m(audio, None, "missingaudioonly"), m.mlp_head((a_shared + a_only) / 2), atol=1e-6)
        v_only = m.norm_v(m.blocks_u[0](v, "v")).mean(1)
        v_shared = m.norm(m.blocks_u[0](v)).mean(1)
        assert torch.allclose(m(None, image, "videoonly"), m.mlp_head(v_only), atol=1e-6)
        assert torch.allclose(m(None, image, "missingvideoonly"), m.mlp_head((v_shared + v_only) / 2), atol=1e-6)
        assert not torch.allclose(a_shared, a_only, atol=1e-3)
        fa, fv = m.forward_feat(audio, image)
        assert fa.shape == (4, 64, 64) and fv.shape == (4, 16, 64)
        assert torch.allclose(fa.mean(1), a_only, atol=1e-6)
    with pytest.raises(ValueError):
        m(audio, image, "bogus")


def test_fused_and_plain_attention_agree_fp32():
    torch.manual_seed(0)
    m = CAVMAEFT(7, size="tiny", target_length=1024, num_mel_bins=128, image_size=224).eval()
    audio, image = batch(b=2, target_length=1024, image=224)
    with torch.no_grad():
        fused = m(audio, image, "multimodal")
        set_fused_attn(m, False)
        plain = m(audio, image, "multimodal")
    assert not torch.equal(fused, torch.zeros_like(fused))
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)


def test_pretrain_forward_feat_is_unmasked():
    torch.manual_seed(0)
    m = CAVMAE(**TINY).eval()
    audio, image = batch(b=2)
    with torch.no_grad():
        a, v = m.forward_feat(audio, image)
    assert a.shape == (2, 64, 64) and v.shape == (2, 16, 64)


def test_builders_take_plain_dicts():
    cfg = dict(TINY, mask_ratio_a=0.5, contrast_chunks=2, tr_pos=False)
    pre = build_pretrain_model(cfg)
    assert isinstance(pre, CAVMAE) and pre.mask_ratio_a == 0.5 and pre.contrast_chunks == 2
    ft = build_finetune_model(cfg, label_dim=9)
    assert isinstance(ft, CAVMAEFT) and not ft.pos_embed_a.requires_grad and ft.mlp_head[1].out_features == 9
    assert isinstance(build_finetune_model(cfg, label_dim=9, audio_only=True), CAVMAEFTAudio)
    with pytest.raises(ValueError, match="unknown model config keys"):
        build_pretrain_model(dict(TINY, mask_ratio=0.5))
    with pytest.raises(ValueError):
        build_pretrain_model(dict(TINY, mask_mode="random"))
    with pytest.raises(ValueError):
        build_pretrain_model(dict(TINY, target_length=1000))
