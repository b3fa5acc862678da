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
    assert counts["train"]["max_token_id"] == max(max(ids) for ids in data["train"]["input_ids"])
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


# ---------------------------------------------------------------- exactness of the parallel implementation

ODD_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_TRUE = {"true", "1", "yes", "y", "t", "preferred", "good", "desirable"}


def _source_rows(path: Path) -> list[dict]:
    """Every source row of a fixture, read the plain way (all splits of a {split: rows} JSON)."""
    if path.suffix == ".csv":
        import csv

        with path.open(encoding="utf-8-sig", newline="") as handle:
            return list(csv.DictReader(handle))
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        return [r for rows in data.values() for r in rows] if isinstance(data, dict) else data
    return _input_rows(path)


def _reference_rows(rows: list[dict], tokenizer, max_length: int, max_prompt: int):
    """The previous implementation's rule, one row and one tokenizer call at a time: the ground truth."""
    def messages(value, role):
        return value if isinstance(value, list) else [{"role": role, "content": value}]

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    out, pairs, counts = [], [], dict.fromkeys(("boundary_mismatch", "truncated_prompt", "truncated_completion"), 0)
    for row in rows:
        if "chosen" in row:
            halves = [(row["chosen"], True), (row["rejected"], False)]
        else:
            label = row["label"]
            halves = [(row["completion"], label if isinstance(label, bool) else str(label).strip().lower() in _TRUE)]
        group = []
        for completion, label in halves:
            prompt = row["prompt"]
            if tokenizer.chat_template:
                p_text = tokenizer.apply_chat_template(messages(prompt, "user"), tokenize=False,
                                                       add_generation_prompt=True)
                f_text = tokenizer.apply_chat_template(messages(prompt, "user") + messages(completion, "assistant"),
                                                       tokenize=False)
            else:
                p_text, f_text = prompt, prompt + completion + tokenizer.eos_token
            p_ids, f_ids = encode(p_text), encode(f_text)
            if f_ids[: len(p_ids)] != p_ids or not f_text.startswith(p_text):
                counts["boundary_mismatch"] += 1
                f_ids = p_ids + encode(f_text[len(p_text):] if f_text.startswith(p_text) else f_text)
            c_ids = f_ids[len(p_ids):]
            c_text = tokenizer.decode(c_ids)
            if len(p_ids) > max_prompt:
                p_ids, counts["truncated_prompt"] = p_ids[-max_prompt:], counts["truncated_prompt"] + 1
            if len(p_ids) + len(c_ids) > max_length:
                c_ids, counts["truncated_completion"] = c_ids[: max_length - len(p_ids)], counts["truncated_completion"] + 1
            users = [m["content"] for m in messages(prompt, "user") if m["role"] == "user"]
            group.append((tuple(p_ids + c_ids), len(p_ids), label, p_text, c_text,
                          prompt if isinstance(prompt, str) else (users or [prompt[-1]["content"]])[-1]))
        out += group
        if len(group) == 2:
            pairs.append(frozenset(group))
    return out, pairs, counts


def _artifact_rows(out: Path):
    rows, by_pair = [], {}
    for name, split in datasets.load_from_disk(str(out)).items():
        for r in split:
            row = (tuple(r["input_ids"]), r["completion_start"], r["label"], r["prompt_text"], r["completion_text"],
                   r["prompt"])
            rows.append(row)
            if r["pair_id"] >= 0:
                by_pair.setdefault((name, r["pair_id"]), []).append(row)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    totals = {k: sum(c[k] for c in counts.values()) for k in ("boundary_mismatch", "truncated_prompt",
                                                                "truncated_completion")}
    return rows, [frozenset(v) for v in by_pair.values()], totals


EXACTNESS_CASES = [
    ("mix14k_sample.jsonl", "chatml", 1024, 512), ("mix14k_sample.jsonl", "odd", 1024, 512),
    ("mix14k_sample.jsonl", "chatml", 24, 12), ("paired_sample.jsonl", "chatml", 1024, 512),
    ("plain_sample.jsonl", "chatml", 1024, 512), ("plain_sample.jsonl", "none", 1024, 512),
    ("plain_sample.csv", "chatml", 1024, 512), ("ufg_sample.json", "chatml", 1024, 512),
    ("multiturn_unicode.json", "chatml", 1024, 512), ("multiturn_unicode.json", "odd", 30, 16),
]


