"""Task specifications: label order, Kaggle folder names, default Hub dataset, grouping.

A *task* fixes the label order once for the whole project; every dataset, checkpoint and
metric uses it. Adding a task is one entry in :data:`TASKS`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath

__all__ = ["Task", "TASKS", "get_task", "malaria_group", "TASK_NAMES", "GROUP_BY", "GROUP_BY_HELP", "GROUP_METHOD_TEXT"]


@dataclass(frozen=True)
class Task:
    """What a classification task is: its labels (in a fixed order) and where its data lives."""

    name: str
    labels: tuple[str, ...]
    #: class-folder name (as in the Kaggle download, compared case-insensitively) -> label
    folder_aliases: dict[str, str] = field(default_factory=dict)
    #: default Hugging Face Hub dataset id (``None`` when there is no published copy yet)
    hub_dataset: str | None = None
    #: what one group is (used in reports and model cards)
    group_unit: str = "group"
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    def label_from_folder(self, folder: str) -> str | None:
        """Map a class-folder or label name (any case, ``-``/``_``/space) to a label, or ``None``."""
        key = _norm(folder)
        for alias, label in self.folder_aliases.items():
            if _norm(alias) == key:
                return label
        for label in self.labels:
            if _norm(label) == key:
                return label
        return None


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


TASKS: dict[str, Task] = {
    "blood-cells": Task(
        name="blood-cells",
        labels=("eosinophil", "lymphocyte", "monocyte", "neutrophil"),
        folder_aliases={
            "EOSINOPHIL": "eosinophil",
            "LYMPHOCYTE": "lymphocyte",
            "MONOCYTE": "monocyte",
            "NEUTROPHIL": "neutrophil",
        },
        hub_dataset="cellhub/blood-cells",
        group_unit="microscope field of the source white cell (smears of one field merged)",
        description="White blood cell type from a stained peripheral blood smear crop (BCCD / Kaggle).",
    ),
    "malaria": Task(
        name="malaria",
        labels=("parasitized", "uninfected"),
        folder_aliases={"Parasitized": "parasitized", "Uninfected": "uninfected"},
        hub_dataset="cellhub/malaria",
        group_unit="slide / patient",
        description="Plasmodium-infected vs uninfected thin-smear red blood cell (NIH / Kaggle).",
    ),
    "pbc": Task(
        name="pbc",
        labels=("basophil", "eosinophil", "erythroblast", "immature granulocyte", "lymphocyte", "monocyte",
                "neutrophil", "platelet"),
        folder_aliases={"ig": "immature granulocyte", "BASOPHIL": "basophil", "EOSINOPHIL": "eosinophil",
                        "ERYTHROBLAST": "erythroblast", "LYMPHOCYTE": "lymphocyte", "MONOCYTE": "monocyte",
                        "NEUTROPHIL": "neutrophil", "PLATELET": "platelet"},
        hub_dataset=None,
        group_unit="image (every PBC image is a distinct cell; near-duplicate copies grouped)",
        description="Peripheral blood cell type, the 8 classes of the PBC dataset (Acevedo et al. 2020: "
                    "CellaVision DM96, May Grünwald-Giemsa stain, Hospital Clinic of Barcelona).",
    ),
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(name: str | Task) -> Task:
    """Return the :class:`Task` called ``name``; a clear ``ValueError`` lists the choices."""
    if isinstance(name, Task):
        return name
    key = str(name).strip().lower().replace("_", "-")
    aliases = {"blood": "blood-cells", "bloodcells": "blood-cells", "wbc": "blood-cells", "pbc8": "pbc"}
    key = aliases.get(key, key)
    if key not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Choose one of: {', '.join(TASKS)}.")
    return TASKS[key]


#: ``group_by`` choices: the unit a split must not cut (see :mod:`cellhub.data.groups`)
GROUP_BY: tuple[str, ...] = ("auto", "field", "smear", "patient", "near-duplicates", "file", "none")

#: the ``--group-by`` help, one text for every command
GROUP_BY_HELP = ("the unit no split may cut, one independent sample: auto (default: field when the full smears are "
                 "beside blood-cell crops, patient for malaria, else near-duplicates), field, smear, patient, "
                 "near-duplicates (copies of one cell), file (every image distinct), none")

#: what each ``report.group_method`` value means, for reports, dataset cards and model cards
GROUP_METHOD_TEXT: dict[str, str] = {
    "field": "microscope field of each crop (crops matched to the full smears; smears of one field merged)",
    "smear": "source smear of each crop (crops matched to the full smears of the download)",
    "field+near-duplicates": "microscope field where a crop matched a smear; other crops grouped as near-duplicates",
    "smear+near-duplicates": "source smear where a crop matched one; other crops grouped as near-duplicates",
    "near-duplicates": "copies of one cell (rotated, mirrored, shifted, resized) grouped by image signature",
    "patient": "slide/patient prefix of the file name (C100P61 = slide 100, patient 61)",
    "column": "group column of the source dataset",
    "file": "each image is its own group",
    "none": "no grouping: images assumed independent",
}


_MALARIA_GROUP = re.compile(r"^(C\d+P\d+|C\d+)", re.IGNORECASE)


def malaria_group(filename: str | PurePath) -> str:
    """Slide/patient prefix of an NIH malaria file name.

    ``C100P61ThinF_IMG_..._cell_162.png`` -> ``C100P61`` (slide 100, patient 61);
    ``C13NThinF_IMG_...png`` -> ``C13`` (a slide of an uninfected patient). Cells of one
    patient are highly correlated, so splits must never separate a group. A name without
    the prefix falls back to its stem (its own group), which is the conservative choice.
    """
    stem = PurePath(str(filename)).name
    m = _MALARIA_GROUP.match(stem)
    if m:
        return m.group(1).upper()
    return PurePath(stem).stem
