"""Backbones: official numbers on stand-in release files, strict loading, the frozen contract."""
import argparse

import pytest
import torch
from conftest import load_golden
from stand_ins import stand_in_image

from errors import UserError
from models import ARCHS, FAMILIES, CheckpointError, build_backbone, convert_checkpoint, load_backbone, resolve_arch
from models.stand_in import stand_in_release
from models.vit import resample_pos_embed

GOLDEN = load_golden("backbones.pt")
SMALL = "dino_vit_small_16"  # the cheapest released arch, for the refusal tests


@pytest.fixture(scope="module")
def small_release():
    """The release-layout object of the SMALL stand-in, made once (it takes a moment)."""
    return stand_in_release(SMALL)


def save(obj, path):
    torch.save(obj, path)
    return path


def tokens(backbone, side=96):
    with torch.no_grad():
        return backbone(stand_in_image(side, 0))


@pytest.mark.parametrize("arch", sorted(GOLDEN))
def test_tokens_match_official(arch, tmp_path):
    case = GOLDEN[arch]
    backbone = load_backbone(save(stand_in_release(arch), tmp_path / f"{arch}.pth"))
    assert (backbone.arch, backbone.family) == (arch, ARCHS[arch].family)
    assert not any(t.is_meta for t in backbone.state_dict().values())
    with torch.no_grad():
        out = backbone(stand_in_image(case["image_side"], case["image_seed"]))
    torch.testing.assert_close(out, case["tokens"], rtol=1e-4, atol=1e-4)


def test_registry_matches_spec_table():
    spec_table = {  # docs/cause.md §1: family, patch, dim, heads, pretrain grid
        "dino_vit_small_8": ("dino", 8, 384, 12, 28), "dino_vit_small_16": ("dino", 16, 384, 12, 14),
        "dino_vit_base_8": ("dino", 8, 768, 12, 28), "dino_vit_base_16": ("dino", 16, 768, 12, 14),
        "dinov2_vit_small_14": ("dinov2", 14, 384, 6, 37), "dinov2_vit_base_14": ("dinov2", 14, 768, 12, 37),
        "ibot_vit_small_16": ("ibot", 16, 384, 6, 14), "ibot_vit_base_16": ("ibot", 16, 768, 12, 14),
        "msn_vit_small_16": ("msn", 16, 384, 6, 14), "msn_vit_base_16": ("msn", 16, 768, 12, 14),
        "mae_vit_base_16": ("mae", 16, 768, 12, 14),
        "dino_vit_tiny_8": ("dino", 8, 192, 3, 28), "dino_vit_tiny_16": ("dino", 16, 192, 3, 14),
        "dinov2_reg_vit_small_14": ("dinov2_reg", 14, 384, 6, 37),
        "dinov2_reg_vit_base_14": ("dinov2_reg", 14, 768, 12, 37),
        # DINOv3: no stored positional embedding (grid 0), 64-wide heads
        "dinov3_vit_small_16": ("dinov3", 16, 384, 6, 0), "dinov3_vit_small_plus_16": ("dinov3", 16, 384, 6, 0),
        "dinov3_vit_base_16": ("dinov3", 16, 768, 12, 0), "dinov3_vit_large_16": ("dinov3", 16, 1024, 16, 0),
    }
    assert {a: (s.family, s.patch, s.dim, s.heads, s.pretrain_grid) for a, s in ARCHS.items()} == spec_table
    assert {a for a, s in ARCHS.items() if s.depth != 12} == {"dinov3_vit_large_16"}
    assert ARCHS["dinov3_vit_large_16"].depth == 24
    assert {a for a, s in ARCHS.items() if s.ffn != "mlp"} == {"dinov3_vit_small_plus_16"}
    assert {a: s.extra_tokens for a, s in ARCHS.items() if s.extra_tokens} == {
        a: 4 for a in spec_table if a.startswith(("dinov2_reg", "dinov3"))}
    assert {s.family for s in ARCHS.values()} == set(FAMILIES)


