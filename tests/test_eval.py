"""eval: scoring functions against hand-worked numbers, every task on tiny models, bad inputs."""

import json
import shutil
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import FIXTURES, systematic_rows, write_jsonl
from safetensors.torch import load_file, save_file

from rdro_cli import prepare
from rdro_cli.evaluation import models as eval_models
from rdro_cli.evaluation import scoring
from rdro_cli.lm import batching, completion_head, fingerprints, generation, loading
from rdro_cli.recipe import load_recipe
from rdro_cli.store import digests, integrity, manifests

SMALL = ["--set", "eval.max_new_tokens=6", "--set", "eval.batch_size=4"]
FP32 = ["--set", "model.dtype=float32"]  # on a GPU "auto" would mean bfloat16 against float32 references


# ---------------------------------------------------------------------------------------------------------
# Helpers: a prepared run and reference log-probs made directly (independent of the logprobs stage)


def prepare_run(run: Path, source: Path, model: Path) -> Path:
    cfg = load_recipe(None, [f"output.dir={json.dumps(str(run))}", "data.test_fraction=0.25"],
                      {"data.dataset": str(source), "model.name": str(model)})
    return prepare.run(cfg)


def write_ref_logprobs(data_dir: Path, model_dir: Path, out: Path) -> Path:
    data = datasets.load_from_disk(str(data_dir))
    model = loading.load_model(model_dir, dtype="float32")
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in data.items():
        ids, starts = rows["input_ids"], rows["completion_start"]
        logps = torch.empty(len(ids))
        with torch.no_grad():
            for start in range(0, len(ids), 8):
                batch = list(range(start, min(start + 8, len(ids))))
                tensors = batching.collate([ids[i] for i in batch], [starts[i] for i in batch], 0)
                logps[batch] = completion_head.completion_logps(model, *tensors)
        save_file({"ref_logps": logps}, str(out / f"{split}.safetensors"))
    data_fp = manifests.read_manifest(data_dir)["fingerprint"]
    inputs = {"data": data_fp, "model": fingerprints.model_fingerprint(model_dir)}
    manifests.write_manifest(out, stage="logprobs", fingerprint=digests.fingerprint_json(inputs), inputs=inputs,
                             config={}, counts={}, started=time.time())
    return out


def make_adapter(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama) -> Path:
    """<run>/data from the systematic fixture and <run>/logprobs from tiny_llama as the reference."""
    run = tmp_path_factory.mktemp("eval-run")
    source = write_jsonl(run / "systematic.jsonl", systematic_rows(48))
    prepare_run(run, source, tiny_llama)
    write_ref_logprobs(run / "data", tiny_llama, run / "logprobs")
    return run


def read_results(out: Path) -> dict:
    return json.loads((out / "eval.json").read_text())


def one_line_error(code: int, stderr: str) -> bool:
    return code == 2 and len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


# ---------------------------------------------------------------------------------------------------------
# Scoring functions


def test_auc_hand_worked():
    assert scoring.auc([3, 2, 1, 0], [1, 1, 0, 0]) == 1.0
    assert scoring.auc([0, 1, 2, 3], [1, 1, 0, 0]) == 0.0
    assert scoring.auc([1, 1, 1], [1, 0, 0]) == 0.5
    # preferred 0.5, 2.0 against non-preferred 1.0, 0.5, 0.0: (0 + 0.5 + 1) + 3 = 4.5 of 6 comparisons
    assert scoring.auc([0.5, 1.0, 2.0, 0.5, 0.0], [1, 0, 1, 0, 0]) == pytest.approx(0.75)
    assert scoring.auc([1.0, 2.0], [1, 1]) is None


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg])
    assert scoring.auc(scores, labels) == pytest.approx(brute, abs=1e-12)


def test_pair_accuracy_and_metrics_hand_worked():
    logratios = [1.0, -1.0, 0.0, 0.5, 2.0, 2.0, 3.0]
    labels = [True, False, True, False, True, False, True]
    pair_ids = [0, 0, 1, 1, 2, 2, -1]  # pair 0 won, pair 1 lost, pair 2 tied; the unpaired row is ignored
    assert scoring.pair_accuracy(logratios, labels, pair_ids) == (0.5, 3)
    assert scoring.pair_accuracy([1.0, 2.0], [True, False], [-1, -1]) == (None, 0)
    metrics = scoring.preference_metrics(logratios, labels, pair_ids)
    assert metrics["mean_logratio_preferred"] == pytest.approx(1.5)
    assert metrics["mean_logratio_non_preferred"] == pytest.approx(0.5)
    reference = scoring.preference_metrics(np.zeros(7), labels, pair_ids)
    assert reference == {"mean_logratio_preferred": 0.0, "mean_logratio_non_preferred": 0.0, "auc": 0.5,
                         "pair_accuracy": 0.5, "pairs": 3}


