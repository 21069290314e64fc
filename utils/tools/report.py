"""The report: every evaluation's metrics.json under a results folder, as the papers' tables.

    python report.py [--results_root results]

writes RESULTS_ROOT/report.md and RESULTS_ROOT/report.csv: one table per data set and evaluation
protocol (utils/engine/protocols.py; a metrics.json names its own, and a table holds one protocol
only, named above it), one row per configuration: the method and what of it is scored (CAUSE's
cluster centroids; PriMaPs-EM's θ_M, θ_R or initial prototypes; a released STEGO or HP model's
probes), the backbone, the head or mode, the training recipe, whether the label leak was on, and the
seeds. Columns: mIoU and pixel accuracy after the CRF and without, the published figure of that row
(utils/tools/paper_results.py) and our difference to it, and where each number came from (the
evaluation's folder, when it was written, the project's revision).

Evaluations of one configuration that differ only in their seed (`bash run --seeds`) make one row:
mean ± standard deviation (n − 1 in the denominator) over the n seeds; where one seed was evaluated in
several folders, the latest evaluation counts.
"""
import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from errors import UserError
from utils.engine.evaluate import figure_pairs
from utils.runtime.io import save_text
from utils.runtime.records import now
from utils.tools import paper_results

REPORT_MD, REPORT_CSV = "report.md", "report.csv"
FIGURES = (("crf", "mIoU"), ("crf", "pAcc"), ("no_crf", "mIoU"), ("no_crf", "pAcc"))
_UNNAMED = {"name": "not recorded", "words": "an evaluation made before metrics.json named its protocol: run its "
                                             "test step again (--restart) to compare it"}
# What each variant prefix of an evaluation step scores.
_SCORED = {
    "test": {"": "cluster centroids"},
    "test_primaps": {"": "θ_M", "theta_r_": "θ_R", "init_": "initial prototypes"},
    "test_sota": {"": "cluster probe", "linear_": "linear probe (uses labels)",
                  "primaps_protocol_": "cluster centres"},
}


class ReportError(UserError):
    pass


