"""Grid sampling, quantisation and the two losses against the official implementation's
numbers (golden/losses.pt) and against dense references written out here."""
import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden
from whole_batch import bank_from_entries, contrastive_loss, modularity_loss

from loader.samplers import BatchShare
from modules.bank import ConceptBank
from modules import grid, losses
from modules.grid import grid_order, grid_sample_tokens, map_to_tokens, tokens_to_map
from modules.quantize import cosine_similarity_to, quantize, quantize_index
from modules.randomness import BatchRandom


@pytest.fixture(scope="module")
def golden():
    return load_golden("losses.pt")


def modularity_with_grad(codebook, feat, temp):
    codebook = codebook.clone().requires_grad_(True)
    loss = modularity_loss(codebook, feat, temp)
    loss.backward()
    return loss.detach(), codebook.grad


def arg_max_in_blocks_of(rows, monkeypatch, feat, codebook):
    """Make the modularity's arg-max take `rows` rows of float32 products at a time (None: as it does)."""
    if rows is not None:
        b, p, _ = feat.shape
        monkeypatch.setattr(losses, "_CHUNK_BYTES", rows * b * p * codebook.shape[0] * 4)


@pytest.mark.parametrize("row_chunk", [None, 3])
def test_modularity_matches_official(golden, row_chunk, monkeypatch):
    for case in golden["modularity"]:
        arg_max_in_blocks_of(row_chunk, monkeypatch, case["feat"], case["codebook"])
        loss, grad = modularity_with_grad(case["codebook"], case["feat"], case["temp"])
        torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, case["grad_codebook"], rtol=1e-5, atol=1e-6)


def dense_modularity(codebook, feat, temp):
    """docs/cause.md §3 written out literally, with the [B, P, P, K] tensor."""
    x = F.normalize(feat, dim=-1)
    a = (x @ x.transpose(1, 2)).clamp_min(0) * (1 - torch.eye(x.shape[1]))
    d = a.sum(2, keepdim=True)
    e = a.sum((1, 2), keepdim=True)
    w = a - d @ d.transpose(1, 2) / e
    s = (x @ F.normalize(codebook, dim=-1).T).clamp_min(0)
    delta = torch.tanh(s[:, :, None, :] * s[:, None, :, :] / temp).amax(-1)
    return -torch.einsum("bij,bji->b", w / e, delta).mean()


