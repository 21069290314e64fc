"""Harness for tests/golden/trajectory.pt: the step-by-step records of the official training loops.

The golden file (its README, section "trajectory.pt") stores no inputs in network form and no
weights: both follow from rules, which this module implements, together with the recorded
summaries and the comparison of a recorded step with what the project computed.

- `golden_batch`: the normalised image batch and int64 labels (-1 = ignore) at 320 or 224 px.
- `rule_weights` / `load_rule_weights`: the rule-made initial weights of a case and their loading
  into the project's SegmentModule / ClusterModule.
- `summary`: the golden summary of one tensor.
- `bank_summary`, `project_state`, `project_grads`, `record_forward_calls`: what the project holds,
  in the golden file's names.
- `compare_*`: lists of `Difference`, in recording order; `assert_no_difference` fails on the
  first one, naming the step, the quantity, the key and by how much it is off. `compare_number`,
  `compare_tensor` (element by element), `compare_exact` (integer maps) and `compare_summary` also
  serve tests/test_trajectory_primaps.py (tests/golden/trajectory_primaps.pt), as does
  `stand_in_backbone` for its featurizer.
- `RecordedRandom`: a step's draws with the settings the official loops were recorded with.

No test lives here; the tests that drive the training steps import it.
"""
import math
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from conftest import GOLDEN

from modules.randomness import BatchRandom

GOLDEN_NAME = "trajectory.pt"
CASES = ("front_door_tr", "front_door_mlp", "mediator", "fine_tune_tr", "fine_tune_mlp")
IGNORE = -1
# The 224-px cases see the centre crop of the 320-px arrays.
CROP = {320: slice(0, 320), 224: slice(48, 272)}
CLUSTER_PREFIX = "cluster."
# The EMA copies start as their source: the weight rule reads the student's key for them.
EMA_SOURCES = (("head_ema.", "head."), ("projection_head_ema.", "projection_head."))
ONES_SUFFIXES = (".norm1.weight", ".norm2.weight", ".norm3.weight")
WEIGHT_SCALE = np.float32(0.02)
SAMPLES = 8

# Tolerances. The project runs the same float32 CPU arithmetic on the same tokens (bitwise equal to
# the golden's), but not in the same order (batched contrastive loss, chunked modularity arg-max,
# batch-first attention), so results agree to float32 rounding amplified by the network, not bitwise.
# Observed worst error/allowance over all five cases is quoted: first from an exploration of the old
# code with the teacher aliasing emulated, then [with the real step code, tests/test_trajectory.py,
# 2 threads as the golden / 1 thread].
# - Step 1 (losses, gradient norms, activations): one forward/backward from identical weights and
#   tokens; rounding stays near 1e-6 relative (worst 12%: a sampled value of the TR head's output;
#   [6.5% / 16%: sampled values of the TR / MLP head's output]).
STEP1_RTOL = 1e-5
# - Later steps and every parameter summary: Adam turns rounding of a small gradient into a larger
#   difference of its update. Worst 52%: the sum of the TR head's linear1.weight, off by 2.4e-3 after
#   step 1 because one FFN pre-activation (|z| ~ 6e-8) rounds to the other side of the ReLU and a few
#   elements whose gradient nearly cancels Adam's L2 term (grad ≈ -1e-4·w) flip their ±lr update (a
#   float64 run agrees with the golden there). [9.9%: a sampled value of the TR head's linear1.bias
#   after step 6 / 28%: the sum of the MLP head's f2.0.bias after step 6.] The copy-instead-of-share
#   EMA teacher (the known front-door defect) is off by ~1e-3 on weights of scale 0.02 and fails by
#   ~100x (step-1 teacher sums, step-2 losses) [step 1: 900-2600x on the teacher's tensors; step 2:
#   total 39x / 140x, front 78x / 257x, linear 17x / 16x (MLP / TR)].
RTOL = 1e-4
# - Absolute floor per element, for values near zero (biases start at 0 and move by ~lr = 1e-3 per
#   step). Adam moves an element by lr·g/(|g| + eps): where |g| is within a few eps = 1e-8 of zero, a
#   rounding error δg of its gradient moves it by up to lr·δg/eps (~1e-6 for δg ~ 1e-11). Such
#   gradients exist: the TR cross-attention's query bias has Σ_j ∂L/∂s_ij = 0 built in and its
#   gradient cancels to ~1e-9 for some elements. Sums and norms of n elements get ATOL·sqrt(n), the
#   size of n independent per-element errors (observed: 1.1e-5 on the 768 q/v biases, floor 2.8e-5).
ATOL = 1e-6
# Step-1 activations that the golden records as summaries, by name in `step1`.
STEP1_TENSORS = ("tokens", "proj_feat", "proj_feat_ema", "modularity_input")
# Scalars of a step record other than losses.
STEP_SCALARS = ("grad_norm_before_clip", "clip_max_norm", "bank_rows_used")
LOSSES = ("total", "front", "linear", "modularity")


