"""How often ``predict``'s whole-field check fires (issue #11: a field given where a crop is expected).

    python bench/whole_field_check.py --task malaria  /work/shared/data/blood-cells/dataset-master   # fields
    python bench/whole_field_check.py --task blood-cells /work/shared/data/pbc                          # crops

Runs :func:`cellhub.fields.whole_field_problem` on every image under the folders (or a seeded
sample of ``--limit`` of them) and prints how many were called whole fields, with a Wilson 95%
interval. On folders of fields that is the detection rate; on folders of single-cell crops, the
false-alarm rate. It also counts the images that fail the stained-smear colour check
(:func:`cellhub.cellcheck.check_cell_image`), which ``predict`` makes on crops and ``analyze`` on
fields: on real fields or crops, each one is a false alarm.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cellhub.cellcheck import check_cell_image  # noqa: E402
from cellhub.fields import whole_field_problem, wilson_interval  # noqa: E402
from cellhub.images import DEFAULT_LIMITS, collect_images, read_image  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+")
    p.add_argument("--task", required=True, choices=["blood-cells", "pbc", "malaria"])
    p.add_argument("--limit", type=int, default=None, help="a seeded sample of this many images")
    args = p.parse_args(argv)
    refs, _ = collect_images(args.folders, limits=replace(DEFAULT_LIMITS, max_images=10**7, max_zip_members=10**7))
    if args.limit and len(refs) > args.limit:
        refs = random.Random(0).sample(refs, args.limit)
    flagged, not_smear, seconds = [], [], 0.0
    for ref in refs:
        t0 = time.perf_counter()
        image = read_image(ref.read_bytes(), name=ref.name)
        problem = whole_field_problem(image, args.task)
        seconds += time.perf_counter() - t0  # decoding and the whole-field check, as before; the colour check apart
        if problem:
            flagged.append((ref.name, problem))
        verdict = check_cell_image(image)  # the colour check both predict and analyze make
        if not verdict.ok:
            not_smear.append((ref.name, verdict.reason))
    n, k = len(refs), len(flagged)
    out = {"task": args.task, "images": n, "flagged": k, "rate": k / max(n, 1), "ci95": wilson_interval(k, n),
           "ms_per_image": 1000 * seconds / max(n, 1), "examples": flagged[:5],
           "not_a_stained_smear": len(not_smear), "not_a_stained_smear_examples": not_smear[:5]}
    print(json.dumps(out, indent=1))
    print(f"whole-field check: {k}/{n} flagged, {len(not_smear)}/{n} not a stained smear by colour cmd='python bench/whole_field_check.py --task {args.task} "
          f"{' '.join(args.folders)}{f' --limit {args.limit}' if args.limit else ''}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