@pytest.mark.parametrize("fixture,template,max_length,max_prompt", EXACTNESS_CASES,
                         ids=[f"{f}-{t}-{m}" for f, t, m, _ in EXACTNESS_CASES])
def test_rows_equal_an_independent_per_row_computation(tmp_path, tiny_tokenizer_dir, no_template_tokenizer,
                                                       monkeypatch, fixture, template, max_length, max_prompt):
    # two worker processes, 3-row batches and 7-row chunks, so rows cross batch, process and chunk boundaries
    monkeypatch.setattr(prepare, "BATCH_ROWS", 3)
    monkeypatch.setattr(prepare, "CHUNK_ROWS", 7)
    overrides = {"data.dataset": str(FIXTURES / fixture), "data.max_length": max_length,
                 "data.max_prompt_length": max_prompt, "data.num_proc": 2,
                 "model.name": str(no_template_tokenizer if template == "none" else tiny_tokenizer_dir)}
    if template == "odd":
        (tmp_path / "odd.jinja").write_text(ODD_TEMPLATE)
        overrides["model.chat_template"] = str(tmp_path / "odd.jinja")
    out = prepare.run(load_recipe(None, [], overrides), out=tmp_path / "d")
    tokenizer = AutoTokenizer.from_pretrained(overrides["model.name"])
    if template == "odd":
        tokenizer.chat_template = ODD_TEMPLATE
    expected, expected_pairs, expected_counts = _reference_rows(_source_rows(FIXTURES / fixture), tokenizer,
                                                                max_length, max_prompt)
    rows, pairs, counts = _artifact_rows(out)
    assert sorted(rows) == sorted(expected)
    assert sorted(pairs, key=sorted) == sorted(expected_pairs, key=sorted)
    assert counts == expected_counts
    if template == "odd":
        assert counts["boundary_mismatch"] == len(expected) > 0


# Digests of the artifact the previous (one process, one row at a time) implementation wrote for 20,000
# rows of scripts/synthetic_feedback.py (seed 0, mixed), over rows in a split-independent order.
GOLDEN_TOKENIZER = "a416e38eab88fb8d"
GOLDEN = {"chatml": ("a0fcc3281d1998a1", {"rows": 22055, "preferred": 11907, "pairs": 2055, "boundary_mismatch": 0,
                                          "truncated_prompt": 6774, "truncated_completion": 7445,
                                          "dropped_empty_completion": 0}),
          "odd": ("982d1c973a8eb623", {"rows": 22055, "preferred": 11907, "pairs": 2055, "boundary_mismatch": 22055,
                                       "truncated_prompt": 6712, "truncated_completion": 15041,
                                       "dropped_empty_completion": 0})}


def golden_digest(out: Path) -> tuple[str, dict]:
    """sha256 over the sorted digests of pair groups (a lone row is its own group): independent of which
    split a row is in, of row order and of pair-id values, but not of any row's content or pairing."""
    import hashlib

    groups = {}
    for name, split in datasets.load_from_disk(str(out)).items():
        for i, r in enumerate(split):
            h = hashlib.sha256(json.dumps([r["input_ids"], r["completion_start"], r["label"], r["prompt_text"],
                                           r["completion_text"], r["prompt"]], ensure_ascii=False).encode())
            key = (name, r["pair_id"]) if r["pair_id"] >= 0 else (name, "row", i)
            groups.setdefault(key, []).append(h.hexdigest())
    digests = sorted(hashlib.sha256(("row:" if k[1] == "row" else "paired:").encode() + "".join(sorted(v)).encode())
                     .hexdigest() for k, v in groups.items())
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    totals = {k: sum(c[k] for c in counts.values()) for k in GOLDEN["chatml"][1]}
    return hashlib.sha256("".join(digests).encode()).hexdigest()[:16], totals


