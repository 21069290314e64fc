"""Whether a step must run: its identity, the "already done" decision, and the records it writes.

A step's identity is what its result depends on: the values of its result-changing options
(utils/runtime/config.result_settings) and its recipe, the fingerprints of the backbone file, of the
data files it reads and of the earlier artifacts it reads (with the run that made them). A step is
already done when the record of its main artifact says its run finished with exactly the current
identity and its artifacts are what that run wrote; otherwise it says what changed and runs again
(or, with --if_changed refuse, stops). An unfinished run's resume state is continued when it was
made with the same settings (utils/engine/resume.py).
"""
import sys
from pathlib import Path

from loader import split_files
from models import CheckpointError
from utils.runtime.config import ConfigError, result_settings
from utils.runtime.distributed import torchrun_rank
from utils.engine import resume
from utils.runtime.backbone_files import backbone_file
from utils.runtime.download import downloaded
from utils.runtime.paths import RunFiles
from utils.runtime.records import (FingerprintCache, StaleInputError, differences, file_list_fingerprint, identity_of,
                                   now, project_version, read_record, recorded_fingerprint, upstream_entry,
                                   write_record)
from utils.runtime.steps import STEPS, command_of


def say(text):
    """Print once per launch (rank 0 of a torchrun launch)."""
    if torchrun_rank() == 0:
        print(text)


def uses_backbone(cfg):
    """Whether the step reads a backbone file (--ckpt): not where a released model holds its own."""
    return "ckpt" in STEPS[cfg.step].options and cfg.ckpt is not None


def fingerprint_cache(cfg):
    """The cache of the file hashes a step takes: in the output folder of a step that writes there,
    else (the crop step) in the data folder, beside its artifacts."""
    root = cfg.output_root if "output_root" in STEPS[cfg.step].options else cfg.data_dir
    return FingerprintCache(Path(root) / ".fingerprints.json")


def with_backbone_file(cfg):
    """`cfg` with --ckpt turned into the backbone file it names: a path as it is, an arch's release found
    or downloaded (utils/runtime/backbone_files.py); a missing file stops the step."""
    # A step without --cache_dir: backbone_file's default cache.
    found = backbone_file(cfg.ckpt, getattr(cfg, "cache_dir", None), progress=torchrun_rank() == 0).path
    if not found.is_file():
        raise CheckpointError(f"backbone checkpoint {found} does not exist: pass --ckpt an arch name (e.g. "
                              f"--ckpt dino_vit_base_8) for its authors' release, or the path of a release file")
    return cfg.replace(ckpt=found)


def upstream_inputs(cfg, paths, fingerprints):
    """{name: upstream entry} of the earlier artifacts `cfg.step` reads (utils/runtime/records.py); stops
    at a missing one, naming the command that makes it."""
    upstream = {}
    for name, wanted in STEPS[cfg.step].upstream(cfg, paths).items():
        if wanted.step is None:
            if not Path(wanted.path).is_file():
                raise StaleInputError(f"{wanted.path} (given with {wanted.given}) does not exist")
            upstream[name] = upstream_entry(wanted.path, f"the released file given with {wanted.given}", fingerprints)
            continue
        made_by = command_of(wanted.step, cfg)
        if not wanted.path.exists():
            raise StaleInputError(f"{wanted.path} does not exist: run {made_by} first (or place the released "
                                  f"file there)")
        upstream[name] = upstream_entry(wanted.path, made_by, fingerprints)
    return upstream


def data_files(cfg, split):
    """The image and label files `cfg.step` reads of `split`: what its data fingerprint covers. Listing
    them checks the layout (DatasetLayoutError naming what is missing)."""
    images, labels = split_files(cfg.dataset, cfg.data_dir, split, STEPS[cfg.step].train_set)
    return images + labels


def identity(cfg, recipe, fingerprints, files, upstream):
    """Everything the step's result depends on (see the module's doc); `files`: {split: data files}. Stops
    when an earlier artifact was made from other inputs (check_shared_inputs)."""
    step = STEPS[cfg.step]
    resize = {split: step.resize[split] for split in step.data}
    found = {"settings": {**result_settings(cfg), **(recipe.settings() if recipe else {}),
                          **({"resize": resize} if resize else {})},
             "data": {split: file_list_fingerprint(listed, cfg.data_dir)
                      for split, listed in files.items()},
             "upstream": {name: identity_of(entry) for name, entry in upstream.items()}}
    if uses_backbone(cfg):
        found["backbone"] = {"arch": cfg.arch, "fingerprint": fingerprints.file(cfg.ckpt)}
    if cfg.sota_family is not None:
        found["sota"] = sota_identity(cfg, fingerprints)
    check_shared_inputs(cfg, found, upstream)
    return found


