"""Every distributed helper, in one module.

A training step runs as one process per GPU (NCCL) or per CPU worker (gloo). Three ways in:
  * `torchrun ...`: the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*) says who we are;
  * `--gpu 0,1,2,3`: this module spawns one process per listed GPU;
  * `--nproc N` without GPUs: N CPU processes with gloo (how the tests check multi-process runs).
Trained modules are never wrapped in DDP: the step engines call their parts separately
(student, EMA teacher, probe), so gradients are reduced explicitly after backward
(`BatchGroup.reduce_gradients`), without the unwrapping that made each official process train alone.

A user error (errors.UserError) raised in a spawned process reaches the user as the same one
line as in a single process: the process hands its message to the launcher and exits, the
launcher stops the others and raises it again. Under torchrun the process that raised prints it.
A process that dies (killed by a signal: the out-of-memory killer sends SIGKILL) ends the run as
ProcessDied, one line naming it and the signal; so does a data-loader worker process that dies
(`data_loader_failures`).
"""
import os
import re
import signal
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from errors import USER_ERROR_STATUS, UserError, tell

DEBUG_VARIABLE = "CAUSE_DEBUG"  # set to 1: user errors keep their traceback, in every process
# Under torchrun, a process whose collective lost its peer (gloo's words for it) exits with this status
# and without a traceback: the process that stopped first reports why, itself.
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")
PEER_STOPPED_STATUS = 3


class LaunchError(UserError):
    """The processes of a run cannot be started as asked (busy port, absent GPUs)."""


class ProcessDied(UserError):
    """A process of the run (a training process, a data-loader worker) ended before its work was done:
    killed by a signal (the out-of-memory killer sends SIGKILL) or crashed."""


RERUN = "run the step again (a training step resumes from its last saved epoch)"
# torch's words for a data-loader worker that died: "DataLoader worker (pid 123) is killed by signal:
# Killed." (noticed on SIGCHLD) or "DataLoader worker (pid(s) 123) exited unexpectedly".
LOADER_WORKER_DIED = "DataLoader worker (pid"
# What torch makes of an exception raised in a data-loader worker: the exception's type again, its
# message a traceback ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback ...").
LOADER_WORKER_RAISED = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def debugging():
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


@dataclass(frozen=True)
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def under_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_rank():
    """This process's rank under torchrun, 0 otherwise."""
    return int(os.environ["RANK"]) if under_torchrun() else 0


def launch(worker, cfg, label):
    """Run `worker(cfg, dist_info)` in every process of the run and return rank 0's result; `label` names
    the step in the line a user error is told in."""
    if under_torchrun():
        return _run_process(int(os.environ["LOCAL_RANK"]), worker, cfg, label, None, None)
    gpus = requested_gpus(cfg.gpu)
    world_size = len(gpus) if gpus else cfg.nproc
    if world_size == 1:
        return worker(cfg, Dist(0, 1, _device(gpus[0] if gpus else None)))
    _check_port_free(cfg.port)
    results = mp.get_context("spawn").Manager().dict()
    processes = mp.start_processes(_run_process, args=(worker, cfg, label, gpus, results), nprocs=world_size,
                                   join=False, start_method="spawn")
    try:
        while not processes.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        # A process that meets a user error leaves its message here before it exits; the others may
        # fail after it (a collective's peer is gone) and be reported first. So may the others of a
        # process killed by a signal. Any other failure (a bug) is reported as torch's launcher reports it.
        if "user_error" in results:
            raise UserError(results["user_error"]) from None
        killed = _killed(processes.processes)
        if killed is not None:
            rank, process, name = killed
            raise ProcessDied(f"training process {rank} of {world_size} (PID {process.pid}) was killed by signal "
                              f"{name}: the out-of-memory killer does so when memory runs out; {RERUN}") from None
        raise
    return results.get("result")


def _killed(processes):
    """(rank, process, signal name) of the first process of a failed run that a signal ended, None when
    none was; the SIGTERM torch's launcher sends the survivors of a failed process does not count."""
    for rank, process in enumerate(processes):
        code = process.exitcode
        if code is not None and code < 0 and -code != signal.SIGTERM:
            return rank, process, signal.Signals(-code).name
    return None


@contextmanager
def data_loader_failures():
    """Tell what a DataLoader's worker processes met in the body as the user errors they are: a worker
    that died becomes ProcessDied, one line; a user error raised in a worker (a damaged data file) is
    raised again with its own message instead of the traceback torch wraps it in."""
    try:
        yield
    except RuntimeError as err:
        if not str(err).startswith(LOADER_WORKER_DIED):
            raise
        raise ProcessDied(f"a data-loader worker process died ({str(err).strip()}): the out-of-memory killer "
                          f"does so when memory runs out; {RERUN}, with fewer --num_workers if memory is "
                          f"short") from None
    except UserError as err:
        message = _message_of_worker_error(err)
        if message is None:
            raise
        raise type(err)(message) from None


