"""Data sets of SPEC §2: layouts, label mapping, transforms, cropped training sets, loaders."""
from loader.crops import write_cropped_dataset
from loader.datasets import (DATASETS, DatasetInfo, DatasetLayoutError, build_dataset, build_loader,
                             build_source_dataset, check_layout, existing_crop_dir, verify_readable)

__all__ = ["DATASETS", "DatasetInfo", "DatasetLayoutError", "build_dataset", "build_loader",
           "build_source_dataset", "check_layout", "existing_crop_dir", "verify_readable", "write_cropped_dataset"]
