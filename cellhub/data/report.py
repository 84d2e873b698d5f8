"""What a load found (:class:`LoadReport`) and the error for a folder it cannot read (:class:`DatasetLayoutError`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DatasetLayoutError", "LoadReport"]


class DatasetLayoutError(ValueError):
    """A dataset folder does not have a layout :func:`load_cell_dataset` understands."""


@dataclass
class LoadReport:
    """What :func:`load_cell_dataset` found: where, how it grouped, and which files it skipped."""

    source: str
    task: str
    source_kind: str  # kaggle-blood-cells | kaggle-malaria | imagefolder | parquet-folder | saved-to-disk | hub
    root: str | None = None
    #: split -> number of images kept
    splits: dict[str, int] = field(default_factory=dict)
    #: (path, reason) of every file that was not loaded
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: split -> how its groups were computed
    #: (field | smear | field+near-duplicates | smear+near-duplicates | patient | near-duplicates | file |
    #: none | column)
    group_method: dict[str, str] = field(default_factory=dict)
    #: the grouping asked for ("auto" unless the caller chose one) and the one used
    group_by_requested: str = "auto"
    group_by: str = ""
    #: split -> fraction of images attributed to a source smear (blood cells with smears only)
    smear_attribution: dict[str, float] = field(default_factory=dict)
    smear_dir: str | None = None
    #: files of a nested duplicate tree (Kaggle malaria zip) that were recognised and not counted again
    ignored_duplicates: int = 0
    #: False when a local folder had no split folders: its one split ("train") is the whole folder
    named_splits: bool = True
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["skipped"] = [{"path": p, "reason": r} for p, r in self.skipped]
        return d
