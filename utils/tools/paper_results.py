"""The published figures the report (utils/tools/report.py) sets beside ours: the one place in the code
that holds them. mIoU and pixel accuracy in %, after the CRF, each under the protocol that made it
(utils/engine/protocols.py's keys); the README's tables and docs/primaps.md §6 print the same numbers.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class PaperFigure:
    mIoU: float
    pAcc: float | None  # None: not published
    source: str


_CAUSE_SOURCE = "CAUSE paper (Kim et al.), as the README's table of released checkpoints"
_PRIMAPS_SOURCE = "PriMaPs' official README (docs/primaps.md §6)"

# CAUSE, after the CRF: {(dataset, head, arch): (mIoU, pixel accuracy)}.
CAUSE = {
    ("cocostuff27", "mlp", "dino_vit_small_8"): (27.9, 66.8),
    ("cocostuff27", "tr", "dino_vit_small_8"): (32.4, 69.6),
    ("cocostuff27", "mlp", "dino_vit_small_16"): (25.9, 66.3),
    ("cocostuff27", "tr", "dino_vit_small_16"): (33.1, 70.4),
    ("cocostuff27", "mlp", "dino_vit_base_8"): (34.3, 72.8),
    ("cocostuff27", "tr", "dino_vit_base_8"): (41.9, 74.9),
    ("cocostuff27", "tr", "dinov2_vit_base_14"): (45.3, 78.0),
    ("cocostuff27", "tr", "ibot_vit_base_16"): (39.5, 73.8),
    ("cocostuff27", "tr", "msn_vit_small_16"): (34.1, 72.1),
    ("cocostuff27", "tr", "mae_vit_base_16"): (21.5, 59.1),
    ("cityscapes", "mlp", "dino_vit_small_8"): (21.7, 87.7),
    ("cityscapes", "tr", "dino_vit_small_8"): (24.6, 89.4),
    ("cityscapes", "mlp", "dino_vit_base_8"): (25.7, 90.3),
    ("cityscapes", "tr", "dino_vit_base_8"): (28.0, 90.8),
    ("cityscapes", "tr", "dinov2_vit_base_14"): (29.9, 89.8),
    ("cityscapes", "tr", "ibot_vit_base_16"): (23.0, 89.1),
    ("cityscapes", "tr", "msn_vit_small_16"): (21.2, 89.1),
    ("cityscapes", "tr", "mae_vit_base_16"): (12.5, 82.0),
    ("pascalvoc", "mlp", "dino_vit_small_8"): (46.0, None),
    ("pascalvoc", "tr", "dino_vit_small_8"): (50.0, None),
    ("pascalvoc", "mlp", "dino_vit_base_8"): (47.9, None),
    ("pascalvoc", "tr", "dino_vit_base_8"): (53.3, None),
    ("pascalvoc", "tr", "dinov2_vit_base_14"): (53.2, 91.5),
    ("pascalvoc", "tr", "ibot_vit_base_16"): (53.4, 89.6),
    ("pascalvoc", "tr", "msn_vit_small_16"): (30.2, 84.2),
    ("pascalvoc", "tr", "mae_vit_base_16"): (25.8, 83.7),
    ("coco81", "mlp", "dino_vit_small_8"): (19.1, 78.8),
    ("coco81", "tr", "dino_vit_small_8"): (21.2, 75.2),
    ("coco171", "mlp", "dino_vit_small_8"): (10.6, 44.9),
    ("coco171", "tr", "dino_vit_small_8"): (15.2, 46.6),
}

# PriMaPs' table, after the CRF: {(row, arch): {dataset: (pixel accuracy, mIoU)}} (its own order).
# "baseline": the PCA + k-means initialisation alone; "PriMaPs-EM": θ_M on the backbone;
# "+SotA+PriMaPs": θ_M on the released STEGO or HP model of PRIMAPS_SOTA.
PRIMAPS = {
    ("baseline", "dino_vit_small_8"): {"cityscapes": (61.4, 15.8), "cocostuff27": (34.2, 9.5),
                                       "potsdam3": (56.6, 33.6)},
    ("PriMaPs-EM", "dino_vit_small_8"): {"cityscapes": (81.2, 19.4), "cocostuff27": (46.5, 16.4),
                                         "potsdam3": (62.5, 38.9)},
    ("+SotA+PriMaPs", "dino_vit_small_8"): {"cityscapes": (76.6, 19.2), "cocostuff27": (57.8, 25.1),
                                            "potsdam3": (78.4, 64.2)},
    ("baseline", "dino_vit_base_8"): {"cityscapes": (49.2, 15.5), "cocostuff27": (38.8, 15.7),
                                      "potsdam3": (66.1, 49.4)},
    ("PriMaPs-EM", "dino_vit_base_8"): {"cityscapes": (59.6, 17.6), "cocostuff27": (48.5, 21.9),
                                        "potsdam3": (80.5, 67.0)},
    ("+SotA+PriMaPs", "dino_vit_base_8"): {"cityscapes": (78.6, 21.6), "cocostuff27": (57.9, 29.7),
                                           "potsdam3": (83.3, 71.0)},
    ("baseline", "dinov2_vit_small_14"): {"cityscapes": (49.5, 15.3), "cocostuff27": (44.5, 22.9),
                                          "potsdam3": (75.9, 61.0)},
    ("PriMaPs-EM", "dinov2_vit_small_14"): {"cityscapes": (71.5, 19.0), "cocostuff27": (46.5, 23.8),
                                            "potsdam3": (78.5, 64.3)},
    ("baseline", "dinov2_vit_base_14"): {"cityscapes": (36.1, 14.9), "cocostuff27": (35.0, 17.9),
                                         "potsdam3": (82.4, 69.9)},
    ("PriMaPs-EM", "dinov2_vit_base_14"): {"cityscapes": (82.9, 21.3), "cocostuff27": (52.8, 23.6),
                                           "potsdam3": (83.2, 71.1)},
}
# The released model each "+SotA+PriMaPs" cell stands on (docs/sota.md §3): {(dataset, arch): stego | hp}.
PRIMAPS_SOTA = {
    ("cityscapes", "dino_vit_base_8"): "stego", ("cocostuff27", "dino_vit_base_8"): "stego",
    ("potsdam3", "dino_vit_base_8"): "hp", ("cityscapes", "dino_vit_small_8"): "hp",
    ("cocostuff27", "dino_vit_small_8"): "hp", ("potsdam3", "dino_vit_small_8"): "stego",
}

# STEGO's published figures for its released files, its own evaluation, cluster probe after the CRF:
# {file name: (dataset, mIoU, pixel accuracy, where)}.
STEGO_RELEASED = {
    "cocostuff27_vit_base_5.ckpt": ("cocostuff27", 28.19, 56.93, "STEGO's GitHub issue #3"),
    "potsdam_test.ckpt": ("potsdam3", 62.57, 77.03, "STEGO's GitHub issue #39"),
}


def cause_figure(dataset, head, arch):
    """CAUSE's figure for a head on a backbone (the CAUSE protocol), or None."""
    found = CAUSE.get((dataset, head, arch))
    return None if found is None else PaperFigure(found[0], found[1], _CAUSE_SOURCE)


def primaps_figure(row, dataset, arch, sota_family=None):
    """PriMaPs' figure (its protocol) of `row` ("baseline", "PriMaPs-EM", "+SotA+PriMaPs": then only on the
    released model family that cell used), or None."""
    if row == "+SotA+PriMaPs" and PRIMAPS_SOTA.get((dataset, arch)) != sota_family:
        return None
    found = PRIMAPS.get((row, arch), {}).get(dataset)
    return None if found is None else PaperFigure(found[1], found[0], _PRIMAPS_SOURCE)


def stego_figure(dataset, file_name):
    """STEGO's published figure for its released file (STEGO's own protocol), or None."""
    found = STEGO_RELEASED.get(file_name)
    if found is None or found[0] != dataset:
        return None
    return PaperFigure(found[1], found[2], found[3])
