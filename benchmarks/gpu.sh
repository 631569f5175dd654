#!/usr/bin/env bash
# The throughput set on one GPU, in one go (budget: 8 minutes on one H100 / H200):
#   1. teacher cache build, CPU pipeline (workers decode with PIL) vs device pipeline (nvJPEG + tensor ops),
#      against the bare CLIP forward: random-weight open_clip RN50-quickgelu (pretrained none), fp16,
#      channels-last, 8192 synthetic ImageNet-size JPEGs (400 px +-25% per side, made on the spot);
#   2. one train step of the paper recipe (ResNet-50 student + EMAN teacher at 224 px, batch 64, mu 5,
#      multi-view, DebiasPL, bf16, channels-last), both pipelines, against the bare forward/backward, with
#      the per-phase breakdown (read, decode, augment, transfer, forward, backward, optimizer, EMA).
# No downloads: every model has random weights, every image is synthetic.
# Writes benchmarks/results/gpu.json (both scripts' full results, the machine and the commands).
#
#   benchmarks/gpu.sh            # on a GPU machine (needs a CUDA build of torch and torchvision)
#   benchmarks/gpu.sh --quick    # end-to-end check at tiny sizes on whatever device there is (CPU here):
#                                # same models, 32 images, 1 repeat; writes $TMPDIR/zsa-gpu-quick.json,
#                                # never benchmarks/results (its figures are not results)
# Environment: PYTHON (default python), WORKERS (DataLoader workers; default usable CPUs - 1).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-python}"
cpus="$("$python" -c 'import os; print(len(os.sched_getaffinity(0)))')"
workers="${WORKERS:-$(( cpus > 1 ? cpus - 1 : 1 ))}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/zsa-gpu.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == "--quick" ]]; then
    output="${TMPDIR:-/tmp}/zsa-gpu-quick.json"
    cache_args=(--images 32 --source-size 400 --size-jitter 0.25 --batch-size 16 --workers 0 1 --shard-size 8192
                --repeats 1)
    train_args=(--images 32 --source-size 400 --size-jitter 0.25 --image-size 224 --batch-size 2 --mu 1
                --multiview --workers 0 1 --steps 1 --warmup-steps 1 --repeats 1)
else
    output="$here/results/gpu.json"
    "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "no CUDA device: use --quick")'
    cache_args=(--images 8192 --source-size 400 --size-jitter 0.25 --batch-size 256 --workers 4 "$workers"
                --shard-size 8192 --repeats 3 --precision fp16 --channels-last)
    train_args=(--images 4096 --source-size 400 --size-jitter 0.25 --image-size 224 --batch-size 64 --mu 5
                --multiview --workers "$workers" --steps 10 --warmup-steps 3 --repeats 2 --mixed-precision bf16
                --channels-last)
fi

start=$SECONDS
echo "== cache build: RN50-quickgelu (random weights), cpu vs device pipeline, $workers workers max"
"$python" "$here/cache_throughput.py" --model RN50-quickgelu --pipeline cpu device "${cache_args[@]}" \
    --tmp-dir "$scratch" --output "$scratch/cache.json"
echo "== cache build done after $(( SECONDS - start )) s"
echo "== train step: resnet50 student at 224 px, paper recipe (multi-view), cpu vs device pipeline"
"$python" "$here/train_throughput.py" --arch resnet50 --pipeline cpu device "${train_args[@]}" \
    --tmp-dir "$scratch" --output "$scratch/train.json"
echo "== train step done after $(( SECONDS - start )) s"

"$python" - "$scratch/cache.json" "$scratch/train.json" "$output" "$(( SECONDS - start ))" "$*" <<'EOF'
import datetime as dt
import json
import os
import sys

cache_path, train_path, output, seconds, flags = sys.argv[1:]
def only_run(path):
    runs = json.load(open(path))["runs"]
    (setting, result), = runs.items()
    return {"setting": setting, **result}

document = {
    "benchmark": "gpu",
    "description": "benchmarks/gpu.sh: cache build and paper-recipe train step, CPU vs device input pipeline, "
                   "ratios to the bare model in the same process (see benchmarks/README.md)",
    "command": f"benchmarks/gpu.sh {flags}".strip(),
    "quick": "--quick" in flags,
    "measured_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
    "wall_seconds": int(seconds),
    "cache_throughput": only_run(cache_path),
    "train_throughput": only_run(train_path),
}
os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
temp = f"{output}.{os.getpid()}.tmp"
with open(temp, "w") as handle:
    json.dump(document, handle, indent=2)
    handle.write("\n")
os.replace(temp, output)
print(f"wrote {output} ({seconds} s)")
EOF
