"""predict.py: the test step's predictions on its own images, any image a user has, reruns, errors, --help."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from steps import make_tiny_setup, run_step, step_args

from errors import UserError
from modules.probe import ClusterModule
from utils.engine import predict as predict_module
from utils.engine.predict import build_predict_parser, parse_options
from utils.engine.predict import main as predict_main
from utils.engine.predictors import CausePredictor
from utils.cli import pipeline
from utils.runtime.config import parse_config
from utils.engine.predict import PREDICT
from utils.runtime.steps import STEPS
from utils.runtime.pictures import colorize, palette

RESOLUTION = 64
IMAGE_SIZE = 128  # the tiny setup's images
ORIENTATION = 0x0112


@pytest.fixture(autouse=True)
def _one_thread():
    # 64-pixel windows gain nothing from a second thread, and on a busy 2-core machine every op then
    # waits for it (seconds per image).
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny MLP model through every step (one epoch of TR leaves it one class), and the test step's
    pictures of all 3 val images."""
    torch.set_num_threads(1)  # as _one_thread, which runs after module fixtures
    root = tmp_path_factory.mktemp("trained")
    data_dir, ckpt = make_tiny_setup(root, image_size=IMAGE_SIZE)
    args = step_args(data_dir, ckpt, root, resolution=RESOLUTION, extra=["--epochs", "1"])
    for step, head in (("mediator", None), ("front_door", "mlp"), ("fine_tune", "mlp")):
        run_step(step, head, args)
    run_step("test", "mlp", [*args, "--num_pictures", "-1"])
    results = root / "results" / "cocostuff27" / "MLP" / "dino_vit_tiny_8" / "16"
    return root, args, results


def model_args(trained, **changes):
    """predict.py's options for the trained model (those of the test step it shares)."""
    root, args, _ = trained
    options = {"--ckpt": args[args.index("--ckpt") + 1], "--output_root": str(root / "CAUSE"),
               "--results_root": str(root / "results"), "--train_resolution": str(RESOLUTION),
               "--test_resolution": str(RESOLUTION), "--num_codebook": "16", "--projection_dim": "24",
               "--num_workers": "0", "--crf_workers": "1", "--head": "mlp", **changes}
    return [token for name, value in options.items() for token in (name, value)]


def predict(trained, inputs, output, *extra, **changes):
    return predict_main([*model_args(trained, **changes), "--output", str(output), *extra, *map(str, inputs)])


def decode(picture_path, palette_name="pascal"):
    """Ids of a picture coloured with `palette_name` (its first 27 colours are distinct)."""
    colours = palette(palette_name)[:27].astype(np.int64)
    rgb = np.array(Image.open(picture_path)).astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    lookup = {int(c[0] << 16 | c[1] << 8 | c[2]): i for i, c in enumerate(colours)}
    return np.vectorize(lookup.__getitem__)(codes)


def ids_of(path):
    with Image.open(path) as picture:
        assert picture.mode == "L"
        return np.array(picture)


def test_outputs_equal_the_test_steps_predictions(trained, tmp_path, capsys):
    _, _, results = trained
    metrics = json.loads((results / "metrics.json").read_text())
    matching = np.array(metrics["cluster_to_class"])
    images = sorted((results / "imgs").glob("*.png"))  # the val images as the test step resized them
    assert len(images) == 3
    assert predict(trained, [results / "imgs"], tmp_path / "raw") == 0
    # Two CRF workers: the CRFs run in a pool while the next images' features are computed.
    assert predict(trained, [results / "imgs"], tmp_path / "crf", "--crf", **{"--crf_workers": "2"}) == 0
    assert "3 written, 0 skipped" in capsys.readouterr().out
    predicted = set()
    for image in images:
        raw = ids_of(tmp_path / "raw" / "ids" / image.name)
        predicted.update(np.unique(raw).tolist())
        assert np.array_equal(raw, matching[decode(results / "raw" / image.name)])
        crf = ids_of(tmp_path / "crf" / "ids" / image.name)
        assert np.array_equal(crf, matching[decode(results / "crf" / image.name)])
        with Image.open(results / "matched" / image.name) as matched, \
                Image.open(tmp_path / "crf" / "color" / image.name) as colour:
            assert np.array_equal(np.array(colour), np.array(matched))
        with Image.open(tmp_path / "crf" / "overlay" / image.with_suffix(".jpg").name) as overlay:
            assert overlay.size == (RESOLUTION, RESOLUTION)
    assert len(predicted) > 2, "a model that predicts one class would match anything"
    classes = json.loads((tmp_path / "crf" / "classes.json").read_text())
    assert classes["ids"] == "classes" and classes["cluster_to_class"] == metrics["cluster_to_class"]
    assert [c["name"] for c in classes["classes"][:3]] == ["electronic", "appliance", "food"]
    assert classes["classes"][5]["color"] == palette("pascal")[5].tolist()


