#!/usr/bin/env bash
# The prepared device check of issue 16: one script, at most ~8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (wheels/ from benchmarks/gpu_wheels.sh carried)
#   bash benchmarks/gpu_check.sh --quick    # the same steps on CPU with tiny shapes (tests/test_gpu_check_smoke.py)
#
# Parts, each time-boxed (`timeout`; 4x the box with --quick) and skipped when the remaining budget
# (GPU_CHECK_BUDGET seconds, default 480) is below its box; GPU_CHECK_PARTS="env fsdp" runs only those:
#   env          versions, GPU name, whether flash-attention is importable
#   packing      benchmarks/packing_check.py: packed vs padded vs length groups on one micro-batch
#                (log-probs, gradients, seconds), qwen2-0.5b shapes, bf16
#   train_bench  benchmarks/train_bench.py on the qwen2-0.5b shape, contenders a, c, d
#   mfu          benchmarks/train_bench.py --mfu on the qwen2-1.5b shape, full fine-tuning and LoRA
#   logprobs     benchmarks/logprobs_bench.py on the llama-7b-ish shape
#   fsdp         `rdro train` through recipes/accelerate/fsdp-8gpu.yaml adapted to 1 process, then the
#                last checkpoint removed and `--resume`d: the resumed steps must repeat the first run's
# Every part appends one JSON line {"part", "rc", "seconds", "result"} to $OUT/results.jsonl; all output goes
# to $OUT/log.txt. OUT defaults to ./gpu-check-out.
set -u
cd "$(dirname "$0")/.."
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
LOG=$OUT/log.txt
: >"$RESULTS"
: >"$LOG"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-480}
PARTS=" ${GPU_CHECK_PARTS:-env packing train_bench mfu logprobs fsdp} "  # e.g. GPU_CHECK_PARTS="env fsdp" to rerun
START=$(date +%s)
WORK=$(mktemp -d /tmp/gpu-check-XXXXXX)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export RDRO_CACHE_DIR=$WORK/cache

