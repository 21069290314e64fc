"""PriMaPs-EM follows the official training loop step for step (tests/golden/trajectory_primaps.pt).

The golden file records the official `UnsupervisedSegmenter.training_step` (visinf/primaps `train.py`)
through both stages: the initialisation (`--pcainit --train-state baseline`: linear probe + cosine
k-means, 6 steps) and EM (41 steps, θ_M updated after the steps that 10, 20, 30 and 40 batches
preceded). Each test builds the project's real Training object (utils/engine/primaps.py: KMeansTraining
for the initialisation, PriMaPsTraining for EM) as `initialise` / `train` build it, from the golden
initial weights, and drives it as `fit` does: per batch `losses(batch, random)` then
`update(losses, random)` with a BatchRandom of a one-process BatchShare, `end_epoch()` after the
epoch (all the recorded steps are one epoch). What differs from a run is injected: the featurizer is
the recorded `features` (StoredFeatures; the project's own ViT is compared with them separately), and
the views are the recording's (GivenViews: its rule-made student views, no flip), set as the
PriMaPsTraining's `views` in place of its AugmentedViews.

What the steps compute inside (the E-step's θ_M logits and labels, the focal loss's inputs, the
probe's and the k-means' inputs) is read by wrapping the functions the engine calls (`Spy`).

Beside the comparison itself: θ_M's former schedule (one batch early) must fail it; a Training resumed
from its state_dict must continue bit for bit; the init stage's losses of a batch split over two
processes must add up to the whole batch's (their denominators are the global batch's pixels).

Tolerances (golden README, "Tolerances"): fed the recorded features, losses within 1e-5 relative and
every traced tensor within 1e-5 absolute; the pseudo labels and class maps exactly (θ_M's top-2 logit
margin is ≥ 5e-5 everywhere and the mask votes' ≥ 11 pixels). The measured worst errors are quoted
beside each tolerance.
"""
import io
import math
import zlib

import pytest
import torch
from conftest import GOLDEN
from torch import nn
from trajectory import (Difference, assert_no_difference, compare_exact, compare_number, compare_summary,
                        compare_tensor, stand_in_backbone)

import utils.engine.primaps as engine
import utils.engine.primaps_init as init_engine
from loader.samplers import BatchShare
from modules.primaps import MASK_BACKBONE_HEADS, PriMaPsModel, Prototypes, focal_weights
from modules.randomness import BatchRandom, mixed_seed
from modules.views import Views
from utils.engine.optim import Precision
from utils.engine.trained import Features
from utils.runtime.distributed import BatchGroup

GOLDEN_NAME = "trajectory_primaps.pt"
K, DIM = 5, 384
LR = 5e-3  # linear_lr = cluster_lr = seghead_lr of the recording: the project's --lr
SEED = 0
CPU = torch.device("cpu")
IGNORE_LABEL = 255  # the golden's; the project's loaders mark an ignored label -1
NO_LOSS = 0.0  # the loss an official stage adds as the constant 0.0 (init: seghead; EM: cluster)

# Tolerances, with the worst error measured as a fraction of its allowance [2 threads, as the golden /
# 1 thread]. The project sums in another order (the probe's mean as a sum over the pixel count, θ_R's
# logits upsampled rather than its features), so results agree to float32 rounding, not bitwise.
# - The project's ViT-S/8 against the recorded features: 1e-4 relative as for backbones.pt, with an
#   absolute floor for elements near 0 [max |diff| 2.6e-6 on elements up to 4.5].
FEATURE_RTOL, FEATURE_ATOL = 1e-4, 1e-5
# - Losses, relative [0.025 / 0.025: 2.4e-7 on a probe cross-entropy of ~1].
LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-7
# - Every traced tensor after every step, and the final state, absolute [0.012 / 0.012: θ_R's and θ_M's
#   g after 41 steps; the linear probe is bitwise the golden's on 2 threads].
TENSOR_ATOL = 1e-5
# - Gradient norms, full step-1 gradients (relative to the largest element), the focal weights and the
#   step-1 activation summaries, relative [0.20 / 0.16: θ_R's g gradient norm (~0.03) late in EM; step-1
#   summaries 0.12 / 0.14: a sampled θ_R logit].
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7

