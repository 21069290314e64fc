"""Options declared with the steps that take them: a step's own option is one declaration, and reaches
its script's --help, `bash run`'s routing and the step's identity; a Config holds its step's options
only; a value no run can use is refused before anything starts, in one line."""
import pytest

from utils.cli.pipeline import known_options, route
from utils.cli.steps import main
from utils.runtime.config import ConfigError, build_parser, default_resolutions, make_config, result_settings
from utils.runtime.options import OPTIONS, POSITIVE, Option
from utils.runtime.steps import STEPS, Step, register

CKPT = "checkpoint/dino_vit_tiny_8.pth"  # the arch follows from the name; no step reads the file here


@pytest.fixture
def toy_step():
    """A step registered as a project built on this one registers it, with two options of its own."""
    step = register(Step(
        name="toy_options", engine="toy_options", script=None,
        options=("dataset", "ckpt", "arch", "seed",
                 Option("toy_scale", "toy", dict(type=int, default=3, help="how far the toy reaches"),
                        refused=POSITIVE),
                 Option("toy_verbosity", "toy", dict(type=int, default=0, help="how much the toy says"),
                        changes_result=False)),
        outputs=lambda paths: [], pipeline="cause", description="a toy with options of its own"))
    yield step
    del STEPS[step.name], OPTIONS["toy_scale"], OPTIONS["toy_verbosity"]


def test_an_option_declared_with_its_step_reaches_help_routing_and_identity(toy_step):
    assert "how far the toy reaches" in build_parser(toy_step).format_help()
    known = known_options([STEPS["mediator"], toy_step])
    assert route(["--toy_options.toy_scale", "5", "--seed", "2"], known) == {
        "mediator": ["--seed", "2"], "toy_options": ["--toy_scale", "5", "--seed", "2"]}
    given = vars(build_parser(toy_step).parse_args(["--toy_scale", "5", "--toy_verbosity", "2", "--ckpt", CKPT]))
    settings = result_settings(make_config(toy_step, None, given))
    assert settings["toy_scale"] == 5 and "toy_verbosity" not in settings, "a result-neutral option is no identity"
    with pytest.raises(ConfigError, match="--toy_scale must be at least 1, got 0"):
        make_config(toy_step, None, {**given, "toy_scale": 0})


def test_a_step_declaring_a_taken_name_otherwise_is_refused(toy_step):
    with pytest.raises(ValueError, match="declared otherwise"):
        register(Step(name="toy_clash", engine="toy_options", script=None,
                      options=(Option("toy_scale", "toy", dict(type=float, default=1.0, help="another")),),
                      outputs=lambda paths: []))
    assert "toy_clash" not in STEPS


def test_a_config_holds_the_options_of_its_step_only():
    crop = make_config(STEPS["crop"], None, {"dataset": "cityscapes", "label_leak": True})
    assert crop.dataset == "cityscapes"
    for name in ("label_leak", "mode", "ckpt", "threshold"):
        with pytest.raises(AttributeError):
            getattr(crop, name)
    fine_tune = make_config(STEPS["fine_tune"], "tr", {"ckpt": CKPT, "label_leak": True})
    assert fine_tune.label_leak is True and fine_tune.epochs == 5
    for name in ("pca_batches", "keep_best_on_val"):
        with pytest.raises(AttributeError):
            getattr(fine_tune, name)
    assert make_config(STEPS["primaps_init"], None, {"ckpt": CKPT, "init_epochs": 3}).epochs == 3


@pytest.mark.parametrize("option,value,expected", [
    ("lr", float("nan"), "--lr must be a positive finite number, got nan"),
    ("lr", -1e-3, "--lr must be a positive finite number, got -0.001"),
    ("lr", float("inf"), "--lr must be a positive finite number"),
    ("num_codebook", 0, "--num_codebook must be at least 1, got 0"),
    ("reduced_dim", -4, "--reduced_dim must be at least 1, got -4"),
    ("projection_dim", 0, "--projection_dim must be at least 1"),
    ("batch_size", 0, "--batch_size must be at least 1"),
    ("crf_workers", 0, "--crf_workers must be at least 1"),
    ("num_pictures", -2, "--num_pictures must be at least -1"),
    ("train_resolution", 0, "--train_resolution must be a positive multiple of the backbone's patch size, at most"),
    ("test_resolution", 0, "--test_resolution must be a positive multiple"),
    ("train_resolution", 100000, "--train_resolution must be a positive multiple of the backbone's patch size, at "
                                 "most 2048, got 100000"),
    ("test_resolution", -64, "--test_resolution must be a positive multiple"),
])
def test_a_value_no_run_can_use_is_refused(option, value, expected):
    step = "test" if option in ("num_pictures", "crf_workers") else "fine_tune"
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        make_config(STEPS[step], "mlp", {"ckpt": CKPT, option: value})


@pytest.mark.parametrize("name", ["pca_batches", "init_epochs"])
def test_the_counts_a_step_declares_itself_are_refused_below_one(name):
    with pytest.raises(ConfigError, match=f"--{name} must be at least 1, got 0"):
        make_config(STEPS["primaps_init"], None, {"ckpt": CKPT, name: 0})


def test_a_tr_head_is_tested_at_the_resolution_it_was_trained_at():
    for step in ("test", "front_door"):
        with pytest.raises(ConfigError, match="--test_resolution 320: the TR head is built for the tokens of its "
                                              "training grid, --train_resolution 224"):
            make_config(STEPS[step], "tr", {"ckpt": CKPT, "train_resolution": 224, "test_resolution": 320})
    trained_at = make_config(STEPS["test"], "tr", {"ckpt": CKPT, "train_resolution": 224})
    assert trained_at.test_resolution == 224 and trained_at.num_queries == (224 // 8) ** 2
    # The MLP head reads any grid: it is tested at the default whatever it trained at.
    assert make_config(STEPS["test"], "mlp", {"ckpt": CKPT, "train_resolution": 224}).test_resolution == 320
    with pytest.raises(ConfigError, match="the TR head"):
        make_config(STEPS["primaps"], None, {"ckpt": CKPT, "head": "tr", "test_resolution": 256})


def test_the_default_resolution_is_the_patchs_multiple_next_to_320():
    step = STEPS["test"]
    assert default_resolutions(step, "tr", 14) == (322, 322)
    assert default_resolutions(step, "tr", 16) == (320, 320) and default_resolutions(step, "tr", 8) == (320, 320)
    assert default_resolutions(STEPS["front_door"], "mlp", 14) == (224, 322)
    cfg = make_config(step, "tr", {"ckpt": "checkpoint/dinov2_vit_small_14.pth"})
    assert (cfg.patch, cfg.train_resolution, cfg.test_resolution) == (14, 322, 322)


@pytest.mark.parametrize("argv,expected", [
    (["--lr", "nan"], "--lr must be a positive finite number, got nan"),
    (["--num_codebook", "0"], "--num_codebook must be at least 1, got 0"),
    (["--train_resolution", "100000"], "at most 2048, got 100000"),
])
def test_a_refused_value_stops_a_step_script_in_one_line(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main("mediator", None, ["--ckpt", CKPT, "--data_dir", str(tmp_path), "--output_root", str(tmp_path), *argv])
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and expected in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []
