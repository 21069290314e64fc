"""STEGO's and HP's released-model numerics (modules/sota.py, read through models/released.py) against the
official code's numbers (golden/sota.pt).

Each case goes the whole way a released file goes: a stand-in file in the official layout (the golden
`layout`, name for name, shape for shape and in order) with the DINO ViT-S/8 stand-in inside
(`models.stand_in_state_dict`, the golden backbone) and the golden head weights, written, read, checked
and loaded, then run on the golden 48×64 images.

Tolerances (golden/README.md): 1e-4 relative for everything behind the ViT (features, codes,
log-probabilities), measured against each tensor's largest value. The CRF, fed the official
log-probabilities, gives the official marginals Q to 1e-5; fed this project's own log-probabilities,
which differ from the official ones by float32 rounding (~1e-6 relative), its mean-field iterations
amplify that to at most 1e-3 in Q, so end to end Q is compared to 1e-3 and the predictions wherever the
official Q's two best classes are more than 1e-3 apart.
"""
import json

import pytest
import torch
from conftest import load_golden
from official_helpers import ema_code, eval_log_probs, eval_predictions
from stand_ins import save_foreign, stand_in_hp, stand_in_stego

from models.released import load_sota_model, read_sota_file
from modules.crf import dense_crf_batch

ARCH = "dino_vit_small_8"
Q_FROM_OFFICIAL_INPUT = 1e-5
Q_END_TO_END = 1e-3


@pytest.fixture(scope="module")
def golden():
    return load_golden("sota.pt")


def close(actual, expected, rtol=1e-4):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.fixture(scope="module")
def stego(golden, tmp_path_factory):
    """(the stand-in file's layout, the model loaded from it with the golden head weights)."""
    obj = stand_in_stego(ARCH, n_classes=3, dim=golden["stego"]["args"]["dim"])
    layout = [(k, tuple(v.shape)) for k, v in obj["state_dict"].items()]
    obj["state_dict"].update(golden["stego"]["state_dict"])
    path = tmp_path_factory.mktemp("stego") / "potsdam_test.ckpt"
    save_foreign(obj, path)
    return layout, read_sota_file(path), load_sota_model(path)


@pytest.fixture(scope="module")
def hp(golden, tmp_path_factory):
    checkpoint, options = stand_in_hp(ARCH, n_classes=3, dim=golden["hp"]["args"]["model"]["dim"])
    layout = {part: [(k, tuple(v.shape)) for k, v in checkpoint[part].items()] for part in golden["layout"][
        "hp_vit_small_8_dim64"]}
    options["model"] = golden["hp"]["args"]["model"]
    for part, state in golden["hp"]["state_dict"].items():
        checkpoint[part].update(state)
    folder = tmp_path_factory.mktemp("hp")
    path = folder / "experiment_name" / "ckpt.pth"
    path.parent.mkdir()
    torch.save(checkpoint, path)
    (folder / "option.json").write_text(json.dumps(options))
    return layout, read_sota_file(path), load_sota_model(path)


def test_stego_stand_in_holds_the_official_layout(golden, stego):
    layout, sota, model = stego
    assert layout == list(golden["layout"]["stego_potsdam_vit_small_8"].items())
    args = golden["stego"]["args"]
    assert (sota.family, sota.arch) == ("stego", args["backbone"])
    assert (sota.sizes.code_dim, sota.sizes.n_classes, sota.sizes.nonlinear) == (args["dim"], args["n_classes"], True)
    assert model.backbone.blocks[0].attn.num_heads == args["heads"]


def test_hp_stand_in_holds_the_official_layout(golden, hp):
    layout, sota, model = hp
    assert layout == {part: list(shapes.items()) for part, shapes in golden["layout"]["hp_vit_small_8_dim64"].items()}
    assert (sota.family, sota.arch, sota.sizes.code_dim, sota.sizes.ema) == ("hp", golden["hp"]["args"]["backbone"],
                                                                             64, True)
    assert model.backbone.blocks[0].attn.num_heads == golden["hp"]["args"]["heads"]


@pytest.fixture(scope="module")
def outputs(golden, stego, hp):
    """Every output of each model on the golden images, computed once."""
    results = {}
    for family, model in (("stego", stego[2]), ("hp", hp[2])):
        image = golden[family]["image"]
        with torch.no_grad():
            out = {"feat": model.features(image), "code": model.code(image), "patch_code": model.eval_patch_code(image),
                   "log_probs": eval_log_probs(model, image), "crf_pred": eval_predictions(model, image, crf=True)}
            if family == "hp":
                out.update(code_ema=ema_code(model, image), pred=eval_predictions(model, image, crf=False))
        out["crf_q"] = {probe: dense_crf_batch(image, getattr(out["log_probs"], probe))
                        for probe in ("cluster", "linear")}
        results[family] = out
    return results


def test_stego_codes_and_probes_match_official(golden, outputs):
    case, out = golden["stego"], outputs["stego"]
    close(out["feat"], case["feat"])
    close(out["code"], case["code"])
    close(out["patch_code"], case["code_flip"])
    close(out["log_probs"].linear, case["linear_log_probs"])
    close(out["log_probs"].cluster, case["cluster_log_probs"])


def test_hp_codes_and_probes_match_official(golden, outputs):
    case, out = golden["hp"], outputs["hp"]
    assert golden["meta"]["hp_feat_is_stego_feat"]
    close(out["feat"], case["feat"])
    close(out["code"], case["code"])
    close(out["code_ema"], case["code_ema"])
    # HP evaluates the online code of the image alone: no flip.
    assert torch.equal(out["patch_code"], out["code"])
    close(out["log_probs"].linear, case["linear_log_probs"])
    close(out["log_probs"].cluster, case["cluster_log_probs"])
    # HP's is_crf=False branch: arg-max of the linear logits and of the cosines.
    assert torch.equal(out["pred"]["linear"], case["linear_pred"].long())
    assert torch.equal(out["pred"]["cluster"], case["cluster_pred"].long())


def decided(q, tolerance):
    """Pixels whose two best classes in `q` [B, K, H, W] are more than `tolerance` apart."""
    top2 = q.topk(2, dim=1).values
    return (top2[:, 0] - top2[:, 1]) > tolerance


@pytest.mark.parametrize("family", ["stego", "hp"])
@pytest.mark.parametrize("probe", ["cluster", "linear"])
def test_crf_matches_official(golden, outputs, family, probe):
    case, out = golden[family], outputs[family]
    official_q, official_pred = case[f"crf_{probe}"], case[f"crf_{probe}_pred"].long()
    # The CRF alone, on the official log-probabilities.
    q = dense_crf_batch(case["image"], case[f"{probe}_log_probs"])
    torch.testing.assert_close(q, official_q, rtol=0, atol=Q_FROM_OFFICIAL_INPUT)
    assert torch.equal(q.argmax(dim=1), official_pred)
    # End to end: the model's own log-probabilities through the CRF, and its CRF predictions.
    torch.testing.assert_close(out["crf_q"][probe], official_q, rtol=0, atol=Q_END_TO_END)
    sure = decided(official_q, Q_END_TO_END)
    assert sure.float().mean() > 0.9
    assert torch.equal(out["crf_pred"][probe][sure], official_pred[sure])