class RecordedRandom(BatchRandom):
    """A step's draws with the settings the official loops were recorded with (tests/golden/README.md,
    trajectory.pt): every dropout keeps everything, and the bank keeps the first half of each prototype's
    tokens in (image, token) order. Neither draws from the generator."""

    def dropout(self, x, p):
        return x

    def channel_dropout(self, x, p):
        return x

    def permutation(self, n):
        return torch.arange(n, device=self.device)


def load_trajectory():
    """The golden record (plain dicts, lists, floats and tensors)."""
    return torch.load(GOLDEN / GOLDEN_NAME, weights_only=True)


# ----------------------------------------------------------------------------- inputs


def golden_batch(inputs, resolution):
    """(images [4,3,R,R] float32 normalised, labels [4,R,R] int64 with -1 = ignore) for R = 320 or 224.

    x[b,c,h,w] = (float32(images[b,h,w,c]) / 255 - mean[c]) / std[c], every step in float32.
    """
    crop = CROP[resolution]
    images = inputs["images"][:, crop, crop].permute(0, 3, 1, 2).float()
    mean = torch.tensor(inputs["mean"], dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(inputs["std"], dtype=torch.float32).view(1, 3, 1, 1)
    images = (images / 255 - mean) / std
    labels = inputs["labels"][:, crop, crop].long()
    labels[labels == inputs["ignore"]] = IGNORE
    return images.contiguous(), labels.contiguous()


def stand_in_backbone(directory, arch="dino_vit_small_16", dino_small_heads=12):
    """The stand-in backbone of `arch` (default: DINO ViT-S/16 with 12 heads, as trajectory.pt), loaded
    from a release file in `directory`."""
    from models import load_backbone
    from models.stand_in import stand_in_release

    path = directory / f"{arch}.pth"
    torch.save(stand_in_release(arch), path)
    return load_backbone(path, arch, dino_small_heads)


@torch.no_grad()
def golden_tokens(backbone, inputs, resolution):
    """Backbone patch tokens [4, P, 384] of the golden batch at `resolution` (compute once, reuse)."""
    return backbone(golden_batch(inputs, resolution)[0])


# ----------------------------------------------------------------------------- weights


def _generator(text):
    return np.random.Generator(np.random.PCG64(zlib.crc32(text.encode())))


def rule_source(key):
    """The key whose seed makes `key`: no `cluster.` prefix, and the EMA copies read their student's."""
    key = key.removeprefix(CLUSTER_PREFIX)
    for ema, source in EMA_SOURCES:
        if key.startswith(ema):
            return source + key[len(ema):]
    return key


def rule_tensor(key, shape):
    """The rule-made initial value of one key of a case (float32 CPU tensor)."""
    source = rule_source(key)
    x = _generator("traj/" + source).standard_normal(tuple(shape)).astype(np.float32)
    if source.endswith("bias"):
        x = np.zeros_like(x)
    elif source.endswith(ONES_SUFFIXES):
        x = np.ones_like(x)
    elif source != "codebook":
        x = x * WEIGHT_SCALE
    return torch.from_numpy(x)


def rule_weights(case):
    """{key: tensor} for every key of the case, in the case's key order."""
    return {key: rule_tensor(key, shape) for key, shape in zip(case["keys"], case["shapes"], strict=True)}


def split_weights(weights):
    """(segment state dict, cluster state dict): the golden keys without / with the `cluster.` prefix
    (the prefix dropped: `codebook`, `cluster_probe`, as ClusterModule names them)."""
    segment = {k: v for k, v in weights.items() if not k.startswith(CLUSTER_PREFIX)}
    cluster = {k.removeprefix(CLUSTER_PREFIX): v for k, v in weights.items() if k.startswith(CLUSTER_PREFIX)}
    return segment, cluster


@torch.no_grad()
def load_rule_weights(weights, segment=None, cluster=None):
    """Load rule weights into the project's modules.

    segment: a SegmentModule; its state dict has exactly the official names (strict load). The TR
    heads also get the codebook (`cluster.codebook`, a non-persistent buffer set by set_codebook).
    cluster: a ClusterModule; `codebook` is a buffer there (a parameter in the official Cluster),
    `cluster_probe` a parameter; both load by name.
    """
    segment_state, cluster_state = split_weights(weights)
    if segment is not None:
        segment.load_state_dict(segment_state, strict=True)
        segment.set_codebook(cluster_state["codebook"].clone())
    if cluster is not None:
        cluster.load_state_dict(cluster_state, strict=True)


# ----------------------------------------------------------------------------- summaries


def sample_index(key, numel):
    """The 8 flat indices (int64, may repeat) at which the golden samples the tensor named `key`."""
    return torch.from_numpy(_generator("traj/idx/" + key).integers(0, numel, size=SAMPLES).astype(np.int64))


def key_third(numel):
    """The flat index range of the key-bias third of a MultiheadAttention in_proj_bias."""
    dim = numel // 3
    return range(dim, 2 * dim)


def _qv(flat):
    third = key_third(flat.numel())
    return torch.cat([flat[:third.start], flat[third.stop:]])


def summary(tensor, key):
    """The golden summary of `tensor` named `key` (float64 sum and norm, values at the sampled indices,
    and for `*in_proj_bias` the sums without the key third and that third's max |value|)."""
    t = tensor.detach().cpu()
    flat = t.reshape(-1)
    wide = flat.double()
    index = sample_index(key, flat.numel())
    out = {"shape": tuple(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sum": wide.sum().item(),
           "norm": wide.norm().item(), "index": index, "values": flat[index].clone()}
    if key.endswith("in_proj_bias"):
        third = key_third(flat.numel())
        out.update(sum_qv=_qv(wide).sum().item(), norm_qv=_qv(wide).norm().item(),
                   key_part_max_abs=flat[third.start:third.stop].abs().max().item())
    return out


# ----------------------------------------------------------------------------- project state


def project_state(segment=None, cluster=None, extra=None):
    """{golden key: copy of the tensor} of what the project holds now: the segment state dict,
    `cluster.` + the ClusterModule state dict, then `extra` (golden key -> tensor) for what the
    project keeps elsewhere (e.g. the front door's plain codebook tensor, the mediator's codebook
    Parameter, the front door's never-used cluster probe: its rule value)."""
    state = {}
    if segment is not None:
        state.update(segment.state_dict())
    if cluster is not None:
        state.update({CLUSTER_PREFIX + k: v for k, v in cluster.state_dict().items()})
    state.update(extra or {})
    return {k: v.detach().clone() for k, v in state.items()}


def project_grads(segment=None, cluster=None, extra=None):
    """{golden key: copy of the gradient, or None} of every parameter (buffers have none): read it
    after the optimiser step, when `.grad` is what the optimiser consumed (clipped; Adam's L2 decay
    does not write into `.grad`). `extra`: golden key -> parameter held elsewhere."""
    grads = {}
    if segment is not None:
        grads.update({k: p.grad for k, p in segment.named_parameters()})
    if cluster is not None:
        grads.update({CLUSTER_PREFIX + k: p.grad for k, p in cluster.named_parameters()})
    grads.update({k: p.grad for k, p in (extra or {}).items()})
    return {k: None if g is None else g.detach().clone() for k, g in grads.items()}


class BankSummary(NamedTuple):
    counts: torch.Tensor  # int32 [K]: rows stored per prototype
    row_sum: torch.Tensor  # float64 [K]: sum of all elements of the prototype's rows
    row_norm: torch.Tensor  # float64 [K]: their L2 norm
    row_abs_sum: torch.Tensor  # float64 [K]: their L1 norm (the scale of the row sum's rounding)


@torch.no_grad()
def bank_summary(bank):
    """The golden's per-prototype summary of a ConceptBank, in float64, over the stored rows only."""
    valid = bank.valid()
    prototype = torch.nonzero(valid)[:, 0]
    rows = bank.values[valid].double()  # only the stored rows: the full buffer is K·capacity rows
    zeros = torch.zeros(bank.num_prototypes, dtype=torch.float64, device=rows.device)

    def per_prototype(x):
        return zeros.index_add(0, prototype, x).cpu()

    return BankSummary(bank.count.int().cpu(), per_prototype(rows.sum(1)), per_prototype(rows.square().sum(1)).sqrt(),
                       per_prototype(rows.abs().sum(1)))


@contextmanager
def record_forward_calls(segment, names=("head", "head_ema", "projection_head", "projection_head_ema", "linear")):
    """Within the block, the outputs of the segment's sub-modules `names` in call order, as a list of
    (module, call number from 1, output tensor): the golden `step1.forward_calls`."""
    calls, counts, hooks = [], {}, []

    def hook(name):
        def record(module, args, output):
            counts[name] = counts.get(name, 0) + 1
            calls.append((name, counts[name], output.detach().clone()))
        return record

    for name in names:
        hooks.append(getattr(segment, name).register_forward_hook(hook(name)))
    try:
        yield calls
    finally:
        for handle in hooks:
            handle.remove()


# ----------------------------------------------------------------------------- comparisons


@dataclass
class Difference:
    where: str  # "init", "step 3", "step 1 activations", "final", ...
    quantity: str  # e.g. "state_sum[head.tr.f1.weight]", "total", "bank_counts[17]"
    golden: object
    project: object
    error: float  # |golden - project| (inf for a structural mismatch)
    allowed: float

    def __str__(self):
        return (f"{self.where}: {self.quantity} differs: golden {self.golden}, project {self.project}, "
                f"|diff| {self.error:.3g} > allowed {self.allowed:.3g}")


def _off(a, b):
    """|a - b| for numbers, treating two NaNs (no gradient) as equal and a single NaN as infinitely off."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    return abs(a - b)


def _number(out, where, quantity, golden, project, rtol, atol, scale=0.0):
    """Append a Difference when |golden - project| > atol + rtol·(|golden| + scale)."""
    golden, project = float(golden), float(project)
    allowed = atol + rtol * ((0.0 if math.isnan(golden) else abs(golden)) + scale)
    error = _off(golden, project)
    if error > allowed:
        out.append(Difference(where, quantity, golden, project, error, allowed))


def _structure(out, where, quantity, golden, project):
    out.append(Difference(where, quantity, golden, project, math.inf, 0.0))


def compare_number(where, quantity, golden, project, rtol, atol):
    """[] or [the Difference] of two numbers: |golden - project| > atol + rtol·|golden|; two NaNs agree."""
    out = []
    _number(out, where, quantity, golden, project, rtol, atol)
    return out


def compare_tensor(where, name, golden, project, rtol, atol):
    """Element by element, |golden - project| > atol + rtol·|golden| (two NaNs agree): [] or one Difference
    naming the element furthest beyond its allowance and how many elements are off."""
    golden, project = golden.detach().cpu(), project.detach().cpu()
    if tuple(golden.shape) != tuple(project.shape):
        return [Difference(where, f"shape[{name}]", tuple(golden.shape), tuple(project.shape), math.inf, 0.0)]
    expected, got = golden.double().reshape(-1), project.double().reshape(-1)
    both_nan = expected.isnan() & got.isnan()
    error = torch.where(both_nan, 0.0, (expected - got).abs().nan_to_num(math.inf))
    allowed = atol + rtol * expected.abs().nan_to_num(0.0)
    beyond = torch.where(error > allowed, error / allowed.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    off = int((error > allowed).sum())
    if not off:
        return []
    i = int(beyond.argmax())
    element = list(torch.unravel_index(torch.tensor(i), golden.shape)) if golden.dim() else []
    return [Difference(where, f"{name}[{', '.join(str(int(e)) for e in element)}] ({off} elements off)",
                       expected[i].item(), got[i].item(), error[i].item(), allowed[i].item())]


def compare_exact(where, name, golden, project):
    """Integer tensors (labels, class maps, counts) element by element, exactly: [] or one Difference
    naming the first differing element; its error is the number of differing elements."""
    golden, project = golden.detach().cpu().long(), project.detach().cpu().long()
    if tuple(golden.shape) != tuple(project.shape):
        return [Difference(where, f"shape[{name}]", tuple(golden.shape), tuple(project.shape), math.inf, 0.0)]
    differing = torch.nonzero(golden != project)
    if not len(differing):
        return []
    first = tuple(differing[0].tolist())
    return [Difference(where, f"{name}[{', '.join(map(str, first))}] ({len(differing)} elements differ)",
                       int(golden[first]), int(project[first]), len(differing), 0)]


def compare_summary(golden, tensor, key, where, rtol=RTOL, atol=ATOL, name=None):
    """Differences between a golden summary and the project's `tensor` named `key`.

    The sum is compared relative to |sum| + norm: a sum of many signed elements may cancel to
    near zero, while its error scales with the elements (typically |δ|, the norm of their errors).
    Sums and norms of n elements get the absolute floor atol·sqrt(n) (see ATOL).
    For `*in_proj_bias` the sums and norms without the key third are compared and the sampled
    values inside that third are ignored (its gradient is analytically zero; README caveat).
    """
    name = name or key
    out = []
    if tuple(golden["shape"]) != tuple(tensor.shape):
        _structure(out, where, f"shape[{name}]", tuple(golden["shape"]), tuple(tensor.shape))
        return out
    mine = summary(tensor, key)
    suffix = "_qv" if "sum_qv" in golden else ""
    norm = golden["norm" + suffix]
    n = tensor.numel() - (len(key_third(tensor.numel())) if suffix else 0)
    floor = atol * math.sqrt(n)
    _number(out, where, f"sum{suffix}[{name}]", golden["sum" + suffix], mine["sum" + suffix], rtol, floor, norm)
    _number(out, where, f"norm{suffix}[{name}]", norm, mine["norm" + suffix], rtol, floor)
    flat = tensor.detach().reshape(-1)
    ignored = key_third(flat.numel()) if suffix else range(0)
    for i, v in zip(golden["index"].tolist(), golden["values"].tolist(), strict=True):
        if i not in ignored:
            _number(out, where, f"values[{name}][{i}]", v, flat[i].item(), rtol, atol)
    return out


def compare_states(case, which, state, rtol=RTOL, atol=ATOL):
    """`which` = "init" or "final": every key's golden summary against the project's `state`."""
    out = []
    for key in case["keys"]:
        if key not in state:
            _structure(out, which, f"tensor[{key}]", "recorded", "missing")
            continue
        out += compare_summary(case[which][key], state[key], key, which, rtol, atol)
    return out


def compare_step1(case, computed, rtol=STEP1_RTOL, atol=ATOL):
    """Step-1 activations. `computed` may hold: tensors named as in STEP1_TENSORS, `codebook_index`
    ([B,P] int), `forward_calls` (list of (module, call, tensor), see record_forward_calls) and
    `ce_valid_pixels` (int). Every entry the golden `step1` records must be there."""
    golden, where, out = case["step1"], "step 1 activations", []
    for name in STEP1_TENSORS:
        if name in golden:
            if name not in computed:
                _structure(out, where, name, "recorded", "not computed")
            else:
                out += compare_summary(golden[name], computed[name], "step1/" + name, where, rtol, atol, name)
    if "codebook_index" in golden:
        out += compare_codebook_index(golden, computed.get("codebook_index"), where)
    if "forward_calls" in golden:
        out += compare_forward_calls(golden["forward_calls"], computed.get("forward_calls"), where, rtol, atol)
    if "ce_valid_pixels" in golden:
        project = computed.get("ce_valid_pixels")
        if project is None or int(project) != int(golden["ce_valid_pixels"]):
            _structure(out, where, "ce_valid_pixels", int(golden["ce_valid_pixels"]), project)
    return out


def compare_codebook_index(golden, index, where):
    """Exact match of every token's nearest prototype; a flip names the first tokens and their golden
    top-2 margins (near-ties, README caveat): the error is the number of flipped tokens."""
    if index is None:
        return [Difference(where, "codebook_index", "recorded", "not computed", math.inf, 0.0)]
    expected = golden["codebook_index"].long()
    index = index.detach().cpu().long().reshape(expected.shape)
    flipped = torch.nonzero(index != expected).tolist()
    if not flipped:
        return []
    margins = ", ".join(f"(image {b}, token {p}): margin {float(golden['codebook_top2_margin'][b, p]):.2g}"
                        for b, p in flipped[:3])
    (b, p) = flipped[0]
    return [Difference(where, f"codebook_index[{b}, {p}] ({len(flipped)} tokens flipped; {margins})",
                       int(expected[b, p]), int(index[b, p]), len(flipped), 0)]


def compare_forward_calls(golden_calls, calls, where, rtol=STEP1_RTOL, atol=ATOL):
    if calls is None:
        return [Difference(where, "forward_calls", "recorded", "not computed", math.inf, 0.0)]
    expected = [(c["module"], c["call"]) for c in golden_calls]
    got = [(module, call) for module, call, _ in calls]
    if expected != got:
        return [Difference(where, "forward_calls order", expected, got, math.inf, 0.0)]
    out = []
    for record, (module, call, tensor) in zip(golden_calls, calls, strict=True):
        name = f"{module}#{call}"
        out += compare_summary(record["out"], tensor, "step1/" + name, where, rtol, atol, name)
    return out


def compare_step(case, step, computed, rtol=None, atol=ATOL):
    """Differences between the golden record of step `step` (1-based) and `computed`, a dict with:

    - the losses the record holds (`total` and `front`/`linear`/`modularity`), floats;
    - `lr`: list of the lr of every param group (optimisers in the official order) used in the step;
    - `state`: {golden key: tensor} after the step (see project_state);
    - `grads`: {golden key: gradient or None} as the optimiser consumed it (see project_grads);
    - where recorded: `grad_norm_before_clip`, `clip_max_norm`, `bank_rows_used`, and
      `bank`: the BankSummary (see bank_summary) after the step's bank update.
    Every recorded quantity must be computed. rtol defaults to STEP1_RTOL for step 1's scalars
    (losses, gradient norms) and RTOL otherwise; states always use RTOL.
    """
    record = case["steps"][step - 1]
    where = f"step {step}"
    scalar_rtol = rtol if rtol is not None else (STEP1_RTOL if step == 1 else RTOL)
    state_rtol = rtol if rtol is not None else RTOL
    out = []

    def need(name):
        if name not in computed:
            _structure(out, where, name, "recorded", "not computed")
            return False
        return True

    for name in LOSSES:
        if name in record and need(name):
            _number(out, where, name, record[name], computed[name], scalar_rtol, atol)
    if need("lr"):
        if len(record["lr"]) != len(computed["lr"]):
            _structure(out, where, "lr (param groups)", record["lr"], computed["lr"])
        else:
            for i, (a, b) in enumerate(zip(record["lr"], computed["lr"], strict=True)):
                _number(out, where, f"lr[{i}]", a, b, 1e-12, 0.0)
    for name in STEP_SCALARS:
        if name in record and need(name):
            _number(out, where, name, record[name], computed[name], scalar_rtol, atol)
    if need("state"):
        out += _compare_state_record(case, record, computed["state"], where, state_rtol, atol)
    if need("grads"):
        for key, golden, grad in zip(case["keys"], record["grad_norm"].tolist(), _grad_norms(case, computed["grads"]),
                                     strict=True):
            _number(out, where, f"grad_norm[{key}]", golden, grad, scalar_rtol, atol)
    if "bank_counts" in record and need("bank"):
        out += compare_bank(record["bank_counts"], record["bank_row_sum"], computed["bank"], where, state_rtol, atol)
    return out


def _grad_norms(case, grads):
    """Per golden key: the float64 L2 norm of the gradient, NaN where there is none."""
    norms = []
    for key in case["keys"]:
        g = grads.get(key)
        norms.append(math.nan if g is None else g.detach().double().norm().item())
    return norms


def _compare_state_record(case, record, state, where, rtol, atol):
    """state_sum/state_norm (their _qv forms for in_proj_bias) and the sampled values of every key."""
    out = []
    for row, key in enumerate(case["keys"]):
        if key not in state:
            _structure(out, where, f"tensor[{key}]", "recorded", "missing")
            continue
        golden = {"shape": tuple(case["shapes"][row]), "index": case["index"][row],
                  "values": record["state_values"][row]}
        if key.endswith("in_proj_bias"):
            golden.update(sum_qv=record["state_sum_qv"][row].item(), norm_qv=record["state_norm_qv"][row].item())
        else:
            golden.update(sum=record["state_sum"][row].item(), norm=record["state_norm"][row].item())
        out += compare_summary(golden, state[key], key, where, rtol, atol)
    return out


def compare_bank(golden_counts, golden_row_sum, bank, where, rtol=RTOL, atol=ATOL):
    """Rows per prototype exactly; each prototype's row sum relative to |sum| + the L1 norm of its rows
    (`bank`: a BankSummary of the project's bank). Unlike a parameter tensor's elements, the rows are
    activations whose rounding errors are correlated (a row is off by a common relative ε), so a sum
    of thousands of them is off by up to ε·Σ|x| (observed 1.4e-4 of the L2 norm, 2e-6 of Σ|x|). The
    golden has no per-step row norms; the project's Σ|x| sets the scale."""
    off = torch.nonzero(bank.counts.int() != golden_counts.int()).flatten().tolist()
    if off:
        k = off[0]
        return [Difference(where, f"bank_counts[{k}] ({len(off)} prototypes differ)", int(golden_counts[k]),
                           int(bank.counts[k]), abs(int(golden_counts[k]) - int(bank.counts[k])), 0)]
    out = []
    for k in torch.nonzero(golden_counts > 0).flatten().tolist():
        _number(out, where, f"bank_row_sum[{k}]", golden_row_sum[k].item(), bank.row_sum[k].item(), rtol, atol,
                bank.row_abs_sum[k].item())
    return out


def compare_bank_final(case, bank, rtol=RTOL, atol=ATOL):
    """The final L2 norm of each prototype's stored rows (front-door cases); `bank`: a BankSummary."""
    out = []
    golden = case["bank_final_row_norm"]
    row_norm = bank.row_norm
    for k in range(golden.numel()):
        _number(out, "final", f"bank_final_row_norm[{k}]", golden[k].item(), row_norm[k].item(), rtol, atol)
    return out


def compare_changed(case, init, final):
    """The keys whose tensor changed at all, and the max |final - init| of each (golden `changed`,
    `max_abs_change`)."""
    out = []
    changed = [k for k in case["keys"] if not torch.equal(init[k], final[k])]
    if changed != list(case["changed"]):
        only_golden = [k for k in case["changed"] if k not in changed]
        only_project = [k for k in changed if k not in case["changed"]]
        _structure(out, "final", "changed keys (changed in one only)", only_golden[:5], only_project[:5])
    for key in case["keys"]:
        change = (final[key].double() - init[key].double()).abs().max().item()
        _number(out, "final", f"max_abs_change[{key}]", case["max_abs_change"][key], change, RTOL, ATOL)
    return out


def compare_case(case, init, step1, steps, final, bank=None):
    """Every recorded quantity of a case, in recording order: the initial state, the step-1
    activations, each step (`steps`: one `computed` dict per step, see compare_step), the final
    state with its changed keys and, for the front door, the final bank (a BankSummary)."""
    out = compare_states(case, "init", init) + compare_step1(case, step1)
    if len(steps) != len(case["steps"]):
        _structure(out, "steps", "number of steps", len(case["steps"]), len(steps))
    for i, computed in enumerate(steps[:len(case["steps"])], 1):
        out += compare_step(case, i, computed)
    out += compare_states(case, "final", final) + compare_changed(case, init, final)
    if "bank_final_row_norm" in case:
        if bank is None:
            _structure(out, "final", "bank_final_row_norm", "recorded", "not computed")
        else:
            out += compare_bank_final(case, bank)
    return out


def assert_no_difference(differences, shown=10):
    """Fail with the first difference (step, quantity, key, magnitude), and a few more for context."""
    if differences:
        listed = "\n  ".join(str(d) for d in differences[:shown])
        raise AssertionError(f"{len(differences)} recorded quantities differ; first:\n  {listed}")