def test_answer_extraction():
    assert scoring.extract_answer("  42 \n", "") == "42"
    assert scoring.extract_answer("The sum is -12, I think 7", r"-?\d+") == "-12"
    assert scoring.extract_answer("Answer: 9.", r"Answer:\s*(\d+)") == "9"
    assert scoring.extract_answer("no digits", r"-?\d+") is None


@pytest.mark.parametrize("output, target, correct", [
    ("True and not False is True. So the answer is True.", "True", True),
    ("So THE ANSWER IS: false", "False", True),
    ("the answer is (b).", "(B)", True),
    ("The answer is B", "(B)", True),
    ("The answer is (C) 8.\nQ: another question\nA: the answer is (A)", "(C)", True),
    ("the answer is (A) 4", "(B)", False),
    ("(A)", "(A)", True),  # no phrase: the first line
    ("I am not sure.\nthe answer is 12", "12", True),
    ("It is True", "True", False),
])
def test_bbh_scoring(output, target, correct):
    assert scoring.bbh_correct(output, target)[1] is correct


# ---------------------------------------------------------------------------------------------------------
# preference


def test_preference_of_the_reference_itself_is_zero(cli, run_dir, tiny_llama, tmp_path):
    out = tmp_path / "eval"
    code, stdout, stderr = cli("eval", "--model", tiny_llama, "--tasks", "preference", "--data", run_dir / "data",
                               "--logprobs", run_dir / "logprobs", "--out", out, *FP32)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    result = read_results(out)
    assert result["model"] == str(tiny_llama)
    pref = result["tasks"]["preference"]
    test_rows = len(datasets.load_from_disk(str(run_dir / "data"))["test"])
    assert pref["rows"] == test_rows and pref["preferred"] + pref["non_preferred"] == test_rows
    assert abs(pref["mean_logratio_preferred"]) < 1e-4 and abs(pref["mean_logratio_non_preferred"]) < 1e-4
    assert pref["pair_accuracy"] is None and pref["pairs"] == 0  # unpaired data
    assert pref["reference"]["auc"] == 0.5 and pref["reference"]["mean_logratio_preferred"] == 0.0
    saved = load_file(str(out / "logratios.safetensors"))
    assert saved["logratios"].dtype == torch.float32 and saved["labels"].dtype == torch.uint8
    assert saved["logratios"].shape == (test_rows,) and saved["logratios"].abs().max().item() < 1e-4
    assert int(saved["labels"].sum()) == pref["preferred"]
    assert "auc" in stderr  # the rich table
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval" and {"model", "data", "logprobs"} <= set(manifest["inputs"])

    code, stdout, stderr = cli("eval", "--model", tiny_llama, "--tasks", "preference", "--data", run_dir / "data",
                               "--logprobs", run_dir / "logprobs", "--out", out, *FP32)
    assert code == 0 and "up to date" in stderr and stdout == f"{out}\n"  # stdout: only the path


def test_preference_on_paired_data_and_limit(cli, tmp_path, tiny_llama):
    run = tmp_path / "paired"
    prepare_run(run, FIXTURES / "paired_sample.jsonl", tiny_llama)
    write_ref_logprobs(run / "data", tiny_llama, run / "logprobs")
    code, _, stderr = cli("eval", "--set", f"output.dir={run}", "--model", tiny_llama, "--tasks", "preference")
    assert code == 0, stderr
    pref = read_results(run / "eval")["tasks"]["preference"]
    assert pref["pairs"] > 0 and pref["reference"]["pair_accuracy"] == 0.5
    assert pref["pair_accuracy"] is not None and 0.0 <= pref["pair_accuracy"] <= 1.0

    code, _, stderr = cli("eval", "--set", f"output.dir={run}", "--model", tiny_llama, "--tasks", "preference",
                          "--limit", "2")
    assert code == 0, stderr
    assert read_results(run / "eval")["tasks"]["preference"]["rows"] == 2


