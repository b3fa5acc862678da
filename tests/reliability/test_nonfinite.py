"""Non-finite numbers (issue 13.5): `logprobs` never publishes NaN/inf reference log-probs, and `train`
refuses a log-prob file holding them, each in one line naming the rows and the likely cause."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import systematic_rows, write_jsonl
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from rdro_cli.cli import app
from rdro_cli.store import integrity


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, " ".join(result.stderr.split())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("nonfinite")
    source = write_jsonl(root / "rows.jsonl", systematic_rows(24))
    code, err = _cli("prepare", "--dataset", source, "--model", tiny_llama, "--out", root / "data")
    assert code == 0, err
    return root


def _model_with(tiny_llama, out, change) -> str:
    shutil.copytree(tiny_llama, out)
    weights = load_file(out / "model.safetensors")
    change(weights)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def test_nan_in_one_token_is_refused_naming_exactly_the_rows_that_contain_it(prepared, tiny_llama, tmp_path):
    import datasets

    train = datasets.load_from_disk(str(prepared / "data"))["train"]
    ids = train["input_ids"]
    # A token some rows contain before their last position (where it reaches the scored positions:
    # attention carries a NaN to every later position of its row, never to other rows).
    counts = {}
    for row in ids:
        for token in set(row[:-1]):
            counts[token] = counts.get(token, 0) + 1
    token = next(t for t, n in sorted(counts.items(), key=lambda kv: kv[1]) if 2 <= n <= len(ids) - 2)
    expected = [i for i, row in enumerate(ids) if token in row[:-1]]
    assert json.loads((tiny_llama / "config.json").read_text()).get("tie_word_embeddings") is False

    def poison(weights):
        weights["model.embed_tokens.weight"][token] = float("nan")

    model = _model_with(tiny_llama, tmp_path / "poisoned", poison)
    out = tmp_path / "lp"
    code, err = _cli("logprobs", "--data", prepared / "data", "--model", model, "--out", out,
                     "--set", "model.dtype=float32")
    assert code == 2, err
    shown = ", ".join(map(str, expected[:8])) + (", ..." if len(expected) > 8 else "")
    assert f"ref_logps for train {len(expected)} of {len(ids)} rows ({shown})" in err, (expected, err)
    assert "nothing was published" in err and "model.dtype=bfloat16" in err
    assert not out.exists()  # no artifact a later stage would take


def test_float16_overflow_is_refused_with_the_dtype_hint_and_float32_then_works(prepared, tiny_llama, tmp_path):
    def huge(weights):  # 0.02 * 1e7 = 2e5 > 65504, float16's largest finite value; RMSNorm undoes it in fp32
        weights["model.embed_tokens.weight"].mul_(1e7)

    model = _model_with(tiny_llama, tmp_path / "huge", huge)
    out = tmp_path / "lp"
    code, err = _cli("logprobs", "--data", prepared / "data", "--model", model, "--out", out,
                     "--set", "model.dtype=float16")
    assert code == 2, err
    assert "model.dtype=float16" in err and "float16 overflow" in err and "--force" in err
    assert not out.exists()
    code, err = _cli("logprobs", "--data", prepared / "data", "--model", model, "--out", out,
                     "--set", "model.dtype=float32", "--force")
    assert code == 0, err
    assert torch.isfinite(load_file(out / "train.safetensors")["ref_logps"]).all()


def test_train_refuses_a_logprobs_file_with_nan_at_load(prepared, tiny_llama, tmp_path):
    good = tmp_path / "good"
    code, err = _cli("logprobs", "--data", prepared / "data", "--model", tiny_llama, "--out", good)
    assert code == 0, err
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    tensors = load_file(bad / "train.safetensors")
    tensors["ref_logps"][3] = float("nan")
    tensors["ref_logps"][7] = float("-inf")
    save_file(tensors, str(bad / "train.safetensors"))
    integrity.reseal(bad)  # as an older rdro would have published it: intact, but not finite
    code, err = _cli("train", "--data", prepared / "data", "--logprobs", bad, "--model", tiny_llama,
                     "--out", tmp_path / "train", "--set", "train.max_steps=1")
    assert code == 2, err
    assert f"{bad}/train.safetensors: ref_logps is NaN/inf for 2 of {len(tensors['ref_logps'])} rows (3, 7)" in err
    assert "rdro logprobs --force" in err and "bfloat16" in err
    assert not (tmp_path / "train" / "manifest.json").exists()
