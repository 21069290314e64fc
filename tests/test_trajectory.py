"""The training loops follow the official ones step for step (tests/golden/trajectory.pt).

Each test builds the step's real Training object (utils/engine/front_door.py, mediator.py,
fine_tune.py) as its `train` does, from the golden file's rule-made weights, and drives it as the
engine's loop (`fit`) does: `losses(batch, random)`, `update(losses, random)`, `end_epoch()` after
every step (each official step is one epoch). The deterministic settings of the recording:
`RecordedRandom` (tests/trajectory.py: the project's BatchRandom with no dropout and a bank that keeps
the first half of each prototype's tokens), `grid=False`, and the fixed batch (the golden images 0..3
every step).

Tolerances (tests/trajectory.py, where their rationale is): float32 rounding accumulated over the
steps, 1e-5 relative for step 1's losses, gradient norms and activations (STEP1_RTOL), 1e-4 relative
for later steps and every tensor summary (RTOL), with an absolute floor of 1e-6 per element (ATOL,
·√n for sums and norms); codebook indices, bank counts and which tensors changed exactly, lrs to
1e-12. The copy-instead-of-share teacher exceeds them by ~1000x (test below).

The backbone the steps call is the stand-in ViT-S/16 the golden was recorded with, run once per
resolution (it is frozen and sees the same batch every step): `CachedBackbone` returns its tokens,
and only for that batch. The tokens themselves are compared with the golden `step1.tokens`.
"""
import io

import pytest
import torch

from loader import DATASETS
from loader.samplers import BatchShare
from modules.bank import ConceptBank
from modules.heads import build_segment
from modules.probe import ClusterModule
from modules.quantize import quantize_index
from modules.randomness import mixed_seed
from trajectory import (CASES, CLUSTER_PREFIX, RecordedRandom, assert_no_difference, bank_summary, compare_case,
                        compare_states, compare_step, compare_step1, golden_batch, golden_tokens, load_rule_weights,
                        load_trajectory, project_grads, project_state, record_forward_calls, rule_weights,
                        stand_in_backbone)
from utils.engine.fine_tune import FineTuneTraining, set_trainable
from utils.engine.front_door import FrontDoorTraining
from utils.engine.mediator import MediatorTraining
from utils.engine.optim import Precision
from utils.runtime.distributed import BatchGroup
from utils.runtime.recipe import CAUSE_OPTIMISATION

DIM, REDUCED_DIM, PROJECTION_DIM, NUM_CODEBOOK, PATCH = 384, 90, 2048, 2048, 16
CPU = torch.device("cpu")
OPTIMISATION = CAUSE_OPTIMISATION["cocostuff27"]  # the golden's data set: its clipping and weight decay are official
N_CLASSES = DATASETS["cocostuff27"].n_classes
LR = 1e-3  # one process: the paper recipe's lr
SEED = 0  # nothing is drawn with dropout and the random cut off; the seed only follows fit's form


@pytest.fixture(scope="module")
def golden():
    return load_trajectory()


class CachedBackbone(torch.nn.Module):
    """The frozen stand-in backbone's tokens of the golden batch: the steps call their backbone on that
    batch every step, and recomputing the ViT each time would only cost time. Any other input fails."""

    def __init__(self, images, tokens):
        super().__init__()
        self.images, self.tokens = images, tokens
        self.calls = 0

    def forward(self, images):
        assert torch.equal(images, self.images), "the trajectory steps see the golden batch only"
        self.calls += 1
        return self.tokens.clone()


@pytest.fixture(scope="module")
def inputs(golden, tmp_path_factory):
    """resolution -> (images, labels, CachedBackbone); the stand-in ViT runs once per resolution."""
    backbone = stand_in_backbone(tmp_path_factory.mktemp("backbone"))
    cache = {}

    def at(resolution):
        if resolution not in cache:
            images, labels = golden_batch(golden["inputs"], resolution)
            cache[resolution] = images, labels, golden_tokens(backbone, golden["inputs"], resolution)
        images, labels, tokens = cache[resolution]
        return images, labels, CachedBackbone(images, tokens)

    return at


def batch_random(step):
    """The step's draws as fit makes them (one process holding the whole batch of 4), with the
    recording's settings: dropout off, the bank's cut keeping the first half in (image, token) order."""
    return RecordedRandom(mixed_seed(SEED, step, 0, -1), BatchShare(0, 4, 4), CPU)