def _message_of_worker_error(err):
    """The message of user error `err` as raised in a data-loader worker; None for one raised here."""
    text = str(err)
    if not LOADER_WORKER_RAISED.match(text):
        return None
    kind = type(err)
    head = f"\n{kind.__module__}.{kind.__qualname__}: "
    start = text.rfind(head)
    return None if start < 0 else text[start + len(head):].rstrip("\n")


def launch_single(worker, cfg):
    """Run `worker(cfg, dist_info)` in this one process: on the first GPU of --gpu, else the first
    visible GPU, else the CPU. Under torchrun only rank 0 works; the other ranks return None."""
    if torchrun_rank() != 0:
        return None
    gpus = requested_gpus(getattr(cfg, "gpu", None))  # a step without --gpu computes on the first visible one
    with data_loader_failures():  # predict.py's too
        return worker(cfg, Dist(0, 1, _device(gpus[0] if gpus else None)))


def _device(gpu):
    if gpu is None:
        return torch.device("cpu")
    device = torch.device("cuda", gpu)
    torch.cuda.set_device(device)
    return device


def _run_process(local_rank, worker, cfg, label, gpus, results):
    if gpus is None:  # torchrun
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        gpu = local_rank if torch.cuda.is_available() else None
    else:
        rank, world_size = local_rank, len(gpus) if gpus else cfg.nproc
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(cfg.port)
        gpu = gpus[local_rank] if gpus else None
    device = _device(gpu)
    dist.init_process_group("nccl" if gpu is not None else "gloo", rank=rank, world_size=world_size,
                            **({"device_id": device} if gpu is not None else {}))
    try:
        with data_loader_failures():
            result = worker(cfg, Dist(rank, world_size, device))
        if results is not None and rank == 0:
            results["result"] = result
        return result
    except UserError as err:
        if debugging():
            raise
        if results is None:
            # torchrun: this process tells it and stops at once, before closing its process group, so
            # that its peers fail after it and the launcher sees this failure first.
            tell(label, err)
            sys.stdout.flush()
            os._exit(USER_ERROR_STATUS)
        results.setdefault("user_error", str(err))
        sys.exit(USER_ERROR_STATUS)
    except RuntimeError as err:
        if results is None and any(words in str(err) for words in PEER_GONE) and not debugging():
            sys.exit(PEER_STOPPED_STATUS)
        raise
    finally:
        dist.destroy_process_group()


def requested_gpus(spec):
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


def process_count(cfg):
    """How many processes a training step of `cfg` runs as."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    gpus = requested_gpus(cfg.gpu)
    return len(gpus) if gpus else cfg.nproc


def _check_port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # A port still closing after the previous step's processes (TIME_WAIT) is free to reuse, as
        # torch's rendezvous store does; only one that something listens on is busy.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise LaunchError(f"port {port} is already in use (another run?); pass a free one with --port") from None


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def world_size():
    return dist.get_world_size() if is_initialized() else 1


def communication_device():
    """Where tensors for collectives live: the process's GPU under NCCL, the CPU under gloo."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier():
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor):
    """Sum `tensor` over all processes in place and return it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_parameters(module, src=0):
    """Make every process start from rank `src`'s weights (random inits differ per process)."""
    if is_initialized():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


class BatchGroup:
    """The processes that share one global batch (loader/samplers.py): all of them in the paper
    recipe, each process alone in the scaled recipe. `row_counts` are the rows of the current
    global batch that each process of the group holds, in rank order."""

    def __init__(self, shared):
        self.shared = shared and world_size() > 1
        self.row_counts = None

    def set_rows(self, row_counts):
        self.row_counts = list(row_counts)

    def sum(self, tensor):
        """Sum over the group, in place (the identity when a process is its own group)."""
        if self.shared:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, tensor):
        """The group's rows of `tensor` [rows, ...] concatenated in rank order: the whole global batch."""
        if not self.shared:
            return tensor
        # Collectives need equal shapes: every process sends its rows padded to the largest share.
        most = max(self.row_counts)
        padded = tensor.new_zeros((most, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in self.row_counts]
        dist.all_gather(parts, padded)
        return torch.cat([part[:rows] for part, rows in zip(parts, self.row_counts, strict=True)])

    def reduce_gradients(self, parameters):
        """Make every process hold the same gradients: summed over a shared batch (each process
        computed its part of one loss), averaged over independent batches (as DDP does).

        The flat buffer has a slot for every parameter on every process, zeros where a process has no
        gradient, and a last segment counting the processes that had one: a parameter keeps a
        gradient when any process had one, and all processes send buffers of one size (a parameter
        without a gradient on one rank must not change the collective's shape: NCCL would hang).
        """
        if not is_initialized() or world_size() == 1:
            return
        parameters = list(parameters)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        had = torch.tensor([p.grad is not None for p in parameters], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [had])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        if not self.shared:
            flat[:-len(parameters)] /= world_size()
        offset = 0
        for p, count in zip(parameters, flat[-len(parameters):].tolist(), strict=True):
            values = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if count == 0:
                p.grad = None
            elif p.grad is None:
                p.grad = values.clone()
            else:
                p.grad.copy_(values)