def _gradient(height, width, channels=3):
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([(rows * 7 + cols * 3 + 40 * c) % 256 for c in range(channels)], -1).astype(np.uint8)


@pytest.fixture()
def photos(tmp_path):
    """A folder of what a user may have: {name: (width, height) of the upright image, or None: bad}."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(_gradient(48, 80)).save(root / "rgb.jpg", quality=90)
    Image.fromarray(_gradient(40, 30, 1)[..., 0], mode="L").save(root / "sub" / "gray.png")
    Image.fromarray(_gradient(36, 50, 4)).save(root / "rgba.png")
    Image.fromarray((_gradient(30, 44, 1)[..., 0].astype(np.uint16) * 257)).save(root / "deep.png")
    exif = Image.Exif()
    exif[ORIENTATION] = 6  # stored 60 wide, 40 high; shown turned 90°: 40 wide, 60 high
    Image.fromarray(_gradient(40, 60)).save(root / "rotated.jpg", exif=exif, quality=90)
    Image.fromarray(_gradient(20, 20)).save(root / "icon.png")
    Image.fromarray(_gradient(200, 3000)).save(root / "strip.png")
    Image.fromarray(_gradient(5, 5)).save(root / "speck.png")  # under one 8-pixel patch
    whole = root / "whole.jpg"
    Image.fromarray(_gradient(64, 64)).save(whole, quality=90)
    (root / "truncated.jpg").write_bytes(whole.read_bytes()[:300])
    whole.unlink()
    (root / "notes.png").write_text("not an image, whatever its name says\n")
    (root / "notes.txt").write_text("a text file in the folder is not an input\n")
    sizes = {"rgb": (80, 48), "sub/gray": (30, 40), "rgba": (50, 36), "deep": (44, 30), "rotated": (40, 60),
             "icon": (20, 20), "strip": (3000, 200), "speck": None, "truncated": None, "notes": None}
    return root, sizes


def test_every_image_a_user_has_gets_outputs_of_its_size_and_bad_files_are_named(trained, photos, tmp_path, capsys):
    root, sizes = photos
    output = tmp_path / "out"
    status = predict(trained, [root], output, "--results_root", str(tmp_path / "no_results"))
    text = capsys.readouterr().out
    assert status == 1, "some images failed"
    for name, size in sizes.items():
        paths = [output / "ids" / f"{name}.png", output / "color" / f"{name}.png", output / "overlay" / f"{name}.jpg"]
        if size is None:
            assert not any(path.exists() for path in paths), name
            continue
        for path in paths:
            with Image.open(path) as picture:
                assert picture.size == size, path
    assert "7 written, 0 skipped (outputs exist; --overwrite redoes them), 3 failed" in text
    summary = text[text.index("7 written"):]
    assert f"failed: {root / 'speck.png'}: 5×5 pixels: the shorter side is below one patch (8 pixels)" in summary
    assert f"failed: {root / 'truncated.jpg'}: cannot read image" in summary
    assert f"failed: {root / 'notes.png'}: cannot read image" in summary
    assert not list(output.rglob(".*")), "no temporary file is left behind"
    classes = json.loads((output / "classes.json").read_text())
    assert classes["ids"] == "clusters" and classes["cluster_to_class"] is None
    assert "does not exist (run test_mlp.py" in classes["meaning"]
    assert all(entry["name"] is None for entry in classes["classes"])


def test_rerun_skips_finished_images_and_overwrite_rewrites_them(trained, photos, tmp_path, capsys):
    root, _ = photos
    listing = tmp_path / "some.txt"
    listing.write_text("# two of them\nphotos/rgb.jpg\nphotos/sub\n")
    output = tmp_path / "out"
    assert predict(trained, [listing], output) == 0
    written = {path: path.stat().st_mtime_ns for path in output.rglob("*") if path.is_file()}
    assert len(written) == 2 * 3 + 1
    (output / "color" / "rgb.png").unlink()  # as if killed between two outputs
    capsys.readouterr()
    assert predict(trained, [listing], output) == 0
    assert "1 written, 1 skipped" in capsys.readouterr().out
    assert (output / "ids" / "gray.png").stat().st_mtime_ns == written[output / "ids" / "gray.png"]
    assert predict(trained, [listing], output, "--overwrite") == 0
    assert "2 written, 0 skipped" in capsys.readouterr().out
    assert (output / "ids" / "gray.png").stat().st_mtime_ns != written[output / "ids" / "gray.png"]
    with pytest.raises(UserError, match=r"holds predictions of another model or other settings \(settings differ"):
        predict(trained, [listing], output, "--crf")


def test_tiled_prediction_of_a_large_image_follows_the_windows(trained, tmp_path):
    """An image larger than the window is segmented from several windows at --short_side, each
    window's features where it sees the image; its ids keep the image's size."""
    image = np.zeros((300, 500, 3), np.uint8)
    image[:, 250:] = 255  # two halves the tiny model tells apart
    Image.fromarray(image).save(tmp_path / "halves.png")
    assert predict(trained, [tmp_path / "halves.png"], tmp_path / "out", "--short_side", "128", "--stride", "32") == 0
    ids = ids_of(tmp_path / "out" / "ids" / "halves.png")
    assert ids.shape == (300, 500)
    assert len(np.unique(ids[:, :200])) == 1 and len(np.unique(ids[:, 300:])) == 1
    assert ids[0, 0] != ids[0, -1]


def test_large_images_are_reduced_band_by_band_to_the_same_prediction(trained, tmp_path, monkeypatch):
    """Past BAND_VALUES, predictions are reduced a band of rows at a time: from the CAUSE scores (not
    the features) without the CRF, from the CRF's marginals with it. Both give the one-shot ids."""
    Image.fromarray(_gradient(150, 230)).save(tmp_path / "photo.png")
    for crf in ((), ("--crf",)):
        assert predict(trained, [tmp_path / "photo.png"], tmp_path / f"whole{crf}", *crf) == 0
        with monkeypatch.context() as patched:
            patched.setattr(predict_module, "BAND_VALUES", 90 * 230 * 7)  # a few rows a band
            assert predict(trained, [tmp_path / "photo.png"], tmp_path / f"bands{crf}", *crf) == 0
        whole = ids_of(tmp_path / f"whole{crf}" / "ids" / "photo.png")
        bands = ids_of(tmp_path / f"bands{crf}" / "ids" / "photo.png")
        assert whole.shape == (150, 230) and len(np.unique(whole)) > 1
        assert (whole != bands).mean() < 1e-3, "the same prediction, up to float rounding at ties"


