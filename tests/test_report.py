"""report.py: every metrics.json under a results folder as the papers' tables, one per data set and
protocol, with the paper's figure, the difference to it, several seeds' mean ± std and the sources."""
import csv
import json
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest
from conftest import ROOT
from report import main

from utils.cli.steps import guarded
from utils.engine.protocols import protocols_of
from utils.tools.report import write_report

VARIANTS = {"test": ["crf", "no_crf", "no_crf_no_flip"],
            "test_primaps": ["crf", "no_crf", "theta_r_crf", "theta_r_no_crf", "init_crf", "init_no_crf"],
            "test_sota": ["crf", "no_crf", "linear_crf", "linear_no_crf", "primaps_protocol_crf",
                          "primaps_protocol_no_crf"]}


def figures(base, variants):
    """Distinct figures per variant, from `base`."""
    return {name: {"mIoU": base + 1.25 * i, "pAcc": base + 40.5 + i, "per_class_iou": []}
            for i, name in enumerate(variants)}


def trained(step, seed, **settings):
    return {"origin": "trained", "complete": True, "fingerprint": f"sha256:{step}{seed}",
            "record": {"step": step, "recipe": {"name": "paper"}, "version": "abc",
                       "identity": {"settings": {"seed": seed, "epochs": 1, **settings}}}}


def metrics_file(root, folder, step, base, written, resolution=320, upstream=None, **description):
    """A metrics.json as a test step writes one (the fields the report reads), in the results layout."""
    cfg = SimpleNamespace(step=step, test_resolution=resolution, sota_family=description.get("method"))
    metrics = {**description, **figures(base, VARIANTS[step]), "variants": {name: "" for name in VARIANTS[step]},
               "evaluation_protocols": protocols_of(cfg, VARIANTS[step]), "step": step,
               "identity": {"settings": {"test_resolution": resolution}}, "upstream": upstream or {},
               "version": "0123abc", "written": written, "complete": True}
    path = root / folder / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(metrics))
    return metrics


def cause(root, folder, head, seed, base, written="2026-01-01T00:00:00+00:00", **kwargs):
    upstream = {"modular": trained("mediator", seed),
                "cluster": trained("fine_tune", seed, label_leak=False)}
    return metrics_file(root, folder, "test", base, written, upstream=upstream, dataset="cocostuff27", head=head,
                        backbone={"arch": "dino_vit_small_8"}, **kwargs)


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    made = {
        "tr": cause(root, "cocostuff27/TR/dino_vit_small_8/2048", "tr", 0, 30.0),
        # the same configuration and seed evaluated again later, elsewhere: the later one counts
        "tr_again": cause(root, "old/cocostuff27/TR/dino_vit_small_8/2048", "tr", 0, 10.0,
                          written="2025-01-01T00:00:00+00:00"),
        "mlp0": cause(root, "seed_0/cocostuff27/MLP/dino_vit_small_8/2048", "mlp", 0, 20.0),
        "mlp1": cause(root, "seed_1/cocostuff27/MLP/dino_vit_small_8/2048", "mlp", 1, 23.5),
        # another test resolution: another protocol, another table
        "small": cause(root, "small/cocostuff27/TR/dino_vit_small_8/2048", "tr", 0, 5.0, resolution=64),
        "primaps": metrics_file(root, "potsdam3/PRIMAPS_BACKBONE/dino_vit_base_8", "test_primaps", 60.0,
                                "2026-01-02T00:00:00+00:00", upstream={"primaps": trained("primaps", 0)},
                                dataset="potsdam3", mode="backbone", head=None, backbone="dino_vit_base_8"),
        "stego": metrics_file(root, "cocostuff27/STEGO/cocostuff27_vit_base_5", "test_sota", 25.0,
                              "2026-01-03T00:00:00+00:00", dataset="cocostuff27", method="stego",
                              backbone="dino_vit_base_8", checkpoint="/files/cocostuff27_vit_base_5.ckpt"),
    }
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "metrics.json").write_text(json.dumps({"loss": 1.0}))
    return root, made


