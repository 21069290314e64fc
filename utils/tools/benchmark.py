"""Training-step cost of this project against the official CAUSE formulation.

    python -m utils.tools.benchmark [--device cpu|cuda] [--full | --full-dinov3 | --small] [--steps N] [--measures ...]
                              [--json PATH]

--full uses the paper's shapes (ViT-B/8, 320 px -> 40x40 tokens, batch 16, K = 2048,
projection 2048, concept bank full: 100 entries for each prototype); --full-dinov3 the same
on DINOv3's ViT-L/16 (320 px -> 20x20 tokens of dim 1024, 24 blocks); --small (the default
on CPU) reduced ones that run in about a minute on two CPU cores. Single shape values can
be overridden (--arch, --resolution, ...).

Measured, for this project and for the official formulation (utils/tools/official_formulation.py):
- mediator step: modularity loss forward and backward and the Adam step on the clusterbook;
- front-door step, TR and MLP heads: heads and projections, contrastive loss against the
  full bank, backward, Adam step, EMA update, bank update;
- bank update alone, on the full bank;
and once, the frozen backbone's forward pass, the cost no step can avoid: its time, its weights'
bytes and its peak memory above them.

Method:
- Time: median over --steps runs after --warmup untimed ones; project and official runs
  alternate; on CUDA the device is synchronised before and after each run.
- Peak memory (mediator step): the most bytes allocated at any moment of one further run,
  above what was allocated when it started. CUDA: the allocator's counters
  (max_memory_allocated after reset_peak_memory_stats). CPU: every allocation and free
  recorded by torch.profiler (profile_memory=True), summed in time order; the profiler does
  not see frees of blocks allocated before the run (here the clusterbook's previous
  gradient), which adds the same K·dim·4 bytes to both formulations. Both are measured alike.
- Both formulations share everything they do not formulate differently: the project's heads,
  backbone tokens, Adam with clipping and loss scaling, and precision (fp16 autocast with
  loss scaling on CUDA, as training; fp32 on CPU). They differ in the modularity loss, the
  contrastive loss, the bank and the EMA update. The labelled linear probe, the same for
  both, is left out.
- Weights are random (costs do not depend on them). The front door's clusterbook is drawn
  from backbone tokens, so that the sampled tokens spread over many prototypes as they do
  with a trained one; the number hit per step is reported, as the official bank update loops
  over them.

The speed and memory targets are printed beside the measured ratios, not asserted.
"""
import argparse
import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace

import torch
from torch.profiler import ProfilerActivity, profile

from loader.samplers import BatchShare
from models import build_backbone
from modules.bank import ConceptBank
from modules.grid import grid_sample_tokens
from modules.heads import SegmentModule
from modules.losses import probe_cross_entropy
from modules.quantize import quantize_index
from modules.randomness import BatchRandom
from utils.engine.front_door import FrontDoorTraining, student_teacher_tokens
from utils.engine.loop import backbone_tokens
from utils.engine.mediator import MediatorTraining
from utils.engine.optim import Precision, optimizer_step
from utils.runtime.config import resolved_precision
from utils.runtime.distributed import BatchGroup
from utils.runtime.recipe import CAUSE_OPTIMISATION
from utils.tools.official_formulation import (OfficialBank, official_contrastive_loss, official_ema_update,
                                              official_modularity_loss)


@dataclass(frozen=True)
class Shapes:
    arch: str
    resolution: int
    batch: int
    num_codebook: int
    projection_dim: int
    bank_capacity: int


PRESETS = {
    "full": Shapes("dino_vit_base_8", 320, 16, 2048, 2048, 100),
    "full_dinov3": Shapes("dinov3_vit_large_16", 320, 16, 2048, 2048, 100),
    "small": Shapes("dino_vit_small_16", 320, 4, 256, 256, 20),
}

# Front-door settings of cocostuff27 (docs/cause.md §4): gradient-norm clipping per head, weight decay.
CLIP = CAUSE_OPTIMISATION["cocostuff27"].front_door_clip
WEIGHT_DECAY = CAUSE_OPTIMISATION["cocostuff27"].weight_decay
LR = 1e-3

# Largest allowed project ÷ official ratio for each speed and memory target, and how it is worded.
TARGETS = {
    "front_door_tr_step_s": (1 / 3, "≥3× faster"),
    "front_door_mlp_step_s": (1 / 3, "≥3× faster"),
    "mediator_step_peak_bytes": (1 / 10, "≥10× less memory"),
    "bank_update_s": (1 / 10, "≥10× faster"),
}

# What can be measured, one group at a time (--measures).
MEASURE_GROUPS = ("mediator", "front_door_tr", "front_door_mlp", "bank_update")