def num_queries(case):
    return (case["resolution"] // PATCH) ** 2


def learning_rates(optimizers):
    return [group["lr"] for optimizer in optimizers for group in optimizer.param_groups]


# ----------------------------------------------------------------------------- the three steps


class FrontDoor:
    """The front door as utils/engine/front_door.py `train` builds it, on the golden weights."""

    def __init__(self, case, head, backbone):
        self.weights = rule_weights(case)
        self.codebook = self.weights[CLUSTER_PREFIX + "codebook"]
        self.segment = build_segment(head, DIM, REDUCED_DIM, PROJECTION_DIM, N_CLASSES, num_queries(case),
                                     self.codebook, CPU)
        load_rule_weights(self.weights, self.segment)
        self.bank = ConceptBank(NUM_CODEBOOK, PROJECTION_DIM, device=CPU, compact=True)
        optimizer = torch.optim.Adam(self.segment.student_parameters(), lr=LR, weight_decay=OPTIMISATION.weight_decay)
        self.training = FrontDoorTraining(backbone, self.segment, self.codebook, self.bank, optimizer,
                                          OPTIMISATION.front_door_clip[head], Precision("fp32", CPU), BatchGroup(False),
                                          N_CLASSES, grid=False)
        self.optimizers = [optimizer]

    def state(self):
        # The front door holds the clusterbook as a plain tensor and has no cluster probe: the golden's
        # cluster.cluster_probe is the rule value it never touches.
        codebook, probe = CLUSTER_PREFIX + "codebook", CLUSTER_PREFIX + "cluster_probe"
        return project_state(self.segment, extra={codebook: self.codebook, probe: self.weights[probe]})

    def grads(self):
        return project_grads(self.segment)

    def named_losses(self, losses):
        return {"total": losses["loss"], "front": losses["contrastive"], "linear": losses["probe_cross_entropy"]}

    def step1(self, tokens, losses, calls):
        outputs = {f"{module}#{call}": out for module, call, out in calls}
        return {"tokens": tokens, "proj_feat": outputs["projection_head#1"],
                "proj_feat_ema": outputs["projection_head_ema#1"], "forward_calls": calls,
                "codebook_index": quantize_index(tokens, self.codebook), "ce_valid_pixels": int(losses["counted"])}

    def before_step(self):
        return {"bank_rows_used": int(self.bank.count.sum())}

    def after_step(self, done):
        return {"grad_norm_before_clip": float(done["grad_norm_before_clip"]),
                "clip_max_norm": self.training.clip_norm, "bank": bank_summary(self.bank)}


class Mediator:
    """The mediator as utils/engine/mediator.py `train` builds it, from the golden codebook."""

    def __init__(self, case, backbone):
        self.weights = rule_weights(case)
        self.codebook = torch.nn.Parameter(self.weights[CLUSTER_PREFIX + "codebook"].clone())
        optimizer = torch.optim.Adam([self.codebook], lr=LR)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.2)
        self.training = MediatorTraining(backbone, self.codebook, optimizer, scheduler, Precision("fp32", CPU),
                                         BatchGroup(False), grid=False)
        self.optimizers = [optimizer]

    def state(self):
        # The official mediator trains a Cluster module whose cluster_probe never gets a gradient; the
        # project's mediator has only the clusterbook: the probe is the rule value throughout.
        probe = CLUSTER_PREFIX + "cluster_probe"
        return project_state(extra={CLUSTER_PREFIX + "codebook": self.codebook, probe: self.weights[probe]})

    def grads(self):
        return project_grads(extra={CLUSTER_PREFIX + "codebook": self.codebook})

    def named_losses(self, losses):
        # The golden's `modularity` is the loss, −Q; the project's "modularity" is Q itself.
        return {"total": losses["loss"], "modularity": -losses["modularity"]}

    def step1(self, tokens, losses, calls):
        return {"tokens": tokens, "modularity_input": tokens}  # grid off: the loss sees every token

    def before_step(self):
        return {}

    def after_step(self, done):
        return {}