def test_tiny_stand_in_round_trips(tmp_path):
    """The demo saves a random ViT-Tiny's state_dict and loads it back as a DINO release."""
    built = build_backbone("dino_vit_tiny_16")
    loaded = load_backbone(save(built.state_dict(), tmp_path / "dino_vit_tiny_16.pth"))
    out = tokens(loaded, 48)
    assert out.shape == (1, 9, 192)
    torch.testing.assert_close(out, tokens(built, 48), rtol=0, atol=0)


def test_positional_embedding_grids():
    backbone = build_backbone("dino_vit_tiny_16")
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 32, 80)).shape == (2, 2 * 5, 192)
    pos = backbone.pos_embed
    assert resample_pos_embed(pos, (14, 14), 14, "dino") is pos  # the pretrain grid: stored embedding as is
    assert resample_pos_embed(pos, (2, 5), 14, "dino").shape == (1, 11, 192)
    assert torch.equal(resample_pos_embed(pos, (6, 6), 14, "msn")[:, 0], pos[:, 0])  # class token kept
    with pytest.raises(UserError, match="msn positional-embedding rule"):
        resample_pos_embed(pos, (2, 5), 14, "msn")  # isotropic: the official rule has no answer


def test_missing_block_refused(tmp_path, small_release):
    sd = {k: v for k, v in small_release.items() if not k.startswith("blocks.11.")}
    with pytest.raises(CheckpointError, match=r"12 missing keys \(blocks\.11\.") as err:
        load_backbone(save(sd, tmp_path / f"{SMALL}.pth"))
    assert "dino release files hold a flat state_dict" in str(err.value)


def test_renamed_key_refused(tmp_path, small_release):
    sd = dict(small_release)
    sd["final_norm.weight"] = sd.pop("norm.weight")
    with pytest.raises(CheckpointError) as err:
        load_backbone(save(sd, tmp_path / f"{SMALL}.pth"))
    message = str(err.value)
    assert "1 missing keys (norm.weight)" in message and "1 unexpected keys (final_norm.weight)" in message


def test_shape_mismatch_refused(tmp_path, small_release):
    """A ViT-S/16 file named as ViT-S/8: same keys, other shapes."""
    mismatch = r"shape mismatches \(pos_embed: file \(1, 197, 384\) vs model \(1, 785, 384\)"
    with pytest.raises(CheckpointError, match=mismatch):
        load_backbone(save(small_release, tmp_path / "dino_vit_small_8.pth"))