@pytest.mark.bench  # 2 x 20k rows: minutes on 2 cores; the per-fixture exactness tests run in CI
def test_20k_rows_equal_the_previous_implementation(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setattr(prepare, "CHUNK_ROWS", 6000)  # the split is mapped in 4 chunks, as a large one would be

    import synthetic_feedback
    from conftest import tiny_model

    source = synthetic_feedback.write_jsonl(tmp_path / "rows.jsonl", 20_000, seed=0, mixed=True)
    texts = [json.dumps(r, ensure_ascii=False) for r in synthetic_feedback.rows(300, seed=1, mixed=True)]
    tiny_model.build_tokenizer(tmp_path / "tok", texts, vocab_size=3000)
    assert hashlib.sha256((tmp_path / "tok" / "tokenizer.json").read_bytes()).hexdigest()[:16] == GOLDEN_TOKENIZER
    (tmp_path / "odd.jinja").write_text(ODD_TEMPLATE)
    for name, extra in (("chatml", {}), ("odd", {"model.chat_template": str(tmp_path / "odd.jinja")})):
        cfg = load_recipe(None, [], {"data.dataset": str(source), "model.name": str(tmp_path / "tok"),
                                     "data.max_length": 768, "data.max_prompt_length": 384, **extra})
        assert golden_digest(prepare.run(cfg, out=tmp_path / name)) == GOLDEN[name], name


def test_bad_row_met_inside_a_worker_is_one_line_and_nothing_is_written(cli, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(prepare, "BATCH_ROWS", 2)
    good = [{"prompt": f"x {i}", "completion": "y", "label": i % 2 == 0} for i in range(12)]
    source = write_jsonl(tmp_path / "bad.jsonl", good[:9] + [{"prompt": "a", "completion": 3, "label": True}] + good[9:])
    code, out, _, stderr = _run(cli, tmp_path, source, tiny_llama, "--set", "data.num_proc=2")
    assert code == 2 and f"{source}:10: completion must be a string or a list" in stderr
    assert [line for line in stderr.splitlines() if "error" in line.lower()] == stderr.strip().splitlines()[-1:]
    assert "Traceback" not in stderr and not out.exists() and not list(tmp_path.glob("data.tmp-*"))


def test_kl_partners_equal_the_per_row_loop():
    import numpy as np

    from rdro_cli.dataprep import splitting

    def loop(keys, seed):  # the previous implementation
        n = len(keys)
        order = np.random.default_rng(seed).permutation(n)
        partners = [0] * n
        for position, row in enumerate(order):
            partner = int(order[(position + 1) % n])
            for step in range(2, min(n, 64)):
                if keys[partner] != keys[row]:
                    break
                partner = int(order[(position + step) % n])
            partners[int(row)] = partner
        return partners

    rng = np.random.default_rng(3)
    for n, distinct in ((1, 1), (2, 1), (5, 2), (300, 7), (2000, 1500), (500, 1)):
        keys = rng.integers(0, distinct, size=n)
        assert splitting.kl_partners(keys, seed=n).tolist() == loop(keys.tolist(), seed=n), (n, distinct)


def test_grouped_split_by_hand():
    import numpy as np

    from rdro_cli.dataprep import splitting

    # prompts: A A B C C C D  (7 rows); 0.3 * 7 = 2.1 -> at least 2 test rows, whole groups only
    keys = np.array([1, 1, 2, 3, 3, 3, 4])
    train, test = splitting.grouped_test_split(keys, 0.3, seed=0)
    assert sorted([*train, *test]) == list(range(7)) and len(test) >= 2
    assert not set(keys[train]) & set(keys[test])
    assert splitting.duplicates(np.array([5, 6, 5, 5, 7, 6])).tolist() == [False, False, True, True, False, True]
    with pytest.raises(prepare.UserError, match="distinct prompt"):
        splitting.grouped_test_split(np.array([9, 9, 9]), 0.3, seed=0)


# ---------------------------------------------------------------- issue 17: honest splits and odd inputs


def test_no_prompt_is_in_both_splits(cli, tmp_path, tiny_llama):
    rows = [{"prompt": f"question {i % 10}", "completion": f"answer {i}", "label": i % 3 != 0} for i in range(60)]
    source = write_jsonl(tmp_path / "repeats.jsonl", rows)
    code, out, _, _ = _run(cli, tmp_path, source, tiny_llama, "--test-fraction", "0.2")
    assert code == 0
    data = datasets.load_from_disk(str(out))
    train, test = set(data["train"]["prompt"]), set(data["test"]["prompt"])
    assert train and test and not train & test
    assert len(data["train"]) + len(data["test"]) == 60 and len(data["test"]) == 12  # two whole prompts


def test_exact_duplicates_are_counted_kept_by_default_and_dropped_on_request(cli, tmp_path, tiny_llama):
    rows = [{"prompt": f"q {i}", "completion": f"a {i}", "label": i % 2 == 0} for i in range(20)]
    rows += [rows[3], rows[3], rows[7]]  # three exact duplicates
    rows += [{"prompt": "q 3", "completion": "a 3", "label": True}]  # another label: not a duplicate
    source = write_jsonl(tmp_path / "dups.jsonl", rows)
    code, out, _, stderr = _run(cli, tmp_path, source, tiny_llama)
    assert code == 0 and "exact duplicate rows: 3, kept" in stderr
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert sum(c["duplicate_rows"] for c in counts.values()) == 3
    assert sum(c["rows"] for c in counts.values()) == len(rows)
    code, _, stderr = cli("prepare", "--dataset", source, "--model", tiny_llama, "--out", tmp_path / "d2",
                          "--set", "data.drop_duplicates=true")
    assert code == 0 and "dropped" in stderr
    counts = json.loads((tmp_path / "d2" / "manifest.json").read_text())["counts"]
    assert sum(c["rows"] for c in counts.values()) == len(rows) - 3
    assert sum(c["dropped_duplicates"] for c in counts.values()) == 3


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".json"])
def test_a_utf8_byte_order_mark_is_accepted(cli, tmp_path, tiny_llama, suffix):
    rows = [{"prompt": f"q {i}", "completion": f"a {i}", "label": i % 2 == 0} for i in range(10)]
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif suffix == ".csv":
        text = "prompt,completion,label\n" + "".join(f"{r['prompt']},{r['completion']},{r['label']}\n" for r in rows)
    else:
        text = json.dumps(rows)
    source = tmp_path / f"bom{suffix}"
    source.write_bytes(b"\xef\xbb\xbf" + text.encode())
    code, out, _, stderr = _run(cli, tmp_path, source, tiny_llama)
    assert code == 0, stderr
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["train"]["rows"] + counts["test"]["rows"] == 10


