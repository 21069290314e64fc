"""Released STEGO, HP and PriMaPs files as steps (docs/sota.md): test_sota.py, PriMaPs-EM in --mode
stego|hp, released PriMaPs checkpoints in test_primaps.py, predict.py, `bash run --primaps --mode stego`,
on tiny synthetic data with the project's stand-in files (a DINO ViT-Tiny/8 inside)."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from official_helpers import eval_predictions
from stand_ins import save_foreign, stand_in_primaps, stand_in_stego, write_stand_in_hp
from steps import make_tiny_setup, only_for, run_step, step_args

from loader import build_dataset
from models import load_backbone, stand_in_release
from models.released import load_sota_model
from models.released_primaps import load_primaps_backbone, load_primaps_model, read_primaps_checkpoint
from modules.features import backbone_map, flip_averaged, upsample
from modules.metrics import MatchedMetrics
from modules.primaps import MASK_BACKBONE_HEADS
from utils.cli.pipeline import chain
from utils.engine.optim import Precision
from utils.engine.predict import main as predict_main
from utils.engine.resume import ResumeState
from utils.engine.trained import on_sota_model
from utils.runtime.config import make_config
from utils.runtime.io import save_torch
from utils.runtime.records import weights_fingerprint
from utils.runtime.steps import STEPS

ARCH = "dino_vit_tiny_8"
K, DIM = 27, 16  # COCO-Stuff-27's classes; a small code
RESOLUTION = 64


class Killed(BaseException):
    """Stands for the process being killed (not an Exception, so nothing catches it)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny COCO-Stuff data, the ViT-Tiny stand-in release, and STEGO, HP and PriMaPs files holding it."""
    root = tmp_path_factory.mktemp("sota_steps")
    data_dir, ckpt = make_tiny_setup(root, n_train=4, n_val=3, image_size=96)
    save_torch(stand_in_release(ARCH), ckpt)  # the ViT inside the STEGO and HP stand-ins
    stego = root / "stego" / "cocostuff27_stand_in.ckpt"
    stego.parent.mkdir()
    save_foreign(stand_in_stego(ARCH, K, DIM), stego)
    hp = write_stand_in_hp(root / "hp", ARCH, K, DIM)
    released = {"backbone": root / "primaps_backbone.ckpt", "stego": root / "primaps_stego.ckpt"}
    save_foreign(stand_in_primaps(ARCH, K), released["backbone"])
    save_foreign(stand_in_primaps(ARCH, K, sota="stego", sota_path=str(stego), code_dim=DIM), released["stego"])
    return {"root": root, "data_dir": data_dir, "ckpt": ckpt, "stego": stego, "hp": hp, "released": released}


def args(files, out, *extra):
    return step_args(files["data_dir"], files["ckpt"], out, resolution=RESOLUTION, extra=("--epochs", "2", *extra))


def sota_args(files, out, family, *extra):
    return args(files, out, "--sota_ckpt", str(files[family]), *extra)


def metrics(path):
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def runs(files):
    """Each released model evaluated, and PriMaPs-EM trained and tested on it (one process)."""
    out = files["root"] / "runs"
    for family in ("stego", "hp"):
        run_step("test_sota", None, sota_args(files, out, family))
        run_step("primaps", None, sota_args(files, out, family, "--mode", family))
        run_step("test_primaps", None, sota_args(files, out, family, "--mode", family))
    return out


def results(out, kind, name):
    return metrics(out / "results/cocostuff27" / kind / name / "metrics.json")


def val_items(files, resize):
    dataset = build_dataset("cocostuff27", files["data_dir"], "val", RESOLUTION, resize=resize)
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("family,name", [("stego", "cocostuff27_stand_in"), ("hp", "experiment_name")])
@torch.no_grad()
def test_a_released_model_scores_as_its_own_evaluation_script(files, runs, family, name):
    """The headline: nearest-resized val images, STEGO's flip-averaged code (HP's plain one), the cluster probe
    at temperature 2 (Hungarian-matched) and the linear probe (its own classes), with and without the CRF."""
    report = results(runs, family.upper(), name)
    model = load_sota_model(files[family])
    expected = {"no_crf": MatchedMetrics(K), "crf": MatchedMetrics(K),
                "linear_no_crf": MatchedMetrics(K, matched=False), "linear_crf": MatchedMetrics(K, matched=False)}
    for item in val_items(files, "nearest"):
        image, label = item["img"][None], item["label"][None]
        for crf, suffix in ((False, "no_crf"), (True, "crf")):
            predicted = eval_predictions(model, image, crf=crf)
            expected[suffix].update(predicted["cluster"], label)
            expected[f"linear_{suffix}"].update(predicted["linear"], label)
    for variant, metric in expected.items():
        assert report[variant]["mIoU"] == pytest.approx(metric.compute()["mIoU"], abs=1e-9), variant
    assert report["method"] == family and report["protocol"]["flip"] == (family == "stego")
    assert report["identity"]["sota"]["family"] == family and "backbone" not in report["identity"]
    assert set(report["variants"]) == {*expected, "primaps_protocol_crf", "primaps_protocol_no_crf"}


def test_the_primaps_protocol_of_a_released_model_is_test_primaps_on_its_cluster_centres(runs):
    # HP runs in eval mode in both: test_sota's PriMaPs-protocol figures are test_primaps' init_* ones.
    sota, primaps = results(runs, "HP", "experiment_name"), results(runs, "PRIMAPS_HP", "experiment_name")
    for variant in ("crf", "no_crf"):
        assert sota[f"primaps_protocol_{variant}"] == primaps[f"init_{variant}"], variant


def test_primaps_on_a_released_model_starts_from_its_centres_and_shares_the_backbones_masks(files, runs):
    artifact = runs / "CAUSE/cocostuff27/primaps_stego/cocostuff27_stand_in/primaps.pth"
    state = torch.load(artifact, weights_only=True)
    centres = load_sota_model(files["stego"]).cluster_probe.clusters
    assert torch.equal(state["initial"], centres), "θ_R starts from the file's cluster probe, no k-means"
    record = metrics(artifact.with_suffix(".json"))
    assert record["identity"]["sota"]["fingerprint"].startswith("sha256:") and "backbone" not in record["identity"]
    assert record["upstream"] == {}, "no initialisation step, no CAUSE artifacts"
    assert "Dropout2d(0.1) active" in record["choices"]["features"] and record["choices"]["precision"] == "fp32"
    # The masks come from the DINO ViT inside the file, which is the release's: one folder for every mode.
    release = weights_fingerprint(load_backbone(files["ckpt"], ARCH, MASK_BACKBONE_HEADS))
    [folder] = (runs / "CAUSE/cocostuff27/primaps_masks").iterdir()
    info = metrics(folder / "masks.json")
    assert info["identity"]["backbone_weights"] == release and folder.name.startswith(f"{ARCH}_{release[7:15]}_")
    assert info["computed_by_the_last_run"] == 0, "the HP run (the same ViT) reused the STEGO run's masks"


@torch.no_grad()
def test_stegos_official_dropout_draws_anew_and_eval_mode_does_not(files):
    model = load_sota_model(files["stego"])
    images = torch.randn(1, 3, RESOLUTION, RESOLUTION)
    precision = Precision("fp32", torch.device("cpu"))
    for dropout, random in (("official", True), ("eval", False)):
        cfg = make_config(STEPS["primaps"], None, {"mode": "stego", "sota_ckpt": files["stego"],
                                                   "sota_dropout": dropout})
        features, _ = on_sota_model(cfg, model, precision)
        first, second = features(images), features(images)
        assert torch.equal(first, second) != random, dropout
        if not random:
            assert torch.equal(first, model.code(images)), "eval mode: the official eval-mode code"
    hp = make_config(STEPS["primaps"], None, {"mode": "hp", "sota_ckpt": files["hp"], "sota_dropout": "official"})
    assert hp.sota_dropout is None, "HP runs in eval mode whatever --sota_dropout says"


def test_two_processes_train_as_one_does_on_a_released_model(files, runs, tmp_path):
    # STEGO's dropout masks are drawn for the global batch, each process keeping its rows' (randomness.py).
    shutil.copytree(runs / "CAUSE/cocostuff27/primaps_masks", tmp_path / "CAUSE/cocostuff27/primaps_masks")
    port = 29000 + os.getpid() % 1000
    options = sota_args(files, tmp_path, "stego", "--mode", "stego", "--nproc", "2", "--port", str(port))
    command = [sys.executable, "train_primaps.py", *only_for("primaps", options)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    name = "CAUSE/cocostuff27/primaps_stego/cocostuff27_stand_in/primaps.pth"
    one, two = (torch.load(root / name, weights_only=True) for root in (runs, tmp_path))
    for key in one:
        assert (one[key].float() - two[key].float()).norm() <= 1e-3 * one[key].float().norm() + 1e-5, key


def test_a_killed_run_on_stego_resumes_to_the_uninterrupted_result(files, runs, tmp_path, monkeypatch, capsys):
    # With STEGO's dropout on: its masks are drawn from each step's seeded generator.
    shutil.copytree(runs / "CAUSE/cocostuff27/primaps_masks", tmp_path / "CAUSE/cocostuff27/primaps_masks")
    real_save = ResumeState.save

    def save_then_die(self, epoch, training):
        real_save(self, epoch, training)
        raise Killed

    monkeypatch.setattr(ResumeState, "save", save_then_die)
    with pytest.raises(Killed):
        run_step("primaps", None, sota_args(files, tmp_path, "stego", "--mode", "stego"))
    monkeypatch.undo()
    run_step("primaps", None, sota_args(files, tmp_path, "stego", "--mode", "stego"))
    assert "resuming after epoch 1" in capsys.readouterr().out
    name = "CAUSE/cocostuff27/primaps_stego/cocostuff27_stand_in/primaps.pth"
    resumed, whole = (torch.load(root / name, weights_only=True) for root in (tmp_path, runs))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


@torch.no_grad()
def test_a_released_backbone_mode_primaps_checkpoint_is_evaluated_as_the_official_test(files, tmp_path):
    run_step("test_primaps", None, args(files, tmp_path, "--primaps_ckpt", str(files["released"]["backbone"])))
    report = results(tmp_path, "PRIMAPS_BACKBONE", "released_primaps_backbone")
    assert report["mode"] == "backbone" and not any(name.startswith("init_") for name in report["variants"]), \
        "the file holds no initial prototypes"
    assert report["upstream"]["primaps"]["origin"] == "released"
    checkpoint = read_primaps_checkpoint(files["released"]["backbone"])
    backbone, model = load_primaps_backbone(checkpoint), load_primaps_model(checkpoint)
    expected = MatchedMetrics(K)
    for item in val_items(files, "tensor_bilinear"):  # the official test's resizing
        image, label = item["img"][None], item["label"][None]
        _, averaged = flip_averaged(lambda x: backbone_map(backbone, x), image)
        expected.update(upsample(model.momentum(averaged), label.shape[-2:]).argmax(dim=1), label)
    assert report["no_crf"]["mIoU"] == pytest.approx(expected.compute()["mIoU"], abs=1e-9)


def test_a_released_stego_primaps_checkpoint_reads_the_stego_file_its_options_name(files, runs, tmp_path):
    # No --sota_ckpt: the path stored in the checkpoint's opts. With STEGO in eval mode its init_* figures
    # are test_sota's PriMaPs-protocol ones: θ_R started from the STEGO file's centres.
    run_step("test_primaps", None, args(files, tmp_path, "--primaps_ckpt", str(files["released"]["stego"]),
                                        "--sota_dropout", "eval"))
    report = results(tmp_path, "PRIMAPS_STEGO", "released_primaps_stego")
    sota = results(runs, "STEGO", "cocostuff27_stand_in")
    assert report["mode"] == "stego" and report["sota"]["file"] == str(files["stego"])
    for variant in ("crf", "no_crf"):
        assert report[f"init_{variant}"] == sota[f"primaps_protocol_{variant}"], variant


def test_predict_segments_with_a_released_model_alone_and_with_primaps_on_it(files, runs, tmp_path):
    images = sorted((files["data_dir"] / "cocostuff/images/val2017").glob("*.jpg"))[:2]
    common = ["--test_resolution", str(RESOLUTION), "--num_workers", "0", "--crf_workers", "1", "--output_root",
              str(runs / "CAUSE"), "--results_root", str(runs / "results"), "--sota_ckpt", str(files["stego"])]
    for model, extra, evaluation in (("sota", [], "STEGO"), ("primaps", ["--mode", "stego"], "PRIMAPS_STEGO")):
        output = tmp_path / model
        assert predict_main(["--model", model, *extra, *common, "-o", str(output), *map(str, images)]) == 0
        classes = metrics(output / "classes.json")
        assert classes["ids"] == "classes" and f"/{evaluation}/cocostuff27_stand_in/metrics.json" in classes["meaning"]
        assert len(list((output / "ids").glob("*.png"))) == 2
    # A released PriMaPs file segments too; no evaluation of it has matched its clusters here.
    output = tmp_path / "released"
    assert predict_main(["--model", "primaps", "--primaps_ckpt", str(files["released"]["backbone"]), *common[:-2],
                         "-o", str(output), *map(str, images)]) == 0
    classes = metrics(output / "classes.json")
    assert classes["ids"] == "clusters" and "test_primaps.py" in classes["meaning"]
    assert classes["model"]["mode"] == "backbone" and "backbone" not in classes["files"], "the backbone is inside"


def test_bash_run_with_a_sota_mode_runs_its_steps_and_prints_them_side_by_side(files, runs):
    assert [step.name for step in chain(True, "stego")] == ["test_sota", "primaps", "test_primaps"]
    assert [step.name for step in chain(True, "backbone")] == ["primaps", "test_primaps"], "no CAUSE steps"
    options = step_args(files["data_dir"], files["ckpt"], runs, resolution=RESOLUTION,
                        extra=("--sota_ckpt", str(files["stego"]), "--mode", "stego", "--primaps.epochs", "2"))
    done = subprocess.run(["bash", "run", "--primaps", *options], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("is up to date") == 3, "the fixture made all three with these options"
    sota = results(runs, "STEGO", "cocostuff27_stand_in")
    primaps = results(runs, "PRIMAPS_STEGO", "cocostuff27_stand_in")
    last = done.stdout.strip().splitlines()[-3:]
    assert last[0].startswith("STEGO ") and f"mIoU {sota['crf']['mIoU']:.1f}" in last[0]
    assert f"mIoU {sota['primaps_protocol_crf']['mIoU']:.1f}" in last[1]
    assert last[2].startswith("STEGO + PriMaPs-EM") and f"mIoU {primaps['crf']['mIoU']:.1f}" in last[2]


def truncated(files, tmp_path):
    path = tmp_path / "truncated.ckpt"
    path.write_bytes(files["stego"].read_bytes()[:4096])
    return path


def cause_segment_file(files, tmp_path):
    path = tmp_path / "segment_tr.pth"
    save_torch({"head_ema.weight": torch.zeros(2), "projection_head.weight": torch.zeros(2)}, path)
    return path


BAD = {
    "hp file as stego": (lambda f, t: ["--mode", "stego", "--sota_ckpt", str(f["hp"])],
                         "is an HP checkpoint: pass --mode hp"),
    "no file": (lambda f, t: ["--mode", "hp"], "pass its file with --sota_ckpt"),
    "classes": (lambda f, t: ["--mode", "stego", "--sota_ckpt", str(f["stego"]), "--dataset", "potsdam3"],
                "predicts 27 classes, but --dataset potsdam3 has 3"),
    "a cause file": (lambda f, t: ["--mode", "stego", "--sota_ckpt", str(cause_segment_file(f, t))],
                     "is a CAUSE segment file .*, not a STEGO checkpoint or an HP checkpoint"),
    "truncated": (lambda f, t: ["--mode", "stego", "--sota_ckpt", str(truncated(f, t))], "truncated.ckpt"),
    "primaps file as stego": (lambda f, t: ["--mode", "stego", "--sota_ckpt", str(f["released"]["stego"])],
                              "is a PriMaPs checkpoint, not a STEGO checkpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_wrong_released_file_is_refused_in_one_line_before_any_work(files, tmp_path, capsys, case):
    given, message = BAD[case]
    with pytest.raises(SystemExit) as stopped:
        run_step("primaps", None, args(files, tmp_path, *given(files, tmp_path)))
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("error [primaps]")
    assert re.search(message, error), error
    assert not (tmp_path / "CAUSE").exists() and not (tmp_path / "logs").exists()


def test_a_released_primaps_file_of_another_mode_is_refused(files, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_step("test_primaps", None, args(files, tmp_path, "--primaps_ckpt", str(files["released"]["stego"]),
                                            "--mode", "hp"))
    assert "--mode hp, but" in capsys.readouterr().err and not (tmp_path / "results").exists()


def test_a_released_sota_primaps_file_whose_model_is_not_here_asks_for_it(files, tmp_path, capsys):
    moved = tmp_path / "primaps_on_a_missing_stego.ckpt"
    save_foreign(stand_in_primaps(ARCH, K, sota="stego", sota_path=str(tmp_path / "gone.ckpt"), code_dim=DIM), moved)
    with pytest.raises(SystemExit):
        run_step("test_primaps", None, args(files, tmp_path, "--primaps_ckpt", str(moved)))
    error = capsys.readouterr().err
    assert "gone.ckpt, which is not here" in error and "pass that file with --sota_ckpt" in error