def test_default_model_is_the_adapter_in_train_final(cli, tmp_path, run_dir, tiny_llama):
    run = tmp_path / "run"
    shutil.copytree(run_dir / "data", run / "data")
    shutil.copytree(run_dir / "logprobs", run / "logprobs")
    adapter = make_adapter(tiny_llama, run / "train" / "final")
    code, _, stderr = cli("eval", "--set", f"output.dir={run}", "--tasks", "preference")
    assert code == 0, stderr
    result = read_results(run / "eval")
    assert result["model"] == str(adapter)
    pref = result["tasks"]["preference"]
    assert abs(pref["mean_logratio_preferred"]) > 1e-3  # a different policy than the reference
    assert 0.0 <= pref["auc"] <= 1.0


def test_refuses_logprobs_of_other_data(cli, tmp_path, run_dir, tiny_llama):
    logprobs = tmp_path / "logprobs"
    shutil.copytree(run_dir / "logprobs", logprobs)
    manifest = json.loads((logprobs / "manifest.json").read_text())
    manifest["inputs"]["data"] = "0" * 64
    (logprobs / "manifest.json").write_text(json.dumps(manifest))
    integrity.reseal(logprobs)  # a valid manifest for other data, not a damaged one
    code, _, stderr = cli("eval", "--model", tiny_llama, "--tasks", "preference", "--data", run_dir / "data",
                          "--logprobs", logprobs, "--out", tmp_path / "eval")
    assert one_line_error(code, stderr) and "rdro logprobs" in stderr


def test_refuses_a_model_with_another_tokenizer(cli, tmp_path, run_dir):
    import tiny_model
    from conftest import build_model

    other = tiny_model.build_tokenizer(tmp_path / "other", tiny_model.corpus([]), vocab_size=300)
    model = build_model(tmp_path / "other", other, "llama")
    code, _, stderr = cli("eval", "--model", model, "--tasks", "preference", "--data", run_dir / "data",
                          "--logprobs", run_dir / "logprobs", "--out", tmp_path / "eval")
    assert one_line_error(code, stderr) and "different tokenizer" in stderr


# ---------------------------------------------------------------------------------------------------------
# generate / exact_match / bbh


def test_generate_writes_alpacaeval_outputs(cli, tmp_path, run_dir, tiny_llama):
    out = tmp_path / "eval"
    code, _, stderr = cli("eval", "--model", tiny_llama, "--tasks", "generate", "--data", run_dir / "data",
                          "--out", out, *SMALL)
    assert code == 0, stderr
    records = json.loads((out / "generations.json").read_text())
    test = datasets.load_from_disk(str(run_dir / "data"))["test"]
    assert len(records) == len(set(test["prompt_text"]))
    assert [r["instruction"] for r in records] == list(dict.fromkeys(test["prompt"]))
    for record in records:
        assert set(record) == {"instruction", "output", "generator", "dataset"}
        assert isinstance(record["output"], str)
        assert record["generator"] == tiny_llama.name and record["dataset"] == "systematic"
    assert read_results(out)["tasks"]["generate"]["prompts"] == len(records)

    code, _, stderr = cli("eval", "--model", tiny_llama, "--tasks", "generate", "--out", out, "--limit", "2",
                          "--set", f"eval.generate_prompts={FIXTURES / 'alpaca_prompts.json'}", *SMALL)
    assert code == 0, stderr
    records = json.loads((out / "generations.json").read_text())
    assert [r["instruction"] for r in records] == ["Give me a synonym for happy.", "What is the capital of France?"]
    assert {r["dataset"] for r in records} == {"fixture"}


def test_generation_is_greedy_and_batch_independent(tiny_llama):
    cfg = load_recipe(None, ["eval.max_new_tokens=5", "eval.batch_size=1", "model.dtype=float32"])
    model, tokenizer = eval_models.load_eval_model(str(tiny_llama), cfg)
    prompts = [generation.chat_prompt(tokenizer, p) for p in ["What is a cat?", "yes", "why is the sea good?"]]
    one_by_one = generation.generate(model, tokenizer, prompts, cfg, "test")
    cfg.eval.batch_size = 3  # left padding must not change greedy outputs
    assert generation.generate(model, tokenizer, prompts, cfg, "test") == one_by_one
    assert all(isinstance(o, str) for o in one_by_one)


def fake_generate(answers: dict[str, str]):
    """Stands in for eval.generate: answers by the question the prompt ends with."""
    def generate(model, tokenizer, prompts, cfg, description, *, greedy=False):
        assert greedy
        return [next(a for q, a in answers.items() if q in p.rsplit("Q:", 1)[-1]) for p in prompts]
    return generate


