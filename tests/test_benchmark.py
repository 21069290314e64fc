"""The benchmark's baseline (utils/tools/official_formulation.py) computes what the project computes,
so that the benchmark compares the costs of equal work; and the benchmark runs end to end.
No timing is asserted here."""
import copy
import json

import pytest
import torch
from conftest import bank_entries, load_golden
from whole_batch import bank_from_entries, contrastive_loss, modularity_loss

from modules.bank import ConceptBank
from modules.heads import SegmentModule
from utils.tools import benchmark
from utils.tools.official_formulation import (OfficialBank, official_contrastive_loss, official_ema_update,
                                              official_modularity_loss)


def value_and_grad(fn, leaf):
    """fn(leaf) and its gradient with respect to a fresh copy of `leaf`."""
    leaf = leaf.detach().clone().requires_grad_(True)
    value = fn(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def test_official_modularity_reproduces_golden():
    # The transcription itself reproduces the official code's numbers.
    for case in load_golden("losses.pt")["modularity"]:
        loss, grad = value_and_grad(lambda c, case=case: official_modularity_loss(c, case["feat"], case["temp"]),
                                    case["codebook"])
        torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, case["grad_codebook"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(2, 16, 8, 5), (3, 25, 12, 40)])
def test_modularity_matches_official(shape):
    b, p, d, k = shape
    gen = torch.Generator().manual_seed(sum(shape))
    feat = torch.randn(b, p, d, generator=gen)
    codebook = torch.randn(k, d, generator=gen)
    expected, expected_grad = value_and_grad(lambda c: official_modularity_loss(c, feat, 0.1), codebook)
    loss, grad = value_and_grad(lambda c: modularity_loss(c, feat, 0.1), codebook)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_bank_update_matches_official():
    num_prototypes, dim, capacity = 6, 3, 5
    bank = ConceptBank(num_prototypes, dim, capacity)
    official = OfficialBank(num_prototypes, dim, capacity)
    gen = torch.Generator().manual_seed(0)
    for step in range(10):
        # Sizes vary so that some prototypes overflow the capacity in one step and some get nothing.
        n = int(torch.randint(1, 40, (1,), generator=gen))
        index = torch.randint(0, num_prototypes, (n,), generator=gen)
        # Values that say where they came from (step, token), so a mismatch is visible.
        values = torch.stack([torch.full((n,), float(step)), torch.arange(n, dtype=torch.float32),
                              index.float()], 1)
        # Both draw their random half from the same permutation.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(step))
        bank.update(index, values, order=order)
        official.update(index, values, order=order)
        entries, expected = bank_entries(bank), official.entries()
        assert entries.keys() == expected.keys()
        for k in expected:
            assert torch.equal(entries[k], expected[k])


def test_official_bank_update_keeps_a_random_half():
    official = OfficialBank(3, 2, capacity=4)
    index = torch.tensor([0, 0, 0, 0, 0, 2, 2, 1])
    values = torch.stack([torch.arange(8.0), index.float()], 1)
    official.update(index, values)
    entries = official.entries()
    assert {k: v.shape[0] for k, v in entries.items()} == {0: 2, 2: 1}
    for k, stored in entries.items():
        assert (stored[:, 1] == k).all()


def contrastive_inputs(seed, batch=3, tokens=16, dim=8, proj_dim=10, num_prototypes=5):
    gen = torch.Generator().manual_seed(seed)
    feat = torch.randn(batch, tokens, dim, generator=gen)
    proj = torch.randn(batch, tokens, proj_dim, generator=gen)
    proj_ema = torch.randn(batch, tokens, proj_dim, generator=gen)
    codebook = torch.randn(num_prototypes, dim, generator=gen)
    # Bank entries of different lengths, one prototype left empty, one longer than the capacity.
    lengths = dict(enumerate([3, 0, 7, 1, 4]))
    entries = {k: torch.randn(n, proj_dim, generator=gen) for k, n in lengths.items() if n}
    return feat, proj, proj_ema, codebook, entries


def test_official_contrastive_reproduces_golden():
    for case in load_golden("losses.pt")["contrastive"]:
        k, proj_dim = case["codebook"].shape[0], case["proj_feat"].shape[-1]
        bank = OfficialBank.from_entries(case["bank"], k, dim=proj_dim)
        def loss_fn(proj, case=case, bank=bank):
            return official_contrastive_loss(case["feat"], proj, case["proj_feat_ema"], case["codebook"], bank,
                                             case["temp"], case["pos_thresh"], case["neg_thresh"])
        loss, grad = value_and_grad(loss_fn, case["proj_feat"])
        torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, case["grad_proj_feat"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_bank", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_contrastive_matches_official(with_bank, seed):
    feat, proj, proj_ema, codebook, entries = contrastive_inputs(seed)
    capacity, k = 6, codebook.shape[0]
    official_bank = OfficialBank.from_entries(entries, k, capacity) if with_bank else None
    bank = bank_from_entries(entries, k, capacity) if with_bank else None
    expected, expected_grad = value_and_grad(
        lambda p: official_contrastive_loss(feat, p, proj_ema, codebook, official_bank), proj)
    assert torch.isfinite(expected), "inputs must give every image a positive pair, or the official loss is NaN"
    loss, grad = value_and_grad(lambda p: contrastive_loss(feat, p, proj_ema, codebook, bank), proj)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_ema_update_matches_official():
    segment = SegmentModule("mlp", 8, reduced_dim=4, projection_dim=6)
    with torch.no_grad():
        for p in segment.head.parameters():
            p.add_(1.0)
    official = copy.deepcopy(segment)
    segment.update_ema()
    official_ema_update(official.head, official.head_ema)
    official_ema_update(official.projection_head, official.projection_head_ema)
    for name, value in official.state_dict().items():
        torch.testing.assert_close(segment.state_dict()[name], value, rtol=0, atol=1e-7)


def test_benchmark_runs_end_to_end(tmp_path):
    path = tmp_path / "benchmark.json"
    results = benchmark.main(["--device", "cpu", "--small", "--arch", "dino_vit_tiny_8", "--resolution", "64",
                              "--batch", "2", "--num-codebook", "16", "--projection-dim", "32",
                              "--bank-capacity", "4", "--steps", "1", "--warmup", "0", "--json", str(path)])
    assert json.loads(path.read_text()) == results
    assert results["backbone_forward_s"] > 0
    for side in ("project", "official"):
        assert results[side].keys() == benchmark.MEASURES.keys()
        assert all(value > 0 for value in results[side].values())
    assert results["ratios"]["project_over_official"].keys() == benchmark.MEASURES.keys()
    assert all(key in benchmark.MEASURES for key in benchmark.TARGETS)


def test_benchmark_measures_only_what_is_asked(capsys):
    results = benchmark.main(["--device", "cpu", "--small", "--arch", "dino_vit_tiny_8", "--resolution", "64",
                              "--batch", "2", "--num-codebook", "16", "--projection-dim", "32",
                              "--bank-capacity", "4", "--steps", "1", "--warmup", "0",
                              "--measures", "mediator", "bank_update"])
    measured = {"mediator_step_s", "mediator_step_peak_bytes", "bank_update_s"}
    assert results["project"].keys() == results["official"].keys() == measured
    report = capsys.readouterr().out
    assert "[benchmark] bank update time: project" in report and "front-door" not in report