def mean_std(values):
    """(mean, sample standard deviation: None for a single value) of a figure over seeds."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def format_mean_std(values, digits=1):
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class Row:
    """One configuration of one table: its evaluations, at most one per seed set."""
    dataset: str
    protocol: dict
    columns: dict  # method, scored, backbone, head_or_mode, recipe, label_leak
    paper: paper_results.PaperFigure | None
    evaluations: dict = field(default_factory=dict)  # {seeds: (metrics, folder, crf variant, no-crf variant)}

    def add(self, seeds, entry):
        kept = self.evaluations.get(seeds)
        if kept is None or entry[0].get("written", "") > kept[0].get("written", ""):
            self.evaluations[seeds] = entry

    def values(self, variant, figure):
        return [metrics[pair[0] if variant == "crf" else pair[1]][figure]
                for metrics, _, *pair in self.evaluations.values()]

    @property
    def seeds(self):
        found = [seed for seeds in self.evaluations for seed in seeds]
        return ", ".join(map(str, sorted(found))) if found else "–"


def _records(metrics):
    """The records of the trained artifacts the evaluation read."""
    return [entry["record"] for entry in metrics.get("upstream", {}).values() if entry.get("origin") == "trained"]


def _arch(metrics):
    backbone = metrics.get("backbone")
    if isinstance(backbone, dict):
        return backbone.get("arch")
    return metrics.get("identity", {}).get("settings", {}).get("arch") or backbone


def _configuration(metrics, scored):
    step, records = metrics["step"], _records(metrics)
    released = any(entry.get("origin") == "released" for entry in metrics.get("upstream", {}).values())
    recipes = sorted({record.get("recipe", {}).get("name", "?") for record in records}
                     | ({"released"} if released or not records else set()))
    leaks = {record["identity"]["settings"]["label_leak"] for record in records
             if "label_leak" in record.get("identity", {}).get("settings", {})}
    if step == "test":
        method, head_or_mode = "CAUSE", metrics["head"].upper()
    elif step == "test_primaps":
        mode = metrics.get("mode")
        method = "PriMaPs-EM" + (f" on {mode.upper()}" if mode in ("stego", "hp") else "")
        head_or_mode = f"{mode} {metrics['head'].upper()}" if mode == "cause" else mode
    else:
        method, head_or_mode = metrics["method"].upper(), Path(metrics.get("checkpoint") or "").name
    return {"method": method, "scored": scored, "backbone": _arch(metrics), "head_or_mode": head_or_mode,
            "recipe": "+".join(recipes), "label_leak": "yes" if True in leaks else "no" if leaks else "–"}


def _paper(metrics, prefix, protocol_key):
    step, dataset, arch = metrics["step"], metrics["dataset"], _arch(metrics)
    if step == "test" and prefix == "" and protocol_key == "cause":
        return paper_results.cause_figure(dataset, metrics["head"], arch)
    if step == "test_primaps" and protocol_key == "primaps":
        mode = metrics.get("mode")
        if mode == "backbone":
            row = {"": "PriMaPs-EM", "init_": "baseline"}.get(prefix)
            return paper_results.primaps_figure(row, dataset, arch) if row else None
        if mode in ("stego", "hp") and prefix == "":
            return paper_results.primaps_figure("+SotA+PriMaPs", dataset, arch, mode)
    if step == "test_sota" and prefix == "" and protocol_key == "stego":
        return paper_results.stego_figure(dataset, Path(metrics.get("checkpoint") or "").name)
    return None


def _protocol_of(metrics, variant):
    """(key, description) of the protocol `variant` was scored under."""
    for key, protocol in metrics.get("evaluation_protocols", {}).items():
        if variant in protocol.get("variants", ()):
            return key, protocol
    return None, _UNNAMED


def _comparable(protocol, crf, no_crf):
    """What of a protocol must agree for two results to share a column: all of it but the variant names."""
    shown = {key: value for key, value in protocol.items() if key not in ("variants", "flip_averaged")}
    if "flip_averaged" in protocol:
        shown["flip_averaged"] = [protocol["flip_averaged"].get(crf), protocol["flip_averaged"].get(no_crf)]
    return shown


def _identity_without_seed(metrics):
    """What a result depends on, its seed left out: configurations that differ only there share a row."""
    identity = metrics.get("identity", {})
    upstream = {}
    for name, entry in metrics.get("upstream", {}).items():
        if entry.get("origin") == "trained":
            record = entry["record"]
            settings = {k: v for k, v in record.get("identity", {}).get("settings", {}).items() if k != "seed"}
            upstream[name] = {"step": record.get("step"), "settings": settings,
                              "backbone": record.get("identity", {}).get("backbone")}
        else:
            upstream[name] = {"released": entry.get("fingerprint")}
    return {key: identity.get(key) for key in ("settings", "backbone", "sota", "data")} | {"upstream": upstream}


def _seeds(metrics):
    return tuple(sorted({record["identity"]["settings"]["seed"] for record in _records(metrics)
                         if "seed" in record.get("identity", {}).get("settings", {})}))


def gather(results_root):
    """({(dataset, protocol json): {row key: Row}}, [skipped files and why]) of every metrics.json under
    `results_root`."""
    results_root = Path(results_root)
    if not results_root.is_dir():
        raise ReportError(f"no results folder {results_root}: run an evaluation first (bash run, test_tr.py, "
                          f"...), or pass --results_root the folder its metrics.json files are under")
    tables, skipped = {}, []
    for path in sorted(results_root.rglob("metrics.json")):
        try:
            metrics = json.loads(path.read_text())
            step = metrics["step"]
            scored = _SCORED[step]
        except (OSError, ValueError, KeyError, TypeError):
            skipped.append(f"{path}: not a metrics.json of this project's test steps")
            continue
        folder = path.parent
        for prefix, (crf, no_crf) in figure_pairs([name for name in metrics if isinstance(metrics[name], dict)
                                                   and "mIoU" in metrics[name]]).items():
            if prefix not in scored:
                continue
            key, protocol = _protocol_of(metrics, crf)
            comparable = _comparable(protocol, crf, no_crf)
            table = tables.setdefault((metrics["dataset"], json.dumps(comparable, sort_keys=True, default=str)), {})
            columns = _configuration(metrics, scored[prefix])
            row_key = json.dumps([columns, _identity_without_seed(metrics)], sort_keys=True, default=str)
            row = table.setdefault(row_key, Row(metrics["dataset"], comparable, columns, _paper(metrics, prefix, key)))
            row.add(_seeds(metrics), (metrics, folder, crf, no_crf))
    return tables, skipped


def _source(metrics, folder, results_root):
    try:
        shown = folder.relative_to(results_root)
    except ValueError:
        shown = folder
    return f"{shown} ({metrics.get('written', '?')}, revision {metrics.get('version', '?')})"


def _sources(row, results_root):
    return "; ".join(_source(metrics, folder, results_root) for metrics, folder, *_ in row.evaluations.values())


def _sorted_rows(rows):
    return sorted(rows.values(), key=lambda row: [str(row.columns[k]) for k in ("method", "backbone", "head_or_mode",
                                                                                "scored", "recipe", "label_leak")])


def _delta(row, figure):
    published = getattr(row.paper, figure) if row.paper else None
    if published is None:
        return None, None
    return published, statistics.fmean(row.values("crf", figure)) - published


def _protocol_lines(protocol):
    lines = [f"Protocol: **{protocol['name']}**. {protocol.get('words', '')}."]
    if "resize" in protocol:
        lines.append(f"Val split: {protocol['resize']['words']}.")
    if "flip_averaged" in protocol:
        crf, no_crf = protocol["flip_averaged"]
        lines.append(f"Flip averaging: {'yes' if crf else 'no'} (after the CRF), {'yes' if no_crf else 'no'} "
                     f"(without).")
    if "crf" in protocol:
        crf = protocol["crf"]
        lines.append(f"Dense CRF: {crf['iterations']} iterations, Gaussian sxy {crf['gaussian']['sxy']} compat "
                     f"{crf['gaussian']['compat']}, bilateral sxy {crf['bilateral']['sxy']} srgb "
                     f"{crf['bilateral']['srgb']} compat {crf['bilateral']['compat']}; its input: "
                     f"{protocol.get('crf_input', '?')}.")
    for key, label in (("matching", "Matching"), ("classes_scored", "Classes scored"),
                       ("unmatched_clusters", "Unmatched clusters")):
        if key in protocol:
            lines.append(f"{label}: {protocol[key]}.")
    return lines


_HEADER = ["method", "scored", "backbone", "head or mode", "recipe", "label leak", "seeds", "n", "mIoU CRF",
           "pAcc CRF", "mIoU no CRF", "pAcc no CRF", "paper mIoU", "paper pAcc", "Δ mIoU", "Δ pAcc", "source"]


def _number(value):
    return "–" if value is None else f"{value:.1f}"


def _signed(value):
    return "–" if value is None else f"{value:+.1f}"


def markdown(tables, skipped, results_root):
    lines = ["# Results", "",
             f"Every metrics.json under `{results_root}`, gathered by report.py on {now()}. One table per data set "
             "and evaluation protocol (named above it: only results of that protocol share its columns). CRF: after "
             "the dense CRF; paper: the published figure of that row, after the CRF "
             "(utils/tools/paper_results.py), and Δ = ours (after the CRF) − paper. Several seeds: mean ± standard "
             "deviation (n − 1) over the n seeds.", ""]
    if not tables:
        lines += ["No evaluation found.", ""]
    for (dataset, _), rows in sorted(tables.items(), key=lambda item: (item[0][0], next(iter(item[1].values()))
                                                                      .protocol["name"], item[0][1])):
        protocol = next(iter(rows.values())).protocol
        lines += [f"## {dataset}: {protocol['name']} protocol", "",
                  *(f"- {line}" for line in _protocol_lines(protocol)), "",
                  "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
        sources = set()
        for row in _sorted_rows(rows):
            c = row.columns
            paper_miou, delta_miou = _delta(row, "mIoU")
            paper_pacc, delta_pacc = _delta(row, "pAcc")
            if row.paper:
                sources.add(row.paper.source)
            cells = [c["method"], c["scored"], c["backbone"], c["head_or_mode"], c["recipe"], c["label_leak"],
                     row.seeds, str(len(row.evaluations)),
                     *(format_mean_std(row.values(variant, figure)) for variant, figure in FIGURES),
                     _number(paper_miou), _number(paper_pacc), _signed(delta_miou), _signed(delta_pacc),
                     _sources(row, results_root)]
            lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
        if sources:
            lines += ["", "Paper figures: " + "; ".join(sorted(sources)) + "."]
        lines.append("")
    if skipped:
        lines += ["## Not gathered", "", *(f"- {line}" for line in skipped), ""]
    return "\n".join(lines)


_CSV_HEADER = ["dataset", "protocol", "protocol_details", "method",
               "scored", "backbone", "head_or_mode", "recipe", "label_leak", "seeds",
               "n", *(f"{variant}_{figure}_{stat}" for variant, figure in FIGURES for stat in ("mean", "std")),
               "paper_mIoU", "paper_pAcc", "delta_mIoU", "delta_pAcc", "paper_source", "sources"]


def csv_text(tables, results_root):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(_CSV_HEADER)
    for (dataset, protocol_json), rows in sorted(tables.items()):
        for row in _sorted_rows(rows):
            c = row.columns
            figures = [value for variant, figure in FIGURES for value in mean_std(row.values(variant, figure))]
            paper_miou, delta_miou = _delta(row, "mIoU")
            paper_pacc, delta_pacc = _delta(row, "pAcc")
            writer.writerow([dataset, " ".join(_protocol_lines(row.protocol)[:3]), protocol_json, c["method"],
                             c["scored"], c["backbone"], c["head_or_mode"],
                             c["recipe"], c["label_leak"], row.seeds, len(row.evaluations),
                             *("" if value is None else value for value in figures),
                             *("" if value is None else value for value in (paper_miou, paper_pacc, delta_miou,
                                                                            delta_pacc)),
                             row.paper.source if row.paper else "", _sources(row, results_root)])
    return out.getvalue()


def write_report(results_root):
    """Write RESULTS_ROOT/report.md and report.csv (each whole or not at all); returns their paths."""
    results_root = Path(results_root)
    tables, skipped = gather(results_root)
    md_path, csv_path = results_root / REPORT_MD, results_root / REPORT_CSV
    save_text(csv_text(tables, results_root), csv_path)
    save_text(markdown(tables, skipped, results_root), md_path)
    return md_path, csv_path