def test_exact_match_counts_and_accuracy(cli, tmp_path, tiny_llama, monkeypatch):
    out = tmp_path / "eval"
    args = ("eval", "--model", tiny_llama, "--tasks", "exact_match", "--out", out, "--force",
            "--set", f"eval.exact_match_file={FIXTURES / 'exact_match.jsonl'}", *SMALL)
    code, _, stderr = cli(*args)  # the real tiny model: structure and consistency
    assert code == 0, stderr
    records = [json.loads(line) for line in (out / "exact_match.jsonl").read_text().splitlines()]
    assert len(records) == 5 and {"prompt", "answer", "output", "extracted", "correct"} <= set(records[0])
    result = read_results(out)["tasks"]["exact_match"]
    assert result["accuracy"] == sum(r["correct"] for r in records) / 5 and records[1]["answer"] == "8"

    monkeypatch.setattr(generation, "generate", fake_generate({
        "2 + 3": "5", "7 + 1": "It is 8.", "4 + 4": "8", "9 + 0": "the answer: 9", "6 + 5": "12"}))
    code, _, stderr = cli(*args, "--set", "eval.answer_pattern=-?\\d+")
    assert code == 0, stderr
    result = read_results(out)["tasks"]["exact_match"]
    assert (result["correct"], result["examples"], result["accuracy"]) == (4, 5, 0.8)
    code, _, stderr = cli(*args, "--limit", "3")  # no pattern: the whole stripped output must equal the answer
    assert code == 0, stderr
    result = read_results(out)["tasks"]["exact_match"]
    assert (result["correct"], result["examples"]) == (2, 3)


def test_bbh_per_task_and_mean_accuracy(cli, tmp_path, tiny_llama, monkeypatch):
    out = tmp_path / "eval"
    args = ("eval", "--model", tiny_llama, "--tasks", "bbh", "--out", out, "--force",
            "--set", f"eval.bbh_dir={FIXTURES / 'bbh'}",
            "--set", f"eval.bbh_fewshot_dir={FIXTURES / 'bbh' / 'cot-prompts'}", *SMALL)
    code, _, stderr = cli(*args, "--limit", "2")
    assert code == 0, stderr
    result = read_results(out)["tasks"]["bbh"]
    assert {t: r["examples"] for t, r in result["tasks"].items()} == {"boolean_expressions": 2, "sum_choice": 2}
    records = [json.loads(line) for line in (out / "bbh.jsonl").read_text().splitlines()]
    assert len(records) == 4 and {"task", "input", "target", "output", "extracted", "correct"} <= set(records[0])

    seen = []
    answers = {"True and not False": "So the answer is True.", "not ( False or False )": "the answer is True",
               "False or ( True and True )": "The answer is true.", "not not not True": "So the answer is False",
               "2 + 3": "2 + 3 = 5. So the answer is (B).", "1 + 1": "the answer is (C)", "4 + 4": "(C)"}
    fake = fake_generate(answers)

    def recording(model, tokenizer, prompts, cfg, description, *, greedy=False):
        seen.extend(prompts)
        return fake(model, tokenizer, prompts, cfg, description, greedy=greedy)

    monkeypatch.setattr(generation, "generate", recording)
    code, _, stderr = cli(*args)
    assert code == 0, stderr
    result = read_results(out)["tasks"]["bbh"]
    assert result["tasks"]["boolean_expressions"]["accuracy"] == 0.75
    assert result["tasks"]["sum_choice"]["accuracy"] == pytest.approx(2 / 3)
    assert result["mean_accuracy"] == pytest.approx((0.75 + 2 / 3) / 2)
    # few-shot text after the canary separator is prepended; the canary itself is not
    assert "Evaluate the result of a Boolean expression." in seen[0] and "HAND-WRITTEN" not in seen[0]
    assert seen[0].rstrip().endswith("Let's think step by step.<|im_end|>\n<|im_start|>assistant")


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: one line, exit 2


def test_bbh_file_of_the_wrong_shape(cli, tmp_path, tiny_llama):
    bbh = tmp_path / "bbh"
    bbh.mkdir()
    (bbh / "good.json").write_text(json.dumps({"examples": [{"input": "x", "target": "y"}]}))
    (bbh / "broken.json").write_text(json.dumps({"data": [{"question": "x"}]}))
    code, _, stderr = cli("eval", "--model", tiny_llama, "--tasks", "bbh", "--out", tmp_path / "eval",
                          "--set", f"eval.bbh_dir={bbh}")
    assert one_line_error(code, stderr) and "broken.json" in stderr and "examples" in stderr
    (bbh / "broken.json").write_text(json.dumps({"examples": [{"input": "x"}]}))
    code, _, stderr = cli("eval", "--model", tiny_llama, "--tasks", "bbh", "--out", tmp_path / "eval",
                          "--set", f"eval.bbh_dir={bbh}")
    assert one_line_error(code, stderr) and "broken.json" in stderr and "examples[0]" in stderr


