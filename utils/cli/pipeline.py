"""`bash run`: every step of CAUSE for one dataset, head and backbone, each with its own options.

    bash run [demo] [--head tr|mlp] [--primaps] [OPTION ...]

--primaps runs PriMaPs-EM (train_primaps.py, test_primaps.py) and ends by printing the results side by
side: in cause mode (the default) after the CAUSE steps, whose features it fits; with `--mode backbone`
alone, on the plain backbone; with `--mode stego|hp --sota_ckpt FILE` after test_sota.py has evaluated
that released model.

An option goes to the steps it is meant for: `--front_door.epochs 2` to that step alone, `--epochs 1`
to every step that has an --epochs option, shared options (--dataset, --data_dir, --ckpt, --seed,
--precision, ...) to every step. An option no step knows, or a value a step refuses, stops the run
before any step starts. The environment gives defaults: DATASET, HEAD, CKPT, DATA_DIR, GPU.
Each step skips work whose output is up to date and resumes an interrupted one (docs/runs.md).
The demo ends by segmenting a few of its images with predict.py, as a user would their own.

`--seeds 0,1,2` runs the chain once per seed, each seed's files apart (ROOT/seed_S under the output,
results and logs roots), then prints each figure's mean ± standard deviation over the seeds. A run ends
by writing the report of every evaluation under the results root (report.py) and printing its path.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from errors import UserError
from utils.engine.predict import PREDICT
from utils.runtime.config import parse_config
from utils.runtime.options import HEADS, OPTIONS
from utils.runtime.paths import paths_of
from utils.runtime.steps import pipeline_steps, script_options
from utils.tools.report import format_mean_std, write_report

ROOT = Path(__file__).resolve().parents[2]
# {PriMaPs mode: the chains `bash run --primaps` runs}; without --primaps the CAUSE chain alone.
PRIMAPS_CHAINS = {"cause": ("cause", "primaps"), "backbone": ("primaps",), "stego": ("sota", "primaps"),
                  "hp": ("sota", "primaps")}
ENVIRONMENT = {"DATASET": "dataset", "CKPT": "ckpt", "DATA_DIR": "data_dir", "GPU": "gpu"}
# Options that name one step's own work: given without a step they would redo more than meant.
STEP_ONLY = {"restart"}


class PipelineError(UserError):
    pass


def chain(primaps=False, mode="cause"):
    """The steps `bash run` runs, in order: CAUSE's; with --primaps those PriMaPs-EM's `mode` needs, then its own."""
    return pipeline_steps(*(PRIMAPS_CHAINS[mode] if primaps else ("cause",)))


def mode_of(tokens):
    """The PriMaPs mode `bash run`'s options ask for (the last --mode; cause when none)."""
    mode = "cause"
    for i, token in enumerate(tokens):
        name, has_value, value = token.partition("=")
        if name == "--mode" or name.endswith(".mode"):
            mode = value if has_value else (tokens[i + 1] if i + 1 < len(tokens) else mode)
    if mode not in PRIMAPS_CHAINS:
        raise PipelineError(f"--mode must be one of {', '.join(PRIMAPS_CHAINS)}, got {mode!r}")
    return mode


def known_options(steps):
    """{step name: the options its script takes} of a chain."""
    return {step.name: set(script_options(step)) for step in steps}


