"""prepare's piecewise encoding (rdro_cli/piece_encoding.py) equals the plain tokenizer calls it replaces,
on tokenizers where it applies and on ones where it must not (and then falls back)."""

import json

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rdro_cli.dataprep import piece_encoding

TEXTS = [
    "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    "general kenobi<|im_end|>\n",
    "<|im_start|>user\ncafé 日本語 emoji🙂 e\u0301<|im_end|><|im_end|>\n\n  <|im_start|>",  # adjacent tokens, unicode
    "no added tokens at all, just text  ",
    "",
    "<|im_end|>",
]


def _plain(tokenizer, texts):
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_pieces_equal_the_plain_call_on_a_byte_level_bpe(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    encoder = piece_encoding.PieceEncoder(tokenizer)
    assert encoder.pattern is not None and encoder.lossless  # the piecewise path is the one tested
    for start in range(len(TEXTS)):  # each text also inside the checked first rows and after them
        texts = TEXTS[start:] + TEXTS[:start]
        assert encoder(texts) == _plain(tokenizer, texts)
    assert encoder.pattern is not None  # no batch fell back


def test_completion_texts_equal_decoding_where_the_boundary_is_exact(tiny_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    encoder = piece_encoding.PieceEncoder(tokenizer)
    texts = [(TEXTS[0], TEXTS[1]), ("<|im_start|>user\nq<|im_end|>\n", "<|im_start|>user\nq<|im_end|>\nanswér ✓")] * 3
    prompt_ids, full_ids = _plain(tokenizer, [p for p, _ in texts]), _plain(tokenizer, [f for _, f in texts])
    ids = [full[len(prompt):] for prompt, full in zip(prompt_ids, full_ids, strict=True)]
    exact = [True, True, False, True, True, False]
    expected = [tokenizer.decode(x) for x in ids]
    assert encoder.completion_texts(texts, ids, exact) == expected
    assert encoder.lossless


def test_a_metaspace_tokenizer_takes_the_plain_call(tmp_path):
    # Metaspace (SentencePiece-style) marks the first piece of a text: cutting at added tokens would change ids
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(["hello there general kenobi", "be brief user assistant system"] * 20,
                            trainer=trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<|im_start|>",
                                                                                          "<|im_end|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    encoder = piece_encoding.PieceEncoder(tokenizer)
    assert encoder.pattern is None and not encoder.lossless
    assert encoder(TEXTS) == _plain(tokenizer, TEXTS)


def test_added_tokens_that_strip_whitespace_take_the_plain_call(tiny_tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in config["added_tokens"]:
        token["rstrip"] = True  # "<|im_end|>  x" then loses the spaces: not a plain cut
    from tokenizers import Tokenizer

    stripped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(config)))
    encoder = piece_encoding.PieceEncoder(stripped)
    assert encoder.pattern is None
    assert encoder(TEXTS) == _plain(stripped, TEXTS)


def test_a_batch_whose_first_rows_differ_falls_back_for_good(tiny_tokenizer_dir, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    encoder = piece_encoding.PieceEncoder(tokenizer)
    encoder.ids = {k: v + 1 for k, v in encoder.ids.items()}  # a wrong rule: every added token's id is off
    assert encoder(TEXTS) == _plain(tokenizer, TEXTS)
    assert encoder.pattern is None  # later batches take the plain call without trying again
    assert encoder(TEXTS[:2]) == _plain(tokenizer, TEXTS[:2])


@pytest.mark.parametrize("texts", [[], ["only text"]])
def test_small_batches(tiny_tokenizer_dir, texts):
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert piece_encoding.PieceEncoder(tokenizer)(texts) == (_plain(tokenizer, texts) if texts else [])