def test_cause_scores_have_the_cosine_logits_arg_max():
    torch.manual_seed(0)
    cluster = ClusterModule(16, 32, 90, 27)
    predictor = CausePredictor(None, None, cluster, None, 64, 8)
    features = torch.randn(2, 90, 9, 11) * torch.rand(2, 1, 9, 11) * 5  # norms differ from pixel to pixel
    assert torch.equal(predictor.scores(features).argmax(1), predictor.logits(features).argmax(1))


def test_missing_model_files_stop_with_the_test_steps_message(trained, tmp_path, monkeypatch):
    root, args, _ = trained
    monkeypatch.setenv("CAUSE_DEBUG", "1")  # the step script raises its user error instead of exiting
    empty = str(tmp_path / "nothing")
    Image.fromarray(_gradient(64, 64)).save(tmp_path / "photo.png")
    with pytest.raises(UserError) as from_test_step:
        run_step("test", "mlp", [*args, "--output_root", empty])
    with pytest.raises(UserError) as from_predict:
        predict(trained, [tmp_path / "photo.png"], tmp_path / "out", **{"--output_root": empty})
    assert str(from_predict.value) == str(from_test_step.value)
    assert "modular.npy does not exist: run train_mediator.py first" in str(from_predict.value)
    assert not (tmp_path / "out").exists()


