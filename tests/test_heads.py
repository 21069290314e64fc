"""Segment heads and cluster probe against the official implementation's numbers (golden/heads.pt)."""
import pytest
import torch
from conftest import load_golden

from loader.samplers import BatchShare
from modules.grid import tokens_to_map
from modules.heads import SegmentModule
from modules.primaps import kmeans_loss
from modules.probe import ClusterModule, crf_log_probs
from modules.randomness import BatchRandom


@pytest.fixture(scope="module")
def golden():
    return load_golden("heads.pt")


def build(head_type, args):
    return SegmentModule(head_type, args["dim"], args["reduced_dim"], args["projection_dim"],
                         args["n_classes"], args["num_queries"])


@pytest.mark.parametrize("head_type", ["mlp", "tr"])
def test_heads_match_official(golden, head_type):
    case = golden["heads"][head_type]
    segment = build(head_type, golden["heads"]["args"])
    segment.load_state_dict(case["state_dict"], strict=True)
    segment.set_codebook(case["codebook"])
    segment.eval()
    with torch.no_grad():
        head = segment.head(case["feat"])
        projection = segment.projection_head(head)
        linear = segment.linear(head)
    torch.testing.assert_close(head, case["head"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(projection, case["projection"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear, case["linear"], rtol=1e-5, atol=1e-5)


def shapes(state):
    return {name: tuple(value.shape) for name, value in state.items()}


@pytest.mark.parametrize("head_type", ["mlp", "tr"])
def test_segment_layout_is_the_released_one(golden, head_type):
    layout = golden["layout"][f"segment_{head_type}"]
    segment = SegmentModule(head_type, 768, 90, 2048, 27, num_queries=1600)
    assert shapes(segment.state_dict()) == layout
    segment.load_state_dict({name: torch.zeros(shape) for name, shape in layout.items()}, strict=True)


def test_cluster_layout_is_the_released_one(golden):
    layout = golden["layout"]["cluster"]
    cluster = ClusterModule(2048, 768, 90, 27)
    assert shapes(cluster.state_dict()) == layout
    cluster.load_state_dict({name: torch.zeros(shape) for name, shape in layout.items()}, strict=True)


def test_cluster_init_ranges():
    cluster = ClusterModule(64, 8, 6, 5)
    assert cluster.codebook.abs().max() <= 1 / 64
    assert cluster.cluster_probe.abs().max() <= 1 / 5
    assert [name for name, _ in cluster.named_parameters()] == ["cluster_probe"]


def small(head_type):
    torch.manual_seed(0)
    segment = SegmentModule(head_type, 16, 6, 10, 4, num_queries=9)
    segment.set_codebook(torch.randn(5, 16))
    return segment


@pytest.mark.parametrize("head_type", ["mlp", "tr"])
def test_ema_init_and_update(head_type):
    segment = small(head_type)
    pairs = [(segment.head, segment.head_ema), (segment.projection_head, segment.projection_head_ema)]
    for student, teacher in pairs:
        for s, t in zip(student.parameters(), teacher.parameters(), strict=True):
            assert torch.equal(s, t) and s.data_ptr() != t.data_ptr()
            assert not t.requires_grad and s.requires_grad
    before = [[t.clone() for t in teacher.parameters()] for _, teacher in pairs]
    with torch.no_grad():
        for p in segment.student_parameters():
            p.add_(1.0)
    segment.update_ema(0.99)
    for (student, teacher), old in zip(pairs, before, strict=True):
        for s, t, t0 in zip(student.parameters(), teacher.parameters(), old, strict=True):
            torch.testing.assert_close(t, 0.99 * t0 + 0.01 * s)


def test_student_parameters_exclude_ema():
    segment = small("tr")
    student = {id(p) for p in segment.student_parameters()}
    expected = {id(p) for m in (segment.head, segment.projection_head, segment.linear) for p in m.parameters()}
    assert student == expected
    ema = {id(p) for m in (segment.head_ema, segment.projection_head_ema) for p in m.parameters()}
    assert not student & ema


def batch_random(rows, seed=0):
    return BatchRandom(seed, BatchShare(0, rows, rows), "cpu")


@pytest.mark.parametrize("head_type", ["mlp", "tr"])
def test_dropout_only_when_a_dropout_function_is_given(head_type):
    segment = small(head_type)
    feat = torch.randn(2, 9, 16)
    with torch.no_grad():
        plain = segment.head(feat)
        assert torch.equal(plain, segment.head(feat)), "without dropout the head is deterministic"
        dropped = segment.head(feat, batch_random(2).dropout)
        assert not torch.allclose(dropped, plain)
        assert torch.equal(dropped, segment.head(feat, batch_random(2).dropout)), "the same draws, the same masks"
        # A dropout function that keeps everything runs the explicit attention path (TR): it must
        # compute what nn.MultiheadAttention computes.
        torch.testing.assert_close(segment.head(feat, lambda x, p: x), plain, rtol=1e-5, atol=1e-6)


def test_tr_dropout_reaches_the_attention_weights():
    segment = small("tr")
    layer = segment.head.tr
    feat = torch.randn(2, 9, 16)
    seen = []

    def recording(x, p):
        seen.append((tuple(x.shape), p))
        return x

    segment.head(feat, recording)
    shapes = [shape for shape, _ in seen]
    assert shapes.count((2, 9, 9)) == 2, "self- and cross-attention weights"
    assert {p for _, p in seen} == {layer.dropout}
    assert len(seen) == 2 + 2 + 2 + 2, "attention weights, attention outputs, FFN inside and out, f1 and f2 inputs"


def test_a_processes_rows_of_a_global_draw_are_the_whole_draws_rows():
    # Two processes sharing a batch of 4 each draw [4, ...] and keep their rows: together they hold
    # exactly what one process drawing for the whole batch holds.
    whole = BatchRandom(7, BatchShare(0, 4, 4), "cpu").uniform((3, 5))
    halves = [BatchRandom(7, BatchShare(offset, 2, 4), "cpu").uniform((3, 5)) for offset in (0, 2)]
    assert torch.equal(torch.cat(halves), whole)
    # A permutation is drawn whole: every process of the batch gets the same one.
    first, second = (BatchRandom(7, BatchShare(offset, 2, 4), "cpu").permutation(9) for offset in (0, 2))
    assert torch.equal(first, second) and not torch.equal(first, torch.arange(9))


def test_tr_head_rejects_wrong_token_count():
    segment = small("tr")
    with pytest.raises(ValueError, match="built for 9 tokens.*got P = 16"):
        segment.head(torch.randn(1, 16, 16))


def test_tr_head_needs_codebook():
    segment = SegmentModule("tr", 16, 6, 10, 4, num_queries=9)
    with pytest.raises(ValueError, match="set_codebook"):
        segment.head(torch.randn(1, 9, 16))


def test_codebook_is_not_saved():
    segment = small("tr")
    assert not any("codebook" in name for name in segment.state_dict())


def test_centroid_matches_official():
    for case in load_golden("losses.pt")["centroid"]:
        feat_map = tokens_to_map(case["feat"])
        cluster = ClusterModule(3, 4, feat_map.shape[1], case["cluster_probe"].shape[0])
        with torch.no_grad():
            cluster.cluster_probe.copy_(case["cluster_probe"])
        assert torch.equal(cluster.predict(feat_map), case["argmax"])
        torch.testing.assert_close(crf_log_probs(cluster.cosine_logits(feat_map), case["alpha"]), case["log_probs"],
                                   rtol=1e-5, atol=1e-5)
        # The probe's clustering loss is the cosine k-means loss of PriMaPs' initialisation stage.
        torch.testing.assert_close(kmeans_loss(cluster.cosine_logits(feat_map)).float(), case["loss"], rtol=1e-5,
                                   atol=1e-6)