def check_shared_inputs(cfg, found, upstream):
    """Stop when an earlier step's artifact was made from another backbone file, released model, data set
    or data files than this step reads now (`found`: its identity), or when two artifacts of one step come
    from different runs, naming the step to run again; a released file (no record) is taken as it is.
    `bash run` never stops here: it reruns each step whose inputs changed before the steps that read it."""
    runs = {}
    for name, entry in upstream.items():
        if entry["origin"] != "trained":
            continue
        record = entry["record"]
        theirs = record.get("identity") if isinstance(record.get("identity"), dict) else {}
        changed = [f"{key} {_short_value(theirs[key])} -> {_short_value(found[key])}"
                   for key in ("backbone", "sota")
                   if isinstance(theirs.get(key), dict) and key in found
                   and theirs[key].get("fingerprint") != found[key]["fingerprint"]]
        settings = theirs.get("settings") if isinstance(theirs.get("settings"), dict) else {}
        if "dataset" in settings and settings["dataset"] != found["settings"].get("dataset", settings["dataset"]):
            changed.append(f"dataset {settings['dataset']} -> {found['settings']['dataset']}")
        data = theirs.get("data") if isinstance(theirs.get("data"), dict) else {}
        for split, now_listed in found["data"].items():
            if split not in data or not _same_files(record.get("step"), cfg.step, split):
                continue
            if data[split] != now_listed:
                changed.append(f"the {split} files (a file added, removed, renamed or rewritten since)")
        if changed:
            raise StaleInputError(f"{entry['file']} was made from other inputs than this run reads: "
                                  f"{'; '.join(changed)}. Run {entry['produced_by']} again first (bash run reruns "
                                  f"every step whose inputs changed)")
        runs.setdefault((record.get("step"), entry["produced_by"]), {})[name] = record.get("run_id")
    for (_, produced_by), of_step in runs.items():
        if len(set(of_step.values())) > 1:
            raise StaleInputError(f"{' and '.join(upstream[name]['file'] for name in of_step)} come from different "
                                  f"runs of {produced_by} (one was stopped while writing them): run it again")


def _same_files(their_step, step, split):
    """Whether two steps read the same files of `split`: val always, train where their train sets agree."""
    return split == "val" or (their_step in STEPS and STEPS[their_step].train_set == STEPS[step].train_set)


def _short_value(value):
    return str(value.get("fingerprint", "?"))[:7 + 12] + "…"


def sota_identity(cfg, fingerprints):
    """The released STEGO or HP model a step reads (--sota_ckpt, and HP's option.json): by content."""
    return {"family": cfg.sota_family, "arch": cfg.arch, "fingerprint": fingerprints.file(cfg.sota_ckpt),
            "options": fingerprints.file(cfg.sota_options) if cfg.sota_options else None}


def released(cfg, label, outputs):
    """True, after saying so, when the step's main artifact exists without a record of how it was made
    (a released file, or one made by another program, such as STEGO's crops): it is used as it is,
    whatever its inputs (they need not exist)."""
    main = Path(outputs[0])
    if getattr(cfg, "restart", False) or not main.exists() or read_record(main) is not None:
        return False
    step = STEPS[cfg.step]
    if step.trains and resume.commit_path(RunFiles(main, step.run_name(cfg.head), cfg.output_root,
                                                   cfg.logs_root)).exists():
        return False  # written by an unfinished run of the step, killed before it wrote its record
    say(f"[{label}] {main} exists without a record of how it was made (a released file, or made by another "
        f"program): skipping the step and using it as it is. Pass --restart to make it again.")
    return True


