#!/usr/bin/env bash
# Runs prepare -> logprobs -> train -> merge -> eval on recipes/tiny-cpu.toml with the code of two commits and
# compares every file digest their manifests record (manifests themselves hold wall times and are left out;
# metrics.jsonl is compared without its wall-time fields, tokens_per_s and mfu).
#   bash benchmarks/artifact_identity.sh OLD_COMMIT [NEW_COMMIT]     (NEW defaults to the working tree)
# EXTRA='--set lora.enabled=true' adds recipe overrides to every stage (a LoRA run also exercises merge).
# Prints one line per stage: identical, or the files that differ. Exit 0 only when every stage is identical.
set -euo pipefail
OLD=${1:?usage: artifact_identity.sh OLD_COMMIT [NEW_COMMIT]}
NEW=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rdro-identity.XXXXXX")
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RDRO_CACHE_DIR="$WORK/cache"
# peft writes adapter_config.json's target_modules from a set: its order follows the string hash seed
export PYTHONHASHSEED=0
tree() {  # $1 = commit or "" (working tree) -> directory holding its rdro_cli
    if [ -z "$1" ]; then echo "$REPO"; return; fi
    mkdir -p "$WORK/src-$1" && git -C "$REPO" archive "$1" | tar -x -C "$WORK/src-$1" && echo "$WORK/src-$1"
}
MODEL=$(cd "$REPO" && "$PY" scripts/tiny_model.py "$WORK/model" | tail -1)
for side in old new; do
    src=$(tree "$([ $side = old ] && echo "$OLD" || echo "$NEW")")
    run="$WORK/run"  # the same path on both sides: recipe.toml, the model card and eval.json name it
    set_args=(--recipe "$REPO/recipes/tiny-cpu.toml" --set "model.name=\"$MODEL\"" --set "output.dir=\"$run\"")
    read -r -a extra <<< "${EXTRA:-}"
    set_args+=("${extra[@]}")
    for stage in prepare logprobs train merge eval; do
        (cd "$REPO" && PYTHONPATH="$src" "$PY" -m rdro_cli $stage "${set_args[@]}" >/dev/null 2>"$WORK/$side-$stage.log") \
            || { echo "$side $stage failed: $WORK/$side-$stage.log"; exit 1; }
    done
    mv "$run" "$WORK/run-$side"
done
"$PY" - "$WORK/run-old" "$WORK/run-new" <<'PYEOF'
import json, sys
from pathlib import Path
old, new = map(Path, sys.argv[1:])
same = True
for stage in ("data", "logprobs", "train", "merged", "eval"):
    if not (old / stage / "manifest.json").is_file() and not (new / stage / "manifest.json").is_file():
        print(f"{stage:9s} not written by either (a full fine-tune: merge has no adapter to fold)")
        continue
    a = json.loads((old / stage / "manifest.json").read_text())["files"]
    b = json.loads((new / stage / "manifest.json").read_text())["files"]
    differ = sorted(k for k in set(a) | set(b) if a.get(k, {}).get("digest") != b.get(k, {}).get("digest"))
    if "metrics.jsonl" in differ:  # wall-time fields aside, every number must agree
        rows = [[{k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "mfu")}
                 for line in (side / stage / "metrics.jsonl").read_text().splitlines()] for side in (old, new)]
        if rows[0] == rows[1]:
            differ.remove("metrics.jsonl")
    same &= not differ
    print(f"{stage:9s} {len(a):3d} files: " + ("identical" if not differ else "DIFFER: " + ", ".join(differ)))
sys.exit(0 if same else 1)
PYEOF
