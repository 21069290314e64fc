"""DINOv2 with registers and DINOv3: the official code's patch tokens on stand-in release files
(tests/golden/backbones_next.pt), their official file names, strict loading, and the by-name lookup of
their files (a public DINOv2-reg download, a DINOv3 file saved by hand or requested in one line)."""
import io
import socket
import sys

import numpy as np
import pytest
import torch
from conftest import GOLDEN, load_golden

from models import ARCHS, CheckpointError, build_backbone, load_backbone
from models.releases import DINOV3_REQUEST_PAGE, GATED_RELEASES, OFFICIAL_FILE_NAMES, RELEASES
from models.stand_in import stand_in_release
from utils.runtime.backbone_files import backbone_file
from utils.runtime.download import MIRROR_VARIABLE

sys.path.insert(0, str(GOLDEN))
import random_checkpoint  # noqa: E402  (the golden set's own generator, to compare the stand-ins with)

GOLDEN_TOKENS = load_golden("backbones_next.pt")
NEW_ARCHS = sorted(arch for arch in GOLDEN_TOKENS if arch != "meta")
V3, REG = "dinov3_vit_small_16", "dinov2_reg_vit_small_14"  # the cheapest of each family


def save(obj, path):
    torch.save(obj, path)
    return path


def golden_image(case):
    rng = np.random.Generator(np.random.PCG64(case["image_seed"]))
    return torch.from_numpy(rng.standard_normal((1, 3, case["height"], case["width"])).astype(np.float32))


@pytest.fixture(scope="module")
def releases():
    """The stand-in release objects of the two small archs, made once."""
    return {arch: stand_in_release(arch) for arch in (V3, REG)}


