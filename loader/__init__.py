"""Data sets of SPEC §2 and PRIMAPS.md §5: layouts, label mapping, transforms, crops, samplers."""
from loader.datasets import (DATASETS, DataError, DatasetInfo, DatasetLayoutError, build_dataset, build_source_dataset,
                             class_names, dataset_info, existing_crop_dir, split_files, verify_readable)

__all__ = ["DATASETS", "DataError", "DatasetInfo", "DatasetLayoutError", "build_dataset", "build_source_dataset",
           "class_names", "dataset_info", "existing_crop_dir", "split_files", "verify_readable"]
