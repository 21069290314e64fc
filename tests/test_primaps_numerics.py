"""PriMaPs-EM numerics (modules/primaps.py) against the official PriMaPs code's numbers
(golden/primaps.pt) and against plain references written out here.

Tolerances: float results use rtol 1e-5 (a few float32 ulps of slack for another BLAS or thread
count reordering sums; on the reference machine every case matches bitwise), CRF marginals 1e-4
(pydensecrf's mean-field iterations amplify rounding in their float32 input). Selections (median,
arg-max maps, majority labels) must match exactly: they pick values rather than compute them.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden
from torch import nn

from modules import primaps
from whole_batch import pseudo_mask, pseudo_mask_from_log_probs
from modules.primaps import (
    NO_MASK,
    MomentumPrototypes,
    Prototypes,
    cosine_inner_products,
    focal_loss,
    kmeans_loss,
    mask_log_probs,
    mask_majority_labels,
    median_filter_3x3,
    pca_directions,
    principal_mask_proposals,
)

FLOAT = {"rtol": 1e-5, "atol": 1e-6}
CRF = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(scope="module")
def golden():
    return load_golden("primaps.pt")


@pytest.fixture
def one_thread():
    """Mask proposals are hundreds of tiny ops per round: with two threads on a busy two-core
    machine each op can wait on a descheduled thread, which made them up to 1000× slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pseudo_masks_match_official(golden, one_thread):
    for case in golden["masks"]:
        assert case["ignore_id"] == NO_MASK
        result = pseudo_mask(case["image"], case["feat"], case["threshold"], seed=case["torch_seed"])
        torch.testing.assert_close(result.log_probs, case["log_probs"], **FLOAT)
        torch.testing.assert_close(result.q, case["q"], **CRF)
        assert result.pseudo.dtype == torch.uint8
        assert torch.equal(result.pseudo.long(), case["pseudo"])


def test_crf_half_matches_official_from_official_log_probs(golden):
    # The worker-process half alone, fed the official CRF input: isolates the CRF from the PCA.
    for case in golden["masks"]:
        q, pseudo = pseudo_mask_from_log_probs(case["image"], case["log_probs"])
        torch.testing.assert_close(q, case["q"], **CRF)
        assert torch.equal(pseudo.long(), case["pseudo"])


def test_seed_reproduces_global_manual_seed_and_restores_caller_rng(golden, one_thread):
    case = golden["masks"][0]
    # seed=None draws from the caller's generator: the official call after torch.manual_seed.
    torch.manual_seed(case["torch_seed"])
    torch.testing.assert_close(mask_log_probs(case["feat"], case["threshold"]), case["log_probs"], **FLOAT)
    # An explicit seed leaves the caller's generator where it was.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    mask_log_probs(case["feat"], case["threshold"], seed=case["torch_seed"])
    assert torch.equal(torch.rand(4), expected)


def test_mask_count_at_or_above_255_is_refused(monkeypatch, golden):
    image = golden["masks"][0]["image"]
    with pytest.raises(ValueError, match="255 mask proposals"):
        pseudo_mask_from_log_probs(image, torch.zeros(256, 4, 4))
    primaps.check_mask_count(254)
    # mask_log_probs refuses before building the CRF input.
    monkeypatch.setattr(primaps, "principal_mask_proposals", lambda *args: torch.ones(255, 4, 4))
    with pytest.raises(ValueError, match="255 mask proposals"):
        mask_log_probs(torch.randn(8, 4, 4), seed=0)


def test_proposals_stop_when_nothing_more_is_assigned(one_thread):
    # Zero features: every similarity is 0, each proposal is 0/0 (NaN, as officially) and assigns
    # nothing, so the unassigned set first counts as unchanged for three rounds at round 4.
    proposals = principal_mask_proposals(torch.zeros(8, 6, 6))
    assert proposals.shape == (4, 6, 6) and proposals.isnan().all()
    # Constant non-zero features: the first proposal is every patch, fully, and that stops it.
    proposals = principal_mask_proposals(torch.full((8, 6, 6), 0.3))
    assert torch.equal(proposals, torch.ones(1, 6, 6))


def test_median_filter_matches_official(golden):
    for case in golden["median"]:
        assert torch.equal(median_filter_3x3(case["x"]), case["out"])


def test_e_step_matches_official(golden):
    for case in golden["e_step"]:
        labels = mask_majority_labels(case["cls_prior"], case["masks"], case["ignore_id"])
        assert torch.equal(labels, case["pseudo"])


def test_e_step_matches_torch_mode_per_mask():
    # Few classes and small masks make ties frequent; mask id 0 counts as a mask like any other.
    gen = torch.Generator().manual_seed(0)
    class_map = torch.randint(0, 4, (3, 10, 12), generator=gen)
    masks = torch.randint(0, 9, (3, 10, 12), generator=gen)
    masks[masks == 8] = NO_MASK
    expected = torch.full_like(masks, NO_MASK)
    for b in range(3):
        for mask_id in masks[b].unique():
            if mask_id != NO_MASK:
                inside = masks[b] == mask_id
                expected[b][inside] = class_map[b][inside].mode().values
    assert torch.equal(mask_majority_labels(class_map, masks), expected)
    assert torch.equal(mask_majority_labels(class_map, torch.full_like(masks, NO_MASK)),
                       torch.full_like(masks, NO_MASK))