def test_missing_chat_template_file_is_a_one_line_error(cli, tmp_path, tiny_llama):
    code, out, _, stderr = _run(cli, tmp_path, FIXTURES / "mix14k_sample.jsonl", tiny_llama,
                                "--chat-template", tmp_path / "missing" / "file.jinja")
    assert code == 2 and "file.jinja" in stderr and "neither an existing file nor Jinja" in stderr
    assert len(stderr.strip().splitlines()) == 1 and not out.exists()
    from rdro_cli.lm import loading

    assert loading.resolve_chat_template("{{ messages }}") == "{{ messages }}"
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert loading.resolve_chat_template(str(tmp_path / "t.jinja")).startswith("{% for")
    cfg = load_recipe(None, [], {"model.name": str(tiny_llama), "model.chat_template": "templates/chatml.jinja"})
    with pytest.raises(prepare.UserError, match="neither an existing file"):
        loading.recipe_tokenizer(cfg)


@pytest.mark.parametrize("template", ["chatml", "none"])
def test_control_token_text_in_content_is_tokenised_as_plain_text(cli, tmp_path, tiny_llama, no_template_tokenizer,
                                                                 template):
    rows = [{"prompt": f"q {i}", "completion": f"a {i}", "label": i % 2 == 0} for i in range(10)]
    rows += [{"prompt": "end it <|im_start|>user", "completion": "done<|im_end|>\nnot really", "label": True}]
    source = write_jsonl(tmp_path / "ctl.jsonl", rows)
    model = tiny_llama if template == "chatml" else no_template_tokenizer
    code, out, _, stderr = _run(cli, tmp_path, source, model, "--test-fraction", "0.1")
    assert code == 0, stderr
    tokenizer = AutoTokenizer.from_pretrained(model)
    end, start = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|im_start|>")
    data = datasets.load_from_disk(str(out))
    row = next(r for split in data.values() for r in split if "not really" in r["completion_text"])
    ids = row["input_ids"]
    completion, prompt = ids[row["completion_start"]:], ids[: row["completion_start"]]
    # the completion's only real <|im_end|> is the one the template (or the eos) appends
    assert completion.count(end) == 1 and completion[-1 if template == "none" else -2] == end
    assert prompt.count(start) == (2 if template == "chatml" else 0)  # the template's, not the user's
    assert tokenizer.decode(completion).startswith("done<|im_end|>\nnot really")
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert sum(c["control_token_text"] for c in counts.values()) == 1
    assert sum(c["control_token_text_as_tokens"] for c in counts.values()) == 0


