"""report: every plot rendered from real tiny-model runs (rdro and ddro on the same data, with a
before-training eval), overlays, hand-written artifacts for the other losses, and the one-line errors."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, systematic_rows, write_jsonl
from safetensors.numpy import save_file

from rdro_cli import report
from rdro_cli.errors import UserError
from rdro_cli.evaluation import scoring
from rdro_cli.reporting import numbers, plots
from rdro_cli.reporting import runs as run_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CURVES = ["loss", "learning_rate", "grad_norm", "logratio", "logratio_max", "tokens_per_s"]
EVAL_PLOTS = ["logratio_hist", "eval_accuracy"]


def _invoke(*args):
    from typer.testing import CliRunner

    from rdro_cli.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _ok(*args) -> str:
    code, stdout, stderr = _invoke(*args)
    assert code == 0, f"rdro {args[0]} failed: {stderr}"
    return stdout


def assert_pngs(out: Path, stems: list[str]) -> str:
    """Each plot is a real PNG of non-trivial size, and report.md embeds it with a relative link."""
    markdown = (out / "report.md").read_text(encoding="utf-8")
    for stem in stems:
        path = out / f"{stem}.png"
        assert path.is_file(), f"{stem}.png missing"
        head = path.read_bytes()[:8]
        assert head == PNG_MAGIC, f"{stem}.png is not a PNG"
        assert path.stat().st_size > 5 * 1024, f"{stem}.png is only {path.stat().st_size} bytes"
        assert f"]({stem}.png)" in markdown, f"report.md does not embed {stem}.png"
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(stems)
    return markdown


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    """Two real runs on the same prepared data: rdro in A (with an eval of the untrained model in
    A/eval-base) and ddro in B; prepare -> logprobs -> train (6 steps) -> eval through the CLI."""
    root = tmp_path_factory.mktemp("report")
    source = write_jsonl(root / "systematic.jsonl", systematic_rows(48))
    recipe = root / "tiny.toml"
    recipe.write_text(f"""