class FineTune:
    """Fine-tuning as utils/engine/fine_tune.py `train` builds it with --label_leak (the official
    behaviour the golden records), from the golden segment and cluster weights."""

    def __init__(self, case, head, backbone):
        self.weights = rule_weights(case)
        codebook = self.weights[CLUSTER_PREFIX + "codebook"]
        self.segment = build_segment(head, DIM, REDUCED_DIM, PROJECTION_DIM, N_CLASSES, num_queries(case),
                                     codebook, CPU)
        self.cluster = ClusterModule(NUM_CODEBOOK, DIM, REDUCED_DIM, N_CLASSES)
        load_rule_weights(self.weights, self.segment, self.cluster)
        self.codebook = self.cluster.codebook
        segment_trained = set_trainable(self.segment, label_leak=True)
        self.optimizers = [torch.optim.Adam(segment_trained, lr=LR, weight_decay=OPTIMISATION.weight_decay),
                           torch.optim.Adam([self.cluster.cluster_probe], lr=LR)]
        schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in self.optimizers]
        self.training = FineTuneTraining(backbone, self.segment, self.cluster, segment_trained, self.optimizers,
                                         schedulers, OPTIMISATION.fine_tune_clip[head], Precision("fp32", CPU),
                                         BatchGroup(False), N_CLASSES, grid=False)

    def state(self):
        return project_state(self.segment, self.cluster)

    def grads(self):
        return project_grads(self.segment, self.cluster)

    def named_losses(self, losses):
        # The golden's `modularity` is the loss, −Q; the project's "modularity" is Q itself.
        return {"total": losses["loss"], "modularity": -losses["modularity"], "linear": losses["probe_cross_entropy"]}

    def step1(self, tokens, losses, calls):
        features = next(out for module, call, out in calls if module == "head_ema")
        computed = {"tokens": tokens, "modularity_input": features, "forward_calls": calls,
                    "ce_valid_pixels": int(losses["counted"])}
        if self.segment.head_type == "tr":
            computed["codebook_index"] = quantize_index(tokens, self.codebook)
        return computed

    def before_step(self):
        return {}

    def after_step(self, done):
        return {"grad_norm_before_clip": float(done["grad_norm_before_clip"]),
                "clip_max_norm": self.training.clip[1]}


def make_step(name, case, backbone):
    if name == "mediator":
        return Mediator(case, backbone)
    kind, head = name.rsplit("_", 1)
    return (FrontDoor if kind == "front_door" else FineTune)(case, head, backbone)


def run_steps(run, batch, steps, after_update=None):
    """Drive `run.training` as fit does for `steps` (1-based step numbers): one batch per epoch, so
    end_epoch after every step. Returns (one `computed` dict per step for compare_step, step-1 activations)."""
    records, step1 = [], None
    backbone, training = run.training.backbone, run.training
    for step in steps:
        random = batch_random(step - 1)
        computed = run.before_step()
        segment = getattr(run, "segment", None)
        if step == 1 and segment is not None:
            with record_forward_calls(segment) as calls:
                losses = training.losses(batch, random)
        else:
            calls, losses = [], training.losses(batch, random)
        if step == 1:
            step1 = run.step1(backbone.tokens, losses, calls)
        computed["lr"] = learning_rates(run.optimizers)  # the lr this step uses, before the scheduler moves it
        done = training.update(losses, random)
        if after_update is not None:
            after_update(step)
        computed.update({name: value.detach().item() for name, value in run.named_losses(losses).items()})
        computed.update(run.after_step(done), state=run.state(), grads=run.grads())
        training.end_epoch()
        records.append(computed)
    return records, step1


def run_case(golden, inputs, name):
    """The whole recorded case: (init state, step-1 activations, steps, final state, final bank or None)."""
    case = golden["cases"][name]
    images, labels, backbone = inputs(case["resolution"])
    run = make_step(name, case, backbone)
    init = run.state()
    steps, step1 = run_steps(run, {"img": images, "label": labels}, range(1, len(case["steps"]) + 1))
    bank = bank_summary(run.bank) if isinstance(run, FrontDoor) else None
    assert backbone.calls == len(case["steps"])
    return case, init, step1, steps, run.state(), bank


@pytest.mark.parametrize("name", CASES)
def test_training_step_matches_official_trajectory(golden, inputs, name):
    """Every recorded quantity of every step: losses and their parts, lrs, gradient norms (before and
    after clipping), each tensor's sum, norm and sampled values after every step, the step-1
    activations, the bank's counts and row sums (front door), the initial and final states and
    which tensors changed."""
    case, init, step1, steps, final, bank = run_case(golden, inputs, name)
    assert_no_difference(compare_case(case, init, step1, steps, final, bank))


# ----------------------------------------------------------------------------- the front door's teacher


