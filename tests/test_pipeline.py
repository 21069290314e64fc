"""The whole chain (`bash run`) on a tiny generated data set with a small stand-in backbone, on CPU;
and how `bash run` routes each option to the steps it is meant for."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from steps import make_tiny_setup

from loader import build_dataset
from modules.heads import SegmentModule
from modules.metrics import MatchedMetrics
from modules.probe import ClusterModule
from utils.runtime.pictures import palette
from utils.cli.pipeline import PipelineError, chain, known_options, route, split_head

# 64-px crops on a patch-8 backbone: an 8×8 token grid, 2×2 after grid sampling. The front door
# trains two epochs, every other training step one: per-step options reach only their step.
SMALL = ["--train_resolution", "64", "--test_resolution", "64", "--batch_size", "4", "--num_codebook", "16",
         "--projection_dim", "24", "--num_workers", "0", "--crf_workers", "1", "--num_pictures", "-1",
         "--epochs", "1", "--front_door.epochs", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    data_dir, ckpt = make_tiny_setup(root, n_train=4, n_val=3)
    return root, data_dir, ckpt


def run_chain(root, data_dir, ckpt, head, *extra, env=None):
    args = ["bash", str(ROOT / "run"), "--head", head, "--data_dir", str(data_dir), "--ckpt", str(ckpt), *SMALL,
            "--output_root", str(root / "CAUSE"), "--results_root", str(root / "results"),
            "--logs_root", str(root / "logs"), *extra]
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def ids_from_picture(path, colours):
    """Cluster ids back from a picture coloured with the Pascal palette (its colours are all distinct)."""
    picture = np.array(Image.open(path))
    lookup = {tuple(colour): index for index, colour in enumerate(colours)}
    return torch.tensor([[lookup[tuple(pixel)] for pixel in row] for row in picture])


@pytest.mark.parametrize("head", ["tr", "mlp"])
def test_run_chains_every_step_then_skips_finished_ones(tiny_run, head):
    root, data_dir, ckpt = tiny_run
    done = run_chain(root, data_dir, ckpt, head)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = done.stdout + done.stderr

    artifacts = root / "CAUSE" / "cocostuff27"
    modular = artifacts / "modularity" / "dino_vit_tiny_8" / "16" / "modular.npy"
    head_dir = artifacts / "dino_vit_tiny_8" / "16"
    segment_file, cluster_file = head_dir / f"segment_{head}.pth", head_dir / f"cluster_{head}.pth"
    assert np.load(modular).shape == (16, 192)
    # The artifacts load strictly into the modules of the released layout.
    segment = SegmentModule(head, 192, 90, 24, 27, 64 if head == "tr" else None)
    segment.load_state_dict(torch.load(segment_file, weights_only=True), strict=True)
    ClusterModule(16, 192, 90, 27).load_state_dict(torch.load(cluster_file, weights_only=True), strict=True)
    assert not list(artifacts.rglob("resume/*.pt")), "a finished step must leave no resume state"
    # Each record says what made its artifact, with the options meant for its step only.
    records = {path.stem: json.loads(path.read_text()) for path in (modular.with_suffix(".json"),
                                                                   segment_file.with_suffix(".json"),
                                                                   cluster_file.with_suffix(".json"))}
    assert {name: record["epochs"] for name, record in records.items()} == {
        "modular": 1, f"segment_{head}": 2, f"cluster_{head}": 1}
    assert all(record["complete"] and record["recipe"]["name"] == "paper" for record in records.values())

    results = root / "results" / "cocostuff27" / head.upper() / "dino_vit_tiny_8" / "16"
    metrics = json.loads((results / "metrics.json").read_text())
    assert set(metrics["upstream"]) == {"modular", "segment", "cluster"}
    assert metrics["upstream"]["segment"]["record"]["step"] == "fine_tune", "the segment module fine-tuning left"
    assert list((root / "logs").rglob("events.out.tfevents.*")), "TensorBoard logs are written"
    last_line = [line for line in output.splitlines() if line.startswith("mIoU:")][-1]
    assert last_line == f"mIoU: {metrics['crf']['mIoU']:.1f} pAcc: {metrics['crf']['pAcc']:.1f}"

    # The reported figures are those of the saved predictions: recompute them from the pictures.
    val = build_dataset("cocostuff27", data_dir, "val", 64)
    colours = palette("pascal")
    for variant, folder in (("crf", "crf"), ("no_crf", "raw")):
        recomputed = MatchedMetrics(27)
        for index in range(len(val)):
            recomputed.update(ids_from_picture(results / folder / f"{index}.png", colours), val[index]["label"])
        result = recomputed.compute()
        assert result["mIoU"] == pytest.approx(metrics[variant]["mIoU"]), variant
        assert result["Acc"] == pytest.approx(metrics[variant]["pAcc"]), variant

    if head == "mlp":
        return  # the rerun below is the same for both heads (and the toy-step test reruns the TR chain too)
    stamps = {p: p.stat().st_mtime_ns for p in (modular, segment_file, cluster_file, results / "metrics.json")}
    again = run_chain(root, data_dir, ckpt, head)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipping") == 5, again.stdout
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again.stdout.splitlines()[-2:] == [last_line, f"report: {root / 'results' / 'report.md'}"], \
        "an up-to-date run still ends with its numbers, then the report's path"


def test_an_option_no_step_knows_stops_the_run_before_any_step(tiny_run):
    root, data_dir, ckpt = tiny_run
    done = run_chain(root / "unknown", data_dir, ckpt, "tr", "--front_door.learning_rate", "3")
    assert done.returncode == 2
    assert "unknown option --front_door.learning_rate" in done.stderr and "+ " not in done.stdout
    assert not (root / "unknown").exists()


def test_options_reach_only_the_steps_they_are_meant_for():
    routed = route(["--epochs", "3", "--front_door.epochs", "2", "--label_leak", "--dataset=cityscapes",
                    "--test.batch_size", "8"], known_options(chain()))
    assert routed["crop"] == ["--dataset", "cityscapes"]
    assert routed["mediator"] == ["--epochs", "3", "--dataset", "cityscapes"]
    assert routed["front_door"] == ["--epochs", "3", "--epochs", "2", "--dataset", "cityscapes"]  # the last wins
    assert routed["fine_tune"] == ["--epochs", "3", "--label_leak", "--dataset", "cityscapes"]
    assert routed["test"] == ["--dataset", "cityscapes", "--batch_size", "8"]


@pytest.mark.parametrize("tokens,message", [
    (["--learning_rate", "3"], "unknown option --learning_rate"),
    (["--mediator.label_leak"], "step 'mediator' knows --label_leak"),
    (["--decoder.epochs", "2"], "no step 'decoder'"),
    (["--restart"], "say which, e.g. --front_door.restart"),
    (["--epochs"], "needs a value"),
    (["--label_leak=yes"], "takes no value"),
])
def test_options_that_cannot_be_routed_are_refused(tokens, message):
    with pytest.raises(PipelineError, match=message):
        route(tokens, known_options(chain()))


def test_the_head_is_the_pipelines_own_option():
    assert split_head(["--epochs", "1", "--head=mlp"], "tr") == ("mlp", ["--epochs", "1"])
    assert split_head(["--head", "mlp", "--head", "tr"], "mlp") == ("tr", [])
    with pytest.raises(PipelineError, match="--head must be mlp or tr"):
        split_head(["--head=cnn"], "tr")


def test_a_refused_value_stops_the_run_before_any_step(tiny_run):
    root, data_dir, ckpt = tiny_run
    done = run_chain(root / "refused", data_dir, ckpt, "tr", "--nproc", "0")
    assert done.returncode == 2
    assert "--nproc must be at least 1" in done.stderr and "+ " not in done.stdout


def test_bash_run_help_lists_every_option():
    done = subprocess.run(["bash", str(ROOT / "run"), "--help"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=60)
    assert done.returncode == 0
    for option in ("--front_door", "--recipe", "--label_leak", "--epochs", "--head", "--precision"):
        assert option in done.stdout


def test_run_with_primaps_adds_its_steps_in_cause_mode_and_prints_both_results(tiny_run):
    root, data_dir, ckpt = tiny_run
    done = run_chain(root, data_dir, ckpt, "tr", "--primaps", "--primaps.epochs", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "+ train_primaps.py --head tr" in done.stdout and "+ test_primaps.py --head tr" in done.stdout
    [masks] = (root / "CAUSE/cocostuff27/primaps_masks").glob("dino_vit_tiny_8_*_64px_threshold0.4_seed0")
    assert len(list(masks.glob("*.png"))) == 4, "one pseudo mask per train image"
    model = root / "CAUSE/cocostuff27/dino_vit_tiny_8/16/primaps_tr.pth"
    record = json.loads(model.with_suffix(".json").read_text())
    assert record["complete"] and record["identity"]["settings"]["mode"] == "cause"
    assert record["identity"]["settings"]["epochs"] == 2, "--primaps.epochs reaches the PriMaPs step"
    assert set(record["upstream"]) == {"modular", "segment", "cluster"}, "cause mode reads the CAUSE artifacts"
    cause = json.loads((root / "results/cocostuff27/TR/dino_vit_tiny_8/16/metrics.json").read_text())
    primaps = json.loads((root / "results/cocostuff27/PRIMAPS_TR/dino_vit_tiny_8/16/metrics.json").read_text())
    both = done.stdout.strip().splitlines()[-2:]
    assert both[0].startswith("CAUSE TR ") and f"mIoU {cause['crf']['mIoU']:.1f}" in both[0], both
    assert both[1].startswith("CAUSE TR + PriMaPs-EM ") and f"mIoU {primaps['crf']['mIoU']:.1f}" in both[1]


TOY = '''
"""A toy step, added as a project built on this one adds one: an engine and one registry entry, with an
option of its own."""
import json

from utils.engine.status import write_artifact_records
from utils.runtime.io import save_text
from utils.runtime.options import Option
from utils.runtime.steps import Step, Upstream, register


def work(ctx):
    made = ctx.paths.head_dir / "toy.txt"
    save_text(json.dumps({"seed": ctx.cfg.seed, "rounds": ctx.cfg.toy_rounds,
                          "cluster": ctx.upstream["cluster"]["fingerprint"]}), made)
    write_artifact_records(ctx, [made])
    print(f"[toy] made {made}")


register(Step(
    name="toy", engine="toy_steps", script=None,
    options=("dataset", "data_dir", "ckpt", "arch", "output_root", "num_codebook", "seed",
             Option("toy_rounds", "toy", dict(type=int, default=1, help="rounds the toy plays"))),
    outputs=lambda paths: [paths.head_dir / "toy.txt"],
    upstream=lambda cfg, paths: {"cluster": Upstream(paths.cluster, "fine_tune")},
    head="script", pipeline="cause", description="a toy step after the test step"))
'''


def test_a_step_added_through_the_registry_alone_runs_in_bash_run(tiny_run, tmp_path):
    root, data_dir, ckpt = tiny_run
    (tmp_path / "toy_steps.py").write_text(TOY)
    env = {"CAUSE_EXTRA_STEPS": "toy_steps", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    listed = subprocess.run(["bash", str(ROOT / "run"), "--help"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable, **env}, timeout=120)
    seed = next(line for line in listed.stdout.splitlines() if line.strip().startswith("--seed "))
    assert "toy" in seed[seed.index("[") + 1:seed.index("]")].split(", ")
    assert "[toy] rounds the toy plays" in next(line for line in listed.stdout.splitlines()
                                                if line.strip().startswith("--toy_rounds"))
    done = run_chain(root, data_dir, ckpt, "tr", "--toy.seed", "5", "--toy.toy_rounds", "3", env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("skipping") == 5, "the chain's own steps are up to date"
    assert "+ python -m utils.cli.steps toy --head tr" in done.stdout and "--seed 5 --toy_rounds 3" in done.stdout
    made = root / "CAUSE/cocostuff27/dino_vit_tiny_8/16/toy.txt"
    record = json.loads(made.with_suffix(".json").read_text())
    assert json.loads(made.read_text())["seed"] == 5 and record["identity"]["settings"]["seed"] == 5
    assert json.loads(made.read_text())["rounds"] == 3 and record["identity"]["settings"]["toy_rounds"] == 3
    assert record["upstream"]["cluster"]["produced_by"] == "fine_tuning_tr.py"
    # Its own command, as the chain printed it, now finds it up to date too.
    toy = next(line for line in done.stdout.splitlines() if line.startswith("+ python -m utils.cli.steps toy"))
    again = subprocess.run([sys.executable, *shlex.split(toy)[2:]], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=300)
    assert again.returncode == 0 and "is up to date" in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