def test_help_explains_every_option_and_user_errors_are_one_line():
    parser = build_predict_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings or action.dest
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    shown = subprocess.run([sys.executable, "predict.py", "--help"], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0
    for action in parser._actions:
        assert (action.option_strings[0] if action.option_strings else action.metavar) in shown.stdout
    assert "exit status: 0" in shown.stdout
    missing = subprocess.run([sys.executable, "predict.py", "-o", "out", "nowhere.jpg"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("error [predict]: input nowhere.jpg does not exist (given on the command "
                                      "line)")


def test_colour_and_overlay_pictures_show_the_ids(trained, tmp_path):
    Image.fromarray(_gradient(64, 96)).save(tmp_path / "photo.png")
    assert predict(trained, [tmp_path / "photo.png"], tmp_path / "out") == 0
    ids = ids_of(tmp_path / "out" / "ids" / "photo.png")
    colour = np.array(Image.open(tmp_path / "out" / "color" / "photo.png"))
    assert np.array_equal(colour, colorize(ids, "pascal"))
    overlay = np.array(Image.open(tmp_path / "out" / "overlay" / "photo.jpg")).astype(int)
    image = _gradient(64, 96).astype(int)
    error = {name: np.abs(overlay - expected).mean()
             for name, expected in (("half", (image + colour) // 2), ("image", image), ("colour", colour))}
    assert error["half"] < 5 and error["half"] < error["image"] / 5 and error["half"] < error["colour"] / 5, error


def test_a_demo_run_ends_by_segmenting_demo_images_with_the_model_it_tested(tmp_path, monkeypatch):
    commands = []

    def record(command, cwd):
        commands.append(command[1:])
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(pipeline, "ROOT", tmp_path)  # the demo's data and artifacts go to tmp_path/demo
    monkeypatch.setattr(pipeline.subprocess, "run", record)
    # No step runs here, so no evaluation is there to report on.
    monkeypatch.setattr(pipeline, "write_report", lambda results_root: (Path(results_root) / "report.md", []))
    assert pipeline.main(["demo", "--head", "mlp"]) == 0
    assert [command[0] for command in commands] == [
        "crop_dataset.py", "train_mediator.py", "train_front_door_mlp.py", "fine_tuning_mlp.py", "test_mlp.py",
        "predict.py"]
    tested = parse_config(STEPS["test"], "mlp", commands[-2][1:])
    cfg, options = parse_options(commands[-1][1:])
    for name in set(PREDICT) & set(STEPS["test"].options):
        assert getattr(cfg, name) == getattr(tested, name), name
    assert cfg.head == "mlp" and options.crf and options.output == tmp_path / "demo" / "predictions_mlp"
    assert len(options.inputs) == 3 and all(Path(path).is_file() for path in options.inputs)


def test_a_primaps_model_predicts_as_its_test_step(trained, tmp_path):
    """--model primaps: PriMaPs-EM's θ_M (here in backbone mode) gives the PriMaPs test step's predictions.
    It tests at the val images' own size, so that its resizing (a float tensor's, as the official test's)
    leaves them as they are and the pictures hold exactly what it read."""
    root, args, _ = trained
    primaps_args = [*args, "--mode", "backbone", "--epochs", "1", "--init_epochs", "1", "--pca_batches", "1",
                    "--num_pictures", "-1", "--test_resolution", str(IMAGE_SIZE)]
    run_step("primaps", None, primaps_args)
    run_step("test_primaps", None, primaps_args)
    results = root / "results" / "cocostuff27" / "PRIMAPS_BACKBONE" / "dino_vit_tiny_8"
    matching = np.array(json.loads((results / "metrics.json").read_text())["cluster_to_class"])
    assert predict(trained, [results / "imgs"], tmp_path, "--crf", "--model", "primaps", "--mode", "backbone",
                   "--test_resolution", str(IMAGE_SIZE)) == 0
    predicted = set()
    for image in sorted((results / "imgs").glob("*.png")):
        ids = ids_of(tmp_path / "ids" / image.name)
        predicted.update(np.unique(ids).tolist())
        assert np.array_equal(ids, matching[decode(results / "crf" / image.name)])
    assert len(predicted) > 2, "a model that predicts one class would match anything"
    classes = json.loads((tmp_path / "classes.json").read_text())
    assert classes["model"]["model"] == "primaps" and classes["model"]["mode"] == "backbone"