# The golden's names of the trained tensors, as the project holds them.
INIT_TENSORS = {
    "linear_probe.weight": lambda stage: stage.linear.weight,
    "linear_probe.bias": lambda stage: stage.linear.bias,
    "cluster_probe.cluster_centers.weight_g": lambda stage: stage.probe.weight_g,
    "cluster_probe.cluster_centers.weight_v": lambda stage: stage.probe.weight_v,
}
EM_TENSORS = {
    "linear_probe.weight": lambda stage: stage.model.linear.weight,
    "linear_probe.bias": lambda stage: stage.model.linear.bias,
    "seghead.weight_g": lambda stage: stage.model.online.weight_g,
    "seghead.weight_v": lambda stage: stage.model.online.weight_v,
    "theta_m.weight_g": lambda stage: stage.model.momentum.prototypes.weight_g,
    "theta_m.weight_v": lambda stage: stage.model.momentum.prototypes.weight_v,
}
# The official init stage runs θ_R (`seghead`) and discards it (its loss is the constant 0.0, so it
# gets no gradient): the project's initialisation has no θ_R. The test checks that the golden's
# stays at its initial value, which is what makes leaving it out exact.
INERT_IN_INIT = ("seghead.weight_g", "seghead.weight_v")
# Each optimiser parameter of the golden's `grad_norm` (official optimiser order: linear, cluster,
# seghead), as the project's parameter, or None where the project has none. The init stage's official
# cluster weight_g is orphaned (replaced by ones every forward: no gradient), as the project's probe g
# (unused by the cosine); in EM the cluster optimiser holds the discarded k-means probe: the project's
# counterpart is θ_M, which has no gradient either.
INIT_GRAD_PARAMS = {
    "linear_probe.weight": lambda stage: stage.linear.weight,
    "linear_probe.bias": lambda stage: stage.linear.bias,
    "cluster_probe.cluster_centers.weight_g": lambda stage: stage.probe.weight_g,
    "cluster_probe.cluster_centers.weight_v": lambda stage: stage.probe.weight_v,
    "seghead.weight_g": None,
    "seghead.weight_v": None,
}
EM_GRAD_PARAMS = {
    "linear_probe.weight": lambda stage: stage.model.linear.weight,
    "linear_probe.bias": lambda stage: stage.model.linear.bias,
    "cluster_probe.cluster_centers.weight_g": lambda stage: stage.model.momentum.prototypes.weight_g,
    "cluster_probe.cluster_centers.weight_v": lambda stage: stage.model.momentum.prototypes.weight_v,
    "seghead.weight_g": lambda stage: stage.model.online.weight_g,
    "seghead.weight_v": lambda stage: stage.model.online.weight_v,
}
# The golden's final state, as the files the project saves name it: the init artifact is the k-means
# probe's state dict, the EM artifact the PriMaPsModel's (training.kept_model()).
INIT_SAVED = {"cluster_probe.cluster_centers.weight_g": "weight_g",
              "cluster_probe.cluster_centers.weight_v": "weight_v"}
EM_SAVED = {
    "seghead.weight_g": "online.weight_g", "seghead.weight_v": "online.weight_v",
    "cluster_probe.online_model.weight_g": "online.weight_g", "cluster_probe.online_model.weight_v": "online.weight_v",
    "cluster_probe.ema_model.weight_g": "momentum.prototypes.weight_g",
    "cluster_probe.ema_model.weight_v": "momentum.prototypes.weight_v",
    "cluster_probe.step": "momentum.calls",
    "linear_probe.weight": "linear.weight", "linear_probe.bias": "linear.bias",
}


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / GOLDEN_NAME, weights_only=True)


