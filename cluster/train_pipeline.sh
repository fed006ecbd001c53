#!/usr/bin/env bash
# The whole training pipeline on a Ray cluster, from images in S3 to a bundle in S3:
#   prepare -> train autoencoder -> infer latents -> train latent DPM -> train classifier -> evaluate
# It is the entrypoint of cluster/kuberay/rayjob-train.yaml, and what `ray job submit` runs with
# cluster/runtime_env.yaml (README "Operations"). Each step is one `python -m pipelines.<job>`.
#
# Settings, from the environment (the runtime env's env_vars):
#   DIFFAE_DATA         images to train on: s3://bucket/prefix (image files or parquet)        (required)
#   DIFFAE_RUNS         root of all runs: s3://bucket/prefix                                     (required)
#   DIFFAE_RUN_NAME     this run; everything it writes is under DIFFAE_RUNS/DIFFAE_RUN_NAME      (required)
#   DIFFAE_BUNDLE       where the finished bundle goes (the RayService's `bundle`)               (required)
#   DIFFAE_ATTRIBUTES   attribute file (CSV or CelebA-HQ annotations) for the classifier; empty: no classifier
#   DIFFAE_PRESET       model preset (default ffhq64); DIFFAE_IMAGE_SIZE its image size (default 64)
#   DIFFAE_NUM_WORKERS  Ray Train workers, one GPU each (default 4); DIFFAE_CPUS_PER_WORKER (default 4)
#   DIFFAE_MAX_SAMPLES  autoencoder training samples (default: the preset's recipe)
#   DIFFAE_HOLDOUT      fraction of images (by id hash) kept out of training for the evaluation (default 0.1)
#   DIFFAE_DRY_RUN=1    print the commands instead of running them
#
# Re-running with the same DIFFAE_RUN_NAME (a RayJob retry, or a new submission) skips the data
# preparation and the autoencoder when they are finished, and resumes an unfinished autoencoder run from
# its last checkpoint; the later steps are minutes long and run again.
set -euo pipefail

: "${DIFFAE_DATA:?set DIFFAE_DATA to the images, e.g. s3://bucket/images}"
: "${DIFFAE_RUNS:?set DIFFAE_RUNS to the runs root, e.g. s3://bucket/runs}"
: "${DIFFAE_RUN_NAME:?set DIFFAE_RUN_NAME to a name for this run, e.g. ffhq64-v1}"
: "${DIFFAE_BUNDLE:?set DIFFAE_BUNDLE to the bundle to write, e.g. s3://bucket/bundles/ffhq64-v1}"
preset="${DIFFAE_PRESET:-ffhq64}"
image_size="${DIFFAE_IMAGE_SIZE:-64}"
workers="${DIFFAE_NUM_WORKERS:-4}"
cpus_per_worker="${DIFFAE_CPUS_PER_WORKER:-4}"
holdout="${DIFFAE_HOLDOUT:-0.1}"
run="${DIFFAE_RUNS%/}/${DIFFAE_RUN_NAME}"
data="$run/data"
autoencoder="$run/autoencoder"
latents="$run/latents"

step() {  # print a command, then run it (unless this is a dry run)
  printf '%q ' "$@"
  printf '\n'
  if [ "${DIFFAE_DRY_RUN:-0}" != 1 ]; then
    "$@"
  fi
}

exists() {  # does this URI (path or s3://) exist? A dry run assumes a fresh run.
  [ "${DIFFAE_DRY_RUN:-0}" != 1 ] || return 1
  python -c 'import sys; from pipelines import runtime; sys.exit(0 if runtime.exists(sys.argv[1]) else 1)' "$1"
}

echo "== 1/6 prepare: $DIFFAE_DATA -> $data"
if exists "$data/dataset.json"; then
  echo "already prepared"
else
  step python -m pipelines.data "$DIFFAE_DATA" "$data" --image-size "$image_size" \
    ${DIFFAE_ATTRIBUTES:+--attributes "$DIFFAE_ATTRIBUTES"}
fi

echo "== 2/6 train the autoencoder: $autoencoder"
if exists "$autoencoder/summary.json"; then
  echo "already trained"
elif exists "$autoencoder/config.json"; then
  step python -m pipelines.train_autoencoder --storage "$run" --resume autoencoder
else
  step python -m pipelines.train_autoencoder --data "$data" --storage "$run" --name autoencoder \
    --preset "$preset" --image-size "$image_size" --num-workers "$workers" --use-gpu \
    --cpus-per-worker "$cpus_per_worker" --holdout "$holdout" ${DIFFAE_MAX_SAMPLES:+--max-samples "$DIFFAE_MAX_SAMPLES"}
fi

echo "== 3/6 infer latents: $latents"
step python -m pipelines.infer_latents --bundle "$autoencoder/bundle" --data "$data" --out "$latents" \
  --concurrency "$workers"

echo "== 4/6 train the latent DPM: $DIFFAE_BUNDLE"
step python -m pipelines.train_latent --bundle "$autoencoder/bundle" --latents "$latents" --out "$DIFFAE_BUNDLE" \
  --storage "$run" --name latent --num-workers 1 --use-gpu --cpus-per-worker "$cpus_per_worker"

echo "== 5/6 train the attribute classifier"
if [ -n "${DIFFAE_ATTRIBUTES:-}" ]; then
  step python -m pipelines.train_classifier --bundle "$DIFFAE_BUNDLE" --latents "$latents" \
    --storage "$run" --name classifier
else
  echo "no DIFFAE_ATTRIBUTES: the bundle gets no classifier (no /v1/classify, no /v1/manipulate)"
fi

echo "== 6/6 evaluate: $run/evaluation"
step python -m pipelines.evaluate --bundle "$DIFFAE_BUNDLE" --data "$data" --holdout "$holdout" \
  --out "$run/evaluation" --concurrency "$workers"

echo "done: bundle $DIFFAE_BUNDLE"
