"""The steps on DINOv3 and DINOv2-with-registers stand-in files: a short CAUSE chain per family (TR head on
DINOv3, MLP head on DINOv2-reg), PriMaPs-EM in backbone mode on DINOv3 and in cause mode on DINOv2-reg,
and predict.py giving the test step's predictions. DINOv3's file is named by arch (`--ckpt
dinov3_vit_small_16`) and found in checkpoint/ under its official name, as a user who saved the emailed
file leaves it."""
import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from steps import make_tiny_setup, run_step, step_args

from models.releases import OFFICIAL_FILE_NAMES
from models.stand_in import stand_in_release
from utils.engine.predict import main as predict_main
from utils.runtime.io import save_torch
from utils.runtime.pictures import palette

V3, REG = "dinov3_vit_small_16", "dinov2_reg_vit_small_14"
# An 8×8 patch grid (the tiny chains' grid: 2×2 after the mediator's grid sampling).
RESOLUTION = {V3: 128, REG: 112}
HEAD = {V3: "tr", REG: "mlp"}


def sha256(path):
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def chains(tmp_path_factory):
    """chains(arch) -> (root, args, file): the CAUSE chain of `arch`'s HEAD on its stand-in file, run once."""
    runs = {}

    def run(arch):
        if arch not in runs:
            root = tmp_path_factory.mktemp(arch)
            data_dir, _ = make_tiny_setup(root, n_train=4, n_val=1, image_size=96)
            if arch == V3:  # saved by hand under its official name; --ckpt names the arch
                file = root / "checkpoint" / OFFICIAL_FILE_NAMES[arch]
                ckpt = arch
            else:
                file = ckpt = root / "checkpoint" / f"{arch}.pth"
            save_torch(stand_in_release(arch), file)
            args = [*step_args(data_dir, ckpt, root, resolution=RESOLUTION[arch], extra=["--epochs", "1"]),
                    "--num_pictures", "-1", "--cache_dir", str(root / "cache")]
            with pytest.MonkeyPatch.context() as patch:
                patch.chdir(root)  # where checkpoint/ is looked for
                for step, head in (("mediator", None), ("front_door", HEAD[arch]), ("fine_tune", HEAD[arch]),
                                   ("test", HEAD[arch])):
                    run_step(step, head, args)
            runs[arch] = (root, args, file)
        return runs[arch]

    return run


def results_of(root, arch, folder):
    return json.loads((root / "results" / "cocostuff27" / folder / "metrics.json").read_text())


def assert_scored(metrics, arch, file, variants):
    assert metrics["identity"]["backbone"] == {"arch": arch, "fingerprint": sha256(file)}
    for variant in variants:
        assert 0 <= metrics[variant]["mIoU"] <= 100 and len(metrics[variant]["per_class_iou"]) == 27, variant


@pytest.mark.parametrize("arch", [V3, REG])
def test_the_cause_chain_runs_on_the_new_backbones(chains, arch):
    root, _, file = chains(arch)
    # The artifact folders follow the arch, DINOv3's file found under its official name included.
    assert (root / "CAUSE" / "cocostuff27" / "modularity" / arch / "16" / "modular.npy").is_file()
    metrics = results_of(root, arch, f"{HEAD[arch].upper()}/{arch}/16")
    assert_scored(metrics, arch, file, ("crf", "no_crf", "no_crf_no_flip"))
    if arch == V3:
        assert (root / "cache" / f"{arch}.pth").resolve() == file


def decode(picture_path):
    colours = palette("pascal")[:27].astype(np.int64)
    rgb = np.array(Image.open(picture_path)).astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    lookup = {int(c[0] << 16 | c[1] << 8 | c[2]): i for i, c in enumerate(colours)}
    return np.vectorize(lookup.__getitem__)(codes)


def test_predict_gives_the_test_steps_predictions_on_dinov3(chains, tmp_path):
    root, args, _ = chains(V3)
    results = root / "results" / "cocostuff27" / "TR" / V3 / "16"
    matching = np.array(results_of(root, V3, f"TR/{V3}/16")["cluster_to_class"])
    shared = [token for name in ("--output_root", "--results_root", "--train_resolution", "--test_resolution",
                                 "--num_codebook", "--projection_dim", "--num_workers", "--cache_dir")
              for token in (name, args[args.index(name) + 1])]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        assert predict_main(["--ckpt", V3, "--head", "tr", *shared, "--output", str(tmp_path),
                             str(results / "imgs")]) == 0
    images = sorted((results / "imgs").glob("*.png"))
    assert len(images) == 1
    for image in images:
        with Image.open(tmp_path / "ids" / image.name) as ids:
            assert np.array_equal(np.array(ids), matching[decode(results / "raw" / image.name)])


@pytest.mark.parametrize("arch, mode", [(V3, "backbone"), (REG, "cause")])
def test_primaps_runs_on_the_new_backbones(chains, arch, mode):
    root, args, file = chains(arch)
    primaps_args = [*args, "--mode", mode, "--head", HEAD[arch], "--init_epochs", "1", "--pca_batches", "1"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        run_step("primaps", None, primaps_args)
        run_step("test_primaps", None, primaps_args)
    folder = f"PRIMAPS_BACKBONE/{arch}" if mode == "backbone" else f"PRIMAPS_{HEAD[arch].upper()}/{arch}/16"
    metrics = results_of(root, arch, folder)
    assert_scored(metrics, arch, file, ("crf", "no_crf", "theta_r_crf", "theta_r_no_crf"))
    masks = list((root / "CAUSE" / "cocostuff27" / "primaps_masks").glob(f"{arch}_*"))
    assert len(masks) == 1 and json.loads((masks[0] / "masks.json").read_text())["images"] == 4
    assert len(list(masks[0].glob("*.png"))) == 4