@pytest.fixture(autouse=True)
def one_thread():
    """The steps are hundreds of tiny ops: on a busy two-core machine a second thread makes each wait on
    a descheduled peer (10× slower measured). The tolerances hold on 1 thread and on the golden's 2."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- inputs


class GoldenData:
    """The 8 samples in network form: normalised images and student views [8, 3, 64, 64], labels int64
    [8, 64, 64] (-1 = ignore, as the project's loaders give them), masks uint8 (255 = no mask)."""

    def __init__(self, inputs):
        mean = torch.tensor(inputs["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(inputs["std"], dtype=torch.float32).view(1, 3, 1, 1)

        def normalised(u8):
            return ((u8.permute(0, 3, 1, 2).float() / 255 - mean) / std).contiguous()

        self.images, self.students = normalised(inputs["images"]), normalised(inputs["student_views"])
        self.labels = inputs["labels"].long()
        self.labels[self.labels == IGNORE_LABEL] = -1
        self.masks = inputs["masks"].clone()

    def batch(self, step):
        """The batch of 0-based step `step`: samples (4·step + j) mod 8, j = 0..3."""
        rows = [(4 * step + j) % 8 for j in range(4)]
        return {"img": self.images[rows], "label": self.labels[rows], "mask": self.masks[rows],
                "student": self.students[rows]}


@pytest.fixture(scope="module")
def data(golden):
    return GoldenData(golden["inputs"])


class StoredFeatures:
    """The featurizer's recorded output (`features`) for any batch of the 8 golden images and student
    views; any other image fails. It stands for utils/engine/primaps.Features (both take a normalised
    image batch and give [B, 384, 8, 8] float32)."""

    def __init__(self, golden, data):
        recorded = golden["features"]
        self.known = torch.cat([data.images, data.students])
        self.features = torch.cat([recorded[name][kind] for kind in ("clean", "student") for name in ("A", "B")])
        self.calls = 0

    def __call__(self, images, random=None):
        rows = []
        for image in images:
            found = [i for i, known in enumerate(self.known) if torch.equal(image, known)]
            assert found, "the trajectory steps see the golden images only"
            rows.append(found[0])
        self.calls += 1
        return self.features[rows].clone()


class GivenViews:
    """The recording's views (set as a PriMaPsTraining's `views`): the image, label and mask as they are (no flip)
    and the rule-made student view the batch carries."""

    def __call__(self, batch, random):
        return Views(batch["img"], batch["label"], batch["mask"], batch["student"])


def batch_random(step):
    """Step `step`'s draws as fit makes them: epoch 0, batch `step`, one process holding the batch of 4."""
    return BatchRandom(mixed_seed(SEED, 0, step, -1), BatchShare(0, 4, 4), CPU)


# ----------------------------------------------------------------------------- the two stages


class Spy:
    """Wraps a function, recording the latest call's arguments and result in `last`."""

    def __init__(self, function=None):
        self.function, self.last = function, None

    def __call__(self, *args, **kwargs):
        result = self.function(*args, **kwargs)
        self.last = {"args": args, "kwargs": kwargs, "result": result}
        return result


@torch.no_grad()
def load_linear_probe(linear, weights):
    linear.weight.copy_(weights["linear_weight"])
    linear.bias.copy_(weights["linear_bias"])


class InitStage:
    """KMeansTraining as utils/engine/primaps_init.work builds it, from the golden initial weights (the
    k-means probe's v in place of the PCA's directions)."""

    tensors, grad_params, saved = INIT_TENSORS, INIT_GRAD_PARAMS, INIT_SAVED

    def __init__(self, golden, data):
        weights = golden["init_weights"]
        self.features = StoredFeatures(golden, data)
        self.probe = Prototypes(DIM, K)
        self.probe.set_directions(weights["weight_v"].reshape(K, DIM))
        self.linear = nn.Conv2d(DIM, K, 1)
        load_linear_probe(self.linear, weights)
        self.training = init_engine.KMeansTraining(self.features, self.probe, self.linear, LR,
                                                   Precision("fp32", CPU), BatchGroup(False), K)
        self.initial = held(self, INIT_TENSORS)
        # {name: (the module whose name the engine calls it by, the spy)}
        self.spies = {"kmeans_loss": (init_engine, Spy()), "probe_cross_entropy": (engine, Spy())}

    def batch(self, data, step):
        return {k: v for k, v in data.batch(step).items() if k in ("img", "label")}

    def named_losses(self, losses):
        kmeans = -losses["mean_nearest_cosine"]
        return {"linear": losses["probe_cross_entropy"], "cluster": kmeans, "seghead": NO_LOSS,
                "total": losses["loss"]}

    def cluster_logits(self):
        return self.spies["kmeans_loss"][1].last["args"][0]  # the probe's cosines [4, 5, 8, 8]

    def observed(self):
        return {}

    def saved_state(self):
        return self.probe.state_dict()


class EMStage:
    """PriMaPsTraining as utils/engine/primaps.train builds it, from the golden initial weights (θ_R and
    θ_M start from the k-means probe's v with g = 1) and the recording's views."""

    tensors, grad_params, saved = EM_TENSORS, EM_GRAD_PARAMS, EM_SAVED

    def __init__(self, golden, data):
        weights = golden["init_weights"]
        self.features = StoredFeatures(golden, data)
        self.model = PriMaPsModel(DIM, K)
        self.model.start_from(weights["weight_v"].reshape(K, DIM))
        load_linear_probe(self.model.linear, weights)
        self.training = engine.PriMaPsTraining(self.features, self.model, LR, Precision("fp32", CPU),
                                               BatchGroup(False), K)
        self.training.views = GivenViews()
        self.initial = {**held(self, EM_TENSORS), "initial prototypes": self.model.initial.clone()}
        self.e_step = Spy(self.training.e_step)
        self.training.e_step = self.e_step
        self.spies = {"focal_loss": (engine, Spy()), "probe_cross_entropy": (engine, Spy())}
        self.calls_before = 0

    def batch(self, data, step):
        return data.batch(step)

    def named_losses(self, losses):
        return {"linear": losses["probe_cross_entropy"], "cluster": NO_LOSS, "seghead": losses["focal"],
                "total": losses["loss"]}

    def cluster_logits(self):
        return self.e_step.last["result"][0]  # θ_M's logits [4, 5, 64, 64]

    def observed(self):
        """The E-step's labels as the focal loss got them, its class weights, and θ_M's update count."""
        focal = self.spies["focal_loss"][1].last
        args, kwargs = focal["args"], focal["kwargs"]
        calls = int(self.model.momentum.calls)
        updated, self.calls_before = calls != self.calls_before, calls
        return {"pseudo": args[1], "focal_weight": focal_weights(kwargs["mean_probability"], args[2]),
                "ema_step": calls, "ema_updated": updated, "ema_initted": calls >= 2}

    def saved_state(self):
        return self.training.kept_model()


STAGES = {"init": InitStage, "em": EMStage}


def held(stage, tensors):
    """{golden name: copy} of what `stage` holds now."""
    return {name: get(stage).detach().clone() for name, get in tensors.items()}


def run_stage(stage, data, steps):
    """Drive `stage.training` as fit does over the 0-based `steps` (one epoch), with the stage's spies
    on the engine's functions meanwhile; one record per step."""
    with pytest.MonkeyPatch.context() as patch:
        for name, (module, spy) in stage.spies.items():
            spy.function = getattr(module, name)
            patch.setattr(module, name, spy)
        return drive(stage, data, steps)


def drive(stage, data, steps):
    records = []
    for step in steps:
        random = batch_random(step)
        losses = stage.training.losses(stage.batch(data, step), random)
        stage.training.update(losses, random)
        record = {name: float(torch.as_tensor(value).detach()) for name, value in stage.named_losses(losses).items()}
        record.update(stage.observed())
        record["grad_norm"] = [grad_norm(stage, get) for get in stage.grad_params.values()]
        record["cluster_pred"] = stage.cluster_logits().argmax(dim=1)
        record["tensors"] = held(stage, stage.tensors)
        if step == 0:
            record["step1"] = step1_activations(stage)
        records.append(record)
    stage.training.end_epoch()
    return records


def grad_norm(stage, parameter):
    """The float64 norm of the gradient the optimiser consumed; NaN for no gradient or no such parameter."""
    grad = None if parameter is None else parameter(stage).grad
    return math.nan if grad is None else grad.double().norm().item()


def step1_activations(stage):
    grads = {name: get(stage).grad.clone() for name, get in stage.grad_params.items()
             if get is not None and get(stage).grad is not None}
    computed = {"linear_logits": stage.spies["probe_cross_entropy"][1].last["args"][0],
                "cluster_logits": stage.cluster_logits(), "grads": grads}
    if isinstance(stage, EMStage):
        computed["seghead_logits"] = stage.spies["focal_loss"][1].last["args"][0]
    return computed


# ----------------------------------------------------------------------------- comparison


def compare_stage(case, stage, records):
    """Every recorded quantity of a case, in recording order: initial state, each step, step-1
    activations, final state."""
    out = compare_initial(case, stage)
    for step, record in enumerate(records, 1):
        out += compare_step(case, stage, step, record)
    if records:
        out += compare_step1(case, records[0]["step1"])
    if len(records) == len(case["steps"]):
        out += compare_final(case, stage)
    return out


def compare_initial(case, stage):
    """Exactly: the stages start from the golden's weights (θ_M: `theta_m_start`, the copy of θ_R made
    when training starts; EM's initial prototypes: the k-means probe's v it read)."""
    out = []
    for name, tensor in stage.initial.items():
        if name.startswith("theta_m."):
            golden = case["theta_m_start"][name.removeprefix("theta_m.")]
        elif name == "initial prototypes":
            golden = case["init_state"]["cluster_probe.cluster_centers.weight_v"]
        else:
            golden = case["init_state"][name]
        out += compare_tensor("init", name, golden, tensor.reshape(golden.shape), 0.0, 0.0)
    return out


def compare_step(case, stage, step, record):
    golden, where = case["steps"][step - 1], f"step {step}"
    out = []
    for name in ("linear", "cluster", "seghead", "total"):
        out += compare_number(where, name, golden[name], record[name], LOSS_RTOL, LOSS_ATOL)
    for name, expected, got in zip(case["grad_norm_params"], golden["grad_norm"].tolist(), record["grad_norm"],
                                   strict=True):
        out += compare_number(where, f"grad_norm[{name}]", expected, got, GRAD_RTOL, GRAD_ATOL)
    out += compare_exact(where, "cluster_pred_hist", golden["cluster_pred_hist"],
                         torch.bincount(record["cluster_pred"].flatten(), minlength=K))
    for name, tensor in record["tensors"].items():
        out += compare_tensor(where, name, case["trace"][name][step - 1], tensor, 0.0, TENSOR_ATOL)
    if "pseudo_crc32" in golden:
        out += compare_em_step(case, step, record)
    return out


def compare_em_step(case, step, record):
    golden, where = case["steps"][step - 1], f"step {step}"
    pseudo = record["pseudo"].to(torch.uint8)
    pseudo_labels = torch.where(pseudo == 255, K, pseudo.long())
    out = compare_exact(where, "pseudo", case["pseudo"][step - 1], pseudo)
    out += compare_number(where, "pseudo_crc32", golden["pseudo_crc32"], zlib.crc32(pseudo.numpy().tobytes()), 0, 0)
    out += compare_exact(where, "pseudo_hist", golden["pseudo_hist"], torch.bincount(pseudo_labels.flatten(),
                                                                                     minlength=K + 1))
    out += compare_tensor(where, "focal_weight", golden["focal_weight"], record["focal_weight"], GRAD_RTOL,
                          GRAD_ATOL)
    for name in ("ema_step", "ema_updated", "ema_initted"):
        out += compare_number(where, name, golden[name], record[name], 0, 0)
    # The first two updates copy θ_R: where the golden's θ_M equals its θ_R bitwise, so must the project's.
    trace, tensors = case["trace"], record["tensors"]
    for part in ("weight_g", "weight_v"):
        if torch.equal(trace[f"theta_m.{part}"][step - 1], trace[f"seghead.{part}"][step - 1]) and not torch.equal(
                tensors[f"theta_m.{part}"], tensors[f"seghead.{part}"]):
            out.append(Difference(where, f"theta_m.{part} is a copy of seghead.{part}", True, False, math.inf, 0.0))
    return out


def compare_step1(case, computed):
    golden, where = case["step1"], "step 1 activations"
    out = []
    for name in ("linear_logits", "cluster_logits", "seghead_logits"):
        if name in computed:
            out += compare_summary(golden[name], computed[name], "step1/" + name, where, GRAD_RTOL, GRAD_ATOL, name)
    out += compare_exact(where, "cluster_pred", golden["cluster_pred"], computed["cluster_logits"].argmax(dim=1))
    for name, expected in golden["grads"].items():
        if name not in computed["grads"]:
            out.append(Difference(where, f"grads[{name}]", "recorded", "no gradient", math.inf, 0.0))
        else:
            out += compare_tensor(where, f"grads[{name}]", expected, computed["grads"][name], GRAD_RTOL,
                                  GRAD_RTOL * expected.abs().max().item())
    return out


def compare_final(case, stage):
    """The golden's final state against what the project's `save` writes."""
    out, saved = [], stage.saved_state()
    for name, key in stage.saved.items():
        golden = case["final_state"][name]
        out += compare_tensor("final", name, golden, saved[key].reshape(golden.shape), 0.0, TENSOR_ATOL)
    if isinstance(stage, EMStage):
        out += compare_number("final", "cluster_probe.initted", case["final_state"]["cluster_probe.initted"].item(),
                              float(int(saved["momentum.calls"]) >= 2), 0, 0)
    else:  # the init artifact holds the prototypes only (utils/engine/primaps_init.work): the probe as trained
        for name in ("linear_probe.weight", "linear_probe.bias"):
            out += compare_tensor("final", name, case["final_state"][name], stage.tensors[name](stage), 0.0,
                                  TENSOR_ATOL)
    return out


# ----------------------------------------------------------------------------- tests


def test_featurizer_matches_the_recorded_features(golden, data, tmp_path):
    """The project's DINO ViT-S/8 with DINO's 6 heads (PRIMAPS_HEADS), the stand-in weights of
    models.stand_in (the golden's weight rule), at 64×64: utils/engine/primaps.Features on the clean
    images and the student views of both batches gives the recorded `features`."""
    backbone = stand_in_backbone(tmp_path, "dino_vit_small_8", MASK_BACKBONE_HEADS)
    features = Features(backbone, None, Precision("fp32", CPU))
    for name, rows in (("A", slice(0, 4)), ("B", slice(4, 8))):
        for kind, images in (("clean", data.images), ("student", data.students)):
            torch.testing.assert_close(features(images[rows]), golden["features"][name][kind], rtol=FEATURE_RTOL,
                                       atol=FEATURE_ATOL, msg=lambda m, name=name, kind=kind: f"{name} {kind}: {m}")


@pytest.mark.parametrize("name", ["init", "em"])
def test_training_follows_the_official_loop_step_for_step(golden, data, name):
    """Every step of both stages: the losses, gradient norms, the probe's / θ_M's class histogram, every
    traced tensor (linear probe, k-means probe, θ_R, θ_M), the pseudo labels exactly, the focal weights,
    θ_M's update count; the step-1 activations and gradients; the initial and final states."""
    case = golden["cases"][name]
    stage = STAGES[name](golden, data)
    records = run_stage(stage, data, range(len(case["steps"])))
    assert_no_difference(compare_stage(case, stage, records))
    assert stage.features.calls == len(case["steps"]) * (2 if name == "em" else 1)


def test_the_official_init_stage_leaves_theta_r_where_it_started(golden):
    """The project's initialisation has no θ_R: the official one runs it and adds 0.0 to the loss, so
    its θ_R never moves and gets no gradient (the EM stage then overwrites it from the k-means probe)."""
    case = golden["cases"]["init"]
    for name in INERT_IN_INIT:
        assert all(torch.equal(row, case["init_state"][name]) for row in case["trace"][name]), name
        assert torch.equal(case["final_state"][name], case["init_state"][name]), name
    slots = [case["grad_norm_params"].index(name) for name in INERT_IN_INIT]
    assert all(math.isnan(step["grad_norm"][i]) for step in case["steps"] for i in slots)
    assert all(step["seghead"] == NO_LOSS for step in case["steps"])


def test_momentum_schedule_one_batch_early_fails_the_comparison(golden, data, monkeypatch):
    """The tolerances see θ_M's timing: updated after the 10th, 20th, ... batch (the project's former
    gate) instead of after the batches that 10, 20, ... batches preceded, the comparison fails, first at
    step 10 on θ_M's update count and tensors."""
    case = golden["cases"]["em"]
    monkeypatch.setattr(engine, "momentum_update_due", lambda before: (before + 1) % engine.MOMENTUM_EVERY == 0)
    stage = EMStage(golden, data)
    records = run_stage(stage, data, range(len(case["steps"])))
    differences = compare_stage(case, stage, records)
    with pytest.raises(AssertionError, match="step 10: ema_step"):
        assert_no_difference(differences)
    first_step = {d.quantity.partition("[")[0] for d in differences if d.where == "step 10"}
    assert {"ema_step", "ema_updated", "theta_m.weight_v"} <= first_step, sorted(first_step)
    assert not [d for d in differences if d.where.startswith("step") and int(d.where.split()[1]) < 10]


@pytest.mark.parametrize("name, interrupted_after", [("init", 3), ("em", 10)])
def test_resuming_keeps_the_trajectory(golden, data, name, interrupted_after):
    """A Training restored from its state_dict (through torch.save / torch.load, as ResumeState writes
    it) after `interrupted_after` steps continues bit for bit as the uninterrupted run, and so the
    golden's: θ_M's batch count (EM: the gate fires in the step right after) and the init stage's
    linear probe travel in the state."""
    case = golden["cases"][name]
    steps = len(case["steps"])
    whole = STAGES[name](golden, data)
    uninterrupted = run_stage(whole, data, range(steps))
    first = STAGES[name](golden, data)
    run_stage(first, data, range(interrupted_after))
    buffer = io.BytesIO()
    torch.save({"training": first.training.state_dict()}, buffer)
    buffer.seek(0)
    resumed = STAGES[name](golden, data)
    resumed.training.load_state_dict(torch.load(buffer, weights_only=False)["training"])
    if name == "em":
        resumed.calls_before = int(resumed.model.momentum.calls)
    after = run_stage(resumed, data, range(interrupted_after, steps))
    for step, (a, b) in enumerate(zip(uninterrupted[interrupted_after:], after, strict=True), interrupted_after + 1):
        assert all(a[k] == b[k] for k in ("linear", "cluster", "seghead", "total")), step
        assert all(torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"]), step
    assert_no_difference([d for step, record in enumerate(after, interrupted_after + 1)
                          for d in compare_step(case, resumed, step, record)])


def test_the_init_losses_of_a_split_batch_add_up_to_the_whole_batch_loss(golden, data):
    """Both initialisation losses divide by the whole global batch's pixels (the probe's ignored pixels
    count 0), so the parts two processes compute of one batch add up to one process's loss."""
    stage = InitStage(golden, data)
    batch = stage.batch(data, 0)

    def losses(rows, share):
        part = {k: v[rows] for k, v in batch.items()}
        random = BatchRandom(0, share, CPU)
        return stage.training.losses(part, random)

    whole = losses(slice(0, 4), BatchShare(0, 4, 4))
    parts = [losses(slice(0, 1), BatchShare(0, 1, 4)), losses(slice(1, 4), BatchShare(1, 3, 4))]
    for name in ("loss", "probe_cross_entropy", "mean_nearest_cosine"):
        torch.testing.assert_close(parts[0][name] + parts[1][name], whole[name], rtol=1e-6, atol=1e-7)
