"""Steps declared once (utils/runtime/steps.py): a step's identity follows from its options'
declarations, and one live run at a time works on a step's artifacts. (A step added through the
registry alone runs in `bash run`: tests/test_pipeline.py.)"""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from stand_ins import save_foreign, stand_in_stego, write_stand_in_hp
from steps import make_tiny_setup, run_step, step_args

from utils.engine import status
from utils.engine.runner import run_files
from utils.runtime.config import ConfigError, make_config, result_settings
from utils.runtime.locks import BusyError, exclusive
from utils.runtime.options import OPTIONS, PRIMAPS_MODES
from utils.runtime.recipe import recipe_for
from utils.runtime.records import FingerprintCache, StaleInputError, write_record
from utils.runtime.steps import CAUSE_FEATURES, STEPS

CHOICES = {"dataset": "cityscapes", "arch": "dino_vit_small_8", "precision": "bf16", "mode": "backbone",
           "recipe": "scaled", "head": "mlp", "if_changed": "refuse", "sota_dropout": "eval"}
# Options naming files: the same content elsewhere is the same input.
FILES = ("ckpt", "sota_ckpt", "sota_options", "primaps_ckpt")


def other_value(name, value):
    """A valid value of option `name` other than `value`."""
    if name in CHOICES:
        return CHOICES[name] if value != CHOICES[name] else "cocostuff27" if name == "dataset" else None
    option = OPTIONS[name]
    if option.is_switch:
        return not value
    if option.kwargs.get("type") is Path:
        return Path(value).parent / "elsewhere" / Path(value).name
    if name in ("train_resolution", "test_resolution"):
        return value + 8  # stays a multiple of the patch size
    if name == "dino_small_heads":
        return 6 if value == 12 else 12
    if name == "grid":
        return not value
    if name == "threshold":
        return value / 2
    if isinstance(value, float):
        return value * 2
    if name == "gpu":
        return "cpu"
    return (value or 1) + 1


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("checkpoint") / "dino_vit_tiny_8.pth"
    ckpt.write_bytes(b"the content is what the identity holds")
    return ckpt


@pytest.fixture(scope="module")
def sota_files(tmp_path_factory):
    """Stand-in STEGO and HP files of 27 classes (COCO-Stuff-27 and Cityscapes both have 27)."""
    root = tmp_path_factory.mktemp("sota")
    save_foreign(stand_in_stego("dino_vit_tiny_8", 27, 16), root / "stego.ckpt")
    return {"stego": root / "stego.ckpt", "hp": write_stand_in_hp(root / "hp", "dino_vit_tiny_8", 27, 16)}


def decision(base, changed, tmp_path):
    """Whether a step whose artifact was made with `base` (its record says so) runs again for `changed`."""
    fingerprints = FingerprintCache(None)

    def identity_of(cfg):
        recipe = recipe_for(cfg, STEPS[cfg.step].paper_gpus, 1) if STEPS[cfg.step].trains else None
        return status.identity(cfg, recipe, fingerprints, {}, {})

    artifact = tmp_path / "artifact.pth"
    artifact.write_bytes(b"made")
    write_record(artifact, {"complete": True, "identity": identity_of(base)})
    return status.decide_to_run(changed, "step", [artifact], run_files(changed, [artifact]), identity_of(changed),
                                fingerprints)


def cases():
    for step in STEPS.values():
        for mode in PRIMAPS_MODES if "mode" in step.options else (None,):
            for head in ("tr", "mlp") if step.head == "script" else (None,):
                yield pytest.param(step.name, mode, head, id="-".join(filter(None, (step.name, mode, head))))


