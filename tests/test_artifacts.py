"""Artifact paths, derived configuration, and strict loading of released CAUSE files."""
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_golden
from steps import make_tiny_setup, run_step, step_args

from models import CheckpointError
from modules.heads import SegmentModule
from modules.probe import ClusterModule
from utils.runtime.artifacts import ArtifactError, load_modular, load_state_strict
from utils.runtime.config import parse_config
from utils.runtime.paths import ArtifactPaths
from utils.runtime.steps import STEPS
from utils.runtime.records import record_path

LAYOUT = load_golden("heads.pt")["layout"]


def released_file(tmp_path, name, shapes, fill=0.5):
    path = tmp_path / f"{name}.pth"
    torch.save({key: torch.full(tuple(shape), fill) for key, shape in shapes.items()}, path)
    return path


def test_artifact_paths_follow_the_official_layout():
    paths = ArtifactPaths("cocostuff27", "dino_vit_base_8", 2048, "tr")
    assert paths.modular == Path("CAUSE/cocostuff27/modularity/dino_vit_base_8/2048/modular.npy")
    assert paths.segment == Path("CAUSE/cocostuff27/dino_vit_base_8/2048/segment_tr.pth")
    assert paths.cluster == Path("CAUSE/cocostuff27/dino_vit_base_8/2048/cluster_tr.pth")
    assert paths.fine_tuned_segment == Path("CAUSE/cocostuff27/dino_vit_base_8/2048/segment_tr_fine_tuned.pth")
    assert record_path(paths.segment) == Path("CAUSE/cocostuff27/dino_vit_base_8/2048/segment_tr.json")
    assert record_path(paths.modular) == paths.modular.with_name("modular.json")
    assert paths.results == Path("results/cocostuff27/TR/dino_vit_base_8/2048")
    with pytest.raises(ValueError, match="head"):
        _ = ArtifactPaths("cocostuff27", "dino_vit_base_8", 2048).segment


@pytest.mark.parametrize("step,head,ckpt,train,test,queries", [
    ("front_door", "tr", "checkpoint/dino_vit_base_8.pth", 320, 320, 1600),
    ("front_door", "mlp", "checkpoint/dino_vit_base_8.pth", 224, 320, None),
    ("fine_tune", "mlp", "checkpoint/dinov2_vit_base_14.pth", 224, 322, None),
    ("test", "tr", "checkpoint/dinov2_vit_base_14.pth", 322, 322, 529),
    ("mediator", None, "checkpoint/dino_vit_small_16.pth", 320, None, 400),  # it takes no --test_resolution
])
def test_resolutions_and_derived_sizes(step, head, ckpt, train, test, queries):
    cfg = parse_config(STEPS[step], head, ["--ckpt", ckpt])
    assert (cfg.train_resolution, getattr(cfg, "test_resolution", None)) == (train, test)
    if queries:
        assert cfg.num_queries == queries
    assert cfg.baseline == Path(ckpt).stem


def test_epochs_follow_the_paper():
    assert parse_config(STEPS["fine_tune"], "tr", []).epochs == 5
    assert parse_config(STEPS["fine_tune"], "mlp", []).epochs == 1
    assert parse_config(STEPS["front_door"], "tr", []).epochs == 2
    assert parse_config(STEPS["mediator"], None, []).epochs == 1


def test_checkpoint_named_otherwise_needs_arch():
    with pytest.raises(CheckpointError, match="dino_vit_base_8"):
        parse_config(STEPS["mediator"], None, ["--ckpt", "weights/backbone.pth"])
    named = parse_config(STEPS["mediator"], None, ["--ckpt", "weights/backbone.pth", "--arch", "ibot_vit_base_16"])
    assert named.dim == 768