@pytest.mark.parametrize("row_chunk", [None, 1, 5])
def test_modularity_matches_dense_reference(row_chunk, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    feat = torch.randn(3, 16, 8, generator=gen)
    codebook = torch.randn(7, 8, generator=gen).requires_grad_(True)
    expected = dense_modularity(codebook, feat, 0.1)
    (expected_grad,) = torch.autograd.grad(expected, codebook)
    arg_max_in_blocks_of(row_chunk, monkeypatch, feat, codebook)
    loss, grad = modularity_with_grad(codebook.detach(), feat, 0.1)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_modularity_gradient_reaches_only_the_codebook():
    feat = torch.randn(2, 16, 8, requires_grad=True)
    codebook = torch.randn(5, 8, requires_grad=True)
    modularity_loss(codebook, feat).backward()
    assert feat.grad is None and codebook.grad is not None


def test_modularity_is_float32_under_autocast():
    gen = torch.Generator().manual_seed(1)
    feat = torch.randn(2, 16, 8, generator=gen)
    codebook = torch.randn(5, 8, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = modularity_loss(codebook, feat)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, modularity_loss(codebook, feat))


def test_grid_sampling_matches_official(golden):
    for case in golden["grid_sampling"]:
        out, order = grid_sample_tokens(case["feat"], case["order"])
        torch.testing.assert_close(out, case["out"], rtol=0, atol=0)
        assert torch.equal(order, case["order"])


def loop_grid_sampling(x, order, window):
    """One cell at a time, straight from the definition."""
    b, p, _ = x.shape
    side = int(p**0.5)
    grid = x.view(b, side, side, -1)
    order = order.view(b, -1).tolist()
    cells = side // window
    return torch.stack([torch.stack([
        grid[i, (c // cells) * window + order[i][c] // window, (c % cells) * window + order[i][c] % window]
        for c in range(cells * cells)]) for i in range(b)])


def batch_random(rows, seed=0):
    return BatchRandom(seed, BatchShare(0, rows, rows), "cpu")


def test_grid_sampling_reuses_positions_and_draws_uniformly():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 144, 3, generator=gen)
    out, order = grid_sample_tokens(x, grid_order(batch_random(4), 144))
    assert order.dtype == torch.int64 and order.shape == (4 * 9,)
    torch.testing.assert_close(out, loop_grid_sampling(x, order, 4), rtol=0, atol=0)
    # A second tensor sampled with the same order gives the same token positions.
    positions = torch.arange(144.0).expand(4, 144).unsqueeze(-1)
    picked, same = grid_sample_tokens(positions, order)
    assert torch.equal(same, order)
    assert torch.equal(x.gather(1, picked.long().expand(-1, -1, 3)), out)

    many = grid_sample_tokens(torch.zeros(64, 256, 1), grid_order(batch_random(64), 256))[1]
    assert many.min() >= 0 and many.max() <= 15
    counts = torch.bincount(many, minlength=16)
    assert counts.numel() == 16 and counts.min() > many.numel() / 16 * 0.7


def test_grid_sampling_other_windows_and_errors(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 36, 4, generator=gen)
    monkeypatch.setattr(grid, "WINDOW", 2)
    out, order = grid_sample_tokens(x, grid_order(batch_random(2), 36))
    assert out.shape == (2, 9, 4) and order.max() <= 3
    torch.testing.assert_close(out, loop_grid_sampling(x, order, 2), rtol=0, atol=0)
    monkeypatch.setattr(grid, "WINDOW", 8)
    with pytest.raises(ValueError, match="smaller than the window"):
        grid_sample_tokens(x)
    with pytest.raises(ValueError, match="square"):
        grid_sample_tokens(torch.randn(1, 20, 4))


def test_token_map_round_trip():
    x = torch.randn(2, 12, 5)
    assert torch.equal(map_to_tokens(tokens_to_map(x, 3, 4)), x)
    assert tokens_to_map(torch.randn(2, 16, 5)).shape == (2, 5, 4, 4)
    assert torch.equal(tokens_to_map(x, 3, 4)[1, :, 2, 1], x[1, 2 * 4 + 1])
    with pytest.raises(ValueError, match="square"):
        tokens_to_map(x)


def test_quantize_matches_official(golden):
    for case in golden["quantize"]:
        index = quantize_index(case["feat"], case["codebook"])
        assert torch.equal(index, case["index"])
        torch.testing.assert_close(quantize(case["feat"], case["codebook"]), case["quantized"], rtol=0, atol=0)
        sims = cosine_similarity_to(case["feat"], case["codebook"])
        torch.testing.assert_close(sims, F.cosine_similarity(case["feat"][..., None, :], case["codebook"], dim=-1))


def contrastive_with_grad(case, bank, **kwargs):
    proj = case["proj_feat"].clone().requires_grad_(True)
    loss = contrastive_loss(case["feat"], proj, case["proj_feat_ema"], case["codebook"], bank,
                            case["temp"], case["pos_thresh"], case["neg_thresh"], **kwargs)
    loss.backward()
    return loss.detach(), proj.grad


def test_contrastive_matches_official(golden):
    for case in golden["contrastive"]:
        k, dim = case["codebook"].shape[0], case["proj_feat_ema"].shape[-1]
        if case["bank"]:
            banks = [bank_from_entries(case["bank"], k)]
        else:
            banks = [None, ConceptBank(k, dim)]
        index = quantize_index(case["feat"], case["codebook"])
        for bank in banks:
            for kwargs in ({}, {"index": index}):
                loss, grad = contrastive_with_grad(case, bank, **kwargs)
                torch.testing.assert_close(loss, case["loss"], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(grad, case["grad_proj_feat"], rtol=1e-5, atol=1e-6)


def test_contrastive_is_float32_under_autocast(golden):
    case = golden["contrastive"][2]
    bank = bank_from_entries(case["bank"], case["codebook"].shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = contrastive_loss(case["feat"], case["proj_feat"], case["proj_feat_ema"], case["codebook"], bank)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, case["loss"], rtol=1e-5, atol=1e-6)


def test_grid_sampling_drops_the_remainder_of_a_grid_not_divisible_by_the_window():
    # ViT-/16 at 224 px (the MLP head's training size) gives a 14×14 grid: 3×3 cells, as unfold makes.
    side = 14
    tokens = torch.arange(side * side, dtype=torch.float32).reshape(1, side * side, 1)
    order = torch.arange(9) % 16
    out, _ = grid_sample_tokens(tokens, order)
    windows = tokens.reshape(1, side, side).unfold(1, 4, 4).unfold(2, 4, 4).reshape(1, 9, 16)
    expected = windows[0, torch.arange(9), order]
    assert torch.equal(out.flatten(), expected)
    assert out.max() < 12 * side, "nothing from the last two rows"
