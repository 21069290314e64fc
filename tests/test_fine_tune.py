"""Leak-free fine-tuning: no gradient from labels reaches what the unsupervised prediction uses."""
import pytest
import torch

from modules.heads import SegmentModule
from modules.probe import ClusterModule
from utils.engine import Precision, optimizer_step
from utils.fine_tune import fine_tune_losses, set_trainable


def build(head):
    torch.manual_seed(0)
    segment = SegmentModule(head, 32, 9, 20, 5, 16 if head == "tr" else None)
    codebook = torch.randn(11, 32)
    segment.set_codebook(codebook)
    segment.init_ema()
    cluster = ClusterModule(11, 32, 9, 5)
    cluster.codebook.copy_(codebook)
    segment.train()
    return segment, cluster, torch.randn(2, 16, 32), torch.randint(-1, 5, (2, 16, 16))


def prediction_parameters(segment, cluster):
    """Everything the unsupervised prediction reads: head_ema and the cluster probe (and the clusterbook)."""
    return dict(segment.head_ema.named_parameters(prefix="head_ema")) | dict(cluster.named_parameters())


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_labels_reach_no_prediction_parameter_by_default(head):
    segment, cluster, tokens, labels = build(head)
    set_trainable(segment, label_leak=False)
    _, loss_probe, _, _ = fine_tune_losses(segment, cluster, tokens, labels, 5, grid=True)
    loss_probe.backward()
    for name, parameter in prediction_parameters(segment, cluster).items():
        assert parameter.grad is None or not parameter.grad.any(), f"labels reached {name}"
    assert segment.linear.f.weight.grad.abs().sum() > 0, "the labelled probe itself still learns"


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_label_leak_option_reproduces_the_official_leak(head):
    segment, cluster, tokens, labels = build(head)
    set_trainable(segment, label_leak=True)
    _, loss_probe, _, _ = fine_tune_losses(segment, cluster, tokens, labels, 5, grid=True)
    loss_probe.backward()
    assert any(p.grad is not None and p.grad.any() for p in segment.head_ema.parameters())


def test_a_full_fine_tuning_step_changes_only_the_probes():
    segment, cluster, tokens, labels = build("tr")
    trained = set_trainable(segment, label_leak=False)
    frozen = {n: p.detach().clone() for n, p in segment.named_parameters() if not n.startswith("linear.")}
    probe_before = cluster.cluster_probe.detach().clone()
    optimizers = [torch.optim.Adam(trained, lr=1e-2), torch.optim.Adam([cluster.cluster_probe], lr=1e-2)]
    loss_modularity, loss_probe, _, _ = fine_tune_losses(segment, cluster, tokens, labels, 5, grid=False)
    optimizer_step(loss_modularity + loss_probe, optimizers, Precision("fp32", torch.device("cpu")),
                   trained + [cluster.cluster_probe])
    for name, parameter in segment.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), f"{name} changed"
    assert not torch.equal(cluster.cluster_probe, probe_before), "the cluster probe learns by modularity"
