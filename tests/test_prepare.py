"""prepare: counts, the exact prompt/completion token boundary, truncation, shapes and bad input."""

import json
from pathlib import Path

import datasets
import pytest
from conftest import FIXTURES, write_jsonl
from transformers import AutoTokenizer

from rdro_cli import prepare
from rdro_cli.recipe import load_recipe


def _run(cli, tmp_path, dataset, model, *extra):
    out = tmp_path / "data"
    code, stdout, stderr = cli("prepare", "--dataset", dataset, "--model", model, "--out", out, *extra)
    return code, out, stdout, stderr


def _input_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prepare_writes_artifact_and_manifest_matching_input(cli, tmp_path, tiny_llama):
    source = FIXTURES / "mix14k_sample.jsonl"
    code, out, stdout, _ = _run(cli, tmp_path, source, tiny_llama, "--test-fraction", "0.25")
    assert code == 0 and stdout.strip() == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    rows = _input_rows(source)
    counts = manifest["counts"]
    assert counts["train"]["rows"] + counts["test"]["rows"] == len(rows)
    # grouped by prompt: at least the asked-for fraction, whole prompt groups (this fixture repeats prompts)
    assert round(len(rows) * 0.25) <= counts["test"]["rows"] < round(len(rows) * 0.25) + 3
    assert counts["train"]["preferred"] + counts["test"]["preferred"] == sum(r["label"] for r in rows)
    assert manifest["preferred_fraction"] == pytest.approx(counts["train"]["preferred"] / counts["train"]["rows"])
    assert set(manifest["inputs"]) == {"dataset", "tokenizer", "chat_template"}
    assert manifest["stage"] == "prepare" and manifest["schema_version"] == 1
    for key in ("length_p50", "length_p90", "length_p99", "boundary_mismatch", "dropped_empty_completion"):
        assert key in counts["train"]
    data = datasets.load_from_disk(str(out))
    assert set(data) == {"train", "test"}
    assert {"input_ids", "completion_start", "label", "pair_id", "kl_partner", "prompt_text",
            "completion_text", "prompt"} <= set(data["train"].column_names)
    assert all(p == -1 for p in data["train"]["pair_id"])
    assert not list(tmp_path.glob("data.tmp-*"))


def test_token_boundary_is_where_the_template_puts_it(cli, tmp_path, tiny_llama):
    code, out, _, _ = _run(cli, tmp_path, FIXTURES / "mix14k_sample.jsonl", tiny_llama)
    assert code == 0
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    rows = {json.dumps(r["prompt"]) + r["completion"][0]["content"]: r for r in
            _input_rows(FIXTURES / "mix14k_sample.jsonl")}
    data = datasets.load_from_disk(str(out))
    for split in data.values():
        for row in split:
            start = row["completion_start"]
            ids = row["input_ids"]
            # prompt ids are exactly the templated prompt with the generation prompt
            assert ids[:start] == tokenizer(row["prompt_text"], add_special_tokens=False)["input_ids"]
            assert row["prompt_text"].endswith("<|im_start|>assistant\n")
            completion = tokenizer.decode(ids[start:])
            assert completion == row["completion_text"]
            assert completion.endswith("<|im_end|>\n")
            source = [r for r in rows.values() if r["prompt"][-1]["content"] == row["prompt"]
                      and completion.startswith(r["completion"][0]["content"])]
            assert source, completion
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["train"]["boundary_mismatch"] == 0


def test_boundary_mismatch_is_counted_and_kept_exact(cli, tmp_path, tiny_tokenizer_dir):
    # A template whose generation prompt differs from the rendered assistant turn: the templated
    # prompt is not a prefix of the full text, so every row is counted and the boundary still exact.
    template = (tmp_path / "odd.jinja")
    template.write_text("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    code, out, _, _ = _run(cli, tmp_path, FIXTURES / "mix14k_sample.jsonl", tiny_tokenizer_dir,
                           "--chat-template", template)
    assert code == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    total = counts["train"]["rows"] + counts["test"]["rows"]
    assert counts["train"]["boundary_mismatch"] + counts["test"]["boundary_mismatch"] == total
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    row = datasets.load_from_disk(str(out))["train"][0]
    assert row["input_ids"][: row["completion_start"]] == tokenizer(row["prompt_text"],
                                                                     add_special_tokens=False)["input_ids"]


