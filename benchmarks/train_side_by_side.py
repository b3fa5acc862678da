"""The demo's `train` stage timed on two commits side by side, in alternating runs on the same machine.

    python benchmarks/train_side_by_side.py --old 1320377 --new HEAD --repeats 2 --workdir runs/side-by-side

Each commit is exported with `git archive` into `<workdir>/<commit>/src` and runs its own `prepare` and
`logprobs` once (cached: a re-run reuses them), then `train` runs `--repeats` times per commit, alternating
old/new/old/new so that load from other work on the machine falls on both alike. A run trains from scratch
(`--force`) into its own output directory. Printed per run and written to `<workdir>/timings.json`: the
train stage's wall seconds and the steps per second of its loop (from the progress log), plus the final
loss, so a speed-up that changed the result would show. Needs the demo model (`make demo` converts it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = "recipes/smollm2-135m-demo.toml"


def _model() -> str:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo_model.py")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]


def _export(commit: str, workdir: Path) -> Path:
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", commit], check=True,
                         capture_output=True, text=True).stdout.strip()
    src = workdir / sha / "src"
    if not (src / "rdro_cli").is_dir():
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    return src


def _rdro(src: Path, *args: str, log: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "RDRO_PROGRESS_EVERY": "5"}
    began = time.perf_counter()
    with log.open("w") as handle:
        subprocess.run([sys.executable, "-m", "rdro_cli", *args], cwd=src, env=env, check=True, stdout=handle,
                       stderr=subprocess.STDOUT)
    return time.perf_counter() - began, log.read_text(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", default="1320377")
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0, help="train.max_steps for the timed runs (0: the recipe's 150)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "side-by-side")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    model = _model()
    trees = {label: _export(commit, workdir) for label, commit in (("old", args.old), ("new", args.new))}
    common = ["--recipe", RECIPE, "--set", f"model.name={json.dumps(model)}"]
    for label, src in trees.items():
        run = src.parent / "run"
        for stage in ("prepare", "logprobs"):
            seconds, _ = _rdro(src, stage, *common, "--set", f"output.dir={json.dumps(str(run))}",
                               log=src.parent / f"{stage}.log")
            print(f"{label} {stage}: {seconds:.0f} s", file=sys.stderr)
    results = []
    for repeat in range(args.repeats):
        for label, src in trees.items():
            run = src.parent / "run"
            out = src.parent / f"train-{repeat}"
            steps = ["--max-steps", str(args.steps)] if args.steps else []
            seconds, text = _rdro(src, "train", *common, "--set", f"output.dir={json.dumps(str(run))}", "--out",
                                  str(out), "--force", *steps, log=src.parent / f"train-{repeat}.log")
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            # the loop's own time: the progress bar's (old) or the plain progress line's (new) elapsed clock
            clocks = re.findall(r"(?:elapsed |\d+/\d+ )(\d+):(\d\d):(\d\d)", text)
            loop_s = [int(h) * 3600 + int(m) * 60 + int(sec) for h, m, sec in clocks]
            result = {"commit": label, "repeat": repeat, "train_wall_s": round(seconds, 1),
                      "steps": rows[-1]["step"], "final_loss": rows[-1]["loss"],
                      "loop_s": max(loop_s) if loop_s else None,
                      "load_avg_1m": os.getloadavg()[0]}
            results.append(result)
            print(json.dumps(result), file=sys.stderr)
            (workdir / "timings.json").write_text(json.dumps(results, indent=2) + "\n")
    for label in trees:
        walls = [r["train_wall_s"] for r in results if r["commit"] == label]
        print(f"{label}: train {statistics.median(walls):.0f} s median of {walls}")
    old, new = (statistics.median(r["train_wall_s"] for r in results if r["commit"] == c) for c in ("old", "new"))
    print(f"new / old wall time: {new / old:.2f}")


if __name__ == "__main__":
    main()