def test_other_family_layout_refused(tmp_path, small_release):
    path = save({"state_dict": small_release}, tmp_path / f"{SMALL}.pth")
    with pytest.raises(CheckpointError, match=r"dino release files hold a flat state_dict.*the ibot layout"):
        load_backbone(path)
    path = save(small_release, tmp_path / "mae_vit_base_16.pth")
    with pytest.raises(CheckpointError, match=r"mae release files hold \{'model': state_dict\}.*dinov3 layout"):
        load_backbone(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere/dino_vit_base_8\.pth.*checkpoint/<arch>\.pth"):
        load_backbone(tmp_path / "nowhere" / "dino_vit_base_8.pth")


def test_arch_from_name_or_override(tmp_path, small_release):
    assert resolve_arch("checkpoint/dino_vit_base_8.pth") == "dino_vit_base_8"
    assert resolve_arch("weights.pth", "msn_vit_small_16") == "msn_vit_small_16"
    with pytest.raises(CheckpointError, match=r"pass --arch.*dino_vit_base_8.*msn_vit_small_16"):
        resolve_arch("checkpoint/dino_deitsmall16_pretrain.pth")
    with pytest.raises(CheckpointError, match="unknown arch 'vit_huge'"):
        resolve_arch("x.pth", "vit_huge")
    path = save(small_release, tmp_path / "dino_deitsmall16_pretrain.pth")
    with pytest.raises(CheckpointError, match="pass --arch"):
        load_backbone(path)
    assert load_backbone(path, arch=SMALL).arch == SMALL


def test_known_extra_keys_dropped(tmp_path, small_release):
    sd = dict(small_release, **{"head.weight": torch.zeros(1000, 384), "head.bias": torch.zeros(1000)})
    out = tokens(load_backbone(save(sd, tmp_path / f"{SMALL}.pth")))
    torch.testing.assert_close(out, GOLDEN[SMALL]["tokens"], rtol=1e-4, atol=1e-4)


def test_msn_release_extras_dropped(tmp_path):
    arch = "msn_vit_small_16"
    obj = stand_in_release(arch)
    obj["target_encoder"]["module.fc.fc1.weight"] = torch.zeros(2048, 384)
    obj["prototypes"] = torch.zeros(1024, 256)  # beside the encoder, as MSN saves them
    obj["encoder"] = {"module.cls_token": torch.zeros(1, 1, 384)}
    out = tokens(load_backbone(save(obj, tmp_path / f"{arch}.pth")))
    torch.testing.assert_close(out, GOLDEN[arch]["tokens"], rtol=1e-4, atol=1e-4)


def test_converters_drop_by_rule():
    """Each converter is a pure function of the release object; only the named extras go."""
    t = torch.zeros(1)
    assert convert_checkpoint("mae", {"model": {"cls_token": t, "decoder_embed.weight": t, "mask_token": t},
                                      "args": argparse.Namespace(lr=1.0)}) == {"cls_token": t}
    assert convert_checkpoint("dinov2", {"cls_token": t, "mask_token": t}) == {"cls_token": t}
    assert convert_checkpoint("ibot", {"state_dict": {"cls_token": t, "masked_embed": t}}) == {"cls_token": t}
    assert convert_checkpoint("msn", {"target_encoder": {"module.cls_token": t, "module.fc.fc1.weight": t}}) == {
        "cls_token": t}
    assert convert_checkpoint("dino", {"cls_token": t, "head.weight": t, "extra": t}) == {"cls_token": t, "extra": t}
    with pytest.raises(CheckpointError, match="msn release files hold"):
        convert_checkpoint("msn", {"cls_token": t})


def test_mae_file_with_pickled_options(tmp_path):
    """MAE releases pickle an argparse.Namespace beside the weights: weights-only loading refuses it."""
    arch = "mae_vit_base_16"
    obj = stand_in_release(arch)
    obj["args"] = argparse.Namespace(model="mae_vit_base_patch16")
    obj["model"]["decoder_embed.weight"] = torch.zeros(512, 768)
    out = tokens(load_backbone(save(obj, tmp_path / f"{arch}.pth")))
    torch.testing.assert_close(out, GOLDEN[arch]["tokens"], rtol=1e-4, atol=1e-4)


def test_dino_small_heads(tmp_path, small_release):
    path = save(small_release, tmp_path / f"{SMALL}.pth")
    default = load_backbone(path)
    twelve, six = load_backbone(path, dino_small_heads=12), load_backbone(path, dino_small_heads=6)
    assert default.blocks[0].attn.num_heads == 12 and six.blocks[0].attn.num_heads == 6
    torch.testing.assert_close(tokens(default), GOLDEN[SMALL]["tokens"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tokens(twelve), tokens(default), rtol=0, atol=0)
    assert (tokens(six) - tokens(twelve)).abs().max() > 1e-2
    assert build_backbone("msn_vit_small_16", dino_small_heads=12).blocks[0].attn.num_heads == 6
    with pytest.raises(ValueError, match="dino_small_heads"):
        build_backbone(SMALL, dino_small_heads=8)


def test_frozen_contract():
    backbone = build_backbone("dino_vit_tiny_16")
    assert not any(p.requires_grad for p in backbone.parameters())
    assert not backbone.train().training and not backbone.training
    with pytest.raises(ValueError, match="multiples of its patch size 16"):
        backbone(torch.zeros(1, 3, 40, 48))


def test_attention_is_fused():
    # Issue 6: the backbone's attention runs as one scaled_dot_product_attention call (flash or
    # memory-efficient kernels on a GPU), not as an explicit [heads, N, N] softmax.
    backbone = build_backbone("dino_vit_tiny_8")
    attentions = [m for m in backbone.modules() if hasattr(m, "fused_attn")]
    assert len(attentions) == len(backbone.blocks) and all(m.fused_attn for m in attentions)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        backbone(torch.randn(1, 3, 32, 32))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert len(calls) == len(backbone.blocks)
