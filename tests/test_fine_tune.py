"""Leak-free fine-tuning: no gradient from labels reaches what the unsupervised prediction uses."""
import pytest
import torch

from loader.samplers import BatchShare
from modules.heads import SegmentModule
from modules.probe import ClusterModule
from modules.randomness import BatchRandom
from utils.engine.fine_tune import FineTuneTraining, set_trainable
from utils.engine.optim import Precision
from utils.runtime.distributed import BatchGroup


def build(head, label_leak, labels=None):
    torch.manual_seed(0)
    segment = SegmentModule(head, 32, 9, 20, 5, 16 if head == "tr" else None)
    codebook = torch.randn(11, 32)
    segment.set_codebook(codebook)
    cluster = ClusterModule(11, 32, 9, 5)
    cluster.codebook.copy_(codebook)
    trained = set_trainable(segment, label_leak)
    optimizers = [torch.optim.Adam(trained, lr=1e-2), torch.optim.Adam([cluster.cluster_probe], lr=1e-2)]
    # The tokens stand for the backbone's: an identity "backbone" passes them through.
    training = FineTuneTraining(lambda images: images, segment, cluster, trained, optimizers, [], 2.0,
                                Precision("fp32", torch.device("cpu")), BatchGroup(shared=False), 5, grid=True)
    labels = torch.randint(-1, 5, (2, 16, 16)) if labels is None else labels
    return training, {"img": torch.randn(2, 16, 32), "label": labels}, BatchRandom(0, BatchShare(0, 2, 2), "cpu")


def prediction_parameters(training):
    """Everything the unsupervised prediction reads: head_ema and the cluster probe (and the clusterbook)."""
    segment, cluster = training.segment, training.cluster
    return dict(segment.head_ema.named_parameters(prefix="head_ema")) | dict(cluster.named_parameters())


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_labels_reach_no_prediction_parameter_by_default(head):
    training, batch, random = build(head, label_leak=False)
    training.losses(batch, random)["probe_cross_entropy"].backward()
    for name, parameter in prediction_parameters(training).items():
        assert parameter.grad is None or not parameter.grad.any(), f"labels reached {name}"
    assert training.segment.linear.f.weight.grad.abs().sum() > 0, "the labelled probe itself still learns"


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_label_leak_option_reproduces_the_official_leak(head):
    training, batch, random = build(head, label_leak=True)
    training.losses(batch, random)["probe_cross_entropy"].backward()
    assert any(p.grad is not None and p.grad.any() for p in training.segment.head_ema.parameters())


def test_a_full_fine_tuning_step_changes_only_the_probes():
    training, batch, random = build("tr", label_leak=False)
    segment, cluster = training.segment, training.cluster
    frozen = {n: p.detach().clone() for n, p in segment.named_parameters() if not n.startswith("linear.")}
    probe_before = cluster.cluster_probe.detach().clone()
    training.update(training.losses(batch, random), random)
    for name, parameter in segment.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"{name} changed"
    assert not torch.equal(cluster.cluster_probe, probe_before), "the cluster probe learns by modularity"


def test_a_batch_without_labelled_pixels_still_trains_the_cluster_probe():
    # Possible on Cityscapes crops: the official mean over no pixels is NaN; here the probe term is 0.
    training, batch, random = build("tr", label_leak=False, labels=torch.full((2, 16, 16), -1))
    training.grid = False  # a 4×4 token grid keeps one token per image: no graph to measure modularity on
    probe_before = training.cluster.cluster_probe.detach().clone()
    losses = training.losses(batch, random)
    assert losses["probe_cross_entropy"] == 0 and torch.isfinite(losses["loss"])
    training.update(losses, random)
    assert not torch.equal(training.cluster.cluster_probe, probe_before)
    assert all(torch.isfinite(p).all() for p in training.segment.parameters())