# Install what the image lacks from the carried wheels (no index there), ahead of the image's packages.
# --quick only checks that they install for the device's Python 3.12 and keeps this machine's packages.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls wheels/*.whl >/dev/null 2>&1; then
    target=(--target "$WORK/site")
    [ "$QUICK" = 1 ] && target=(--target "$WORK/site-py312" --python-version 3.12 --only-binary=:all:)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "${target[@]}" \
        wheels/*.whl >>"$LOG" 2>&1; then
        echo "gpu_check: installed $(ls wheels | tr '\n' ' ')" | tee -a "$LOG"
        [ "$QUICK" = 1 ] || export PYTHONPATH=$PWD:$WORK/site${PYTHONPATH#"$PWD"}
    else
        echo "gpu_check: installing wheels/ failed (see log.txt)" | tee -a "$LOG"
    fi
fi

if [ "$QUICK" = 1 ]; then
    DEVICE=(--device cpu --dtype float32)
    PACKING=(--quick)
    BENCH=(--quick --contenders acd)
    MFU=(--quick --mfu)
    LOGPROBS=(--quick)
    FSDP_CONFIG=recipes/accelerate/ddp-cpu-2.yaml  # FSDP needs CUDA; on CPU the same cycle through DDP (gloo)
else
    DEVICE=(--device cuda --dtype bfloat16)
    PACKING=(--arch qwen2-0.5b-llama "${DEVICE[@]}" --rows 8 --repeats 5)
    BENCH=(--arch qwen2-0.5b-llama "${DEVICE[@]}" --contenders acd --steps 5 --warmup 1 --repeats 1)
    MFU=(--mfu --arch qwen2-1.5b-llama "${DEVICE[@]}" --batch-size 32 --steps 4 --warmup 1)
    LOGPROBS=(--arch llama-7b-ish "${DEVICE[@]}" --rows 200 --repeats 1)
    FSDP_CONFIG=recipes/accelerate/fsdp-8gpu.yaml
fi

# part NAME BOX_SECONDS RESULT_FILE COMMAND...: runs COMMAND under `timeout BOX`, appends one JSON line.
# RESULT_FILE holds the part's JSON (or "-": the command's last stdout line that parses as JSON).
part() {
    local name=$1 box=$2 result=$3
    shift 3
    local now elapsed left rc began
    case "$PARTS" in *" $name "*) ;; *) return ;; esac
    [ "$QUICK" = 1 ] && box=$((box * 4))  # a shared CPU is slow; the boxes are sized for the GPU
    now=$(date +%s)
    elapsed=$((now - START))
    left=$((BUDGET - elapsed))
    if [ "$left" -lt "$box" ] && [ "$QUICK" = 0 ]; then
        echo "{\"part\": \"$name\", \"rc\": null, \"seconds\": 0, \"skipped\": \"budget: ${left}s left, box ${box}s\"}" \
            >>"$RESULTS"
        return
    fi
    echo "=== $name (box ${box}s, ${elapsed}s elapsed): $*" | tee -a "$LOG"
    began=$(date +%s)
    timeout --kill-after=10 "$box" "$@" >"$WORK/$name.out" 2>>"$LOG"
    rc=$?
    cat "$WORK/$name.out" >>"$LOG"
    "$PY" - "$name" "$rc" "$(($(date +%s) - began))" "$result" "$WORK/$name.out" >>"$RESULTS" <<'EOF'
import json, sys
name, rc, seconds, result, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
value = None
lines = open(result).read().splitlines() if result != "-" else open(out).read().splitlines()
for line in reversed(lines):
    try:
        value = json.loads(line)
        break
    except ValueError:
        continue
print(json.dumps({"part": name, "rc": rc, "seconds": seconds, "timed_out": rc in (124, 137), "result": value}))
EOF
    echo "=== $name: rc $rc after $(($(date +%s) - began))s" | tee -a "$LOG"
}

env_info() {
    "$PY" - <<'EOF'
import importlib, importlib.util, json, platform
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "flash_attn": importlib.util.find_spec("flash_attn") is not None}
for name in ("transformers", "accelerate", "peft", "datasets", "trl", "pyarrow", "huggingface_hub"):
    try:
        info[name] = importlib.import_module(name).__version__
    except Exception as err:  # noqa: BLE001 -- report any import failure, keep going
        info[name] = f"import failed: {type(err).__name__}: {err}"[:200]
from rdro_cli.lm import fast_paths, throughput
info["packing_supported"] = fast_paths.packing_supported()
info["peak_flops"] = throughput.peak_flops(info["device_name"])
print(json.dumps(info))
EOF
}

# A tiny model's prepare -> logprobs -> train (4 steps, checkpoints at 2 and 4) through accelerate launch with
# the shipped config at 1 process; then the step-4 checkpoint, final/ and the manifest removed and --resume.
fsdp_cycle() {
    local run=$WORK/fsdp config=$WORK/accelerate-1.yaml model
    mkdir -p "$run"
    sed -e 's/^num_processes: .*/num_processes: 1/' "$FSDP_CONFIG" >"$config"
    model=$("$PY" scripts/tiny_model.py "$run/model") || return 1
    local common=(--set "model.name=\"$model\"" --set data.max_length=128 --set data.max_prompt_length=64
                  --set train.batch_size=4 --set train.learning_rate=1e-3 --set train.max_steps=4
                  --set train.save_every=2 --set train.keep_checkpoints=2 --set train.warmup_ratio=0.0)
    "$PY" -m rdro_cli prepare --dataset tests/fixtures/mix14k_sample.jsonl --out "$run/data" "${common[@]}" \
        --test-fraction 0.25 >&2 || return 1
    "$PY" -m rdro_cli logprobs --data "$run/data" --out "$run/logprobs" "${common[@]}" >&2 || return 1
    local launch=("$PY" -m accelerate.commands.launch --config_file "$config" -m rdro_cli train
                  --data "$run/data" --logprobs "$run/logprobs" --out "$run/train" "${common[@]}")
    "${launch[@]}" >&2 || return 1
    cp "$run/train/metrics.jsonl" "$run/first.jsonl"
    # as if the run had died after step 3: the step-4 checkpoint, final/ and the manifest are gone
    rm -rf "$run/train/checkpoints/step-0000004" "$run/train/final" "$run/train/manifest.json"
    "${launch[@]}" --resume >&2 || return 1
    "$PY" - "$run" "$config" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
first = [json.loads(x) for x in (run / "first.jsonl").read_text().splitlines()]
resumed = [json.loads(x) for x in (run / "train" / "metrics.jsonl").read_text().splitlines()]
diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(first, resumed, strict=True))
config = Path(sys.argv[2]).read_text()
print(json.dumps({"distributed_type": next(l.split(":")[1].strip() for l in config.splitlines()
                                           if l.startswith("distributed_type")),
                  "steps_first": [r["step"] for r in first], "steps_resumed": [r["step"] for r in resumed],
                  "max_abs_loss_diff": diff, "losses_first": [r["loss"] for r in first],
                  "losses_resumed": [r["loss"] for r in resumed], "mfu_first": [r.get("mfu") for r in first],
                  "final_written": (run / "train" / "final").is_dir(),
                  "manifest_written": (run / "train" / "manifest.json").is_file()}))
EOF
}

export PY WORK FSDP_CONFIG
export -f env_info fsdp_cycle  # so that `timeout` can run them through bash
part env 60 - bash -c env_info
part packing 60 - "$PY" benchmarks/packing_check.py "${PACKING[@]}"
part train_bench 170 "$WORK/train_bench.json" "$PY" benchmarks/train_bench.py "${BENCH[@]}" --out "$WORK/train_bench.json"
part mfu 120 "$WORK/mfu.json" "$PY" benchmarks/train_bench.py "${MFU[@]}" --out "$WORK/mfu.json"
part logprobs 90 - "$PY" benchmarks/logprobs_bench.py "${LOGPROBS[@]}"
part fsdp 90 - bash -c fsdp_cycle
echo "gpu_check: $(($(date +%s) - START))s in all; results in $RESULTS" | tee -a "$LOG"
rm -rf "$WORK"
