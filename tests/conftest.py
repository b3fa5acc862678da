"""Offline test harness: a tiny byte-level BPE tokenizer with a chat template and tiny Llama / Qwen2
models built from configs in a tmp dir. Nothing here touches the Hub."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
import tiny_model  # noqa: E402  (scripts/ is not a package)


def build_tokenizer(path: Path, *, chat_template: str | None = tiny_model.CHATML):
    return tiny_model.build_tokenizer(path, tiny_model.corpus(sorted(FIXTURES.glob("*.jsonl"))),
                                      chat_template=chat_template)


build_model = tiny_model.build_model


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return build_model(tmp_path_factory.mktemp("tiny-llama"), tokenizer, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    return build_model(tmp_path_factory.mktemp("tiny-qwen2"), tokenizer, "qwen2")


@pytest.fixture(scope="session")
def no_template_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-tokenizer-no-template")
    build_tokenizer(path, chat_template=None)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def systematic_rows(n: int, seed: int = 0) -> list[dict]:
    """Unpaired conversational rows where preferred completions differ systematically
    (they say 'yes good answer', the others 'no bad answer'), so training has a signal to find."""
    rng = random.Random(seed)
    topics = ["the sky", "a cat", "the sea", "a tree", "the sun", "a book", "the moon", "a bird"]
    rows = []
    for i in range(n):
        label = i % 3 != 0  # preferred fraction ~ 2/3
        topic = rng.choice(topics)
        text = (f"yes good answer about {topic}" if label else f"no bad answer {topic} what")
        rows.append({"prompt": [{"role": "user", "content": f"what is {topic} {i % 7}?"}],
                     "completion": [{"role": "assistant", "content": text}], "label": label})
    return rows


@pytest.fixture
def cli():
    """Runs the rdro CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from rdro_cli.cli import app

    def invoke(*args: str):
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return invoke


@pytest.fixture
def one_thread():
    """The tiny models run ~10x faster on one thread than fighting other processes for two cores."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