def csv_rows(path):
    return list(csv.DictReader(path.read_text().splitlines()))


def find(rows, **wanted):
    found = [row for row in rows if all(row[key] == value for key, value in wanted.items())]
    assert len(found) == 1, (wanted, rows)
    return found[0]


def test_the_report_sets_each_configuration_beside_its_paper_figure(results):
    root, made = results
    md_path, csv_path = write_report(root)
    rows = csv_rows(csv_path)

    tr = find(rows, method="CAUSE", head_or_mode="TR", n="1", crf_mIoU_mean=str(made["tr"]["crf"]["mIoU"]))
    assert tr["dataset"] == "cocostuff27" and tr["backbone"] == "dino_vit_small_8" and tr["seeds"] == "0"
    assert tr["recipe"] == "paper" and tr["label_leak"] == "no"
    for variant in ("crf", "no_crf"):
        for figure in ("mIoU", "pAcc"):
            assert float(tr[f"{variant}_{figure}_mean"]) == made["tr"][variant][figure]
            assert tr[f"{variant}_{figure}_std"] == "", "one seed: no standard deviation"
    assert (float(tr["paper_mIoU"]), float(tr["paper_pAcc"])) == (32.4, 69.6), "CAUSE TR, DINO ViT-S/8, COCO-27"
    assert float(tr["delta_mIoU"]) == made["tr"]["crf"]["mIoU"] - 32.4
    assert float(tr["delta_pAcc"]) == made["tr"]["crf"]["pAcc"] - 69.6
    assert tr["sources"] == ("cocostuff27/TR/dino_vit_small_8/2048 (2026-01-01T00:00:00+00:00, revision 0123abc)"), \
        "the later of two evaluations of one seed counts"

    mlp = find(rows, method="CAUSE", head_or_mode="MLP")
    assert mlp["seeds"] == "0, 1" and mlp["n"] == "2"
    values = [made["mlp0"]["crf"]["mIoU"], made["mlp1"]["crf"]["mIoU"]]
    assert float(mlp["crf_mIoU_mean"]) == statistics.fmean(values)
    assert float(mlp["crf_mIoU_std"]) == statistics.stdev(values)
    assert float(mlp["delta_mIoU"]) == statistics.fmean(values) - 27.9
    assert "seed_0/" in mlp["sources"] and "seed_1/" in mlp["sources"]

    small = find(rows, method="CAUSE", head_or_mode="TR", crf_mIoU_mean=str(made["small"]["crf"]["mIoU"]))
    assert small["protocol"] != tr["protocol"] and "64×64" in small["protocol"], "another protocol"

    theta_m = find(rows, method="PriMaPs-EM", scored="θ_M")
    assert (float(theta_m["paper_mIoU"]), float(theta_m["paper_pAcc"])) == (67.0, 80.5)
    baseline = find(rows, method="PriMaPs-EM", scored="initial prototypes")
    assert (float(baseline["paper_mIoU"]), float(baseline["paper_pAcc"])) == (49.4, 66.1)
    assert float(baseline["crf_mIoU_mean"]) == made["primaps"]["init_crf"]["mIoU"]
    assert find(rows, method="PriMaPs-EM", scored="θ_R")["paper_mIoU"] == "", "θ_R has no published figure"

    stego = find(rows, method="STEGO", scored="cluster probe")
    assert (float(stego["paper_mIoU"]), float(stego["paper_pAcc"])) == (28.19, 56.93)
    assert "STEGO" in stego["protocol"]
    centres = find(rows, method="STEGO", scored="cluster centres")
    assert "PriMaPs-EM" in centres["protocol"] and centres["paper_mIoU"] == "", "PriMaPs' protocol: no STEGO figure"
    assert float(centres["crf_mIoU_mean"]) == made["stego"]["primaps_protocol_crf"]["mIoU"]
    assert len(rows) == 9

    text = md_path.read_text()
    tables = [line for line in text.splitlines() if line.startswith("## ")]
    assert tables == ["## cocostuff27: CAUSE protocol", "## cocostuff27: CAUSE protocol",
                      "## cocostuff27: PriMaPs-EM protocol", "## cocostuff27: STEGO protocol",
                      "## potsdam3: PriMaPs-EM protocol", "## Not gathered"]
    tr_line = next(line for line in text.splitlines() if "| cocostuff27/TR/dino_vit_small_8/2048 (" in line)
    cells = [cell.strip() for cell in tr_line.strip("|").split("|")]
    assert cells[8:16] == [f"{made['tr']['crf']['mIoU']:.1f}", f"{made['tr']['crf']['pAcc']:.1f}",
                           f"{made['tr']['no_crf']['mIoU']:.1f}", f"{made['tr']['no_crf']['pAcc']:.1f}", "32.4", "69.6",
                           f"{made['tr']['crf']['mIoU'] - 32.4:+.1f}", f"{made['tr']['crf']['pAcc'] - 69.6:+.1f}"]
    mlp_line = next(line for line in text.splitlines() if "| MLP |" in line)
    assert f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}" in mlp_line
    assert "elsewhere/metrics.json: not a metrics.json of this project's test steps" in text


