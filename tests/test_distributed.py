"""Two-process gloo training: gradients are really averaged, so both ranks hold the same weights."""
import socket
import subprocess
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from conftest import ROOT
from steps import make_tiny_setup, step_args

from modules.heads import SegmentModule
from modules.losses import contrastive_loss
from modules.quantize import quantize_index
from utils.runtime.distributed import broadcast_parameters, launch
from utils.engine import Precision, labelled_cross_entropy, optimizer_step
from utils.front_door import student_teacher_tokens


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def one_front_door_step(cfg, info):
    """A real front-door training step on rank-specific data; returns every rank's weights and local gradients."""
    torch.manual_seed(100 + info.rank)  # different init per rank: broadcast must align them
    segment = SegmentModule("tr", 32, 9, 20, 5, 16)
    broadcast_parameters(segment)
    segment.init_ema()
    codebook = torch.randn(11, 32, generator=torch.Generator().manual_seed(0))
    segment.set_codebook(codebook)
    trained = [p for p in segment.parameters() if p.requires_grad]
    before = _flat(trained).clone()
    optimizer = torch.optim.Adam(trained, lr=1e-3 * info.world_size, weight_decay=1e-4)
    tokens = torch.randn(2, 16, 32)  # each rank sees its own batch
    labels = torch.randint(0, 5, (2, 16, 16))
    segment.train()
    sampled, student, teacher, probe = student_teacher_tokens(segment, tokens, grid=True)
    loss = contrastive_loss(sampled, student, teacher, codebook, None, index=quantize_index(sampled, codebook))
    loss = loss + labelled_cross_entropy(segment.linear(probe), labels, 5)[0]
    local = {}
    for p in trained:
        p.register_hook(lambda g, p=p: local.__setitem__(p, g.detach().clone()))
    optimizer_step(loss, [optimizer], Precision("fp32", torch.device("cpu")), trained, (trained, 2.0))
    result = {"weights": _flat(trained), "local_grads": _flat([local[p] for p in trained]), "before": before}
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, result)
    return gathered


def test_two_process_gloo_step_keeps_ranks_identical():
    cfg = SimpleNamespace(gpu="cpu", nproc=2, port=_free_port())
    ranks = launch(one_front_door_step, cfg)
    assert len(ranks) == 2
    assert torch.equal(ranks[0]["before"], ranks[1]["before"]), "ranks must start from the same weights"
    assert not torch.allclose(ranks[0]["local_grads"], ranks[1]["local_grads"]), "ranks saw different data"
    assert not torch.equal(ranks[0]["weights"], ranks[0]["before"]), "the step must change the weights"
    assert torch.equal(ranks[0]["weights"], ranks[1]["weights"])


def test_a_step_runs_under_torchrun(tmp_path):
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) drives the same code (gloo on CPU)."""
    data_dir, ckpt = make_tiny_setup(tmp_path, n_train=2, n_val=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "train_mediator.py", *step_args(data_dir, ckpt, tmp_path)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    modular = tmp_path / "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16/modular.npy"
    assert modular.is_file()
    assert done.stdout.count("clusterbook saved") == 1, "only rank 0 writes and reports"