def route(tokens, known):
    """{step: argv} from `bash run`'s option tokens (after `demo` and --head are taken out); `known`:
    {step name: the options it takes}."""
    steps = list(known)
    routed = {step: [] for step in steps}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise PipelineError(f"unexpected argument {token!r}: options look like --name value or "
                                f"--step.name value (bash run --help)")
        name, has_value, value = token[2:].partition("=")
        step, dot, option = name.rpartition(".")
        if dot and step not in steps:
            raise PipelineError(f"--{name}: no step {step!r} in this pipeline; steps: {', '.join(steps)}")
        targets = [step] if dot else [s for s in steps if option in known[s]]
        if not targets or (dot and option not in known[step]):
            where = f"step {step!r}" if dot else "no step"
            raise PipelineError(f"unknown option --{name}: {where} knows --{option} (bash run --help lists them)")
        if not dot and option in STEP_ONLY:
            raise PipelineError(f"--{option} redoes one step: say which, e.g. --front_door.{option} (later steps "
                                f"rerun by themselves, as their inputs change); --crop.{option} remakes the crops")
        argv = [f"--{option}"]
        if not OPTIONS[option].is_switch:
            if not has_value:
                if i + 1 >= len(tokens):
                    raise PipelineError(f"--{name} needs a value")
                i += 1
                value = tokens[i]
            argv.append(value)
        elif has_value:
            raise PipelineError(f"--{name} is a switch and takes no value")
        for target in targets:
            routed[target] += argv
        i += 1
    return routed


def split_head(tokens, head):
    """(the head, the other tokens): --head is the pipeline's own option (it picks the scripts)."""
    rest = []
    i = 0
    while i < len(tokens):
        if tokens[i] == "--head":
            if i + 1 >= len(tokens):
                raise PipelineError("--head needs a value: mlp or tr")
            head = tokens[i + 1]
            i += 2
            continue
        if tokens[i].startswith("--head="):
            head = tokens[i].split("=", 1)[1]
        else:
            rest.append(tokens[i])
        i += 1
    if head not in HEADS:
        raise PipelineError(f"--head must be mlp or tr, got {head!r}")
    return head, rest


def usage():
    steps = pipeline_steps("cause", "sota", "primaps")
    lines = [__doc__.strip(), "", "pipeline options:",
             "  demo                 run on the embedded demo data (default when no data is configured)",
             f"  --head {{{','.join(HEADS)}}}       the segmentation head (default tr; PriMaPs' too)",
             "  --primaps            PriMaPs-EM (train_primaps.py, test_primaps.py) in its --mode, after the steps "
             "that mode needs, and the results side by side",
             "  --seeds S,S,...      the chain once per seed, each apart (ROOT/seed_S), then mean ± std over the seeds",
             "",
             "step options (--NAME for every step that has it, --STEP.NAME for one):"]
    takes = known_options(steps)
    for option in OPTIONS.values():
        if option.name == "head":  # the pipeline's own, above
            continue
        reached = [step.name for step in steps if option.name in takes[step.name]]
        lines.append(f"  {option.flag:<20} [{', '.join(reached)}] {option.kwargs.get('help', '')}".rstrip())
    return "\n".join(lines)


def command(step, head, argv):
    """The command line of one step of the chain: its script, or utils/cli/steps.py for one without."""
    if step.script is None:
        return ["-m", "utils.cli.steps", step.name, *(["--head", head] if step.head == "script" else []), *argv]
    return [step.script.format(head=head), *argv]