@pytest.mark.parametrize("name,mode,head", cases())
def test_every_result_changing_option_reruns_its_step_and_no_other_does(name, mode, head, backbone_file, sota_files,
                                                                         tmp_path, capsys):
    step = STEPS[name]
    given = {"ckpt": backbone_file, "data_dir": tmp_path, "sota_ckpt": sota_files["hp" if mode == "hp" else "stego"],
             **({"mode": mode} if mode else {})}
    base = make_config(step, head, given)
    # HP's option.json, found beside its file: given, when the file moves elsewhere.
    given["sota_options"] = getattr(base, "sota_options", None)
    reruns, neutral = [], []
    # The TR head reads its training grid's tokens: a test resolution of its own is refused, not a new identity.
    refused = {"test_resolution"} if base.head == "tr" and "test_resolution" in step.options else set()
    for option in refused:
        with pytest.raises(ConfigError, match="the TR head is built for the tokens of its training grid"):
            make_config(step, head, {**given, option: other_value(option, getattr(base, option))})
    for option in step.options:
        if option in refused or (OPTIONS[option].kwargs.get("type") is Path and getattr(base, option) is None):
            continue  # a path the step does not use here (the ViT inside a released file, no HP options)
        value = other_value(option, getattr(base, option) if option != "head" else "tr")
        if option in FILES:  # the same file elsewhere: its content is what counts
            value.parent.mkdir(exist_ok=True)
            value.write_bytes(getattr(base, option).read_bytes())
        changed = make_config(step, head, {**given, option: value})
        if decision(base, changed, tmp_path):
            reruns.append(option)
        else:
            neutral.append(option)
    capsys.readouterr()
    unused = set(step.unused(vars(base) | {"mode": mode}))
    expected = {o for o in step.options
                if OPTIONS[o].changes_result and o not in step.neutral and o not in unused and o not in refused}
    # --restart redoes the step whatever its inputs; --if_changed refuse stops where it would rerun.
    assert set(reruns) == expected | {"restart"}, (name, mode)
    assert {"num_workers", "data_dir"} <= set(neutral)
    if step.trains:
        assert {"port", "logs_root", "nproc", "gpu", "ckpt"} - unused <= set(neutral)
    if mode not in (None, "cause"):
        assert not set(CAUSE_FEATURES) & set(reruns), f"CAUSE's options play no part in {mode} mode"
    if mode in ("stego", "hp") or name == "test_sota":
        assert not {"ckpt", "arch", "dino_small_heads"} & set(reruns), "the ViT inside the released file is used"
        assert ("sota_dropout" in reruns) == (mode == "stego"), "STEGO's dropout is a choice; HP's eval mode is not"
    # The identity itself names what changed, so the step says why it runs again.
    for option in expected:
        changed = make_config(step, head, {**given, option: other_value(option, getattr(base, option))})
        assert option in result_settings(changed) and result_settings(changed) != result_settings(base)


@pytest.mark.parametrize("name", ["mediator", "test_primaps"])
def test_a_changed_option_is_refused_with_if_changed_refuse(name, backbone_file, tmp_path):
    step = STEPS[name]
    given = {"ckpt": backbone_file, "data_dir": tmp_path}
    base = make_config(step, None, given)
    changed = make_config(step, None, {**given, "seed" if step.trains else "num_pictures": 7, "if_changed": "refuse"})
    with pytest.raises(StaleInputError, match="(seed|num_pictures): .* -> 7.*Rerun without --if_changed refuse"):
        decision(base, changed, tmp_path)


def test_a_step_runs_alone_on_its_artifacts_until_its_process_dies(tmp_path):
    lock = tmp_path / "CAUSE" / "x" / ".mediator.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
            from utils.runtime.locks import exclusive
            with exclusive({str(lock)!r}, "mediator"):
                print("holding", flush=True)
                time.sleep(60)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(BusyError, match=f"mediator is being run by another process right now \\(PID {holder.pid} "):
            with exclusive(lock, "mediator"):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Killed outright, it leaves its lock file, but not its lock: the next run goes ahead, and cleans up.
    with exclusive(lock, "mediator"):
        assert lock.read_text().startswith(f"PID {os.getpid()} ")
    assert not lock.exists()


def test_a_second_run_of_a_step_stops_at_once_naming_the_first(tmp_path, capsys):
    data_dir, ckpt = make_tiny_setup(tmp_path, n_train=1, n_val=1)
    args = step_args(data_dir, ckpt, tmp_path, extra=["--max_steps", "1"])
    lock = tmp_path / "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16/.mediator.lock"
    capsys.readouterr()
    with exclusive(lock, "a test holding the mediator"):
        with pytest.raises(SystemExit) as stopped:
            run_step("mediator", None, args)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and f"PID {os.getpid()}" in error and "is being run by another process" in error
    assert not (tmp_path / "CAUSE/cocostuff27/modularity/dino_vit_tiny_8/16/modular.npy").exists()


def test_primaps_runs_in_float32_unless_asked_and_the_cause_steps_in_fp16_on_a_gpu(backbone_file, monkeypatch):
    """On a GPU, `auto` is the official CAUSE fp16; PriMaPs-EM's official runs are float32."""
    from utils.runtime import config
    monkeypatch.setattr(config, "device_type", lambda gpu: "cuda")
    given = {"ckpt": backbone_file}
    assert make_config(STEPS["front_door"], "tr", given).precision == "fp16"
    for name in ("primaps_init", "primaps", "test_primaps"):
        assert make_config(STEPS[name], None, given).precision == "fp32", name
        assert make_config(STEPS[name], None, {**given, "precision": "bf16"}).precision == "bf16", name
