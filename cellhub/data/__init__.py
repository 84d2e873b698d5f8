"""Load cell-image datasets into one shape: ``datasets.DatasetDict`` with ``image``, ``label``, ``group``, ``file``.

Sources accepted by :func:`load_cell_dataset`:

- a Kaggle "Blood Cell Images" download (the unzipped folder or any folder inside it that holds
  ``dataset2-master/.../images/{TRAIN,TEST,TEST_SIMPLE}/{EOSINOPHIL,...}``);
- a Kaggle malaria download (``cell_images/{Parasitized,Uninfected}``; the zip's nested copy
  ``cell_images/cell_images/...`` is recognised and never counted twice);
- any image-folder tree: class folders, optionally under split folders (``train``, ``test``,
  ``validation``/``val``/``valid``/``dev``, ``test_simple``, any case), read through
  ``datasets``' ``imagefolder`` builder;
- a folder written by ``train/prepare_dataset.py --output-dir`` (Parquet shards + dataset card),
  or by ``DatasetDict.save_to_disk``;
- a Hugging Face Hub dataset id (or a task name, meaning that task's default Hub dataset).

Every split gets the task's fixed label order and a ``group`` column: the unit that must never be
split between training and evaluation (the slide/patient for malaria, the source smear for blood
cells). :func:`split_by_group` draws a validation split that respects it.

Inside the package, bottom to top: ``report`` (LoadReport, DatasetLayoutError), ``layouts``
(what a folder looks like), ``refs`` (where a split's images are stored, nothing decoded), ``groups`` (the unit a split must respect), ``splits`` (grouped
splits), ``resized`` (decode once; the torch dataset over a split), ``sources`` (load from a
folder, a saved dataset or the Hub).
"""
from __future__ import annotations

from ..cache import default_cache_dir
from ..images import IMAGE_EXTENSIONS, check_image
from .refs import file_backed_paths, image_paths, image_refs, local_files, undecoded
from .report import DatasetLayoutError, LoadReport
from .resized import CACHE_INTERPOLATION, ImageRowDataset, cache_resized, pixels_array
from .sources import infer_task, load_cell_dataset
from .splits import cv_fold, ensure_validation, group_kfold, split_by_group

__all__ = [
    "load_cell_dataset",
    "split_by_group",
    "ensure_validation",
    "group_kfold",
    "cv_fold",
    "cache_resized",
    "CACHE_INTERPOLATION",
    "pixels_array",
    "ImageRowDataset",
    "infer_task",
    "LoadReport",
    "DatasetLayoutError",
    "IMAGE_EXTENSIONS",
    "default_cache_dir",
    "check_image",
    "undecoded",
    "image_refs",
    "file_backed_paths",
    "image_paths",
    "local_files",
]
