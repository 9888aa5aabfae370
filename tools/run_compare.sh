#!/usr/bin/env bash
# The quickstart comparison: train every configs/shapes variant of Faster R-CNN and Mask R-CNN,
# test each on the val and test_hard splits, and tabulate the results with collect_results.py.
#
#   tools/run_compare.sh [WORK_ROOT]        (default work_dirs/compare; `make compare` runs it)
#   DETECTORS=faster-rcnn tools/run_compare.sh   (one detector only; default: both)
#   VARIANTS="r50_fpn r50-dk-c3-c5_fpn" tools/run_compare.sh   (some variants only; default: all)
#
# Resumable: a step that finished leaves a stamp in the model's work_dir and is skipped the
# next time; an interrupted training resumes from its last checkpoint (tools/train.py --resume).
# The data must exist first (`make compare` generates it, as `make demo` does).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
WORK_ROOT=${1:-work_dirs/compare}
DATA_ROOT=data/shapes/  # the configs' data_root
ALL_VARIANTS="r50_fpn r50-dconv-c3-c5_fpn r50-dk-c3-c5_fpn r50-dk-global-c3-c5_fpn
              r50-dk-dconv-c3-c5_fpn"
# What --cfg-options changes to test on the held-out split instead of val.
TEST_HARD_OPTIONS=(
  test_dataloader.dataset.ann_file=annotations/instances_test_hard.json
  test_dataloader.dataset.data_prefix.img=test_hard/
  test_evaluator.ann_file=${DATA_ROOT}annotations/instances_test_hard.json
)

if [[ ! -f ${DATA_ROOT}annotations/instances_test_hard.json ]]; then
  echo "run_compare.sh: no data in ${DATA_ROOT}; run 'make compare' (it generates the data)" >&2
  exit 1
fi

work_dirs=()
read -r -a detectors <<< "${DETECTORS:-faster-rcnn mask-rcnn}"
read -r -a variants -d '' <<< "${VARIANTS:-${ALL_VARIANTS}}" || true  # -d '': across lines
for detector in "${detectors[@]}"; do
  for variant in "${variants[@]}"; do
    name=${detector}_${variant}_shapes
    config=configs/shapes/${name}.py
    work_dir=${WORK_ROOT}/${name}
    work_dirs+=("${work_dir}")
    mkdir -p "${work_dir}"

    if [[ ! -f ${work_dir}/.trained ]]; then
      echo "== ${name}: training (log: ${work_dir}/<timestamp>/<timestamp>.log)"
      "${PYTHON}" tools/train.py "${config}" --work-dir "${work_dir}" --resume
      touch "${work_dir}/.trained"
    fi
    checkpoint=$(cat "${work_dir}/last_checkpoint")

    if [[ ! -f ${work_dir}/.tested_val ]]; then
      echo "== ${name}: testing on val"
      "${PYTHON}" tools/test.py "${config}" "${checkpoint}" --work-dir "${work_dir}"
      touch "${work_dir}/.tested_val"
    fi
    if [[ ! -f ${work_dir}/.tested_test_hard ]]; then
      echo "== ${name}: testing on test_hard"
      "${PYTHON}" tools/test.py "${config}" "${checkpoint}" --work-dir "${work_dir}" \
        --cfg-options "${TEST_HARD_OPTIONS[@]}"
      touch "${work_dir}/.tested_test_hard"
    fi
  done
done

"${PYTHON}" tools/analysis_tools/collect_results.py "${work_dirs[@]}" \
  --out "${WORK_ROOT}/results.md" --csv "${WORK_ROOT}/results.csv"
