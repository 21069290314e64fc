"""The concept bank against a dict-of-lists reference, and the contrastive loss with a bank
against an image-by-image loop written after the official definition (docs/cause.md §4)."""
import pytest
import torch
import torch.nn.functional as F
from conftest import bank_entries
from whole_batch import bank_from_entries, contrastive_loss

from modules.bank import ConceptBank
from modules.quantize import quantize_index


def labelled_tokens(index, step):
    """Values that say where they came from: (update step, token number, prototype)."""
    n = index.numel()
    return torch.stack([torch.full((n,), float(step)), torch.arange(n, dtype=torch.float32), index.float()], 1)


def reference_update(reference, index, values, seed, capacity):
    """The official bank update on a dict of lists, choosing the tokens from the permutation
    that the bank draws from a generator seeded the same way."""
    perm = torch.randperm(index.numel(), generator=torch.Generator().manual_seed(seed)).tolist()
    for k in index.unique().tolist():
        mine = [t for t in perm if index[t] == k]
        stored = reference.setdefault(k, []) + [values[t] for t in mine[:len(mine) // 2]]
        reference[k] = stored[-capacity:]


def test_update_matches_dict_of_lists_reference():
    capacity, k = 5, 4
    bank = ConceptBank(k, 3, capacity)
    reference = {}
    gen = torch.Generator().manual_seed(0)
    for step in range(12):
        # Sizes vary so that some prototypes take more than `capacity` in one step, some none.
        index = torch.randint(0, k, (int(torch.randint(1, 30, (1,), generator=gen)),), generator=gen)
        values = labelled_tokens(index, step)
        bank.update(index, values, order=torch.randperm(index.numel(), generator=torch.Generator().manual_seed(step)))
        reference_update(reference, index, values, step, capacity)
        entries = bank_entries(bank)
        assert entries.keys() == {p for p, v in reference.items() if v}
        for p, stored in entries.items():
            assert torch.equal(stored, torch.stack(reference[p]))
        assert int(bank.count.max()) <= capacity


def test_update_stores_half_of_each_prototype_from_that_prototype():
    bank = ConceptBank(6, 3, capacity=100)
    index = torch.tensor([0] * 7 + [2] * 1 + [3] * 4 + [5] * 10)[torch.randperm(22)]
    bank.update(index, labelled_tokens(index, 0))
    assert bank.count.tolist() == [3, 0, 0, 2, 0, 5]
    for p, stored in bank_entries(bank).items():
        assert (stored[:, 2] == p).all()
        tokens = stored[:, 1].long()
        assert tokens.unique().numel() == tokens.numel()
        assert (index[tokens] == p).all()
    prototype, values, valid = bank.candidates()
    assert prototype.shape == valid.shape == (600,) and values.shape == (600, 3)
    assert torch.equal(prototype[valid], values[valid][:, 2].long())


def test_update_chooses_uniformly():
    bank = ConceptBank(1, 3, capacity=1000)
    gen = torch.Generator().manual_seed(0)
    for step in range(200):
        bank.update(torch.zeros(4, dtype=torch.int64), labelled_tokens(torch.zeros(4), step),
                    order=torch.randperm(4, generator=gen))
    chosen = torch.bincount(bank_entries(bank)[0][:, 1].long(), minlength=4)
    assert chosen.sum() == 400 and chosen.min() > 70  # 100 each on average


def test_keeps_newest_in_order_of_arrival():
    capacity = 7
    bank = ConceptBank(2, 3, capacity)
    arrivals = []
    for step in range(6):
        index = torch.zeros(6, dtype=torch.int64)
        bank.update(index, labelled_tokens(index, step))
        arrivals += [step] * 3
        assert bank_entries(bank)[0][:, 0].tolist() == arrivals[-capacity:]
    assert int(bank.count[0]) == capacity and int(bank.count[1]) == 0


def test_from_entries_round_trip_and_empty():
    entries = {0: torch.randn(1, 4), 3: torch.randn(5, 4)}
    bank = bank_from_entries(entries, 5, capacity=3)
    got = bank_entries(bank)
    assert got.keys() == {0, 3}
    assert torch.equal(got[0], entries[0]) and torch.equal(got[3], entries[3][-3:])
    # Appending after loading continues the ring in order of arrival.
    bank.update(torch.tensor([3, 3]), torch.ones(2, 4))
    assert torch.equal(bank_entries(bank)[3], torch.cat([entries[3][-2:], torch.ones(1, 4)]))
    assert not bank_from_entries({}, 5, dim=4).count.any()
    with pytest.raises(ValueError):
        bank_from_entries({}, 5)


def loop_contrastive(feat, proj, proj_ema, codebook, entries, temp=0.07, pos_thresh=0.3, neg_thresh=0.1):
    """One image at a time as the official code does it; NaN terms (no positive pair) left out."""
    prototypes = F.normalize(codebook, dim=-1)
    q = prototypes[quantize_index(feat, codebook)]
    anchors, teacher = F.normalize(proj, dim=-1), F.normalize(proj_ema, dim=-1).flatten(0, 1)
    flat_q = q.flatten(0, 1)
    bank_q = torch.cat([prototypes[k].expand(len(v), -1) for k, v in entries.items()])
    bank_values = F.normalize(torch.cat(list(entries.values())), dim=-1)
    terms = []
    for b in range(proj.shape[0]):
        self_mask = torch.zeros(q.shape[1], flat_q.shape[0], dtype=torch.bool)
        self_mask[:, b * q.shape[1]:(b + 1) * q.shape[1]].fill_diagonal_(True)
        for cand_q, cand, exclude in ((flat_q, teacher, self_mask), (bank_q, bank_values, None)):
            c = q[b] @ cand_q.T
            pos, neg = c > pos_thresh, c < neg_thresh
            if exclude is not None:
                pos &= ~exclude
            s = anchors[b] @ cand.T / temp
            s = s - s.max(1, keepdim=True)[0].detach()
            pair_loss = -s + torch.log((s.exp() * (pos | neg)).sum(1, keepdim=True))
            if pos.any():
                terms.append(pair_loss[pos].mean())
    return sum(terms) / len(terms)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contrastive_with_bank_matches_loop_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    k, batch, tokens = 6, 3, 9
    codebook = torch.randn(k, 8, generator=gen)
    feat = torch.randn(batch, tokens, 8, generator=gen)
    proj = torch.randn(batch, tokens, 12, generator=gen, requires_grad=True)
    proj_ema = torch.randn(batch, tokens, 12, generator=gen)
    bank = ConceptBank(k, 12, capacity=4)
    for _ in range(3):
        bank.update(torch.randint(0, k, (20,), generator=gen), torch.randn(20, 12, generator=gen),
                    order=torch.randperm(20, generator=gen))
    expected = loop_contrastive(feat, proj, proj_ema, codebook, bank_entries(bank))
    (expected_grad,) = torch.autograd.grad(expected, proj)
    loss = contrastive_loss(feat, proj, proj_ema, codebook, bank)
    (grad,) = torch.autograd.grad(loss, proj)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_contrastive_leaves_out_terms_without_positives():
    # Orthogonal prototypes: only tokens of the same prototype are positives. The bank holds
    # only prototype 0, so images without a prototype-0 token have no bank term.
    codebook = torch.eye(4)
    feat = codebook[torch.tensor([[0, 1, 1, 2], [2, 3, 3, 2]])]
    proj = torch.randn(2, 4, 5, requires_grad=True)
    proj_ema = torch.randn(2, 4, 5)
    entries = {0: torch.randn(3, 5)}
    loss = contrastive_loss(feat, proj, proj_ema, codebook, bank_from_entries(entries, 4))
    expected = loop_contrastive(feat, proj, proj_ema, codebook, entries)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, proj)
    assert torch.isfinite(grad).all()


def test_a_compact_bank_gives_the_same_loss_as_the_fixed_shape_one():
    gen = torch.Generator().manual_seed(5)
    k, batch, tokens = 6, 2, 9
    codebook = torch.randn(k, 8, generator=gen)
    feat = torch.randn(batch, tokens, 8, generator=gen)
    proj = torch.randn(batch, tokens, 12, generator=gen)
    proj_ema = torch.randn(batch, tokens, 12, generator=gen)
    banks = [ConceptBank(k, 12, capacity=4, compact=compact) for compact in (False, True)]
    losses = [[contrastive_loss(feat, proj, proj_ema, codebook, bank) for bank in banks]]
    for _ in range(3):
        index, values = torch.randint(0, k, (10,), generator=gen), torch.randn(10, 12, generator=gen)
        order = torch.randperm(10, generator=gen)
        for bank in banks:
            bank.update(index, values, order=order)
        losses.append([contrastive_loss(feat, proj, proj_ema, codebook, bank) for bank in banks])
    for fixed, compact in losses:
        torch.testing.assert_close(compact, fixed, rtol=1e-6, atol=1e-7)
    assert len(banks[1].candidates()[1]) == int(banks[1].count.sum()) < len(banks[0].candidates()[1])