def main(argv=None, seed=None, chains=None):
    """`bash run`; run_seeds calls it once per seed (`seed`), collecting each chain's evaluations in `chains`."""
    tokens = list(sys.argv[1:] if argv is None else argv)
    if "--help" in tokens or "-h" in tokens:
        print(usage())
        return 0
    seeds, tokens = split_seeds(tokens)
    if seeds is not None:
        return run_seeds(seeds, tokens)
    demo = bool(tokens) and tokens[0] == "demo"
    if demo:
        tokens = tokens[1:]
    head, rest = split_head(tokens, os.environ.get("HEAD", "tr"))
    primaps = "--primaps" in rest
    rest = [token for token in rest if token != "--primaps"]
    mode = mode_of(rest) if primaps else "cause"
    steps = chain(primaps, mode)
    defaults = [f"--{option}={os.environ[variable]}" for variable, option in ENVIRONMENT.items()
                if os.environ.get(variable)]
    data_given = any(t.split("=")[0].endswith("data_dir") for t in rest + defaults) or os.environ.get("CAUSE_DATA_DIR")
    if not demo and not data_given and not (ROOT / "data").is_dir():
        print("No data directory configured (--data_dir, DATA_DIR, or ./data): running the demo.")
        print("It checks the pipeline on synthetic data; see README.md for a real run (python prepare_data.py "
              "--dataset cocostuff27 --data_dir DATA --download prepares a data set).")
        demo = True
    known = known_options(steps)
    last = []
    if demo:
        from utils.engine.predict import parse_options
        from utils.tools.demo import predict_arguments, prepare
        data_dir, ckpt, options = prepare(ROOT / "demo")
        defaults = [*options, f"--data_dir={data_dir}", f"--ckpt={ckpt}", "--dataset=cocostuff27"]
        # predict.py takes the options it shares with the steps as the steps do (the model's sizes).
        routed = route(seeded(defaults + rest, seed), {**known, "predict": set(PREDICT)})
        model = "cause" if mode == "cause" else "primaps"  # the CAUSE steps ran only in cause mode
        predict_argv = routed.pop("predict") + predict_arguments(ROOT / "demo", head, model)
        parse_options(predict_argv)
        last.append(["predict.py", *predict_argv])
    else:
        routed = route(seeded(defaults + rest, seed), known)
    for step in steps:
        if step.head == "option":
            routed[step.name] = ["--head", head, *routed[step.name]]
    # Every step's options are checked before the first one starts.
    configs = {step.name: parse_config(step, head, routed[step.name]) for step in steps}
    for line in [command(step, head, routed[step.name]) for step in steps] + last:
        print("+ " + shlex.join(["python", *line] if line[0] == "-m" else line), flush=True)
        done = subprocess.run([sys.executable, *line], cwd=ROOT)
        if done.returncode:
            return done.returncode
    finish(steps, configs, chains)
    if primaps:
        print_side_by_side(configs)
    return 0


def print_side_by_side(configs):
    """What PriMaPs-EM starts from and what it gives, after the CRF, from their metrics.json."""
    primaps = configs["test_primaps"]
    theirs = json.loads(paths_of(primaps).primaps_metrics.read_text())
    rows = []
    if primaps.mode == "cause":
        cause = configs["test"]
        name = f"CAUSE {cause.head.upper()}"
        rows.append((name, json.loads(paths_of(cause).metrics.read_text())["crf"], "after the CRF"))
        added = f"{name} + PriMaPs-EM"
    elif primaps.mode == "backbone":
        rows.append(("its initialisation (PCA + k-means)", theirs["init_crf"], "after the CRF"))
        added = "PriMaPs-EM on the backbone"
    else:
        sota = json.loads(paths_of(configs["test_sota"]).sota_metrics.read_text())
        name = primaps.mode.upper()
        rows.append((name, sota["crf"], "its own evaluation, after the CRF"))
        rows.append((name, sota["primaps_protocol_crf"], "PriMaPs-EM's evaluation, after the CRF"))
        added = f"{name} + PriMaPs-EM"
    rows.append((added, theirs["crf"], "θ_M, PriMaPs-EM's evaluation, after the CRF"))
    width = max(len(row[0]) for row in rows)
    for name, result, how in rows:
        print(f"{name:<{width}}  mIoU {result['mIoU']:.1f}  pAcc {result['pAcc']:.1f}  ({how})")


# The folders each seed of --seeds gets its own of: ROOT/seed_S.
SEED_ROOTS = ("output_root", "results_root", "logs_root")


def split_seeds(tokens):
    """(the seeds --seeds names, in order, or None without it; the other tokens)."""
    seeds, rest = None, []
    i = 0
    while i < len(tokens):
        name, has_value, value = tokens[i].partition("=")
        if name != "--seeds":
            rest.append(tokens[i])
            i += 1
            continue
        if not has_value:
            if i + 1 >= len(tokens):
                raise PipelineError("--seeds needs a value: the seeds, comma-separated (--seeds 0,1,2)")
            value = tokens[i + 1]
            i += 1
        i += 1
        try:
            seeds = [int(seed) for seed in value.split(",")]
        except ValueError:
            raise PipelineError(f"--seeds takes whole numbers, comma-separated (--seeds 0,1,2), got {value!r}") \
                from None
        if len(set(seeds)) != len(seeds):
            raise PipelineError(f"--seeds names a seed twice: {value}")
    return seeds, rest


