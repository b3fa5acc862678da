"""Security defaults: recipes are data (see test_recipe.py), remote code is never trusted unless the
recipe says so, and weights load from safetensors only unless `model.allow_pickle = true`."""

from __future__ import annotations

import json

import pytest
import transformers
from conftest import systematic_rows, write_jsonl


@pytest.fixture
def spy(monkeypatch):
    """Records the keyword arguments of every model and tokenizer load."""
    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer, transformers.AutoConfig):
        original = cls.from_pretrained.__func__

        def recording(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append((_name, kwargs))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    return calls


def _pipeline(cli, tmp_path, model, *sets):
    source = write_jsonl(tmp_path / "rows.jsonl", systematic_rows(16))
    common = ["--set", f"output.dir={json.dumps(str(tmp_path / 'run'))}",
              "--set", f"model.name={json.dumps(str(model))}", *sets]
    for args in (["prepare", "--dataset", source], ["logprobs"],
                 ["train", "--set", "train.max_steps=1", "--set", "train.batch_size=4"],
                 ["eval", "--tasks", "preference"]):
        code, _, stderr = cli(*args, *common)
        assert code == 0, stderr


def test_remote_code_is_off_and_weights_are_safetensors_by_default(cli, tmp_path, tiny_llama, spy):
    _pipeline(cli, tmp_path, tiny_llama)
    assert {name for name, _ in spy} >= {"AutoModelForCausalLM", "AutoTokenizer"}
    for name, kwargs in spy:
        assert kwargs.get("trust_remote_code", False) is False, (name, kwargs)
        if name == "AutoModelForCausalLM":
            assert kwargs.get("use_safetensors") is True, kwargs


def test_the_recipe_can_opt_in(cli, tmp_path, tiny_llama, spy):
    _pipeline(cli, tmp_path, tiny_llama, "--set", "model.trust_remote_code=true", "--set", "model.allow_pickle=true")
    models = [kwargs for name, kwargs in spy if name == "AutoModelForCausalLM"]
    assert models and all(k["trust_remote_code"] is True and k["use_safetensors"] is None for k in models)
