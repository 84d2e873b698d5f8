"""Turn a local download into a Hugging Face Hub dataset: official splits, task label order, ``group`` column.

    python train/prepare_dataset.py ~/Downloads/blood-cells --push-to-hub you/blood-cells
    python train/prepare_dataset.py ~/Downloads/cell_images --task malaria --output-dir ./malaria-hub

The dataset is read with :func:`cellhub.load_cell_dataset` (unreadable files are skipped and
listed), written as a dataset repository — ``data/{split}-XXXXX-of-XXXXX.parquet`` shards with
the images embedded, and a ``README.md`` dataset card — into ``--output-dir`` (or a temporary
folder), then uploaded in one commit with ``--push-to-hub``. The folder is also a valid source for
``load_cell_dataset`` and ``datasets.load_dataset``, so a push can be checked locally first.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

# idle OpenMP threads sleep rather than spin (set before torch loads; see bench/RESULTS.md, finding 1)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cellhub.data import DatasetLayoutError, LoadReport, load_cell_dataset  # noqa: E402
from cellhub.cli import add_group_by_argument  # noqa: E402
from cellhub.tasks import GROUP_METHOD_TEXT  # noqa: E402
from cellhub.tasks import TASK_NAMES, get_task  # noqa: E402

logger = logging.getLogger("prepare_dataset")

_LICENSES = {"blood-cells": "mit", "malaria": "other"}
_SOURCES = {
    "blood-cells": "BCCD dataset (MIT licence), as augmented crops on Kaggle: paultimothymooney/blood-cells.",
    "malaria": "U.S. National Library of Medicine malaria cell images (Rajaraman et al. 2018, PeerJ 6:e4568), "
               "via Kaggle iarunava/cell-images-for-detecting-malaria; publicly released by the NLM.",
}


def _repo_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*", value or ""):
        raise argparse.ArgumentTypeError(f"{value!r} is not a Hub repo id: use OWNER/NAME, e.g. you/blood-cells.")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="local dataset folder (the unzipped Kaggle download, or any image-folder tree)")
    p.add_argument("--task", choices=TASK_NAMES, default=None, help="default: inferred from the class folders")
    p.add_argument("--push-to-hub", metavar="REPO", type=_repo_id, default=None,
                   help="upload to this Hub dataset repo (OWNER/NAME)")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="write the dataset repository here (kept; default with --push-to-hub: a temporary folder)")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    p.add_argument("--max-shard-mb", type=int, default=500, help="largest Parquet shard, in MB (default 500)")
    p.add_argument("--smear-dir", default=None, help="blood cells: folder of full smears (default: found)")
    add_group_by_argument(p)
    p.add_argument("--cache-dir", default=None, help="cellhub cache (default: $CELLHUB_CACHE or ~/.cache/cellhub)")
    args = p.parse_args(argv)
    if args.push_to_hub is None and args.output_dir is None:
        p.error("nothing to do: give --push-to-hub OWNER/NAME, --output-dir DIR, or both.")
    if args.max_shard_mb < 1:
        p.error(f"--max-shard-mb must be at least 1, got {args.max_shard_mb}.")
    return args


def _split_stats(dsd) -> dict[str, dict[str, Any]]:
    stats = {}
    for split, ds in dsd.items():
        names = ds.features["label"].names
        labels = list(ds["label"])
        groups = [str(g) for g in ds["group"]]
        per = {}
        for i, n in enumerate(names):
            gs = {g for g, lab in zip(groups, labels) if lab == i}
            per[n] = (sum(1 for lab in labels if lab == i), len(gs))
        stats[split] = {"images": len(ds), "groups": len(set(groups)), "per_class": per}
    return stats


def dataset_card(dsd, report: LoadReport, repo_id: str | None) -> str:
    """README.md for the dataset repository: YAML metadata (splits as data files) + what the data is."""
    task = get_task(report.task)
    stats = _split_stats(dsd)
    yaml = ["---", f"license: {_LICENSES.get(task.name, 'other')}", "task_categories:", "- image-classification",
            "tags:", "- biology", "- microscopy", "- blood-smear", f"- {task.name}", "- cellhub",
            f"pretty_name: cellhub {task.name}", "configs:", "- config_name: default", "  data_files:"]
    for split in dsd:
        yaml += [f"  - split: {split}", f"    path: data/{split}-*"]
    yaml.append("---")
    name = repo_id or f"cellhub {task.name}"
    body = [
        f"# {name}", "",
        task.description, "",
        f"Prepared with `train/prepare_dataset.py` (cellhub) from a local download ({report.source_kind}).",
        f"Source: {_SOURCES.get(task.name, 'see the original download.')}", "",
        "## Columns", "",
        "- `image`: the cell image, as in the download (not resized).",
        f"- `label`: class, in this fixed order: {', '.join(f'{i} = {n}' for i, n in enumerate(task.labels))}.",
        f"- `group`: the {task.group_unit} the image comes from. **Keep a group on one side of any split**: "
        "images of one group are strongly correlated, and a random split overstates accuracy.",
        "- `file`: the file's path in the original download, relative to its split folder.", "",
        "## Splits", "",
        "| split | images | groups | " + " | ".join(task.labels) + " |",
        "|---|---|---|" + "---|" * len(task.labels),
    ]
    for split, s in stats.items():
        cells = " | ".join(f"{s['per_class'][n][0]} ({s['per_class'][n][1]} groups)" for n in task.labels)
        body.append(f"| {split} | {s['images']} | {s['groups']} | {cells} |")
    body += ["", "## Groups", ""]
    for split, method in report.group_method.items():
        att = report.smear_attribution.get(split)
        extra = f"; {att:.1%} of images traced to their source smear" if att is not None else ""
        body.append(f"- {split}: {GROUP_METHOD_TEXT.get(method, method)}{extra}.")
    if report.skipped:
        body += ["", f"{len(report.skipped)} unreadable files of the download were left out."]
    body += [
        "", "## Use", "", "```python", "import cellhub",
        f"ds = cellhub.load_cell_dataset({(repo_id or 'OWNER/NAME')!r})  # DatasetDict; task label order, group column",
        "parts = cellhub.split_by_group(ds['train'], val_fraction=0.2)  # grouped validation split",
        "```", "",
    ]
    return "\n".join(yaml + body)




def write_repo_folder(dsd, report: LoadReport, out_dir: str | Path, *, repo_id: str | None = None,
                      max_shard_bytes: int = 500 * 2**20) -> Path:
    """Write ``data/*.parquet`` (images embedded) and ``README.md`` into ``out_dir``; returns it."""
    from datasets.table import embed_table_storage

    out = Path(out_dir)
    data = out / "data"
    if data.exists() and any(data.glob("*.parquet")):
        raise FileExistsError(f"{data} already holds Parquet shards; choose an empty --output-dir.")
    data.mkdir(parents=True, exist_ok=True)
    for split, ds in dsd.items():
        size = ds.data.nbytes + _external_bytes(ds)
        n = max(1, math.ceil(size / max_shard_bytes))
        for i in range(n):
            shard = ds.shard(num_shards=n, index=i, contiguous=True)
            fmt = shard.format
            shard = shard.with_format("arrow").map(embed_table_storage, batched=True, keep_in_memory=True)
            shard = shard.with_format(**fmt)
            shard.to_parquet(str(data / f"{split}-{i:05d}-of-{n:05d}.parquet"))
        logger.info("wrote %s: %d images in %d shard(s)", split, len(ds), n)
    (out / "README.md").write_text(dataset_card(dsd, report, repo_id))
    return out


def _external_bytes(ds) -> int:
    """The size on disk of the images not yet embedded in ``ds`` (what the shards will add)."""
    from cellhub.data import file_backed_paths

    total = 0
    for path in file_backed_paths(ds):
        try:
            total += Path(path).stat().st_size
        except OSError:
            pass
    return total


def push_folder(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None) -> str:
    """Create the dataset repo (if needed) and upload ``folder`` in one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=str(folder),
                      commit_message="Add dataset (cellhub prepare_dataset.py)")
    return str(url)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dsd, report = load_cell_dataset(args.path, args.task, cache_dir=args.cache_dir, smear_dir=args.smear_dir,
                                        return_report=True, group_by=args.group_by)
    except (DatasetLayoutError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    max_bytes = args.max_shard_mb * 2**20
    if args.output_dir is not None:
        folder = write_repo_folder(dsd, report, args.output_dir, repo_id=args.push_to_hub, max_shard_bytes=max_bytes)
        print(f"dataset repository written to {folder}")
        if args.push_to_hub:
            print(f"pushed: {push_folder(folder, args.push_to_hub, private=args.private, token=args.token)}")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_repo_folder(dsd, report, tmp, repo_id=args.push_to_hub, max_shard_bytes=max_bytes)
            print(f"pushed: {push_folder(folder, args.push_to_hub, private=args.private, token=args.token)}")
    if report.skipped:
        print(f"{len(report.skipped)} unreadable files were left out (listed in the log above).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
