"""Checkpoint layout: official key lists, prefix handling, pretrained -> finetune loading, IN-MAE initialisation."""

import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from cavmae.train.checkpoint import (
    MAX_TABLE_RATIO,
    CheckpointError,
    imagenet_mae_init,
    load_pretrained_into,
    load_state_dict_file,
    official_state_dict,
    pretrain_init_state,
    read_checkpoint,
    strip_module_prefix,
)
from cavmae.train.model import CAVMAE, CAVMAEFT, CAVMAEFTAudio
from cavmae.train.pos_embed import get_2d_sincos_pos_embed

DATA = Path(__file__).parent / "data"
TINY = dict(size="tiny", target_length=128, num_mel_bins=128, image_size=64)


def official_keys(name):
    """[(key with module. prefix, shape)] from the list of every official state-dict key (copied from the reference)."""
    rows = []
    for line in (DATA / name).read_text().splitlines():
        key, shape = line.split("\t")
        rows.append((key, tuple(int(s) for s in shape.strip("[]").split(","))))
    return rows


def random_state_dict(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((k, torch.randn(shape, generator=g)) for k, shape in rows)


@pytest.fixture(scope="module")
def base_pretrain():
    return CAVMAE()


@pytest.fixture(scope="module")
def base_finetune():
    return CAVMAEFT(527)


@pytest.fixture(scope="module")
def official_pretrained():
    return random_state_dict(official_keys("cavmae_keys.txt"))


def test_key_files_are_the_documented_size():
    assert len(official_keys("cavmae_keys.txt")) == 647
    assert len(official_keys("cavmaeft_keys.txt")) == 478


@pytest.mark.parametrize("prefix", [True, False])
def test_official_pretrained_loads_strictly(base_pretrain, official_pretrained, prefix):
    sd = official_pretrained if prefix else strip_module_prefix(official_pretrained)
    assert load_pretrained_into(base_pretrain, sd) == ([], [])
    key = ("module." if prefix else "") + "blocks_v.7.mlp.fc1.weight"
    assert torch.equal(base_pretrain.blocks_v[7].mlp.fc1.weight, sd[key])
    assert torch.equal(base_pretrain.pos_embed_a, official_pretrained["module.pos_embed_a"])
    # and loads with plain torch strict loading once the prefix is gone
    base_pretrain.load_state_dict(strip_module_prefix(sd), strict=True)


def test_saved_pretrained_layout_equals_official_key_list(base_pretrain):
    ours = [(k, tuple(v.shape)) for k, v in official_state_dict(base_pretrain).items()]
    assert ours == official_keys("cavmae_keys.txt")  # same keys, shapes and order
    assert all(k.startswith("module.") for k in official_state_dict(base_pretrain))
    assert not any(k.startswith("module.") for k in official_state_dict(base_pretrain, module_prefix=False))


def test_official_finetuned_loads_strictly_and_layout_matches(base_finetune):
    rows = official_keys("cavmaeft_keys.txt")
    sd = random_state_dict(rows, seed=1)
    assert load_pretrained_into(base_finetune, sd) == ([], [])
    assert torch.equal(base_finetune.mlp_head[1].weight, sd["module.mlp_head.1.weight"])
    assert [(k, tuple(v.shape)) for k, v in official_state_dict(base_finetune).items()] == rows


def test_pretrained_into_finetune_reports_exactly_the_documented_keys(base_finetune, official_pretrained):
    missing, unexpected = load_pretrained_into(base_finetune, official_pretrained)
    assert missing == ["mlp_head.0.bias", "mlp_head.0.weight", "mlp_head.1.bias", "mlp_head.1.weight"]
    keys = [k[len("module."):] for k, _ in official_keys("cavmae_keys.txt")]
    expected = sorted(k for k in keys if k.startswith(("decoder", "mask_token")))
    assert unexpected == expected
    assert len(unexpected) == 8 * 20 + 13  # 8 decoder blocks of 20 tensors, 12 other decoder tensors, mask_token
    loaded = official_pretrained["module.blocks_u.0.norm1_a.weight"]
    assert torch.equal(base_finetune.blocks_u[0].norm1_a.weight, loaded)


def test_loading_rejects_anything_undocumented():
    ft = CAVMAEFT(5, **TINY)
    sd = CAVMAE(**TINY).state_dict()
    with pytest.raises(ValueError, match="blocks_a.0.attn.qkv.weight"):
        load_pretrained_into(ft, {k: v for k, v in sd.items() if k != "blocks_a.0.attn.qkv.weight"})
    with pytest.raises(ValueError, match="extra"):
        load_pretrained_into(ft, {**sd, "extra.weight": torch.zeros(1)})
    partial_head = {**sd, "mlp_head.0.weight": torch.ones(64), "mlp_head.0.bias": torch.zeros(64)}
    with pytest.raises(ValueError, match="mlp_head"):
        load_pretrained_into(ft, partial_head)
    with pytest.raises(ValueError, match="mask_token"):  # a pretraining model must get every key
        load_pretrained_into(CAVMAE(**TINY), {k: v for k, v in sd.items() if k != "mask_token"})
    with pytest.raises(CheckpointError, match="patch_embed_a.proj.weight"):  # another patch embedding
        load_pretrained_into(CAVMAE(size="tiny", target_length=128, image_size=64),
                             {**sd, "patch_embed_a.proj.weight": torch.zeros(64, 1, 16, 8)})


@pytest.mark.parametrize("new_length", [64, 512])
def test_other_clip_length_rebuilds_the_fixed_position_tables(new_length, caplog):
    """A pretrained checkpoint's tables are fixed sin-cos: at another target_length they are rebuilt exactly as the
    model would build them, silently, and every other weight loads unchanged."""
    torch.manual_seed(0)
    sd = official_state_dict(CAVMAE(**TINY))
    for model in (CAVMAE(**{**TINY, "target_length": new_length}),
                  CAVMAEFT(5, **{**TINY, "target_length": new_length})):
        fresh = {k: v.clone() for k, v in model.state_dict().items()}
        with caplog.at_level("WARNING"):
            load_pretrained_into(model, sd)
        assert not caplog.records
        for name in ("pos_embed_a", "decoder_pos_embed_a", "pos_embed_v"):
            if name in fresh:
                assert torch.equal(model.state_dict()[name], fresh[name]), name
        assert model.pos_embed_a.shape == (1, 8 * new_length // 16, 64)
        assert torch.equal(model.blocks_a[0].attn.qkv.weight, sd["module.blocks_a.0.attn.qkv.weight"])
        model(torch.randn(2, new_length, 128), torch.randn(2, 3, 64, 64), *(() if isinstance(model, CAVMAE)
                                                                             else ("multimodal",)))


def test_trained_position_tables_are_cut_or_interpolated_as_ast(caplog):
    """A finetuned (tr_pos) table is no longer sin-cos: shorter clips take the centre time columns, longer ones a
    bilinear stretch, with one log line per table."""
    torch.manual_seed(0)
    ft = CAVMAEFT(5, **TINY)
    trained = ft.pos_embed_a.detach() + 0.1 * torch.randn_like(ft.pos_embed_a)
    sd = {**ft.state_dict(), "pos_embed_a": trained}
    short = CAVMAEFT(5, **{**TINY, "target_length": 64})
    with caplog.at_level("WARNING", logger="cavmae.train.checkpoint"):
        load_pretrained_into(short, sd)
    assert [r.getMessage() for r in caplog.records] == [
        "pos_embed_a: trained position table fitted from grid 8x8 to 8x4 (centre cut / bilinear, as AST)"]
    grid = trained.reshape(8, 8, -1)  # rows are frequency, columns time
    assert torch.equal(short.pos_embed_a.detach().reshape(8, 4, -1), grid[:, 2:6])
    long = CAVMAEFT(5, **{**TINY, "target_length": 256})
    load_pretrained_into(long, sd)
    stretched = long.pos_embed_a.detach().reshape(8, 16, -1)
    assert torch.allclose(stretched[:, 0], grid[:, 0]) and torch.allclose(stretched[:, -1], grid[:, -1])
    assert torch.allclose(stretched[:, 1], 0.75 * grid[:, 0] + 0.25 * grid[:, 1], atol=1e-6)


def test_audio_only_model_from_finetuned_and_pretrained():
    torch.manual_seed(0)
    ft = CAVMAEFT(5, **TINY).eval()
    audio_model = CAVMAEFTAudio(5, size="tiny", target_length=128).eval()
    missing, unexpected = load_pretrained_into(audio_model, official_state_dict(ft))
    assert missing == []
    visual = ("modality_v", "pos_embed_v", "patch_embed_v", "blocks_v", "norm_v")
    assert unexpected == sorted(k for k in ft.state_dict() if k.startswith(visual))
    audio = torch.randn(2, 128, 128)
    with torch.no_grad():
        assert torch.allclose(audio_model(audio), ft(audio, None, "audioonly"), atol=1e-6)
    missing, unexpected = load_pretrained_into(audio_model, CAVMAE(**TINY).state_dict())
    assert missing == ["mlp_head.0.bias", "mlp_head.0.weight", "mlp_head.1.bias", "mlp_head.1.weight"]
    assert "mask_token" in unexpected and "blocks_v.0.mlp.fc1.weight" in unexpected


def test_file_round_trip_with_prefix_and_model_entry(tmp_path):
    torch.manual_seed(0)
    src = CAVMAE(**TINY)
    raw, wrapped = tmp_path / "raw.pth", tmp_path / "wrapped.pth"
    torch.save(official_state_dict(src), raw)
    torch.save({"model": official_state_dict(src), "epoch": 3}, wrapped)
    for path in (raw, wrapped):
        sd = load_state_dict_file(str(path))
        assert list(sd) == list(src.state_dict())
        dst = CAVMAE(**TINY)
        assert load_pretrained_into(dst, sd) == ([], [])
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))


