"""Bad input table: every case exits 2 with one line naming the problem, no traceback, nothing written.

Cases span recipes, flags, datasets and artifacts of every stage. A hypothesis fuzz of the dataset row
parser checks that any JSON-like row either parses or raises the one-line UserError.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import FIXTURES, build_model, systematic_rows, write_jsonl
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rdro_cli import prepare
from rdro_cli.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_llama):
    """A finished tiny run: data, logprobs (rdro), a LoRA adapter from 2 steps, and an eval."""
    from typer.testing import CliRunner

    from rdro_cli.cli import app

    root = tmp_path_factory.mktemp("reliability-run")
    source = write_jsonl(root / "rows.jsonl", systematic_rows(24))
    common = ["--set", f"output.dir={json.dumps(str(root / 'run'))}", "--set", f"model.name={json.dumps(str(tiny_llama))}"]
    for args in (["prepare", "--dataset", str(source)], ["logprobs"],
                 ["train", "--set", "lora.enabled=true", "--set", "train.max_steps=2", "--set", "train.batch_size=4"]):
        result = CliRunner().invoke(app, [*args, *common], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root / "run"


def _recipe(tmp: Path, text: str) -> Path:
    path = tmp / "recipe.toml"
    path.write_text(text)
    return path


def _file(tmp: Path, name: str, content: str | bytes) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD = [{"prompt": "x", "completion": "y", "label": i % 2 == 0} for i in range(6)]


def _prepare(source, model="{llama}", *extra):
    return ["prepare", "--dataset", source, "--model", model, "--out", "{tmp}/out", *extra]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


# issue 23 inputs: a strict template (as many hub models ship), rows for it, a lone surrogate, a long name
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception("
    "'Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{{ '<|im_start|>' + "
    "m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": "a"}],
         "label": i % 2 == 0} for i in range(6)]
WRONG_ORDER = {"prompt": [{"role": "assistant", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}],
               "label": True}
SURROGATE_ROW = '{"prompt": "a\\ud800", "completion": "b", "label": true}\n'  # valid JSON, not valid text
LONG = "a" * 300  # a file name may have 255 bytes


# Each case: (id, builder(tmp) -> argv with {llama}/{qwen}/{run}/{tmp} placeholders, expected message part)
CASES = [
    ("misspelt-key", lambda t: ["validate", _recipe(t, "[loss]\nalpah = 0.5\n")], "loss.alpah: unknown key (did you mean"),
    ("mistyped-value", lambda t: ["validate", _recipe(t, '[train]\nbatch_size = "8"\n')],
     "train.batch_size: must be an integer"),
    ("alpha-above-1", lambda t: ["validate", _recipe(t, "[loss]\nalpha = 1.5\n")], "loss.alpha: must be in (0, 1)"),
    ("alpha-zero-set", lambda t: [*_prepare(FIXTURES / "mix14k_sample.jsonl"), "--set", "loss.alpha=0"],
     "loss.alpha: must be in (0, 1)"),
    ("unknown-section", lambda t: ["validate", _recipe(t, "[trian]\nseed = 1\n")], "unknown section [trian]"),
    ("invalid-toml", lambda t: ["validate", _recipe(t, "[loss\n")], "not valid TOML"),
    ("missing-recipe", lambda t: ["prepare", "--recipe", t / "nope.toml"], "recipe file not found"),
    ("set-without-equals", lambda t: [*_prepare(FIXTURES / "mix14k_sample.jsonl"), "--set", "loss.alpha"],
     "expected section.key=value"),
    ("unknown-loss-flag", lambda t: ["train", "--loss", "ppo", "--model", "{llama}", "--out", "{tmp}/out"],
     "loss.name: 'ppo' is not one of"),
    ("prompt-longer-than-max-length", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--max-length",
                                                          "64", "--max-prompt-length", "64"),
     "data.max_prompt_length: must be < data.max_length"),
    ("empty-file", lambda t: _prepare(_file(t, "empty.jsonl", "")), "no rows"),
    ("wrong-type-row", lambda t: _prepare(write_jsonl(t / "d.jsonl", [*GOOD, {"prompt": "a", "completion": 3,
                                                                              "label": True}])),
     "completion must be a string or a list"),
    ("non-boolean-label", lambda t: _prepare(write_jsonl(t / "d.jsonl", [*GOOD, {"prompt": "a", "completion": "b",
                                                                                 "label": "maybe"}])),
     "is not boolean-like"),
    ("missing-column", lambda t: _prepare(write_jsonl(t / "d.jsonl", [*GOOD, {"prompt": "a", "label": True}])),
     "missing column 'completion'"),
    ("unparseable-line", lambda t: _prepare(_file(t, "d.jsonl", json.dumps(GOOD[0]) + "\n{oops\n")),
     "d.jsonl:2: not valid JSON"),
    ("one-label-dataset", lambda t: _prepare(write_jsonl(t / "d.jsonl", [GOOD[0]] * 8)), "RDRO needs both labels"),
    ("unreadable-file", lambda t: _prepare(_file(t, "d.jsonl", b"\xff\xfe\x00garbage")), "cannot read dataset file"),
    ("unsupported-extension", lambda t: _prepare(_file(t, "d.txt", "hello")), "unsupported file type"),
    ("unknown-short-name", lambda t: _prepare("mix15k"), "neither a known short name"),
    ("hub-dataset-offline", lambda t: _prepare("mix14k"), "cannot load hub dataset 'trl-lib/kto-mix-14k'"),
    ("no-chat-template", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{notemplate}"),
     "no chat template"),
    ("missing-dataset-file", lambda t: _prepare(t / "nope.jsonl"), "dataset file not found"),
    ("logprobs-missing-data", lambda t: ["logprobs", "--data", t / "nope", "--model", "{llama}", "--out",
                                         "{tmp}/out"], "run `rdro prepare` first"),
    ("logprobs-half-written-data", lambda t: ["logprobs", "--data", "{half}", "--model", "{llama}", "--out",
                                              "{tmp}/out"], "is incomplete (no manifest.json)"),
    ("logprobs-mismatched-tokenizer", lambda t: ["logprobs", "--data", "{run}/data", "--model", "{qwen}", "--out",
                                                 "{tmp}/out"], "tokenised with a different tokenizer"),
    ("train-mismatched-tokenizer", lambda t: ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs",
                                              "--model", "{qwen}", "--out", "{tmp}/out"],
     "tokenised with a different tokenizer"),
    ("pickle-checkpoint", lambda t: ["logprobs", "--data", "{run}/data", "--model", "{pickle}", "--out",
                                     "{tmp}/out"], "model.allow_pickle = true"),
    ("missing-model-dir", lambda t: ["logprobs", "--data", "{run}/data", "--model", t / "no-model", "--out",
                                     "{tmp}/out"], "does not exist"),
    ("logprobs-for-another-dataset", lambda t: ["train", "--data", "{other_data}", "--logprobs", "{run}/logprobs",
                                                "--model", "{llama}", "--out", "{tmp}/out"], "different"),
    ("dpo-on-unpaired-data", lambda t: ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs",
                                        "--model", "{llama}", "--loss", "dpo", "--out", "{tmp}/out"],
     "paired"),
    ("kto-without-kl-logprobs", lambda t: ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs",
                                           "--model", "{llama}", "--loss", "kto", "--out", "{tmp}/out"],
     "ref_kl_logps"),
    ("merge-missing-adapter-base", lambda t: ["merge", "--adapter", "{orphan_adapter}", "--out", "{tmp}/out"],
     "base"),
    ("merge-unfinished-train", lambda t: ["merge", "--adapter", "{unfinished}/final", "--out", "{tmp}/out"],
     "train output is incomplete (no manifest.json); run `rdro train --resume` first"),
    ("eval-unfinished-train", lambda t: ["eval", "--model", "{unfinished}/final", "--data", "{run}/data",
                                         "--logprobs", "{run}/logprobs", "--out", "{tmp}/out"],
     "train output is incomplete"),
    ("merge-mismatched-base", lambda t: ["merge", "--adapter", "{run}/train/final", "--base", "{wide}",
                                         "--out", "{tmp}/out"], "does not fit base model"),
    ("eval-missing-task-file", lambda t: ["eval", "--model", "{llama}", "--tasks", "exact_match", "--set",
                                          f"eval.exact_match_file={json.dumps(str(t / 'nope.jsonl'))}",
                                          "--out", "{tmp}/out"], "exact_match file not found"),
    ("eval-bbh-wrong-shape", lambda t: ["eval", "--model", "{llama}", "--tasks", "bbh", "--set",
                                        f"eval.bbh_dir={json.dumps(str(t / 'bbh'))}", "--out", "{tmp}/out"],
     'examples[0] is not {"input": str, "target": str}'),
    ("eval-model-without-tokenizer", lambda t: ["eval", "--model", "{no_tokenizer}", "--data", "{run}/data",
                                                "--logprobs", "{run}/logprobs", "--out", "{tmp}/out"],
     "no tokenizer files"),
    ("report-missing-run", lambda t: ["report", "--run", t / "no-run", "--out", "{tmp}/out"], "no-run"),
    ("report-damaged-metrics", lambda t: ["report", "--run", "{damaged_run}", "--out", "{tmp}/out"],
     "{damaged_run}/train/metrics.jsonl: damaged (content differs from its recorded digest)"),
    # outputs: rdro never replaces what it did not write (each of these deleted or replaced data before)
    ("out-is-a-file", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out",
                                         _file(t, "notes.txt", "keep me")), "is a file, not an rdro prepare output"),
    ("out-is-a-foreign-dir", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out",
                                                _dir_with(t, "mine", "important.txt")),
     "holds files rdro did not write (important.txt)"),
    ("prepare-out-is-the-whole-run", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out", "{run}"),
     "is a run directory holding rdro artifacts"),
    ("logprobs-out-is-its-data", lambda t: ["logprobs", "--data", "{run}/data", "--model", "{llama}", "--out",
                                            "{run}/data"], "is an input of this command"),
    ("logprobs-out-contains-its-data", lambda t: ["logprobs", "--data", "{run}/data", "--model", "{llama}",
                                                  "--out", "{run}"], "contains {run}/data, an input"),
    ("eval-out-is-the-model", lambda t: ["eval", "--model", "{llama}", "--data", "{run}/data", "--logprobs",
                                         "{run}/logprobs", "--out", "{llama}"], "is an input of this command"),
    ("merge-out-is-the-adapter", lambda t: ["merge", "--adapter", "{run}/train/final", "--out", "{run}/train/final"],
     "is an input of this command"),
    ("train-out-is-a-prepare-artifact", lambda t: ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs",
                                                   "--model", "{llama}", "--out", "{other_data}", "--force"],
     "holds an rdro prepare artifact, not a train output"),
    ("out-inside-an-artifact", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out",
                                                  "{run}/logprobs/data"), "an rdro logprobs artifact"),
    ("out-dot", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out", "."),
     "not an output directory rdro can create"),
    ("out-dotdot", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out", ".."),
     "not an output directory rdro can create"),
    ("out-root", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out", "/"),
     "not an output directory rdro can create"),
    ("out-symlink", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out",
                                       _link(t, "link", _dir_with(t, "real"))), "is a symbolic link"),
    ("out-unwritable", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out", "/sys/rdro-out"),
     "/sys/rdro-out: cannot write there"),
    ("out-under-a-file", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out",
                                            _file(t, "notes.txt", "keep me") / "data"), "cannot write there"),
    ("model-dir-not-a-model", lambda t: ["logprobs", "--data", "{run}/data", "--model", _dir_with(t, "m", "x.txt"),
                                         "--out", "{tmp}/out"], "not a model directory"),
    ("prepare-model-dir-not-a-model", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", _dir_with(t, "m", "x.txt")),
     "not a model directory"),
    # issue 23: user errors that were tracebacks or misleading
    ("template-raises-on-a-row", lambda t: _prepare(write_jsonl(t / "d.jsonl", [*CHAT, WRONG_ORDER]), "{llama}",
                                                    "--chat-template", _file(t, "strict.jinja", STRICT_TEMPLATE)),
     "{tmp}/d.jsonl:7: chat template {tmp}/strict.jinja raised an error on this row: Conversation roles must "
     "alternate user/assistant/user/assistant/..."),
    ("template-syntax-error", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--chat-template",
                                                 _file(t, "bad.jinja", "{% for m in messages %}{{ m.content }\n")),
     "chat template {tmp}/bad.jinja is not a valid Jinja template (line 1: unexpected '}')"),
    ("lone-surrogate-jsonl", lambda t: _prepare(_file(t, "d.jsonl", _jsonl(GOOD) + SURROGATE_ROW)),
     "{tmp}/d.jsonl:7: prompt holds a lone UTF-16 surrogate"),
    ("lone-surrogate-json", lambda t: _prepare(_file(t, "d.json", "[" + ", ".join([*map(json.dumps, GOOD),
                                                                                    SURROGATE_ROW]) + "]")),
     "{tmp}/d.json[6]: prompt holds a lone UTF-16 surrogate"),
    ("negative-train-seed", lambda t: ["validate", _recipe(t, "[train]\nseed = -1\n")], "train.seed: must be >= 0"),
    ("negative-data-seed", lambda t: [*_prepare(FIXTURES / "mix14k_sample.jsonl"), "--set", "data.seed=-3"],
     "data.seed: must be >= 0"),
    ("long-name-in-output-dir", lambda t: ["validate", _recipe(t, f'[output]\ndir = "runs/{LONG}/x"\n')],
     "output.dir: a name in this path is 300 bytes long"),
    ("long-name-in-out", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out",
                                            t / "x" / LONG / "data"), "--out: a name in this path is 300 bytes long"),
    ("path-longer-than-path-max", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", "{llama}", "--out",
                                                     t.joinpath(*["b" * 200] * 25)), "--out: the path is "),
    ("long-name-in-dataset", lambda t: _prepare(t / f"{LONG}.jsonl"), "data.dataset: a name in this path is 306 bytes"),
    ("long-name-in-model", lambda t: _prepare(FIXTURES / "mix14k_sample.jsonl", t / LONG),
     "model.name: a name in this path is 300 bytes long"),
    ("long-name-in-data", lambda t: ["logprobs", "--data", t / LONG, "--model", "{llama}", "--out", "{tmp}/out"],
     "--data: a name in this path is 300 bytes long"),
    ("limit-leaves-one-label", lambda t: _prepare(write_jsonl(t / "d.jsonl", [
        {"prompt": f"p{i}", "completion": "y", "label": i < 10} for i in range(20)]), "{llama}", "--limit", "2"),
     "the training split has only preferred rows: data.limit=2 keeps the first 2 source rows of each split"),
    ("single-prompt-no-split", lambda t: _prepare(write_jsonl(t / "d.jsonl", GOOD)),
     "dataset has only 1 distinct prompt: a held-out test split needs at least 2"),
    ("unpaired-row-with-empty-chosen", lambda t: _prepare(write_jsonl(t / "d.jsonl", [
        *({**row, "chosen": "", "rejected": None} for row in GOOD),
        {"prompt": "a", "completion": "b", "label": "maybe", "chosen": "", "rejected": None}])),
     "{tmp}/d.jsonl:7: label 'maybe' is not boolean-like"),
]


# issue 23: a finished run is never lost and artifacts of different models or datasets are never mixed. The
# cases on `{tmp}/run` run against a copy of the finished run made by SETUPS below: each refusal must leave
# every byte of it as it was (before, a refused --resume had deleted train/manifest.json, and --resume with no
# checkpoint retrained from the base model over final/).
_TRAIN_COPY = ["--data", "{tmp}/run/data", "--logprobs", "{tmp}/run/logprobs", "--model", "{llama}", "--out",
               "{tmp}/run/train", "--set", "lora.enabled=true", "--set", "train.batch_size=4"]
CASES += [
    ("resume-finished-run-without-checkpoints", lambda t: ["train", *_TRAIN_COPY, "--resume", "--max-steps", "8"],
     "holds a finished run of 2 steps but no checkpoint to continue from"),
    ("resume-fewer-steps-than-trained", lambda t: ["train", *_TRAIN_COPY, "--resume", "--max-steps", "1"],
     "the run has trained 2 steps, more than the 1 asked for"),
    ("resume-damaged-last-checkpoint", lambda t: ["train", *_TRAIN_COPY, "--resume", "--max-steps", "4"],
     "damaged"),
    # --force used to delete the run before the checks that came after it (here: the tokenizer's)
    ("force-refused-after-the-output-check", lambda t: ["train", *_TRAIN_COPY[:4], "--model", "{qwen}",
                                                         *_TRAIN_COPY[6:], "--set", 'model.ref_name="{llama}"',
                                                         "--force"], "tokenised with a different tokenizer"),
    ("resume-other-settings", lambda t: ["train", *_TRAIN_COPY, "--resume", "--max-steps", "4", "--set",
                                         "train.learning_rate=0.5"], "--resume cannot change train.learning_rate"),
    ("train-logprobs-of-another-model", lambda t: ["train", "--data", "{run}/data", "--logprobs", "{run}/logprobs",
                                                   "--model", "{twin}", "--out", "{tmp}/out"],
     "the reference log-probs were computed by"),
    ("train-ref-name-not-the-logprobs-model", lambda t: ["train", "--data", "{run}/data", "--logprobs",
                                                         "{run}/logprobs", "--model", "{twin}", "--set",
                                                         'model.ref_name="{wide}"', "--out", "{tmp}/out"],
     "not by model.ref_name"),
    ("merge-base-with-other-weights", lambda t: ["merge", "--adapter", "{run}/train/final", "--base", "{twin}",
                                                 "--out", "{tmp}/out"], "holds other weights"),
    ("prepare-replaces-data-of-a-trained-run", lambda t: _prepare("{other_source}", "{llama}", "--out",
                                                                  "{tmp}/run/data"),
     "that logprobs/ (logprobs), train/ (train) of this run were made from"),
    ("logprobs-replaces-logprobs-of-a-trained-run", lambda t: ["logprobs", "--data", "{tmp}/run/data", "--model",
                                                               "{twin}", "--out", "{tmp}/run/logprobs"],
     "that train/ (train) of this run were made from"),
]


def _copy_run(tmp: Path, places: dict) -> Path:
    shutil.copytree(places["run"], tmp / "run")
    return tmp / "run"


def _flip_last_checkpoint_byte(tmp: Path, places: dict) -> None:
    last = sorted((_copy_run(tmp, places) / "train" / "checkpoints").iterdir())[-1]
    weights = next((last / "model").glob("*.safetensors"))
    content = bytearray(weights.read_bytes())
    content[-3] ^= 0x01
    weights.write_bytes(bytes(content))


SETUPS = {
    "resume-finished-run-without-checkpoints":
        lambda t, places: shutil.rmtree(_copy_run(t, places) / "train" / "checkpoints"),
    "resume-fewer-steps-than-trained": _copy_run,
    "resume-damaged-last-checkpoint": _flip_last_checkpoint_byte,
    "resume-other-settings": _copy_run,
    "force-refused-after-the-output-check": _copy_run,
    "prepare-replaces-data-of-a-trained-run": _copy_run,
    "logprobs-replaces-logprobs-of-a-trained-run": _copy_run,
}

def _dir_with(tmp: Path, name: str, *files: str) -> Path:
    path = tmp / name
    path.mkdir()
    for file in files:
        (path / file).write_text("the user's own file")
    return path


def _link(tmp: Path, name: str, target: Path) -> Path:
    link = tmp / name
    link.symlink_to(target)
    return link


@pytest.fixture(scope="module")
def places(tmp_path_factory, run_dir, tiny_llama, tiny_qwen2, no_template_tokenizer):
    """Artifacts some cases point at, built once."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("places")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    pickle_dir = root / "pickle-model"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    model.save_pretrained(pickle_dir)  # transformers 5 writes safetensors only: turn it into a pickle file
    torch.save(load_file(pickle_dir / "model.safetensors"), pickle_dir / "pytorch_model.bin")
    (pickle_dir / "model.safetensors").unlink()
    tokenizer.save_pretrained(pickle_dir)
    no_tokenizer = root / "no-tokenizer"
    model.save_pretrained(no_tokenizer)
    wide = build_model(root / "wide", tokenizer, "llama", hidden=64)
    half = root / "half-data"
    shutil.copytree(run_dir / "data", half)
    (half / "manifest.json").unlink()  # what a killed prepare would leave if it wrote in place
    orphan = root / "orphan-adapter"
    shutil.copytree(run_dir / "train" / "final", orphan)
    config = json.loads((orphan / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(root / "deleted-base")
    (orphan / "adapter_config.json").write_text(json.dumps(config))
    unfinished = root / "unfinished-train"  # what a kill between final/ and the manifest leaves
    shutil.copytree(run_dir / "train", unfinished)
    (unfinished / "manifest.json").unlink()
    damaged = root / "damaged-run"  # a finished run whose metrics.jsonl lost a bit (same size)
    shutil.copytree(run_dir / "train", damaged / "train")
    metrics = bytearray((damaged / "train" / "metrics.jsonl").read_bytes())
    metrics[len(metrics) // 2] ^= 0x01
    (damaged / "train" / "metrics.jsonl").write_bytes(bytes(metrics))
    other = root / "other-data"
    twin = build_model(root / "twin", tokenizer, "llama", seed=1)  # the same shapes, other weights
    prepare.run(__import__("rdro_cli.recipe", fromlist=["load_recipe"]).load_recipe(
        None, [], {"data.dataset": str(write_jsonl(root / "other.jsonl", systematic_rows(20, seed=3))),
                   "model.name": str(tiny_llama)}), out=other)
    return {"llama": tiny_llama, "qwen": tiny_qwen2, "notemplate": no_template_tokenizer, "run": run_dir,
            "pickle": pickle_dir, "no_tokenizer": no_tokenizer, "wide": wide, "half": half,
            "orphan_adapter": orphan, "other_data": other, "unfinished": unfinished, "damaged_run": damaged,
            "twin": twin, "other_source": root / "other.jsonl"}


def _tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_the_table_has_at_least_82_cases():  # 39 before the output-safety cases, 57 before issue 23
    assert len(CASES) >= 82 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("name,build,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, places, name, build, message):
    if name in SETUPS:
        SETUPS[name](tmp_path, places)
    if name == "eval-bbh-wrong-shape":
        (tmp_path / "bbh").mkdir()
        (tmp_path / "bbh" / "date.json").write_text(json.dumps({"examples": [{"question": "?", "answer": "a"}]}))
    places = {**places, "tmp": tmp_path}
    args = [str(a).format(**places) for a in build(tmp_path)]
    for key, value in places.items():  # not str.format: messages hold braces of their own
        message = message.replace(f"{{{key}}}", str(value))
    watched = [tmp_path, places["run"]]
    before = [_tree(p) for p in watched]
    contents = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, stdout, stderr = cli(*args)
    assert code == 2, (name, code, stdout, stderr)
    assert message in stderr, (name, stderr)
    assert len(stderr.strip().splitlines()) == 1, (name, stderr)
    assert "Traceback" not in stdout + stderr
    assert [_tree(p) for p in watched] == before, f"{name}: wrote files"
    assert {p: p.read_bytes() for p in contents} == contents, f"{name}: changed a file"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", 3]),
                                           "content": st.text(max_size=6) | st.integers()}), max_size=3)
ROWS = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries({"prompt": st.text(max_size=6) | MESSAGES | JSON_VALUES,
                           "completion": st.text(max_size=6) | MESSAGES | JSON_VALUES,
                           "label": st.sampled_from([True, False, 0, 1, "yes", "no", "maybe", None, 2.5])}),
    st.fixed_dictionaries({"prompt": st.text(max_size=6) | MESSAGES, "chosen": st.text(max_size=6) | MESSAGES,
                           "rejected": st.text(max_size=6) | MESSAGES | JSON_VALUES}),
)


@settings(max_examples=400, deadline=None)
@given(ROWS)
@example({"\n": None})  # found by this fuzz in CI: a column name with a newline split the message
@example({"prompt": "a", "completion": "b", "label\r": 1})
def test_row_parser_fuzz_never_tracebacks(row):
    try:
        examples = prepare.parse_row(row, "fuzz.jsonl:1", pair_id=0)
    except UserError as err:
        message = str(err)
        assert message.startswith("fuzz.jsonl:1: ") and "\n" not in message
        return
    assert examples and all(isinstance(ex.label, bool) for ex in examples)