@pytest.mark.parametrize("sets, words", [
    (["eval.bbh_dir=/nonexistent/bbh"], "BBH directory not found"),
    ([f"eval.bbh_dir={FIXTURES / 'bbh'}", "eval.bbh_fewshot_dir={partial}"], "sum_choice.txt"),
    ([], "eval.bbh_dir"),
])
def test_missing_bbh_inputs(cli, tmp_path, tiny_llama, sets, words):
    partial = tmp_path / "prompts"  # few-shot prompts for one of the two tasks only
    partial.mkdir()
    shutil.copy(FIXTURES / "bbh" / "cot-prompts" / "boolean_expressions.txt", partial)
    args = [a for s in sets for a in ("--set", s.format(partial=partial))]
    code, _, stderr = cli("eval", "--model", tiny_llama, "--tasks", "bbh", "--out", tmp_path / "eval", *args)
    assert one_line_error(code, stderr) and words in stderr


def test_missing_exact_match_file(cli, tmp_path, tiny_llama):
    code, _, stderr = cli("eval", "--model", tiny_llama, "--tasks", "exact_match", "--out", tmp_path / "eval",
                          "--set", f"eval.exact_match_file={tmp_path / 'nope.jsonl'}")
    assert one_line_error(code, stderr) and "nope.jsonl" in stderr


def test_model_dir_without_tokenizer(cli, tmp_path, tiny_llama, run_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, bare / name)
    code, _, stderr = cli("eval", "--model", bare, "--tasks", "preference", "--data", run_dir / "data",
                          "--logprobs", run_dir / "logprobs", "--out", tmp_path / "eval")
    assert one_line_error(code, stderr) and "no tokenizer" in stderr
    assert not (tmp_path / "eval").exists()


def test_no_model_to_evaluate(cli, tmp_path):
    code, _, stderr = cli("eval", "--set", f"output.dir={tmp_path / 'empty'}", "--tasks", "preference")
    assert one_line_error(code, stderr) and "--model" in stderr


# ---------------------------------------------------------------------------------------------------------
# End to end: prepare -> logprobs -> train -> eval (-> merge -> eval)


def test_trained_adapter_separates_the_systematic_fixture(cli, tmp_path, tiny_llama):
    pytest.importorskip("rdro_cli.train")
    pytest.importorskip("rdro_cli.logprobs")
    run = tmp_path / "run"
    source = write_jsonl(tmp_path / "systematic.jsonl", systematic_rows(96))
    base = ["--set", f"output.dir={run}", *FP32]
    steps = [
        ("prepare", "--dataset", source, "--model", tiny_llama, "--test-fraction", "0.25"),
        ("logprobs", "--model", tiny_llama),
        ("train", "--model", tiny_llama, "--set", "lora.enabled=true", "--set", "train.learning_rate=1e-3",
         "--set", "train.batch_size=8", "--set", "train.epochs=3", "--set", "train.warmup_ratio=0.0"),
        ("eval", "--tasks", "preference"),
    ]
    for command, *args in steps:
        code, _, stderr = cli(command, *base, *args)
        assert code == 0, f"{command}: {stderr}"
    result = read_results(run / "eval")
    assert result["model"] == str(run / "train" / "final")
    pref = result["tasks"]["preference"]
    assert pref["auc"] > 0.5 and pref["reference"]["auc"] == 0.5
    assert pref["mean_logratio_preferred"] > pref["mean_logratio_non_preferred"]

    code, _, stderr = cli("merge", *base)
    assert code == 0, stderr
    code, _, stderr = cli("eval", *base, "--tasks", "preference", "--out", run / "eval-merged")
    assert code == 0, stderr
    assert read_results(run / "eval-merged")["model"] == str(run / "merged")  # merged is preferred once complete
    adapter = load_file(str(run / "eval" / "logratios.safetensors"))["logratios"]
    merged = load_file(str(run / "eval-merged" / "logratios.safetensors"))["logratios"]
    assert (adapter - merged).abs().max().item() < 1e-4
