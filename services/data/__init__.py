"""Bundled visual tasks (scenes, digit grids) and the dataset loader the worker, learner and eval share."""

from services.data.build import TASK_FAMILIES, SplitSizes, build_all, build_family
from services.data.loader import DatasetError, DatasetItem, load_dataset, open_image

__all__ = [
    "TASK_FAMILIES",
    "DatasetError",
    "DatasetItem",
    "SplitSizes",
    "build_all",
    "build_family",
    "load_dataset",
    "open_image",
]