# Every measured number: key in the results, label in the table.
MEASURES = {
    "mediator_step_s": "mediator step time",
    "mediator_step_peak_bytes": "mediator step peak memory",
    "front_door_tr_step_s": "front-door step TR time",
    "front_door_mlp_step_s": "front-door step MLP time",
    "bank_update_s": "bank update time",
}


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "CPU")
    except OSError:
        model = "CPU"
    return f"{model} ({torch.get_num_threads()} threads)"


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(steps_by_name, device, steps, warmup):
    """{name: median seconds of its step}. The steps take turns, so that a change in the
    machine's load (other processes) falls on all of them alike."""
    for _ in range(warmup):
        for step in steps_by_name.values():
            step()
    times = {name: [] for name in steps_by_name}
    for _ in range(steps):
        for name, step in steps_by_name.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _allocation_events(prof):
    """(time, bytes) of every allocation (positive) and free (negative) the profiler recorded."""
    events = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        node = pending.pop()
        if node.tag == torch._C._profiler._EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        pending.extend(node.children)
    return sorted(events)


def peak_bytes(step, device):
    """Most bytes allocated at once during one run of `step`, above those allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    # CPU has no allocator counters: replay the profiler's allocation record instead.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for _, size in _allocation_events(prof):
        live += size
        peak = max(peak, live)
    return peak


def precomputed(tokens):
    """The step's input batch and a "backbone" that passes it through: both formulations' steps are
    measured on the same precomputed tokens, the backbone's cost measured once, apart."""
    return {"img": tokens}, lambda images: images


def step_random(tokens, step):
    """A BatchRandom for one benchmark step of the whole batch in one process."""
    return BatchRandom(step, BatchShare(0, tokens.shape[0], tokens.shape[0]), tokens.device)


def mediator_steps(tokens, num_codebook, precision):
    """(project step, official step): grid sampling, modularity loss, backward, Adam on the clusterbook."""
    group = BatchGroup(shared=False)

    def clusterbook():
        codebook = torch.empty(num_codebook, tokens.shape[-1], device=tokens.device)
        return torch.nn.Parameter(codebook.uniform_(-1 / num_codebook, 1 / num_codebook))

    codebook = clusterbook()
    optimizer = torch.optim.Adam([codebook], lr=LR)
    batch, identity = precomputed(tokens)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.2)
    training = MediatorTraining(identity, codebook, optimizer, scheduler, precision, group, grid=True)
    steps = iter(range(10**9))

    def project_step():  # the mediator's own training step
        random = step_random(tokens, next(steps))
        training.update(training.losses(batch, random), random)

    official_codebook = clusterbook()
    official_optimizer = torch.optim.Adam([official_codebook], lr=LR)

    # The official loss runs under the training autocast, as in the official mediator script.
    def official_step():
        with precision.autocast():
            loss = official_modularity_loss(official_codebook, grid_sample_tokens(tokens)[0])
        optimizer_step(loss, [official_optimizer], precision, group, [official_codebook])
    return project_step, official_step


def full_banks(shapes, device):
    """(the project's ConceptBank, the official bank) holding the same random projections: every
    prototype's ring full, `bank_capacity` of them, the oldest in the first slot."""
    values = torch.randn(shapes.num_codebook, shapes.bank_capacity, shapes.projection_dim, device=device)
    bank = ConceptBank(shapes.num_codebook, shapes.projection_dim, shapes.bank_capacity, device=device)
    bank.values.copy_(values)
    bank.count.fill_(shapes.bank_capacity)
    entries = {k: values[k] for k in range(shapes.num_codebook)}
    return bank, OfficialBank.from_entries(entries, shapes.num_codebook, shapes.bank_capacity)