def test_the_golden_file_covers_every_new_arch():
    assert NEW_ARCHS == sorted(a for a, s in ARCHS.items() if s.family in ("dinov2_reg", "dinov3"))


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_tokens_match_official(arch, tmp_path):
    """Every case of the golden file: a square and a non-square grid per arch, from a file in the release
    layout whose tensors are the golden set's own (random_checkpoint.make)."""
    release = stand_in_release(arch)
    family, patch, dim, grid = random_checkpoint.SPECS[arch]
    layout = random_checkpoint._keys(family, patch, dim, grid, random_checkpoint.DEPTH.get(arch, 12))
    assert {key: tuple(tensor.shape) for key, tensor in release.items()} == layout
    # The values of every key but those of blocks 1 and later (drawing them twice costs seconds; the tokens
    # check them all).
    for key in (key for key in layout if not key.startswith("blocks.") or key.startswith("blocks.0.")):
        assert torch.equal(release[key], random_checkpoint._tensor(key, layout[key])), key
    backbone = load_backbone(save(release, tmp_path / f"{arch}.pth"))
    assert (backbone.arch, backbone.family) == (arch, ARCHS[arch].family)
    for case in GOLDEN_TOKENS[arch]["cases"]:
        with torch.no_grad():
            tokens = backbone(golden_image(case))
        torch.testing.assert_close(tokens, case["tokens"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", [V3, REG])
def test_official_file_names_name_their_arch(arch, tmp_path, releases):
    path = save(releases[arch], tmp_path / OFFICIAL_FILE_NAMES[arch])
    case = GOLDEN_TOKENS[arch]["cases"][1]
    with torch.no_grad():
        tokens = load_backbone(path)(golden_image(case))
    torch.testing.assert_close(tokens, case["tokens"], rtol=1e-4, atol=1e-4)


def test_official_file_names():
    """The names dinov2/hub/backbones.py and dinov3/hub/backbones.py build (with the hashes the latter holds)."""
    assert OFFICIAL_FILE_NAMES == {
        "dinov2_reg_vit_small_14": "dinov2_vits14_reg4_pretrain.pth",
        "dinov2_reg_vit_base_14": "dinov2_vitb14_reg4_pretrain.pth",
        "dinov3_vit_small_16": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
        "dinov3_vit_small_plus_16": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
        "dinov3_vit_base_16": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
        "dinov3_vit_large_16": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    }


def test_the_stored_rope_periods_are_used_as_stored(tmp_path, releases):
    """DINOv3's release files keep the periods in bfloat16: the rounded values are what the model uses."""
    release = dict(releases[V3], **{"rope_embed.periods": releases[V3]["rope_embed.periods"].bfloat16()})
    backbone = load_backbone(save(release, tmp_path / f"{V3}.pth"))
    assert backbone.rope_embed.periods.dtype == torch.float32
    assert torch.equal(backbone.rope_embed.periods, release["rope_embed.periods"].float())
    assert not torch.equal(backbone.rope_embed.periods, releases[V3]["rope_embed.periods"]), "rounded"
    case = GOLDEN_TOKENS[V3]["cases"][0]
    with torch.no_grad():
        tokens = backbone(golden_image(case))
    assert (tokens - case["tokens"]).abs().max() > 1e-4, "other periods, other tokens"


def refusal(obj, path):
    """The one-line CheckpointError that loading `obj` saved at `path` gives."""
    with pytest.raises(CheckpointError) as refused:
        load_backbone(save(obj, path))
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_a_dinov3_file_with_a_missing_or_renamed_key_is_refused(tmp_path, releases):
    release = releases[V3]
    missing = {k: v for k, v in release.items() if k != "blocks.5.attn.qkv.bias_mask"}
    assert "1 missing keys (blocks.5.attn.qkv.bias_mask)" in refusal(missing, tmp_path / f"{V3}.pth")
    no_periods = {k: v for k, v in release.items() if k != "rope_embed.periods"}
    assert "1 missing keys (rope_embed.periods)" in refusal(no_periods, tmp_path / f"{V3}.pth")
    renamed = {("register_tokens" if k == "storage_tokens" else k): v for k, v in release.items()}
    message = refusal(renamed, tmp_path / f"{V3}.pth")
    assert "1 missing keys (storage_tokens)" in message and "1 unexpected keys (register_tokens)" in message
    assert "dinov3 release files hold a flat state_dict" in message


def test_registers_or_none_must_match_the_arch(tmp_path, releases):
    """A DINOv2-with-registers file named as plain DINOv2 has one key too many, and the reverse one too few."""
    message = refusal(releases[REG], tmp_path / "dinov2_vit_small_14.pth")
    assert "does not fit dinov2_vit_small_14 (dinov2 family): 1 unexpected keys (register_tokens)" in message
    plain = {k: v for k, v in releases[REG].items() if k != "register_tokens"}  # plain DINOv2's layout
    message = refusal(plain, tmp_path / f"{REG}.pth")
    assert f"does not fit {REG} (dinov2_reg family): 1 missing keys (register_tokens)" in message


def test_another_width_or_ffn_is_refused(tmp_path, releases):
    message = refusal(releases[V3], tmp_path / "dinov3_vit_base_16.pth")
    assert "shape mismatches (cls_token: file (1, 1, 384) vs model (1, 1, 768)" in message
    message = refusal(releases[V3], tmp_path / "dinov3_vit_small_plus_16.pth")  # an MLP where S+ has a SwiGLU
    assert "missing keys (blocks.0.mlp.w1.weight" in message and "unexpected keys (blocks.0.mlp.fc1.weight" in message
    message = refusal(releases[REG], tmp_path / "dinov2_reg_vit_base_14.pth")
    assert "shape mismatches (cls_token: file (1, 1, 384) vs model (1, 1, 768)" in message


def test_a_dinov3_file_in_another_layout_is_refused(tmp_path, releases):
    message = refusal({"teacher": releases[V3]}, tmp_path / f"{V3}.pth")
    assert message.startswith(f"{tmp_path / V3}.pth cannot be the {V3} backbone: dinov3 release files hold")


def test_dinov3_attention_is_fused_with_rope_on_the_patch_tokens_only():
    """One scaled_dot_product_attention call per block; the class and storage tokens carry no position."""
    backbone = build_backbone(V3)
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(q, k, v, *args, **kwargs):
        calls.append(q.shape)
        return original(q, k, v, *args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            tokens = backbone(torch.randn(1, 3, 32, 48))
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert tokens.shape == (1, 6, 384)
    assert calls == [(1, 6, 1 + 4 + 6, 64)] * 12
    sin, cos = backbone.rope_embed((2, 3))
    assert sin.shape == cos.shape == (6, 64)
    torch.testing.assert_close(sin[:, :16], sin[:, 32:48], rtol=0, atol=0)  # the angles, twice over a head


def test_dinov2_reg_by_name_downloads_its_public_release(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    release = RELEASES["dinov2_reg_vit_base_14"]
    assert release.url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth"
    assert RELEASES[REG].url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth"
    weights = io.BytesIO()
    torch.save({"w": torch.ones(4)}, weights)  # a torch file the safe loader reads: a download is checked
    server.serve(release.url, weights.getvalue())
    found = backbone_file("dinov2_reg_vit_base_14", tmp_path / "cache", progress=False)
    assert found.path == tmp_path / "cache" / "dinov2_reg_vit_base_14.pth"
    assert found.path.read_bytes() == weights.getvalue()
    assert found.release_url == release.url


def test_a_dinov3_file_is_found_under_its_arch_or_official_name(server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    release = GATED_RELEASES["dinov3_vit_base_16"]
    official = tmp_path / "checkpoint" / release.file_name
    official.parent.mkdir()
    official.write_bytes(b"weights")
    found = backbone_file("dinov3_vit_base_16", tmp_path / "cache")
    # Linked under the arch's name, so that the artifact folders are named after the arch.
    assert found.path == tmp_path / "cache" / "dinov3_vit_base_16.pth"
    assert found.path.resolve() == official and found.path.read_bytes() == b"weights"
    assert backbone_file("dinov3_vit_base_16", tmp_path / "cache").path == found.path
    (tmp_path / "checkpoint" / "dinov3_vit_base_16.pth").write_bytes(b"other")
    assert backbone_file("dinov3_vit_base_16", tmp_path / "cache").path.read_bytes() == b"other"
    assert server.requests == []


def test_a_dinov3_file_found_nowhere_is_requested_in_one_line_without_the_network(tmp_path, monkeypatch):
    """No server listens at the mirror (as without a network): the message needs none, and names the
    request page, the Hugging Face repository, the official file name and where to save it."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv(MIRROR_VARIABLE, f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as refused:
        backbone_file("dinov3_vit_large_16", tmp_path / "cache")
    message = str(refused.value)
    assert "\n" not in message and DINOV3_REQUEST_PAGE in message
    assert "facebook/dinov3-vitl16-pretrain-lvd1689m" in message
    name = "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"
    assert f"save {name} as checkpoint/{name} or {tmp_path / 'cache' / name}" in message
    assert not (tmp_path / "cache").exists()


def dinov3_small_parameters():
    """Tensors of DINOv3's ViT-S/16 backbone, counted from its layout: patch embedding, class and 4 storage
    tokens, 12 blocks (2 LayerNorms, qkv with its bias mask, projection, 2 layer scales, a 4× MLP), the
    final LayerNorm, 16 RoPE periods."""
    d, hidden = 384, 4 * 384
    block = 4 * d + (d * 3 * d + 3 * d) + 3 * d + (d * d + d) + 2 * d + (d * hidden + hidden + hidden * d + d)
    return (3 * 16 * 16 * d + d) + 5 * d + 12 * block + 2 * d + 16


def test_the_benchmark_has_the_papers_shapes_on_dinov3_and_measures_the_backbones_memory():
    from dataclasses import replace

    from utils.tools import benchmark
    assert benchmark.PRESETS["full_dinov3"] == replace(benchmark.PRESETS["full"], arch="dinov3_vit_large_16")
    assert benchmark.parse_args(["--full-dinov3"]).preset == "full_dinov3"
    results = benchmark.main(["--device", "cpu", "--full-dinov3", "--arch", V3, "--resolution", "64",
                              "--batch", "1", "--num-codebook", "4", "--projection-dim", "8", "--bank-capacity", "2",
                              "--steps", "1", "--warmup", "0", "--measures", "bank_update"])
    assert results["preset"] == "full_dinov3" and results["shapes"]["token_grid"] == [4, 4]
    assert results["backbone_weights_bytes"] == 4 * dinov3_small_parameters()
    assert results["backbone_forward_peak_bytes"] > 4 * (5 + 16) * 384  # at least one float32 token sequence