@pytest.mark.parametrize("name", ["front_door_tr", "front_door_mlp"])
def test_copy_instead_of_share_teacher_fails(golden, inputs, name):
    """The tolerance is tight enough to see the known defect: a teacher that is a copy of the student
    (not its shared storage) moves only 1% of the way in step 1, teacher = 0.99·t₀ + 0.01·s₁. Driven
    that way (the teacher corrected after the real step-1 update), the comparison must fail first at
    step 1 on the teacher's tensors, by far more than the allowance, and step 2's losses, which the
    teacher's projections and features feed, must differ too."""
    case = golden["cases"][name]
    images, labels, backbone = inputs(case["resolution"])
    run = make_step(name, case, backbone)
    teacher_keys = [k for k in case["keys"] if k.startswith(("head_ema.", "projection_head_ema."))]
    init = run.state()

    def copy_teacher(step):
        if step == 1:  # the plain EMA from the pre-step teacher, in place of the engine's first-step one
            with torch.no_grad():
                state = run.segment.state_dict(keep_vars=True)
                for key in teacher_keys:
                    state[key].copy_(0.99 * init[key] + 0.01 * state[key.replace("_ema.", ".", 1)])

    steps, step1 = run_steps(run, {"img": images, "label": labels}, (1, 2), after_update=copy_teacher)
    differences = compare_states(case, "init", init) + compare_step1(case, step1) + compare_step(case, 1, steps[0])
    assert differences, "the copy-instead-of-share teacher matched the golden: the tolerance is too loose"
    assert all(d.where == "step 1" and quantity_key(d) in teacher_keys for d in differences), \
        "\n".join(str(d) for d in differences if d.where != "step 1" or quantity_key(d) not in teacher_keys)
    worst = max(d.error / d.allowed for d in differences)
    assert worst > 100, f"the defect exceeds the allowance by only {worst:.3g}x"
    later = {d.quantity for d in compare_step(case, 2, steps[1])}
    assert {"total", "front", "linear"} <= later, sorted(later)[:10]


def quantity_key(difference):
    """The tensor a Difference is about: `values[head_ema.f1.bias][13]` -> `head_ema.f1.bias`."""
    return difference.quantity.partition("[")[2].partition("]")[0]


# ----------------------------------------------------------------------------- resuming


def resumed_from(run, name, case, backbone):
    """A fresh Training made from the rule weights that continues where `run` stands, as fit resumes:
    the training state goes through torch.save / torch.load as ResumeState writes and reads it; the
    bank's state (ResumeState's per-process file) is handed over in memory, loaded by the same
    load_process_state: its fixed buffer is 1.6 GB at the official sizes, whatever it holds."""
    buffer = io.BytesIO()
    torch.save({"training": run.training.state_dict()}, buffer)
    buffer.seek(0)
    resumed = make_step(name, case, backbone)
    resumed.training.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=False)["training"])
    resumed.training.load_process_state(run.training.process_state())
    return resumed


def assert_same_steps(uninterrupted, resumed, first_step):
    """Bit for bit: losses, lrs, gradient norms and gradients, every tensor, and the bank."""
    for step, (a, b) in enumerate(zip(uninterrupted, resumed, strict=True), first_step):
        for quantity in ("total", "front", "linear", "grad_norm_before_clip", "bank_rows_used", "lr"):
            assert a[quantity] == b[quantity], (step, quantity)
        for key in a["state"]:
            assert torch.equal(a["state"][key], b["state"][key]), (step, key)
            grads = a["grads"].get(key), b["grads"].get(key)
            assert (grads[0] is None and grads[1] is None) or torch.equal(*grads), (step, key)
        assert all(torch.equal(x, y) for x, y in zip(a["bank"], b["bank"], strict=True)), step


def test_resume_keeps_front_door_trajectory_exact(golden, inputs):
    """Resuming after step 1 or step 3 gives the remaining steps bit for bit as the uninterrupted run,
    and so the golden's: the teacher's first-step behaviour is neither repeated nor lost by resuming
    (`steps_done` travels in the training state)."""
    name = "front_door_mlp"  # the cheaper head: resuming is the same code for both
    case = golden["cases"][name]
    images, labels, backbone = inputs(case["resolution"])
    batch = {"img": images, "label": labels}
    whole = make_step(name, case, backbone)
    uninterrupted = run_steps(whole, batch, (1,))[0]
    resumed = resumed_from(whole, name, case, backbone)
    assert resumed.training.steps_done == 1
    after_1 = run_steps(resumed, batch, range(2, 7))[0]
    del resumed  # one bank buffer less
    uninterrupted += run_steps(whole, batch, (2, 3))[0]
    resumed = resumed_from(whole, name, case, backbone)
    assert resumed.training.steps_done == 3
    uninterrupted += run_steps(whole, batch, (4, 5, 6))[0]
    after_3 = run_steps(resumed, batch, (4, 5, 6))[0]

    assert_same_steps(uninterrupted[1:], after_1, 2)
    assert_same_steps(uninterrupted[3:], after_3, 4)
    assert_no_difference([d for step in range(2, 7) for d in compare_step(case, step, after_1[step - 2])])
