"""Every distributed helper, in one module.

A step runs as one process per GPU (NCCL) or per CPU worker (gloo). Three ways in:
  * `torchrun ...`: the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) says who we are;
  * `--gpu 0,1,2,3`: this module spawns one process per listed GPU;
  * `--nproc N` without GPUs: N CPU processes with gloo (how the tests check gradient sync).
Trained modules are never wrapped in DDP: the step engines call their parts separately
(student, EMA teacher, probe), so gradients are averaged explicitly with
`all_reduce_gradients` after backward, which is what DDP would do, without the unwrapping
that made each official process train alone.
"""
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class LaunchError(RuntimeError):
    """The processes of a run cannot be started as asked (busy port, absent GPUs)."""


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def launch(worker, cfg):
    """Run `worker(cfg, dist_info)` in every process of the run and return rank 0's result."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _run_process(int(os.environ["LOCAL_RANK"]), worker, cfg, None, None)
    gpus = _requested_gpus(cfg.gpu)
    world_size = len(gpus) if gpus else cfg.nproc
    if world_size == 1:
        device = torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return worker(cfg, Dist(0, 1, device))
    _check_port_free(cfg.port)
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_run_process, args=(worker, cfg, gpus, results), nprocs=world_size, join=True)
    return results.get(0)


def _run_process(local_rank, worker, cfg, gpus, results):
    if gpus is None:  # torchrun
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        use_cuda = torch.cuda.is_available()
        gpu = local_rank
    else:
        rank, world_size = local_rank, len(gpus) if gpus else cfg.nproc
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(cfg.port)
        use_cuda = bool(gpus)
        gpu = gpus[local_rank] if gpus else None
    if use_cuda:
        torch.cuda.set_device(gpu)
        device = torch.device("cuda", gpu)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                            **({"device_id": device} if use_cuda else {}))
    try:
        result = worker(cfg, Dist(rank, world_size, device))
        if results is not None and rank == 0:
            results[0] = result
        return result
    finally:
        dist.destroy_process_group()


def _requested_gpus(spec):
    """GPU indices from --gpu ('0,1,2,3'); all visible GPUs when not given; none on a CPU machine."""
    available = torch.cuda.device_count()
    if spec is None or spec == "":
        return list(range(available)) if available else []
    if spec.lower() == "cpu":
        return []
    try:
        gpus = [int(g) for g in spec.split(",")]
    except ValueError:
        raise LaunchError(f"--gpu expects comma-separated GPU indices such as 0,1,2,3; got {spec!r}") from None
    missing = [g for g in gpus if not 0 <= g < available]
    if missing:
        raise LaunchError(f"--gpu {spec} names GPU(s) {missing}, but this machine has {available} "
                         f"(indices 0..{available - 1})" if available else
                         f"--gpu {spec} names GPU(s) {missing}, but no CUDA GPU is visible; omit --gpu to run on CPU")
    return gpus


def _check_port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise LaunchError(f"port {port} is already in use (another run?); pass a free one with --port") from None


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum `tensor` over processes in place and return it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_gradients(parameters):
    """Average the gradients of `parameters` over processes (what DDP does), in one flat buffer."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_parameters(module, src=0):
    """Make every process start from rank `src`'s weights (random inits differ per process)."""
    if is_initialized():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)