def test_source_test_split_is_used(cli, tmp_path, tiny_llama):
    code, out, _, _ = _run(cli, tmp_path, FIXTURES / "ufg_sample.json", tiny_llama)
    assert code == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert (counts["train"]["rows"], counts["test"]["rows"]) == (12, 6)


def test_paired_rows_are_unpaired_with_pair_ids(cli, tmp_path, tiny_llama):
    code, out, _, _ = _run(cli, tmp_path, FIXTURES / "paired_sample.jsonl", tiny_llama, "--test-fraction", "0.3")
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["paired"] is True
    n_pairs = len(_input_rows(FIXTURES / "paired_sample.jsonl"))
    assert manifest["counts"]["train"]["pairs"] + manifest["counts"]["test"]["pairs"] == n_pairs
    for split in datasets.load_from_disk(str(out)).values():
        by_pair = {}
        for row in split:
            by_pair.setdefault(row["pair_id"], []).append(row)
        for rows in by_pair.values():
            assert sorted(r["label"] for r in rows) == [False, True]
            assert rows[0]["prompt_text"] == rows[1]["prompt_text"]


@pytest.mark.parametrize("name", ["plain_sample.jsonl", "plain_sample.csv"])
def test_plain_text_sources_get_the_chat_template(cli, tmp_path, tiny_llama, name):
    code, out, _, _ = _run(cli, tmp_path, FIXTURES / name, tiny_llama)
    assert code == 0
    row = datasets.load_from_disk(str(out))["train"][0]
    assert row["prompt_text"].startswith("<|im_start|>user\n")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["train"]["rows"] + counts["test"]["rows"] == 18


def test_plain_text_without_template_is_concatenated(cli, tmp_path, no_template_tokenizer):
    code, out, _, _ = _run(cli, tmp_path, FIXTURES / "plain_sample.jsonl", no_template_tokenizer)
    assert code == 0
    row = datasets.load_from_disk(str(out))["train"][0]
    assert row["completion_text"].endswith("<|im_end|>") and not row["prompt_text"].startswith("<|im_start|>")


def test_save_to_disk_dir_and_parquet(cli, tmp_path, tiny_llama):
    rows = _input_rows(FIXTURES / "plain_sample.jsonl")
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    for source in (tmp_path / "rows.parquet", tmp_path / "saved"):
        out = tmp_path / f"out-{source.name}"
        code, _, _ = cli("prepare", "--dataset", source, "--model", tiny_llama, "--out", out)
        assert code == 0
        counts = json.loads((out / "manifest.json").read_text())["counts"]
        assert counts["train"]["rows"] + counts["test"]["rows"] == len(rows)


