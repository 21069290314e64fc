"""Running pipeline steps in-process on a tiny synthetic data set (shared by several tests)."""
import torch

from loader.synthetic import make_synthetic_cocostuff
from models import build_backbone
from utils.engine.crop import write_cropped_dataset
from utils.cli.steps import main
from utils.runtime.steps import STEPS, script_options
from utils.runtime.io import save_torch

STEP_SCRIPTS = {"mediator": (None,), "front_door": ("mlp", "tr"), "fine_tune": ("mlp", "tr"), "test": ("mlp", "tr")}


def make_tiny_setup(root, n_train=4, n_val=3, image_size=128, seed=1):
    """Synthetic cocostuff data with its crops, and a ViT-Tiny/8 stand-in checkpoint in the DINO layout."""
    data_dir = root / "data"
    make_synthetic_cocostuff(data_dir, n_train=n_train, n_val=n_val, image_size=image_size, seed=seed)
    write_cropped_dataset("cocostuff27", data_dir)
    ckpt = root / "checkpoint" / "dino_vit_tiny_8.pth"
    torch.manual_seed(0)
    save_torch(build_backbone("dino_vit_tiny_8").state_dict(), ckpt)
    return data_dir, ckpt


def step_args(data_dir, ckpt, out, resolution=64, codebook=16, projection=24, extra=()):
    return ["--data_dir", str(data_dir), "--ckpt", str(ckpt), "--train_resolution", str(resolution),
            "--test_resolution", str(resolution), "--batch_size", "4", "--num_codebook", str(codebook),
            "--projection_dim", str(projection), "--num_workers", "0", "--crf_workers", "1",
            "--num_pictures", "2", "--output_root", str(out / "CAUSE"), "--results_root", str(out / "results"),
            "--logs_root", str(out / "logs"), *extra]


def only_for(step, args):
    """The options of `args` that `step` has (as `bash run` routes them), in order."""
    known = set(script_options(STEPS[step]))
    kept, i = [], 0
    while i < len(args):
        name = args[i][2:].split("=")[0]
        takes_value = "=" not in args[i] and i + 1 < len(args) and not args[i + 1].startswith("--")
        if name in known:
            kept += args[i:i + 1 + takes_value]
        i += 1 + takes_value
    return kept


def run_step(step, head, args):
    """One step script's work, in this process (`main` of the script), given the options it has."""
    return main(step, head, only_for(step, list(args)))
