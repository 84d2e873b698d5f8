#!/usr/bin/env bash
# Leave one lab out (issue #10): the bundled white-cell recipe trained on ONE lab's images only,
# with BatchNorm and with a second setting side by side (one thread each; GroupNorm unless B_NAME /
# B_ARGS say otherwise), then both scored on every image of the other lab, which neither saw
# (bench/other_lab.py: accuracy with its group-bootstrap interval, per-class recall, the second arm
# minus BatchNorm paired over that lab's groups).
#
#   usage:  bench/leave_one_lab_out.sh kaggle|pbc [extra finetune.py arguments...]
#           kaggle: train on the Kaggle crops, score on PBC's four white-cell classes
#           pbc:    train on PBC's four classes, score on every Kaggle crop
#   env:    DATA (default ../shared/data), WORK (default /tmp/cellhub-lolo), PY (default .venv/bin/python);
#           B_NAME and B_ARGS: the second arm, its name and its finetune.py arguments (default: group,
#           "--norm group"); e.g. B_NAME=reinhard B_ARGS="--norm batch --stain-norm reinhard" for the
#           stain-normalisation study (a finished arm is resumed at its
#           last epoch, not retrained: --resume)
#
# Each arm's epoch is selected on a grouped validation split of its own lab (as the bundle does);
# the other lab plays no part in any choice. Writes $WORK/lolo-<lab>.txt and .json, then the same
# with each BatchNorm model's statistics re-estimated on the other lab's images (--adapt-bn, labels
# unused): $WORK/lolo-<lab>-adapt-bn.txt and .json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
WORK=${WORK:-/tmp/cellhub-lolo}
export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE
lab=${1:?usage: bench/leave_one_lab_out.sh kaggle|pbc [finetune.py arguments...]}; shift
case $lab in
  kaggle) train=$DATA/blood-cells; other=$DATA/pbc ;;
  pbc)    train=$DATA/pbc;         other=$DATA/blood-cells ;;
  *) echo "unknown lab '$lab': choose kaggle (train on the Kaggle crops) or pbc (train on PBC)" >&2; exit 2 ;;
esac
B_NAME=${B_NAME:-group}
B_ARGS=${B_ARGS:---norm group}
tag=$([ "$B_NAME" = group ] && echo "" || echo "-$B_NAME")
mkdir -p "$WORK"
pids=()
for arm in batch "$B_NAME"; do
  # shellcheck disable=SC2086  # B_ARGS is a list of arguments
  if [ "$arm" = batch ]; then arm_args=(--norm batch); else arm_args=($B_ARGS); fi
  "$PY" train/finetune.py --task blood-cells --dataset "$train" \
    --model smallcnn --from-scratch "${arm_args[@]}" --lr 3e-3 --batch-size 64 --warmup-epochs 0.5 \
    --threads 1 --num-workers 0 --no-progress --resume \
    --image-size 80 --epochs 10 --label-smoothing 0.1 --cell-crop nucleus --stain-jitter 0.3 --scale-jitter 0.15 \
    --seed 0 --select-from-epoch 5 "$@" \
    --output-dir "$WORK/lolo-$lab-$arm" >> "$WORK/lolo-$lab-$arm.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
"$PY" bench/other_lab.py "$WORK/lolo-$lab-batch" "$WORK/lolo-$lab-$B_NAME" --data "$other" \
  --json "$WORK/lolo-$lab$tag.json" | tee "$WORK/lolo-$lab$tag.txt"
"$PY" bench/other_lab.py "$WORK/lolo-$lab-batch" "$WORK/lolo-$lab-$B_NAME" --data "$other" --adapt-bn \
  --json "$WORK/lolo-$lab$tag-adapt-bn.json" | tee "$WORK/lolo-$lab$tag-adapt-bn.txt"