@pytest.mark.parametrize("head", ["mlp", "tr"])
def test_released_files_load_strictly(tmp_path, head):
    segment = SegmentModule(head, 768, 90, 2048, 27, 1600 if head == "tr" else None)
    released = released_file(tmp_path, f"segment_{head}", LAYOUT[f"segment_{head}"])
    load_state_strict(segment, released, "segment module", "x")
    assert all(torch.all(v == 0.5) for v in segment.state_dict().values())
    cluster = ClusterModule(2048, 768, 90, 27)
    load_state_strict(cluster, released_file(tmp_path, "cluster", LAYOUT["cluster"]), "cluster probe", "x")
    np.save(tmp_path / "modular.npy", np.zeros(LAYOUT["modular.npy"], np.float32))
    assert load_modular(tmp_path / "modular.npy", 2048, 768).shape == tuple(LAYOUT["modular.npy"])


def small_layout(head, dim=32, classes=5, queries=16):
    module = SegmentModule(head, dim, 9, 20, classes, queries if head == "tr" else None)
    return {k: v.shape for k, v in module.state_dict().items()}


@pytest.mark.parametrize("file_head,file_kwargs,run_kwargs,message", [
    ("tr", {}, {"head": "mlp"}, "holds a TR head but this is a MLP run"),
    ("mlp", {}, {"head": "tr"}, "holds a MLP head but this is a TR run"),
    ("tr", {"dim": 48}, {"head": "tr"}, "backbone width"),
    ("tr", {"queries": 25}, {"head": "tr"}, "trained for 25 tokens, this run uses 16"),
    ("mlp", {"classes": 21}, {"head": "mlp"}, "21 classes, this dataset 5"),
])
def test_mismatched_files_are_refused_with_the_reason(tmp_path, file_head, file_kwargs, run_kwargs, message):
    path = released_file(tmp_path, "segment", small_layout(file_head, **file_kwargs))
    head = run_kwargs["head"]
    segment = SegmentModule(head, 32, 9, 20, 5, 16 if head == "tr" else None)
    before = {k: v.clone() for k, v in segment.state_dict().items()}
    with pytest.raises(ArtifactError, match=message):
        load_state_strict(segment, path, "segment module", "train_front_door.py")
    assert all(torch.equal(before[k], v) for k, v in segment.state_dict().items()), "nothing may be half-loaded"


def test_truncated_or_missing_files_are_explained(tmp_path):
    path = released_file(tmp_path, "cluster", {"codebook": (11, 32), "cluster_probe": (5, 9)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="not a complete torch file.*delete it and rerun fine_tuning_tr.py"):
        load_state_strict(ClusterModule(11, 32, 9, 5), path, "cluster probe", "fine_tuning_tr.py")
    with pytest.raises(ArtifactError, match="run train_mediator.py first"):
        load_modular(tmp_path / "absent.npy", 11, 32)
    np.save(tmp_path / "modular.npy", np.zeros((11, 48), np.float32))
    with pytest.raises(ArtifactError, match=r"expected \(11, 32\)"):
        load_modular(tmp_path / "modular.npy", 11, 32)


def test_a_test_run_given_the_other_heads_file_stops_and_writes_nothing(tmp_path, capsys):
    data_dir, ckpt = make_tiny_setup(tmp_path, n_train=1, n_val=1)
    args = step_args(data_dir, ckpt, tmp_path)
    head_dir = tmp_path / "CAUSE/cocostuff27/dino_vit_tiny_8/16"
    mediator_dir = tmp_path / "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16"
    for folder in (head_dir, mediator_dir):
        folder.mkdir(parents=True)
    np.save(mediator_dir / "modular.npy", np.zeros((16, 192), np.float32))
    torch.save(SegmentModule("mlp", 192, 90, 24, 27).state_dict(), head_dir / "segment_tr.pth")
    torch.save(ClusterModule(16, 192, 90, 27).state_dict(), head_dir / "cluster_tr.pth")
    with pytest.raises(SystemExit) as stopped:
        run_step("test", "tr", args)
    assert stopped.value.code == 2
    assert "holds a MLP head but this is a TR run" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
