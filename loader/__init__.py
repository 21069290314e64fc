"""Data sets of docs/cause.md §2 and docs/primaps.md §5: layouts, label mapping, transforms, crops, samplers."""
from loader.datasets import (DATASETS, TRAIN_SETS, CropSet, DatasetInfo, build_dataset, build_source_dataset,
                             class_names, dataset_info, existing_crop_dir, split_files, verify_readable)
from loader.layouts import COCO_LIST, COCO_LIST_7, DataError, DatasetLayoutError

__all__ = ["COCO_LIST", "COCO_LIST_7", "DATASETS", "TRAIN_SETS", "CropSet", "DataError", "DatasetInfo",
           "DatasetLayoutError", "build_dataset", "build_source_dataset", "class_names", "dataset_info",
           "existing_crop_dir", "split_files", "verify_readable"]