def front_door_steps(head_type, tokens, codebook, shapes, precision):
    """(project step, official step) for one head type, each with its own head, optimiser and full bank."""
    device = tokens.device
    group = BatchGroup(shared=False)
    segment = SegmentModule(head_type, tokens.shape[-1], projection_dim=shapes.projection_dim,
                            num_queries=tokens.shape[1] if head_type == "tr" else None).to(device)
    segment.set_codebook(codebook)
    official_segment = copy.deepcopy(segment)
    bank, official_bank = full_banks(shapes, device)
    # Both sides train the labelled probe too, on labels of the images' size.
    labels = torch.zeros(tokens.shape[0], shapes.resolution, shapes.resolution, dtype=torch.int64, device=device)

    optimizer = torch.optim.Adam(segment.student_parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    batch, identity = precomputed(tokens)
    batch["label"] = labels
    training = FrontDoorTraining(identity, segment, codebook, bank, optimizer, CLIP[head_type], precision, group, 27,
                                 True)
    steps = iter(range(10**9))

    def project_step():  # the front door's own training step
        random = step_random(tokens, next(steps))
        training.update(training.losses(batch, random), random)

    official_trained = list(official_segment.student_parameters())
    official_optimizer = torch.optim.Adam(official_trained, lr=LR, weight_decay=WEIGHT_DECAY)

    # As the official training step: the bank is flattened inside the loss, and the update
    # quantises the tokens again, after the autocast block.
    def official_step():
        random = step_random(tokens, next(steps))
        with precision.autocast():
            sampled, student_proj, teacher_proj, probe_features = student_teacher_tokens(
                official_segment, tokens, True, random)
            loss = official_contrastive_loss(sampled, student_proj, teacher_proj, codebook, official_bank)
            probe, _, counted = probe_cross_entropy(official_segment.linear(probe_features), labels, 27)
            loss = loss + probe / counted
        optimizer_step(loss, [official_optimizer], precision, group, official_trained,
                       (official_trained, CLIP[head_type]))
        official_ema_update(official_segment.head, official_segment.head_ema)
        official_ema_update(official_segment.projection_head, official_segment.projection_head_ema)
        official_bank.update(quantize_index(sampled, codebook).flatten(), teacher_proj.detach().flatten(0, 1))

    return project_step, official_step


def bank_update_steps(index, shapes):
    """(project step, official step): one update of a full bank with the teacher projections of a batch."""
    device = index.device
    bank, official_bank = full_banks(shapes, device)
    values = torch.randn(index.numel(), shapes.projection_dim, device=device)
    return (lambda: bank.update(index, values)), (lambda: official_bank.update(index, values))


def run(shapes, device, steps, warmup, precision_name="auto", measures=MEASURE_GROUPS):
    """Measure each of `measures` (MEASURE_GROUPS) once; returns the results dict that --json writes.

    The backbone forward is always measured. Each measure's figures are printed as soon as
    they are taken, so a long run at the paper's shapes on a CPU shows its progress."""
    torch.manual_seed(0)
    precision = Precision(resolved_precision(precision_name, device.type), device)
    backbone = build_backbone(shapes.arch).to(device)
    images = torch.randn(shapes.batch, 3, shapes.resolution, shapes.resolution, device=device)

    def forward():
        return backbone_tokens(backbone, images, precision)

    backbone_s = median_seconds({"backbone": forward}, device, steps, warmup)["backbone"]
    backbone_peak = peak_bytes(forward, device)
    weights = sum(tensor.numel() * tensor.element_size() for tensor in backbone.state_dict().values())
    tokens = forward().float()
    batch, num_tokens, dim = tokens.shape
    sampled = grid_sample_tokens(tokens)[0]
    if shapes.num_codebook > batch * num_tokens:
        raise ValueError(f"K = {shapes.num_codebook} prototypes cannot be drawn from {batch * num_tokens} tokens: "
                         f"lower --num-codebook or raise --batch / --resolution")
    codebook = tokens.flatten(0, 1)[torch.randperm(batch * num_tokens, device=device)[:shapes.num_codebook]]
    index = quantize_index(sampled, codebook).flatten()

    results = {"project": {}, "official": {}}

    print(f"[benchmark] backbone forward: {_ms(backbone_s)}, peak {_mib(backbone_peak)} above its "
          f"{_mib(weights)} of weights", flush=True)

    def record(name, project_step, official_step, memory=False):
        sides = {"project": project_step, "official": official_step}
        taken = {f"{name}_s": median_seconds(sides, device, steps, warmup)}
        if memory:
            taken[f"{name}_peak_bytes"] = {side: peak_bytes(step, device) for side, step in sides.items()}
        for key, by_side in taken.items():
            for side, value in by_side.items():
                results[side][key] = value
            fmt = _ms if key.endswith("_s") else _mib
            print(f"[benchmark] {MEASURES[key]}: project {fmt(by_side['project'])}, official "
                  f"{fmt(by_side['official'])}", flush=True)

    # One measure at a time, so that only its own buffers (a full bank can be GBs) are allocated.
    if "mediator" in measures:
        record("mediator_step", *mediator_steps(tokens, shapes.num_codebook, precision), memory=True)
    for head_type in ("tr", "mlp"):
        if f"front_door_{head_type}" in measures:
            record(f"front_door_{head_type}_step", *front_door_steps(head_type, tokens, codebook, shapes, precision))
    if "bank_update" in measures:
        record("bank_update", *bank_update_steps(index, shapes))

    side = math.isqrt(num_tokens)
    results.update({
        "device": device_name(device),
        "device_type": device.type,
        "precision": {"fp16": "fp16 autocast + loss scaling", "bf16": "bf16 autocast"}.get(precision.name, "fp32"),
        "shapes": {**asdict(shapes), "token_grid": [side, side], "dim": dim,
                   "sampled_tokens_per_image": sampled.shape[1],
                   "prototypes_hit_per_step": int(index.unique().numel()),
                   "bank_entries": shapes.num_codebook * shapes.bank_capacity},
        "steps": steps,
        "warmup": warmup,
        "backbone_forward_s": backbone_s,
        "backbone_forward_peak_bytes": backbone_peak,
        "backbone_weights_bytes": weights,
        "ratios": {
            "project_over_official": {key: results["project"][key] / results["official"][key]
                                      for key in results["project"]},
            "project_step_over_backbone_forward": {key: value / backbone_s for key, value in results["project"].items()
                                                   if key.endswith("_s")},
        },
        "targets": {key: {"max_project_over_official": limit, "meaning": meaning}
                    for key, (limit, meaning) in TARGETS.items()},
    })
    return results


def _mib(n):
    return f"{n / 2**20:.1f} MiB"


def _ms(s):
    return f"{1e3 * s:.1f} ms"


def format_report(results):
    shapes = results["shapes"]
    ratio = results["ratios"]["project_over_official"]
    over_backbone = results["ratios"]["project_step_over_backbone_forward"]
    lines = [
        f"device: {results['device']} [{results['device_type']}], precision: {results['precision']}",
        f"shapes: {shapes['arch']}, {shapes['resolution']} px -> {shapes['token_grid'][0]}x{shapes['token_grid'][1]} "
        f"tokens of dim {shapes['dim']}, batch {shapes['batch']}, grid sampling -> "
        f"{shapes['sampled_tokens_per_image']} tokens/image; K = {shapes['num_codebook']}, projection "
        f"{shapes['projection_dim']}; bank full: {shapes['bank_capacity']} per prototype "
        f"({shapes['bank_entries']} entries); {shapes['prototypes_hit_per_step']} prototypes hit per step",
        f"median of {results['steps']} steps after {results['warmup']} warm-up steps; "
        f"peak memory = most bytes allocated above the step's start",
        f"backbone forward: {_ms(results['backbone_forward_s'])}, peak {_mib(results['backbone_forward_peak_bytes'])} "
        f"above its {_mib(results['backbone_weights_bytes'])} of weights",
        "",
        f"{'measure':<28}{'project':>14}{'official':>14}{'proj/off':>10}  {'target (proj/off)':<36}"
        f"{'proj/backbone':>14}",
    ]
    for key, label in MEASURES.items():
        if key not in ratio:
            continue
        fmt = _ms if key.endswith("_s") else _mib
        target = ""
        if key in TARGETS:
            limit, meaning = TARGETS[key]
            target = f"≤ {limit:.2f} ({meaning}): {'met' if ratio[key] <= limit else 'NOT met'}"
        backbone = f"{over_backbone[key]:.3g}" if key in over_backbone else ""
        lines.append(f"{label:<28}{fmt(results['project'][key]):>14}{fmt(results['official'][key]):>14}"
                     f"{ratio[key]:>10.3f}  {target:<36}{backbone:>14}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_const", const="full", dest="preset",
                      help="the paper's shapes (default on CUDA)")
    size.add_argument("--full-dinov3", action="store_const", const="full_dinov3", dest="preset",
                      help="the paper's shapes on DINOv3's ViT-L/16")
    size.add_argument("--small", action="store_const", const="small", dest="preset",
                      help="reduced shapes for a CPU (default on CPU)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measure")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--precision", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                        help="as in training; auto: fp16 autocast with loss scaling on CUDA, fp32 on CPU")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers to this JSON file")
    parser.add_argument("--measures", nargs="+", choices=MEASURE_GROUPS, default=list(MEASURE_GROUPS),
                        help="measure only these (default: all)")
    for field, kind in (("arch", str), ("resolution", int), ("batch", int), ("num_codebook", int),
                        ("projection_dim", int), ("bank_capacity", int)):
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind,
                            help=f"override the preset's {field}")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but no CUDA device is available")
    preset = args.preset or ("full" if device.type == "cuda" else "small")
    shapes = replace(PRESETS[preset], **{field: getattr(args, field) for field in Shapes.__dataclass_fields__
                                         if getattr(args, field) is not None})
    results = run(shapes, device, args.steps, args.warmup, args.precision, args.measures)
    results["preset"] = preset
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