def seeded(tokens, seed):
    """The option tokens of one seed's chain: --seed SEED, and each of SEED_ROOTS (the one given, else its
    default) with seed_SEED under it. `seed` None: the tokens as they are."""
    if seed is None:
        return tokens
    roots = {name: str(OPTIONS[name].default) for name in SEED_ROOTS}
    kept = []
    i = 0
    while i < len(tokens):
        if not tokens[i].startswith("--"):  # a value
            kept.append(tokens[i])
            i += 1
            continue
        name, has_value, value = tokens[i][2:].partition("=")
        _, dot, option = name.rpartition(".")
        if option == "seed" or (dot and option in SEED_ROOTS):
            raise PipelineError(f"--{name}: --seeds sets each chain's --seed and its folders (ROOT/seed_S); give "
                                f"the roots to every step (--{option}), and no --seed")
        if option not in SEED_ROOTS:
            kept.append(tokens[i])
            i += 1
            continue
        if not has_value:
            if i + 1 >= len(tokens):
                raise PipelineError(f"--{name} needs a value")
            value = tokens[i + 1]
            i += 1
        roots[option] = value
        i += 1
    return [*kept, *(f"--{name}={Path(root) / f'seed_{seed}'}" for name, root in roots.items()), f"--seed={seed}"]


def evaluations(steps, configs):
    """{metrics.json: its step's config} of each evaluation of the chain, in its order."""
    found = {}
    for step in steps:
        outputs = step.outputs(paths_of(configs[step.name]))
        if outputs and Path(outputs[0]).name == "metrics.json":
            found[Path(outputs[0])] = configs[step.name]
    return found


def finish(steps, configs, chains):
    """The end of a chain: the report of every evaluation under the results root of its evaluations, its
    path printed; a chain of --seeds instead hands that root's parent and its metrics.json files to run_seeds."""
    found = evaluations(steps, configs)
    if not found:
        return
    results_root = Path(list(found.values())[-1].results_root)
    if chains is not None:
        chains.append((results_root.parent, list(found)))
        return
    md_path, _ = write_report(results_root)
    print(f"report: {md_path}")


def run_seeds(seeds, tokens):
    """The chain once per seed, then each evaluation's figures over the seeds, and the report over all."""
    chains = []
    for seed in seeds:
        print(f"=== seed {seed} ({seeds.index(seed) + 1} of {len(seeds)}) ===", flush=True)
        code = main(tokens, seed, chains)
        if code:
            return code
    if chains:  # a chain with an evaluation
        print_over_seeds(seeds, chains)
        md_path, _ = write_report(chains[0][0])
        print(f"report: {md_path}")
    return 0


def print_over_seeds(seeds, chains):
    """Each evaluation's figures over the seeds: mean ± standard deviation (n − 1), and n."""
    print(f"over seeds {', '.join(map(str, seeds))} (n = {len(seeds)}), mean ± std:")
    for files in zip(*(chain_files for _, chain_files in chains), strict=True):
        reports = [json.loads(path.read_text()) for path in files]
        print(f"{files[0].relative_to(chains[0][0] / f'seed_{seeds[0]}').parent}:")
        for variant in reports[0]["variants"]:
            figures = "  ".join(f"{figure} {format_mean_std([report[variant][figure] for report in reports], 2)}"
                                for figure in ("mIoU", "pAcc"))
            print(f"  {variant:<24} {figures}  (n = {len(reports)})")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:
        print(f"error [run]: {err}", file=sys.stderr)
        sys.exit(2)