class _NotATensor:
    pass


def test_file_loading_refuses_arbitrary_pickles(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="evil.pth: holds pickled objects"):
        load_state_dict_file(str(path))
    torch.save({"w": torch.zeros(1), "step": 3}, path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_state_dict_file(str(path))


def claiming(tokens: int, dim: int = 64) -> torch.Tensor:
    """A [1, tokens, dim] table stored as `dim` values: a zero-stride view, which torch.save keeps as it is."""
    return torch.zeros(dim).as_strided((1, tokens, dim), (0, 0, 1))


def test_a_checkpoint_cannot_claim_more_values_than_its_file_holds(tmp_path):
    """A 1 MB checkpoint whose pos_embed_a claims 2^20 times the model's tokens (any copy or sin-cos check of it would
    take gigabytes) is refused on reading, as a model weight (--init, --checkpoint) and inside a training state
    (--resume: the optimizer's moments)."""
    path = tmp_path / "huge.pth"
    sd = {**CAVMAE(**TINY).state_dict(), "pos_embed_a": claiming(64 << 20)}
    torch.save(sd, path)
    assert path.stat().st_size < 2 << 20
    with pytest.raises(CheckpointError, match=r"huge.pth: tensors claim more values than the file stores "
                                              r"\(pos_embed_a \(1, 67108864, 64\)\)"):
        load_state_dict_file(str(path))
    torch.save({"model": {}, "optimizer": {"state": {0: {"exp_avg": claiming(1 << 30)}}}}, path)
    with pytest.raises(CheckpointError, match=r"optimizer.state.0.exp_avg \(1, 1073741824, 64\)"):
        read_checkpoint(path, need=("model", "optimizer"))


def test_a_checkpoint_with_compressed_records_is_refused(tmp_path):
    """torch.save stores its records uncompressed: a deflated one lets a 64 kB file inflate to 64 MB (1 MB to 1 GB)
    when loaded, so it is refused before torch.load reads it."""
    plain, packed = tmp_path / "plain.pth", tmp_path / "packed.pth"
    torch.save({"w": torch.zeros(1 << 24)}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    assert packed.stat().st_size < 1 << 17
    with pytest.raises(CheckpointError, match=r"packed.pth: holds compressed records \(.*\), which torch.save "
                                              r"never writes"):
        load_state_dict_file(str(packed))
    assert load_state_dict_file(str(plain))["w"].shape == (1 << 24,)


def test_position_tables_are_fitted_only_up_to_the_documented_ratio():
    """Fitting a table costs in proportion to its size: one of at most MAX_TABLE_RATIO times the model's tokens
    (the official 1024 rows into a 16-row model) is fitted, a larger one is a shape error naming the table."""
    model = CAVMAE(**{**TINY, "target_length": 16})  # 8 x 1 audio tokens
    for cols, fits in ((MAX_TABLE_RATIO, True), (MAX_TABLE_RATIO + 1, False)):
        sd = official_state_dict(CAVMAE(**{**TINY, "target_length": 16 * cols}))
        if fits:
            load_pretrained_into(model, sd)
        else:
            with pytest.raises(CheckpointError, match=r"checkpoint: does not fit CAVMAE .*pos_embed_a \(1, 520, 64\) "
                                                      r"vs \(1, 8, 64\)"):
                load_pretrained_into(model, sd)


def fake_mae_state_dict(embed=768, depth=12, dec=512, dec_depth=8, seed=0):
    """Random tensors in the layout of facebookresearch/mae `mae_pretrain_vit_base_full.pth` ['model']."""
    g = torch.Generator().manual_seed(seed)

    def block(prefix, d):
        return {
            f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
            f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
            f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
            f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
            f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
            f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,),
        }

    shapes = {"cls_token": (1, 1, embed), "pos_embed": (1, 197, embed),
              "patch_embed.proj.weight": (embed, 3, 16, 16), "patch_embed.proj.bias": (embed,)}
    for i in range(depth):
        shapes.update(block(f"blocks.{i}", embed))
    shapes.update({"norm.weight": (embed,), "norm.bias": (embed,), "mask_token": (1, 1, dec)})
    shapes.update({"decoder_embed.weight": (dec, embed), "decoder_embed.bias": (dec,)})
    shapes["decoder_pos_embed"] = (1, 197, dec)
    for i in range(dec_depth):
        shapes.update(block(f"decoder_blocks.{i}", dec))
    shapes.update({"decoder_norm.weight": (dec,), "decoder_norm.bias": (dec,),
                   "decoder_pred.weight": (768, dec), "decoder_pred.bias": (768,)})
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def test_imagenet_mae_init_base(base_pretrain):
    mae = fake_mae_state_dict()
    sd = imagenet_mae_init(mae)
    assert load_pretrained_into(base_pretrain, sd) == ([], [])
    m = base_pretrain
    for i in (0, 3, 10):
        for name in ("attn.qkv.weight", "mlp.fc2.bias", "norm1.weight"):
            assert torch.equal(sd[f"blocks_a.{i}.{name}"], mae[f"blocks.{i}.{name}"])
            assert torch.equal(sd[f"blocks_v.{i}.{name}"], mae[f"blocks.{i}.{name}"])
    assert torch.equal(m.blocks_a[3].attn.proj.weight, m.blocks_v[3].attn.proj.weight)
    assert torch.equal(m.blocks_u[0].mlp.fc1.weight, mae["blocks.11.mlp.fc1.weight"])
    for norm in ("norm1", "norm1_a", "norm1_v"):
        assert torch.equal(sd[f"blocks_u.0.{norm}.weight"], mae["blocks.11.norm1.weight"])
    for norm in ("norm2_a", "norm2_v"):
        assert torch.equal(sd[f"blocks_u.0.{norm}.bias"], mae["blocks.11.norm2.bias"])
    assert torch.all(sd["blocks_a.0.norm1_a.weight"] == 1)  # dead norms keep the fresh init
    for norm in ("norm", "norm_a", "norm_v"):
        assert torch.equal(sd[f"{norm}.weight"], mae["norm.weight"])
    w = mae["patch_embed.proj.weight"]
    assert torch.equal(sd["patch_embed_v.proj.weight"], w)
    assert torch.allclose(sd["patch_embed_a.proj.weight"][:, 0], w[:, 0] + w[:, 1] + w[:, 2])
    assert torch.equal(sd["patch_embed_a.proj.bias"], mae["patch_embed.proj.bias"])
    assert torch.equal(sd["decoder_pred_a.weight"], mae["decoder_pred.weight"][:256])
    assert torch.equal(sd["decoder_pred_a.bias"], mae["decoder_pred.bias"][:256])
    assert torch.equal(sd["decoder_pred_v.weight"], mae["decoder_pred.weight"])
    assert torch.equal(sd["pos_embed_v"], mae["pos_embed"][:, 1:])
    assert torch.equal(sd["decoder_pos_embed_v"], mae["decoder_pos_embed"][:, 1:])
    assert torch.equal(sd["decoder_blocks.5.attn.qkv.bias"], mae["decoder_blocks.5.attn.qkv.bias"])
    assert torch.equal(sd["mask_token"], mae["mask_token"])
    assert sd["modality_a"].std().item() == pytest.approx(0.02, rel=0.3)  # not in MAE: fresh N(0, 0.02)
    assert torch.equal(sd["pos_embed_a"][0], get_2d_sincos_pos_embed(768, 8, 64))  # audio: fresh sin-cos


def test_imagenet_mae_init_rejects_mismatched_checkpoints():
    mae = fake_mae_state_dict(embed=64, depth=2, dec=32, dec_depth=1)
    sd = imagenet_mae_init(mae, size="tiny", target_length=128)
    assert list(sd) == list(CAVMAE(size="tiny", target_length=128).state_dict())
    with pytest.raises(ValueError, match="head"):
        imagenet_mae_init({**mae, "head.weight": torch.zeros(1)}, size="tiny")
    with pytest.raises(ValueError, match="encoder blocks"):
        imagenet_mae_init(mae, size="base")


def test_pretrain_init_accepts_an_imagenet_mae_file(tmp_path):
    """`pretrain --init mae_pretrain_vit_base_full.pth` works: the MAE layout is converted on load."""
    mae = fake_mae_state_dict(embed=64, depth=2, dec=32, dec_depth=1)
    torch.save({"model": mae}, tmp_path / "mae_full.pth")
    cfg = {"size": "tiny", "target_length": 128, "num_mel_bins": 128}
    sd = pretrain_init_state(str(tmp_path / "mae_full.pth"), cfg)
    model = CAVMAE(size="tiny", target_length=128)
    assert load_pretrained_into(model, sd) == ([], [])
    assert torch.equal(model.blocks_v[0].attn.qkv.weight, mae["blocks.0.attn.qkv.weight"])
    # a CAV-MAE checkpoint passes through unchanged
    torch.save(model.state_dict(), tmp_path / "cavmae.pth")
    again = pretrain_init_state(str(tmp_path / "cavmae.pth"), cfg)
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())