def test_focal_loss_matches_official(golden):
    for case in golden["focal"]:
        logits = case["logits"].clone().requires_grad_(True)
        loss = focal_loss(logits, case["target"], case["gamma"], case["ignore_id"])
        loss.backward()
        torch.testing.assert_close(loss.detach(), case["loss"], **FLOAT)
        torch.testing.assert_close(logits.grad, case["grad_logits"], **FLOAT)


def test_focal_loss_without_focus_is_labelled_cross_entropy_over_all_pixels():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 4, 6, generator=gen)
    target = torch.randint(0, 5, (2, 4, 6), generator=gen)
    target[:, :2] = NO_MASK
    expected = F.cross_entropy(logits, target, ignore_index=NO_MASK, reduction="sum") / target.numel()
    torch.testing.assert_close(focal_loss(logits, target, gamma=0.0), expected, **FLOAT)


def test_cluster_loss_matches_official(golden):
    for case in golden["cluster"]:
        weight_v = case["weight_v"].clone().requires_grad_(True)
        inner_products = cosine_inner_products(case["feat"], weight_v)
        loss = kmeans_loss(inner_products)
        loss.backward()
        torch.testing.assert_close(inner_products.detach(), case["inner_products"], **FLOAT)
        torch.testing.assert_close(loss.detach(), case["loss"], **FLOAT)
        torch.testing.assert_close(weight_v.grad, case["grad_weight_v"], **FLOAT)


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_pca_directions_match_official(golden, two_threads):
    # Signs included. The sign of every direction but the first is rounding noise: B = Qᵀ(X − mean)
    # inside torch.pca_lowrank is a matmul whose reduction order follows the thread count, and
    # LAPACK's SVD of that nearly row-orthogonal B takes its reflection signs from entries that
    # are noise. Here 2 threads reproduce the golden signs bitwise; 1, 3, 4 and 8 threads flip
    # one to three of them (the magnitudes still agree to 2e-5).
    for case in golden["pca_init"]:
        directions = pca_directions(case["features"], case["n_classes"], seed=case["torch_seed"])
        torch.testing.assert_close(directions, case["weight_v"], **FLOAT)


def load_prototypes(module, weights):
    with torch.no_grad():
        module.weight_g.copy_(weights["weight_g"])
        module.weight_v.copy_(weights["weight_v"])


def test_momentum_matches_official(golden):
    case = golden["ema"]
    online = Prototypes(*case["start"]["weight_v"].shape[1::-1])
    load_prototypes(online, case["start"])
    momentum = MomentumPrototypes(online, max_decay=case["beta"])
    for call, (weights, expected) in enumerate(zip(case["online"], case["ema"], strict=True)):
        if call == 30:
            # Resume half-way from a saved state: the call count must travel with the weights.
            state = momentum.state_dict()
            momentum = MomentumPrototypes(Prototypes(*online.weight_v.shape[1::-1]), max_decay=case["beta"])
            momentum.load_state_dict(state)
        load_prototypes(online, weights)
        momentum.update(online)
        torch.testing.assert_close(momentum.prototypes.weight_g, expected["weight_g"], **FLOAT)
        torch.testing.assert_close(momentum.prototypes.weight_v, expected["weight_v"], **FLOAT)
    assert int(momentum.calls) == 60
    assert not any(p.requires_grad for p in momentum.parameters())


def test_prototypes_are_torch_weight_norm_conv():
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, 6, 3, 5, generator=gen)
    prototypes = Prototypes(6, 4)
    reference = nn.utils.parametrizations.weight_norm(nn.Conv2d(6, 4, 1, bias=False), dim=0)
    with torch.no_grad():
        prototypes.weight_g.copy_(torch.rand(4, 1, 1, 1, generator=gen) + 0.5)
        prototypes.weight_v.copy_(torch.randn(4, 6, 1, 1, generator=gen))
        reference.parametrizations.weight.original0.copy_(prototypes.weight_g)
        reference.parametrizations.weight.original1.copy_(prototypes.weight_v)
    torch.testing.assert_close(prototypes(features), reference(features), **FLOAT)
    assert set(prototypes.state_dict()) == {"weight_g", "weight_v"}
    # Initialised from directions: g = 1, logits are dot products with unit prototypes.
    directions = torch.randn(4, 6, generator=gen)
    prototypes.set_directions(directions)
    expected = torch.einsum("bchw,kc->bkhw", features, F.normalize(directions, dim=1))
    torch.testing.assert_close(prototypes(features), expected, **FLOAT)
    torch.testing.assert_close(prototypes.cosine(features), cosine_inner_products(features, prototypes.weight_v))