def decide_to_run(cfg, label, outputs, files, found, fingerprints):
    """False when the step's output is up to date; prints why a step runs again. `files`: the run's
    RunFiles (its resume state), `found`: its identity now."""
    main = Path(outputs[0])
    if getattr(cfg, "restart", False):
        resume.discard(files)
        return True
    saved = _saved_state(label, files) if STEPS[cfg.step].trains else None
    if saved is not None:
        changed_settings = differences(saved["identity"]["settings"], found["settings"])
        if changed_settings:
            raise ConfigError(
                f"[{label}] the unfinished run saved in {saved['path']} used other settings "
                f"({'; '.join(changed_settings)}): rerun with those settings to resume it, or pass --restart "
                f"to start over")
        changed_inputs = _changed_inputs(saved["identity"], found)
        if not changed_inputs:
            return True
        _stale(cfg, label, f"the unfinished run in {saved['path']}", changed_inputs)
        resume.discard(files)
        return True
    if not main.exists():
        return True
    record = read_record(main)
    changed = differences(record.get("identity", {}), found)
    damaged = [str(p) for p in outputs if not _as_written(p, record, fingerprints)]
    if damaged:
        say(f"[{label}] {', '.join(damaged)} is not what its run wrote (missing, damaged, replaced, or written by "
            f"another run than {main}); running the step again")
        return True
    if record.get("complete") and not changed:
        say(f"[{label}] {main} is up to date (made from the same inputs and settings); skipping. "
            f"Pass --restart to make it again.")
        return False
    if record.get("complete"):
        _stale(cfg, label, str(main), changed)
    else:
        say(f"[{label}] {main} comes from an unfinished run without a resume state; starting over")
    return True


def _as_written(path, record, fingerprints):
    """Whether artifact `path` is there as the run of `record` (its main artifact's) wrote it: its record is
    that run's, and its fingerprint the one recorded."""
    if not Path(path).exists():
        return False
    own = read_record(path)
    if own is None or own.get("run_id") != record.get("run_id"):
        return False
    recorded = recorded_fingerprint(record, path)
    return recorded is None or fingerprints.artifact(path) == recorded


def _saved_state(label, files):
    """The committed resume state of the run (resume.describe); one that cannot be trusted is said and
    removed: the step starts over."""
    try:
        return resume.describe(files)
    except resume.UnreadableState as err:
        say(f"[{label}] the saved state of an unfinished run cannot be used ({err}); starting over")
        resume.discard(files)
        return None


def _changed_inputs(old, new):
    return differences({k: v for k, v in old.items() if k != "settings"},
                       {k: v for k, v in new.items() if k != "settings"})


def _stale(cfg, label, what, changed):
    message = f"[{label}] {what} was made from other inputs or settings: {'; '.join(changed)}"
    if getattr(cfg, "if_changed", "rerun") == "refuse":
        raise StaleInputError(message + ". Rerun without --if_changed refuse to make it again.")
    say(message + "; running the step again.")


def step_record(ctx, epochs_done, artifact_fingerprints=None):
    """The record written beside a step's artifacts: its step, identity, inputs, how far it got, how it
    ran (recipe), and what made it (version, command)."""
    cfg, recipe, step = ctx.cfg, ctx.recipe, STEPS[ctx.cfg.step]
    record = {
        "step": cfg.step, "head": cfg.head, "identity": ctx.identity,
        "upstream": {name: {k: v for k, v in entry.items() if k != "record"} for name, entry in ctx.upstream.items()},
        "accepted_partial": ctx.warnings, "version": project_version(), "written": now(), "run_id": ctx.run_id,
        "command": " ".join(sys.argv),
    }
    if cfg.sota_family is not None:
        record["sota"] = {"file": str(cfg.sota_ckpt), "options_file": str(cfg.sota_options) if cfg.sota_options
                          else None, **ctx.identity["sota"]}
    if uses_backbone(cfg):
        # Where the file came from is recorded, apart from the identity: it never makes a step rerun.
        fetched = downloaded(cfg.ckpt)
        record["backbone"] = {"file": str(cfg.ckpt), **ctx.identity["backbone"],
                              "download": fetched.record() if fetched else None}
    if step.trains:
        record.update(complete=epochs_done >= cfg.epochs, epochs_done=epochs_done, epochs=cfg.epochs)
    else:
        record["complete"] = True
    if recipe is not None:
        record["recipe"] = {**recipe.record(), "samples_per_epoch": ctx.samples_per_epoch,
                            "optimizer_steps_per_epoch": ctx.steps_per_epoch}
    if artifact_fingerprints:
        record["artifacts"] = artifact_fingerprints
    return record


def write_artifact_records(ctx, artifacts, epochs_done=None, extra=None):
    """Write the step's record beside each of its artifacts (rank 0, after the artifacts); `extra`:
    step-specific entries of the record."""
    cache = fingerprint_cache(ctx.cfg)
    fingerprints = {str(path): cache.artifact(path) for path in artifacts}
    cache.save()
    record = {**step_record(ctx, epochs_done, fingerprints), **(extra or {})}
    for path in artifacts:
        write_record(path, record)
    return record