def test_truncation_keeps_prompt_end_and_completion_start(cli, tmp_path, tiny_llama):
    rows = [{"prompt": f"question {i} " + "alpha " * 40 + "the end", "completion": "yes " * 60,
             "label": i % 2 == 0} for i in range(8)]
    source = write_jsonl(tmp_path / "long.jsonl", rows)
    code, out, _, _ = _run(cli, tmp_path, source, tiny_llama, "--max-length", "48", "--max-prompt-length", "20")
    assert code == 0
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["train"]["truncated_prompt"] == counts["train"]["rows"]
    assert counts["train"]["truncated_completion"] == counts["train"]["rows"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    for row in datasets.load_from_disk(str(out))["train"]:
        ids, start = row["input_ids"], row["completion_start"]
        assert len(ids) == 48 and start == 20
        assert tokenizer.decode(ids[:start]).endswith("the end<|im_end|>\n<|im_start|>assistant\n")
        assert tokenizer.decode(ids[start:]).startswith("yes yes")


def test_minimal_room_keeps_one_completion_token(tmp_path, tiny_llama):
    # max_prompt_length < max_length always leaves room for at least one completion token.
    rows = [{"prompt": f"hi there {i}", "completion": "yes indeed", "label": i % 2 == 0} for i in range(8)]
    source = write_jsonl(tmp_path / "short.jsonl", rows)
    cfg = load_recipe(None, [], {"data.dataset": str(source), "model.name": str(tiny_llama),
                                 "data.max_length": 4, "data.max_prompt_length": 3})
    out = prepare.run(cfg, out=tmp_path / "d")
    counts = json.loads((out / "manifest.json").read_text())["counts"]["train"]
    assert counts["truncated_prompt"] == counts["truncated_completion"] == counts["rows"]
    for row in datasets.load_from_disk(str(out))["train"]:
        assert (len(row["input_ids"]), row["completion_start"]) == (4, 3)


def test_up_to_date_output_is_skipped_and_force_recomputes(cli, tmp_path, tiny_llama):
    args = ("prepare", "--dataset", FIXTURES / "mix14k_sample.jsonl", "--model", tiny_llama,
            "--out", tmp_path / "d")
    assert cli(*args)[0] == 0
    before = (tmp_path / "d" / "manifest.json").read_text()
    code, _, stdout_err = cli(*args)
    assert code == 0 and (tmp_path / "d" / "manifest.json").read_text() == before
    marker = tmp_path / "d" / "marker"
    marker.write_text("left by the first run")
    assert cli(*args)[0] == 0 and marker.exists()  # skipped: the directory was not touched
    assert cli(*args, "--force")[0] == 0
    assert not marker.exists() and (tmp_path / "d" / "manifest.json").exists()  # rebuilt and replaced


def test_kl_partners_have_a_different_prompt(cli, tmp_path, tiny_llama):
    code, out, _, _ = _run(cli, tmp_path, FIXTURES / "mix14k_sample.jsonl", tiny_llama)
    train = datasets.load_from_disk(str(out))["train"]
    prompts = train["prompt_text"]
    for i, j in enumerate(train["kl_partner"]):
        assert 0 <= j < len(train) and prompts[i] != prompts[j]


BAD_ROWS = [
    ([{"prompt": "a", "label": True}], "missing column 'completion'"),
    ([{"prompt": "a", "completion": "b", "label": "maybe"}], "label 'maybe' is not boolean-like"),
    ([{"prompt": "", "completion": "b", "label": True}], "prompt is empty"),
    ([{"prompt": "a", "completion": "  ", "label": True}], "completion is empty"),
    ([{"prompt": "a", "completion": 3, "label": True}], "completion must be a string or a list"),
    ([{"prompt": "a", "chosen": "b"}], "paired row is missing column 'rejected'"),
    ([{"text": "a"}], "missing column 'prompt'"),
]


@pytest.mark.parametrize("rows,message", BAD_ROWS, ids=[m for _, m in BAD_ROWS])
def test_bad_rows_exit_2_with_one_line_naming_the_row(cli, tmp_path, tiny_llama, rows, message):
    good = [{"prompt": "x", "completion": "y", "label": i % 2 == 0} for i in range(6)]
    source = write_jsonl(tmp_path / "bad.jsonl", good[:3] + rows + good[3:])
    code, out, _, stderr = _run(cli, tmp_path, source, tiny_llama)
    assert code == 2
    assert message in stderr and f"{source}:4" in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not out.exists()


def test_unparseable_line_names_the_line(cli, tmp_path, tiny_llama):
    source = tmp_path / "broken.jsonl"
    source.write_text('{"prompt": "a", "completion": "b", "label": true}\n{"prompt": "a", \n')
    code, out, _, stderr = _run(cli, tmp_path, source, tiny_llama)
    assert code == 2 and f"{source}:2: not valid JSON" in stderr and not out.exists()


def test_one_label_dataset_is_refused(cli, tmp_path, tiny_llama):
    source = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "b", "label": True}] * 10)
    code, out, _, stderr = _run(cli, tmp_path, source, tiny_llama)
    assert code == 2 and "every training row is preferred; RDRO needs both labels" in stderr
    assert not out.exists()


def test_conversational_data_needs_a_chat_template(cli, tmp_path, no_template_tokenizer):
    code, out, _, stderr = _run(cli, tmp_path, FIXTURES / "mix14k_sample.jsonl", no_template_tokenizer)
    assert code == 2 and "no chat template" in stderr and "--chat-template" in stderr
    assert not out.exists()


def test_unreachable_hub_dataset_names_it_and_the_fix(cli, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code, out, _, stderr = _run(cli, tmp_path, "mix14k", tiny_llama)
    assert code == 2
    assert "trl-lib/kto-mix-14k" in stderr and "--dataset DIR" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_empty_and_missing_files(cli, tmp_path, tiny_llama):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, _, stderr = _run(cli, tmp_path, empty, tiny_llama)
    assert code == 2 and "no rows" in stderr
    code, _, _, stderr = _run(cli, tmp_path, tmp_path / "nope.jsonl", tiny_llama)
    assert code == 2 and "not found" in stderr