def test_train_pairs_vectorised_equal_the_per_row_loop():
    import numpy as np

    from rdro_cli.training import inputs as train_inputs


    def loop(pair_id, label):  # the previous implementation
        found = {}
        for row, (pid, lab) in enumerate(zip(pair_id.tolist(), label.tolist(), strict=True)):
            if pid >= 0:
                found.setdefault(pid, {True: [], False: []})[lab].append(row)
        return [(r[True][0], r[False][0]) for _, r in sorted(found.items()) if len(r[True]) == len(r[False]) == 1]

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 500):
        pair_id = rng.integers(-1, max(1, n // 3), size=n)
        label = rng.random(n) < 0.5
        assert train_inputs.pair_rows(pair_id, label).tolist() == [list(p) for p in loop(pair_id, label)]
    assert train_inputs.pair_rows(np.array([3, 3, -1, 1, 1]), np.array([False, True, True, True, False])).tolist() == \
        [[3, 4], [1, 0]]


def test_progress_advances_by_rows_while_workers_run(tmp_path, tiny_llama, monkeypatch):
    import rdro_cli.progress

    events = []

    class Recorder:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def add_task(self, description, total=None, completed=0):
            events.append(("add", description, total, completed))
            return description

        def advance(self, task, n):
            events.append(("advance", task, n))

    monkeypatch.setattr(rdro_cli.progress, "task_progress", lambda *a: Recorder())
    monkeypatch.setattr(prepare, "PROGRESS_DELAY_S", 0.0)
    monkeypatch.setattr(prepare, "BATCH_ROWS", 2)
    rows = [{"prompt": f"q {i}", "completion": f"a {i}", "label": i % 2 == 0} for i in range(20)]
    cfg = load_recipe(None, [], {"data.dataset": str(write_jsonl(tmp_path / "r.jsonl", rows)),
                                 "model.name": str(tiny_llama), "data.num_proc": 2})
    prepare.run(cfg, out=tmp_path / "d")
    added = [e for e in events if e[0] == "add" and e[1] == "tokenising train"]
    steps = [e[2] for e in events if e[0] == "advance" and e[1] == "tokenising train"]
    assert len(added) == 1 and added[0][2] == 20
    # the task appears at the first update; each worker reports its own rows, so at least two updates
    assert added[0][3] + sum(steps) == 20 and 1 + len(steps) >= 2 and 0 < added[0][3] < 20


def test_a_bad_row_in_a_later_chunk_is_named_by_its_index_in_the_split(cli, tmp_path, tiny_llama, monkeypatch):
    # prepare maps a split CHUNK_ROWS rows at a time; an Arrow source's rows are named by index, which must be
    # the row's index in the whole split, not within its chunk
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(prepare, "BATCH_ROWS", 2)
    monkeypatch.setattr(prepare, "CHUNK_ROWS", 4)
    rows = [{"prompt": f"x {i}", "completion": "" if i == 9 else "y", "label": i % 2 == 0} for i in range(12)]
    source = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    code, out, _, stderr = _run(cli, tmp_path, source, tiny_llama, "--set", "data.num_proc=2")
    assert code == 2 and f"{source} row 9: completion is empty" in stderr, stderr
    assert "Traceback" not in stderr and not out.exists()
