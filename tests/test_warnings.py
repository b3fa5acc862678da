"""Normal runs print no third-party deprecation warnings: a tiny LoRA train (with gradient checkpointing),
merge and eval of the adapter, every warning recorded."""

from __future__ import annotations

import warnings

import pytest
from conftest import systematic_rows, write_jsonl

from rdro_cli.lm.peft_compat import building_peft_model

LORA = ["lora.enabled=true", "lora.r=4", "lora.target_modules=q_proj,v_proj", "model.dtype=float32"]


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_merge_and_eval_of_an_adapter_warn_nothing_deprecated(cli, tmp_path, tiny_llama):
    source = write_jsonl(tmp_path / "rows.jsonl", systematic_rows(24))
    code, _, err = cli("prepare", "--dataset", source, "--model", tiny_llama, "--out", tmp_path / "data",
                       "--test-fraction", "0.25")
    assert code == 0, err
    code, _, err = cli("logprobs", "--model", tiny_llama, "--data", tmp_path / "data", "--out",
                       tmp_path / "logprobs", *_sets(["model.dtype=float32"]))
    assert code == 0, err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = cli("train", "--model", tiny_llama, "--data", tmp_path / "data", "--logprobs",
                           tmp_path / "logprobs", "--out", tmp_path / "train",
                           *_sets([*LORA, "train.max_steps=2", "train.batch_size=4",
                                   "train.gradient_checkpointing=true"]))
        assert code == 0, err
        code, _, err = cli("merge", "--adapter", tmp_path / "train" / "final", "--out", tmp_path / "merged")
        assert code == 0, err
        code, _, err = cli("eval", "--model", tmp_path / "train" / "final", "--data", tmp_path / "data",
                           "--logprobs", tmp_path / "logprobs", "--out", tmp_path / "eval",
                           *_sets(["model.dtype=float32"]))
        assert code == 0, err
    deprecations = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught
                    if issubclass(w.category, (FutureWarning, DeprecationWarning, PendingDeprecationWarning))]
    assert deprecations == []


def test_only_the_one_peft_probe_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with building_peft_model():
            warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                          stacklevel=1)
            warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
            warnings.warn("`is_gradient_checkpointing` is deprecated", UserWarning, stacklevel=1)
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "something else is deprecated"), (UserWarning, "`is_gradient_checkpointing` is deprecated")]