[model]
name = {json.dumps(str(tiny_llama))}
dtype = "float32"
[data]
dataset = {json.dumps(str(source))}
max_length = 64
max_prompt_length = 32
test_fraction = 0.25
[logprobs]
max_tokens_per_batch = 2048
chunk_size = 64
[train]
learning_rate = 1e-3
batch_size = 4
max_steps = 6
seed = 0
[eval]
tasks = ["preference", "exact_match", "bbh"]
exact_match_file = {json.dumps(str(FIXTURES / "exact_match.jsonl"))}
answer_pattern = "-?\\\\d+"
bbh_dir = {json.dumps(str(FIXTURES / "bbh"))}
max_new_tokens = 6
batch_size = 4
[output]
dir = {json.dumps(str(root / "rdro-run"))}
""", encoding="utf-8")
    a, b = root / "rdro-run", root / "ddro-run"
    _ok("prepare", "--recipe", recipe)
    _ok("logprobs", "--recipe", recipe)
    _ok("train", "--recipe", recipe, "--loss", "rdro")
    _ok("eval", "--recipe", recipe)
    _ok("eval", "--recipe", recipe, "--model", tiny_llama, "--out", a / "eval-base")
    shared = ["--data", a / "data", "--logprobs", a / "logprobs"]
    _ok("train", "--recipe", recipe, "--loss", "ddro", "--set", f"output.dir={json.dumps(str(b))}", *shared)
    _ok("eval", "--recipe", recipe, "--set", f"output.dir={json.dumps(str(b))}", *shared)
    return recipe, a, b


def test_every_plot_from_a_real_run_is_a_png(runs):
    recipe, a, _ = runs
    stdout = _ok("report", "--recipe", recipe)
    assert stdout.strip().endswith(str(a / "report" / "report.md"))
    markdown = assert_pngs(a / "report", CURVES + ["frac_at_bound"] + EVAL_PLOTS)
    assert "rdro-run (rdro)" in markdown
    assert "auto (= 0.6" in markdown  # alpha "auto" resolved to the preferred fraction (~2/3)
    for metric in ("| preference | auc |", "| exact_match | accuracy |", "bbh", "mean_accuracy"):
        assert metric in markdown
    assert "| rdro-run (rdro) | before |" in markdown  # eval-base is the before column
    rows = [json.loads(line) for line in (a / "train" / "metrics.jsonl").read_text().splitlines()]
    assert numbers.fmt(rows[-1]["loss"]) in markdown  # final metrics come from the last logged step


def test_two_runs_overlay_with_a_legend(runs, tmp_path, monkeypatch):
    _, a, b = runs
    legends = {}
    save = plots._save

    def keep_legend(figure, canvas_cls, path):
        legends[path.stem] = [t.get_text() for ax in figure.axes if ax.get_legend()
                              for t in ax.get_legend().get_texts()]
        save(figure, canvas_cls, path)

    monkeypatch.setattr(plots, "_save", keep_legend)
    out = tmp_path / "compare"
    assert _invoke("report", "--run", a, "--run", b, "--out", out)[0] == 0
    markdown = assert_pngs(out, CURVES + ["frac_at_bound"] + EVAL_PLOTS)
    for stem in ("loss", "learning_rate", "grad_norm", "logratio_max", "tokens_per_s"):
        assert {"rdro-run (rdro)", "ddro-run (ddro)"} <= set(legends[stem]), stem
    assert "rdro-run (rdro): preferred" in legends["logratio"] and "ddro-run (ddro): non-preferred" in legends["logratio"]
    assert any("log(1/α)" in text for text in legends["logratio_max"])  # rdro's bound, not ddro's
    assert legends["frac_at_bound"] == ["rdro-run (rdro)"]
    assert {"rdro-run (rdro)", "ddro-run (ddro)", "rdro-run (rdro) before"} <= set(legends["eval_accuracy"])
    assert "`rdro-run (rdro)`, `ddro-run (ddro)`" in markdown and "| ddro | – |" in markdown


# ---------------------------------------------------------------------------------------------------------
# Hand-written artifacts: the other losses' fields, resumed/partial logs, a shared --baseline


def write_run(run: Path, loss: str, steps: int, *, extra: dict | None = None, manifest: bool = True,
              tail: str = "") -> Path:
    rng = np.random.default_rng(len(loss))
    train = run / "train"
    train.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        row = {"step": step, "epoch": step / steps, "loss": 0.7 - 0.3 * step / steps + 0.05 * rng.standard_normal(),
               "lr": 1e-4 * min(1.0, step / 5), "grad_norm": abs(rng.standard_normal()) + 0.5,
               "tokens_per_s": 1000 + 50 * rng.standard_normal(), "logratio_preferred": 0.02 * step,
               "logratio_non_preferred": -0.03 * step, "logratio_max": 0.05 * step,
               **{k: f(step) for k, f in (extra or {}).items()}}
        lines.append(json.dumps(row))
    (train / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail, encoding="utf-8")
    config = {"loss": {"name": loss, "alpha": "auto", "weighting": "batch", "beta": 0.1},
              "train": {"learning_rate": 1e-4, "batch_size": 8, "gradient_accumulation_steps": 2, "max_steps": steps},
              "model": {"name": "tiny"}, "data": {"dataset": "demo"}, "lora": {"enabled": False}}
    if manifest:
        (train / "manifest.json").write_text(json.dumps({"stage": "train", "config": config}), encoding="utf-8")
    return run


def write_eval(directory: Path, bbh: dict[str, float], logratios: np.ndarray | None = None) -> Path:
    directory.mkdir(parents=True)
    tasks = {"bbh": {"tasks": {k: {"examples": 10, "correct": round(10 * v), "accuracy": v} for k, v in bbh.items()},
                     "mean_accuracy": float(np.mean(list(bbh.values())))},
             "exact_match": {"examples": 5, "correct": 2, "accuracy": 0.4}}
    if logratios is not None:
        labels = np.arange(len(logratios)) % 3 != 0
        save_file({"logratios": logratios.astype(np.float32), "labels": labels.astype(np.uint8)},
                  str(directory / "logratios.safetensors"))
        tasks["preference"] = {"auc": 0.81, "mean_logratio_preferred": 0.3, "pair_accuracy": None,
                               "reference": {"auc": 0.5}}
    (directory / "eval.json").write_text(json.dumps({"model": "m", "tasks": tasks}), encoding="utf-8")
    return directory


def test_kto_and_bco_runs_with_a_shared_baseline(tmp_path, cli):
    kto = write_run(tmp_path / "kto", "kto", 300, extra={"kl_ref_point": lambda s: 0.001 * s},
                    tail='{"step": 301, "lo')  # training still writing its next line
    bco = write_run(tmp_path / "bco", "bco", 200, extra={"delta": lambda s: -0.01 * s}, manifest=False)
    write_eval(kto / "eval", {"boolean_expressions": 0.6, "sum_choice": 0.3},
               np.random.default_rng(0).standard_normal(90))
    write_eval(bco / "eval", {"boolean_expressions": 0.5, "sum_choice": 0.4})
    base = write_eval(tmp_path / "base-eval", {"boolean_expressions": 0.2, "sum_choice": 0.1})
    code, stdout, stderr = cli("report", "--run", kto, "--run", bco, "--baseline", base)
    assert code == 0, stderr
    out = kto / "report"
    markdown = assert_pngs(out, ["loss", "learning_rate", "grad_norm", "logratio", "logratio_max", "kl_ref_point",
                                 "delta", "tokens_per_s"] + EVAL_PLOTS)
    assert "(training in progress)" in markdown  # bco has no train manifest yet
    assert "| bbh | tasks.sum_choice.accuracy | 0.3 | 0.1 | 0.4 |" in markdown
    assert "`" + str(base) + "` (given as `--baseline`)" in markdown


def test_resumed_steps_keep_the_newest_row_and_stale_plots_go(tmp_path):
    run = write_run(tmp_path / "r", "rdro", 4, extra={"bound": lambda s: 0.5, "frac_at_bound": lambda s: 0.0})
    path = run / "train" / "metrics.jsonl"
    path.write_text(path.read_text() + json.dumps({"step": 3, "loss": 9.0}) + "\n")
    assert [r["step"] for r in run_data.read_metrics(path)] == [1, 2, 3, 4]
    assert run_data.read_metrics(path)[2]["loss"] == 9.0
    (run / "report").mkdir()  # an earlier report (of rdro 0.1, without the stage mark)
    (run / "report" / "delta.png").write_bytes(b"old")
    (run / "report" / "report.md").write_text("old")
    report.run(None, runs=[run])
    assert not (run / "report" / "delta.png").exists()
    assert "auto (= 0.6065)" in (run / "report" / "report.md").read_text()  # exp(-0.5) from the bound
    assert not (run / "report" / "logratio_hist.png").exists()


def test_ema_is_debiased_and_accuracies_follow_eval_json():
    labels = np.array([True, True, False, False])
    assert scoring.auc(np.array([1.0, 2.0, 0.0, 2.0]), labels) == 0.625  # ties count half
    assert numbers.ema([2.0] * 5, 0.9) == pytest.approx([2.0] * 5)
    smoothed = numbers.ema([0.0, 10.0], 0.5)
    assert smoothed == pytest.approx([0.0, 10 * 0.5 / 0.75])
    tasks = {"preference": {"auc": 0.7, "pair_accuracy": 0.6, "pairs": 3, "reference": {"auc": 0.5},
                            "mean_logratio_preferred": 0.2},
             "exact_match": {"examples": 5, "correct": 1, "accuracy": 0.2},
             "bbh": {"tasks": {"sum_choice": {"examples": 1, "correct": 1, "accuracy": 1.0}}, "mean_accuracy": 1.0},
             "generate": {"prompts": 1, "mean_output_words": 0.5}}
    assert numbers.accuracy_metrics(tasks) == {"preference: auc": 0.7, "preference: pair_accuracy": 0.6,
                                              "exact_match": 0.2, "bbh: sum_choice": 1.0,
                                              "bbh: mean_accuracy": 1.0}


# ---------------------------------------------------------------------------------------------------------
# One-line errors


def one_line(code: int, stderr: str) -> str:
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr, stderr
    return stderr


def test_missing_matplotlib_is_one_line(cli, tmp_path, monkeypatch):
    run = write_run(tmp_path / "r", "rdro", 3)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    stderr = one_line(*cli("report", "--run", run)[::2])
    assert "rdro report needs matplotlib: pip install 'rdro-cli[report]'" in stderr
    assert not (run / "report").exists()


def test_missing_run_metrics_and_baseline_are_one_line(cli, tmp_path):
    assert "does not exist" in one_line(*cli("report", "--run", tmp_path / "nope")[::2])
    (tmp_path / "empty").mkdir()
    assert "no train/metrics.jsonl; run `rdro train` first" in one_line(*cli("report", "--run", tmp_path / "empty")[::2])
    run = write_run(tmp_path / "r", "rdro", 3)
    assert "no eval.json" in one_line(*cli("report", "--run", run, "--baseline", tmp_path / "empty")[::2])
    (run / "train" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    assert "metrics.jsonl:2: not a JSON line" in one_line(*cli("report", "--run", run)[::2])


def test_help_explains_every_flag(cli):
    code, stdout, _ = cli("report", "--help")
    assert code == 0
    for flag in ("--recipe", "--run", "--baseline", "--out"):
        assert flag in stdout
    assert "eval-base" in stdout


def test_report_never_writes_into_a_directory_of_someone_elses_files(tmp_path):
    run = write_run(tmp_path / "r", "rdro", 4)
    mine = tmp_path / "pictures"
    mine.mkdir()
    (mine / "loss.png").write_bytes(b"my own picture")
    with pytest.raises(UserError, match="holds files rdro did not write"):
        report.run(None, runs=[run], out=mine)
    assert (mine / "loss.png").read_bytes() == b"my own picture" and len(list(mine.iterdir())) == 1


@pytest.mark.parametrize("damaged", ["train/metrics.jsonl", "eval/eval.json", "eval/logratios.safetensors"])
def test_a_finished_runs_damaged_file_is_refused_not_plotted(runs, tmp_path, damaged):
    """A file the report reads from a finished stage must be the bytes that stage sealed in its manifest:
    one flipped byte (same size, so only the digest can tell) is one line naming the file, and no report."""
    import shutil

    _, a, _ = runs
    run = tmp_path / "copy"
    shutil.copytree(a, run, ignore=shutil.ignore_patterns("report"))
    path = run / damaged
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] = ord("7") if data[middle] != ord("7") else ord("8")  # a digit in a JSON number, or any byte
    path.write_bytes(bytes(data))
    code, _, stderr = _invoke("report", "--run", run, "--out", tmp_path / "out")
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert str(path) in stderr and "damaged" in stderr and "rdro verify" in stderr
    assert not (tmp_path / "out" / "report.md").exists()


def test_an_unfinished_run_is_reported_as_it_is(runs, tmp_path):
    """Training still running (no train manifest yet): its metrics are read unchecked, as they grow."""
    import shutil

    _, a, _ = runs
    run = tmp_path / "live"
    shutil.copytree(a, run, ignore=shutil.ignore_patterns("report", "eval", "eval-base"))
    (run / "train" / "manifest.json").unlink()
    with open(run / "train" / "metrics.jsonl", "a", encoding="utf-8") as handle:  # a step logged after the seal
        last = json.loads((a / "train" / "metrics.jsonl").read_text().splitlines()[-1])
        handle.write(json.dumps({**last, "step": last["step"] + 1}) + "\n")
    _ok("report", "--run", run, "--out", tmp_path / "out")
    assert (tmp_path / "out" / "report.md").is_file()