def test_report_py_writes_both_files_and_says_where(results):
    root, _ = results
    done = subprocess.run([sys.executable, "report.py", "--results_root", str(root)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"report: {root / 'report.md'} (and {root / 'report.csv'})"
    assert (root / "report.md").is_file() and len(csv_rows(root / "report.csv")) == 9


def test_a_missing_results_folder_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        guarded("report", lambda: main(["--results_root", str(tmp_path / "none")]))
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (f"error [report]: no results folder {tmp_path / 'none'}: run an evaluation "
                                       f"first (bash run, test_tr.py, ...), or pass --results_root the folder its "
                                       f"metrics.json files are under\n")


def test_each_evaluation_names_its_protocol_in_words_and_values():
    cause = protocols_of(SimpleNamespace(step="test", test_resolution=320), VARIANTS["test"])["cause"]
    assert cause["resize"]["method"] == "nearest" and cause["resize"]["resolution"] == 320
    assert cause["flip_averaged"] == {"crf": True, "no_crf": True, "no_crf_no_flip": False}
    assert cause["crf"]["iterations"] == 10 and cause["crf"]["gaussian"] == {"sxy": 1, "compat": 3}
    assert cause["crf"]["bilateral"] == {"sxy": 67, "srgb": 3, "compat": 4}  # docs/cause.md §6
    primaps = protocols_of(SimpleNamespace(step="test_primaps", test_resolution=320), VARIANTS["test_primaps"])
    assert primaps["primaps"]["resize"]["method"] == "tensor_bilinear"
    assert primaps["primaps"]["variants"] == VARIANTS["test_primaps"]
    sota = protocols_of(SimpleNamespace(step="test_sota", test_resolution=320, sota_family="hp"), VARIANTS["test_sota"])
    assert sota["hp"]["variants"] == ["crf", "no_crf", "linear_crf", "linear_no_crf"]
    assert not any(sota["hp"]["flip_averaged"].values()), "HP's evaluation scores the online code alone"
    assert sota["primaps"]["variants"] == ["primaps_protocol_crf", "primaps_protocol_no_crf"]
    assert sota["primaps"]["resize"]["method"] == "tensor_bilinear" and all(sota["primaps"]["flip_averaged"].values())
    def without_variants(protocol):
        return {key: value for key, value in protocol.items() if key not in ("variants", "flip_averaged")}
    assert without_variants(sota["primaps"]) == without_variants(primaps["primaps"]), \
        "a released model's centres and PriMaPs-EM share PriMaPs-EM's table"
    for protocol in (cause, primaps["primaps"], sota["hp"]):
        assert protocol["matching"].startswith("one histogram") and "unmatched_clusters" in protocol
