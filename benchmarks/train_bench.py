"""Training throughput and peak memory of `rdro train` against TRL and a plain PyTorch loop, same objective (issue 10).

Contenders, all minimising RDRO's per-example loss (docs/losses.md, batch weighting, one alpha)::

    l+(r) = softplus(-r) + alpha * softplus(r)      l-(r) = (1 - alpha) * softplus(r)      r = s_pol - s_ref

- ``a``: ``rdro_cli.train.run`` itself (policy only, chunked completion-only LM head), on a prepare artifact and
  a logprobs artifact made by the real ``prepare`` and ``logprobs`` stages from this benchmark's rows. The
  ``logprobs`` stage is timed separately (setup subprocess) and also amortised over one epoch.
- ``b``: TRL's ``KTOTrainer`` subclassed with its loss replaced by RDRO's formula, the way the published RDRO code
  does: reference model in memory, TRL's KL passes on (policy and reference forwards of the mismatched pairs), TRL
  defaults otherwise (KTOConfig's ``gradient_checkpointing=True``; fp32 on CPU).
- ``c``: the same subclass with TRL's best settings for this loss: ``precompute_ref_log_probs=True`` (the reference
  forward runs once, at construction, timed and amortised like ``a``'s logprobs stage), KL passes off
  (``loss_type="apo_zero_unpaired"``, TRL's only switch for them; the loss is still RDRO's), no gradient
  checkpointing.
- ``d``: a plain PyTorch loop: HF forward with full ``[batch, seq, vocab]`` logits, float32 log_softmax over every
  position, gather, completion mask, sum, RDRO loss against the reference log-probs of the logprobs artifact, AdamW.

TRL 1.16 has no ``kto_loss`` method to override (TRL 0.26's published hook): the loss is computed inside
``_compute_loss`` next to the forwards, so the subclass overrides ``_compute_loss`` and calls TRL's own pieces for
every forward (``_compute_kl_logps``, the fused-LM-head forward TRL patches into the model, the reference model or
``batch["ref_logps"]``); only the loss formula and most of the logging differ.

Same work for everyone: the same model files (random weights, seeded, safetensors), the same rows in the same
order (random token ids with a kto-mix-14k-like length mix, both labels, rendered as ChatML conversations over a
word-level tokenizer so every tokeniser path yields identical ids; checked), batches of ``--batch-size`` rows in
data order (``train.shuffle = false``; TRL's sequential sampler), the same AdamW learning rate, constant schedule,
clipping at 1.0. The policy starts from other seeded weights than the reference, so the first batch's log-ratios
are not 0 and the first-loss check exercises both the policy and the reference paths.

Each contender runs alone in a fresh subprocess (``--contender a|b|c|d``): peak memory is that process's
``ru_maxrss`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Contenders alternate (a b c d, then d c b a, ...)
for ``--repeats`` rounds; headline figures are medians over rounds. Each run does ``--warmup`` untimed steps then
``--steps`` timed ones; tokens/s counts prompt + completion tokens, never padding; start-up (imports excluded,
model load and trainer construction included) is reported apart.

    .venv/bin/python benchmarks/train_bench.py                   # CPU: Llama h256 L4 vocab 32000, fp32, batch 8
    .venv/bin/python benchmarks/train_bench.py --quick           # seconds: tiny model, 2 steps; a smoke run
    python benchmarks/train_bench.py --device cuda --dtype bfloat16 --arch qwen2-0.5b
    python benchmarks/train_bench.py --mfu --device cuda --dtype bfloat16 --arch qwen2-1.5b --batch-size 32

``--mfu`` runs ``a`` only, full fine-tuning and LoRA, and reports MFU = 6 × params × tokens / seconds / peak
(peak: ``rdro_cli.throughput``'s dense bf16 table for the GPU, else 989e12, H100 SXM; ``--peak-flops`` to
change), params = all model parameters (tied embeddings once), tokens without padding; also the ``mfu`` that
``rdro train`` itself logs in metrics.jsonl. ``--set-a KEY=VALUE`` passes recipe settings to ``a`` only. The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package
from bench_env import ARCHS, cpu_name, length_mix  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "user", "assistant"]  # ids 0..4; words from 5
TARGETS = {"speedup_vs_trl": 3.0, "speedup_vs_trl_best": 2.0, "speedup_vs_plain": 1.4,
           "memory_ratio_vs_trl": 0.4, "memory_ratio_vs_plain": 0.6}
MFU_FORMULA = "6 * params * tokens / seconds / peak_flops (params: all model parameters; tokens: no padding)"
CONTENDERS = {"a": "rdro train", "b": "TRL KTOTrainer + RDRO loss (published way)",
              "c": "TRL best (precomputed ref, no KL)", "d": "plain PyTorch loop"}


# ---------------------------------------------------------------------------------------------------------
# Rows, tokenizer, models (deterministic from the seed, so every subprocess sees the same ones)


def make_rows(n: int, words: int, max_length: int, max_prompt: int, seed: int) -> list[tuple[list, list, bool]]:
    """(prompt word ids, completion word ids, label): a kto-mix-14k-like length mix of random words.

    Templated prompt lengths are lognormal around 120 tokens, completions around 170 (cut to fit max_length, no
    truncation by any contender); about 55% preferred. Word ids are token ids (>= 5) of the word-level tokenizer.
    """
    import torch

    gen, prompt_len, completion_len, labels = length_mix(n, seed)
    rows = []
    for i in range(n):
        p = int(min(max(prompt_len[i].item(), 8), max_prompt))  # templated: words + 5
        c = int(min(max(completion_len[i].item(), 2), max_length - p))  # templated: words + 1
        ids = torch.randint(5, words, (p - 5 + c - 1,), generator=gen).tolist()
        rows.append((ids[: p - 5], ids[p - 5:], bool(labels[i])))
    return rows


def row_ids(prompt: list, completion: list) -> tuple[list[int], int]:
    """What ChatML over the word-level tokenizer yields: (input_ids, completion_start)."""
    head = [1, 3, *prompt, 2, 1, 4]
    return head + list(completion) + [2], len(head)


def as_messages(prompt: list, completion: list) -> tuple[list[dict], list[dict]]:
    return ([{"role": "user", "content": " ".join(f"w{t}" for t in prompt)}],
            [{"role": "assistant", "content": " ".join(f"w{t}" for t in completion)}])


def split_rows(args) -> tuple[list, list]:
    vocab = min(ARCHS[args.arch]["vocab_size"], 32000)
    rows = make_rows(args.train_rows + args.test_rows, vocab, args.max_length, args.max_length // 2, args.seed)
    return rows[: args.train_rows], rows[args.train_rows:]


def build_tokenizer(out: Path, vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {tok: i for i, tok in enumerate(SPECIAL)} | {f"w{i}": i for i in range(len(SPECIAL), vocab)}
    tok = Tokenizer(models.WordLevel(table, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIAL[:3])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, arch: str, dtype: str, device: str, seed: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHS[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, max_position_embeddings=4096,
                                  pad_token_id=0, bos_token_id=None, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):  # initialising a 7B model on the GPU takes seconds, on the CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out, safe_serialization=True)


def recipe_text(args, work: Path, alpha: float) -> str:
    return f"""
[model]
name = "{work / 'policy'}"
ref_name = "{work / 'ref'}"
dtype = "{args.dtype}"

[data]
dataset = "{work / 'rows.json'}"
max_length = {args.max_length}
max_prompt_length = {args.max_length // 2}

[loss]
name = "rdro"
alpha = {alpha!r}
weighting = "batch"

[logprobs]
max_tokens_per_batch = {args.max_tokens_per_batch}
chunk_size = {args.chunk_size}

[train]
learning_rate = {args.lr!r}
batch_size = {args.batch_size}
max_steps = {args.warmup + args.steps}
lr_scheduler = "constant"
warmup_ratio = 0.0
max_grad_norm = 1.0
shuffle = false
chunk_size = {args.chunk_size}
seed = {args.seed}

[output]
dir = "{work / 'run'}"
"""


# ---------------------------------------------------------------------------------------------------------
# Helpers for the contender processes


def _peak_memory_mb(cuda: bool) -> float:
    import resource

    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def _result(args, name: str, times: list[float], tokens: list[int], first_loss: float, startup: float,
            cpu_times: list[float], **extra) -> dict:
    import torch

    cuda = args.device.startswith("cuda")
    timed_t, timed_n = times[args.warmup:], tokens[args.warmup:]
    return {"contender": name, "steps": len(timed_t), "warmup_steps": args.warmup,
            "step_seconds": timed_t, "step_tokens": timed_n,
            "tokens_per_s": sum(timed_n) / sum(timed_t), "seconds_per_step": sum(timed_t) / len(timed_t),
            "cpu_seconds_per_step": sum(cpu_times[args.warmup:]) / len(timed_t),
            "tokens_per_cpu_s": sum(timed_n) / sum(cpu_times[args.warmup:]),
            "first_loss": first_loss, "startup_s": startup, "peak_memory_mb": _peak_memory_mb(cuda),
            "memory_kind": "cuda_max_memory_allocated" if cuda else "max_rss",
            "loadavg_end": os.getloadavg()[0], "threads": torch.get_num_threads(), **extra}


def _rdro_losses(logratios, labels, alpha: float):
    """RDRO per-example losses written out independently of rdro_cli.losses (the published formula)."""
    import torch.nn.functional as F

    chosen = F.softplus(-logratios) + alpha * F.softplus(logratios)
    rejected = (1.0 - alpha) * F.softplus(logratios)
    return chosen.where(labels, rejected)


# ---------------------------------------------------------------------------------------------------------
# Setup: model files, rows, the real prepare and logprobs stages (logprobs timed)


def setup_main(args) -> dict:
    work = Path(args.work)
    train_rows, test_rows = split_rows(args)
    vocab = min(ARCHS[args.arch]["vocab_size"], 32000)
    build_device = "cuda" if args.device.startswith("cuda") else "cpu"
    for name, seed in (("ref", args.seed), ("policy", args.seed + 1)):
        build_tokenizer(work / name, vocab)
        build_model(work / name, args.arch, args.dtype, build_device, seed)
        if args.mfu:  # MFU measures throughput only: policy = reference, one set of weights on disk
            break
    if args.mfu:
        os.symlink(work / "ref", work / "policy")
    as_json = [dict(zip(("prompt", "completion"), as_messages(p, c), strict=True), label=lab)
               for p, c, lab in train_rows]
    test_json = [dict(zip(("prompt", "completion"), as_messages(p, c), strict=True), label=lab)
                 for p, c, lab in test_rows]
    (work / "rows.json").write_text(json.dumps({"train": as_json, "test": test_json}))
    alpha = sum(lab for _, _, lab in train_rows) / len(train_rows)  # = loss.alpha "auto"
    (work / "recipe.toml").write_text(recipe_text(args, work, alpha))

    import datasets

    from rdro_cli import logprobs, prepare
    from rdro_cli.recipe import load_recipe

    cfg = load_recipe(work / "recipe.toml")
    data_dir = prepare.run(cfg)
    prepared = datasets.load_from_disk(str(data_dir))["train"]
    expected = [row_ids(p, c) for p, c, _ in train_rows]
    same = prepared["input_ids"] == [e[0] for e in expected] and \
        prepared["completion_start"] == [e[1] for e in expected]
    if not same:
        raise SystemExit("train_bench: `rdro prepare` tokenised the rows differently than expected")
    tokens = sum(len(e[0]) for e in expected) + sum(len(row_ids(p, c)[0]) for p, c, _ in test_rows)
    _sync(args.device.startswith("cuda"))
    began = time.perf_counter()
    logprobs.run(cfg, force=True)
    _sync(args.device.startswith("cuda"))
    seconds = time.perf_counter() - began
    return {"contender": "setup", "alpha": alpha, "train_rows": len(train_rows), "test_rows": len(test_rows),
            "logprobs_seconds": seconds, "logprobs_tokens": tokens, "logprobs_tokens_per_s": tokens / seconds,
            "logprobs_peak_memory_mb": _peak_memory_mb(args.device.startswith("cuda")),
            "train_tokens": sum(len(e[0]) for e in expected),
            "train_completion_tokens": sum(len(e[0]) - e[1] for e in expected)}


# ---------------------------------------------------------------------------------------------------------
# (a) rdro train


def contender_a(args, setup: dict, lora: bool = False) -> dict:
    import torch

    from rdro_cli import train
    from rdro_cli.recipe import load_recipe
    from rdro_cli.training import loop as train_loop_module

    work = Path(args.work)
    cuda = args.device.startswith("cuda")
    sets = [f"lora.enabled={'true' if lora else 'false'}", *args.set_a]
    if args.gradient_checkpointing_a:
        sets.append("train.gradient_checkpointing=true")
    cfg = load_recipe(work / "recipe.toml", sets)
    times, tokens, marks, cpu_times = [], [], {}, []
    original_step, original_loop = train_loop_module._optimizer_step, train_loop_module.train_loop

    def timed_step(session, units):  # the loop looks this name up per step
        _sync(cuda)
        began, cpu = time.perf_counter(), time.process_time()
        record = original_step(session, units)
        _sync(cuda)
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu)
        tokens.append(int(record["tokens"]))
        return record

    def marked_loop(*a, **k):
        marks["loop"] = time.perf_counter()
        result = original_loop(*a, **k)
        marks["loop_end"] = time.perf_counter()
        return result

    train_loop_module._optimizer_step, train_loop_module.train_loop = timed_step, marked_loop
    began = time.perf_counter()
    out = train.run(cfg, out=work / f"train-a-{os.getpid()}", force=True)
    finished = time.perf_counter()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    model = None
    if args.mfu:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "policy"))
    extra = {"metrics_tokens_per_s": [m["tokens_per_s"] for m in metrics],
             "metrics_mfu": [m.get("mfu") for m in metrics], "set_a": list(args.set_a),
             "save_seconds": finished - marks["loop_end"], "lora": lora,
             "gradient_checkpointing": bool(args.gradient_checkpointing_a)}
    if model is not None:
        extra["params"] = model.num_parameters()
    return _result(args, "a", times, tokens, metrics[0]["loss"], marks["loop"] - began, cpu_times, **extra)


# ---------------------------------------------------------------------------------------------------------
# (b), (c) TRL


def _trl_trainer_class():
    import torch
    from trl import KTOTrainer
    from trl.models.utils import disable_gradient_checkpointing

    class RDROKTOTrainer(KTOTrainer):
        """KTOTrainer with RDRO's per-example loss in place of KTO's; every forward is TRL's own."""

        def __init__(self, *a, rdro_alpha: float, **k):
            self.rdro_alpha, self.first_loss, self.step_tokens, self.precompute_seconds = rdro_alpha, None, [], 0.0
            super().__init__(*a, **k)

        def _precompute_ref_logps(self, *a, **k):
            began = time.perf_counter()
            result = super()._precompute_ref_logps(*a, **k)
            self.precompute_seconds += time.perf_counter() - began
            return result

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v)
                     for k, v in inputs.items()}
            kl_logps = self._compute_kl_logps(model, batch)  # TRL's no-grad policy pass over mismatched pairs
            model_kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                            "use_cache": False}
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            seq_len = batch["input_ids"].size(1) - 1
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            logps = outputs.log_probs[:, -seq_len:].sum(-1)
            if self.precompute_ref_logps:
                ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_KL_logps")
            else:
                with torch.no_grad(), disable_gradient_checkpointing(self.model,
                                                                     self.args.gradient_checkpointing_kwargs):
                    ref_kl_logps = self._compute_kl_logps(self.ref_model, batch)
                    ref_out = self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
                    ref_logps = ref_out.log_probs[:, -seq_len:].sum(-1)
            if self.calculate_KL:  # computed and logged as the published code does; RDRO's loss ignores it
                kl = self.accelerator.gather_for_metrics((kl_logps - ref_kl_logps).mean().detach()).mean()
                self._metrics[mode]["kl"].append(kl.clamp(min=0).item())
            label = batch["label"].to(torch.bool)
            logratios = logps - ref_logps.to(logps.dtype)
            loss = _rdro_losses(logratios, label, self.rdro_alpha).mean()
            self._metrics[mode]["rewards/chosen"].append(logratios.detach()[label].nanmean().item())
            self._metrics[mode]["rewards/rejected"].append(logratios.detach()[~label].nanmean().item())
            if self.first_loss is None:
                self.first_loss = loss.item()
            self.step_tokens.append(int(batch["attention_mask"].sum()))
            return (loss, outputs) if return_outputs else loss

    return RDROKTOTrainer


def contender_trl(args, setup: dict, best: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig

    work = Path(args.work)
    cuda = args.device.startswith("cuda")
    train_rows, _ = split_rows(args)
    began = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    tokenizer = AutoTokenizer.from_pretrained(work / "policy")
    policy = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(work / "ref", dtype=dtype)
    rows = datasets.Dataset.from_list(
        [dict(zip(("prompt", "completion"), as_messages(p, c), strict=True), label=lab) for p, c, lab in train_rows])
    config = dict(output_dir=str(work / f"trl-{os.getpid()}"), per_device_train_batch_size=args.batch_size,
                  max_steps=args.warmup + args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
                  warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=args.seed, logging_steps=1,
                  save_strategy="no", report_to="none", disable_tqdm=True, max_length=args.max_length,
                  bf16=args.dtype == "bfloat16", fp16=False, use_cpu=not cuda, dataloader_num_workers=0,
                  train_sampling_strategy="sequential")
    if best:
        config.update(precompute_ref_log_probs=True, loss_type="apo_zero_unpaired", gradient_checkpointing=False,
                      precompute_ref_batch_size=args.batch_size)
    if args.trl_gradient_checkpointing != "default":
        config["gradient_checkpointing"] = args.trl_gradient_checkpointing == "on"
    kto_config = KTOConfig(**config)
    times: list[float] = []
    cpu_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            _sync(cuda)
            self.last = self.start = time.perf_counter()
            self.cpu = time.process_time()

        def on_step_end(self, *a, **k):
            _sync(cuda)
            now = time.perf_counter()
            times.append(now - self.last)
            cpu_times.append(time.process_time() - self.cpu)
            self.last, self.cpu = now, time.process_time()

    timer = StepTimer()
    trainer = _trl_trainer_class()(model=policy, ref_model=ref, args=kto_config, train_dataset=rows,
                                   processing_class=tokenizer, callbacks=[timer], rdro_alpha=setup["alpha"])
    if best:  # precomputed: TRL only keeps a reference model we passed; a user of this setting would not have one
        trainer.ref_model = None
        del ref
    prepared = trainer.train_dataset
    expected = [row_ids(p, c) for p, c, _ in train_rows]
    same_rows = [list(a) + list(b) for a, b in zip(prepared["prompt_ids"], prepared["completion_ids"],
                                                   strict=True)] == [e[0] for e in expected]
    trainer.train()
    return _result(args, "c" if best else "b", times, trainer.step_tokens, trainer.first_loss,
                   timer.start - began, cpu_times, rows_match=same_rows, precompute_seconds=trainer.precompute_seconds,
                   gradient_checkpointing=bool(kto_config.gradient_checkpointing),
                   kl_passes=bool(trainer.calculate_KL), reference_in_memory=trainer.ref_model is not None)


# ---------------------------------------------------------------------------------------------------------
# (d) plain PyTorch


def _full_vocab_logps(model, input_ids, attention_mask, completion_mask):
    """The plain way: [batch, seq, vocab] logits, log_softmax (at least float32) everywhere, gather, mask, sum."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = torch.log_softmax(logits.float() if logits.dtype != torch.float64 else logits, dim=-1)[:, :-1]
    token_logps = logps.gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)
    return (token_logps * completion_mask[:, 1:]).sum(1)


def contender_d(args, setup: dict) -> dict:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    work = Path(args.work)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    train_rows, _ = split_rows(args)
    began = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(work / "policy", dtype=getattr(torch, args.dtype)).to(device)
    model.train()
    exact = args.dtype == "float64"  # the first-loss reference value: float64 policy and reference, no artifact
    if exact:
        ref_model = AutoModelForCausalLM.from_pretrained(work / "ref", dtype=torch.float64).to(device)
    else:
        ref_logps = load_file(str(work / "run" / "logprobs" / "train.safetensors"))["ref_logps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    startup = time.perf_counter() - began
    times, tokens, first_loss, cpu_times = [], [], None, []
    for step in range(args.warmup + args.steps):
        _sync(cuda)
        began, cpu = time.perf_counter(), time.process_time()
        index = list(range(step * args.batch_size, (step + 1) * args.batch_size))
        seqs = [row_ids(*train_rows[i][:2]) for i in index]
        width = max(len(ids) for ids, _ in seqs)
        input_ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        completion_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for b, (ids, start) in enumerate(seqs):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            completion_mask[b, start: len(ids)] = True
        input_ids, attention_mask, completion_mask = (t.to(device) for t in (input_ids, attention_mask,
                                                                             completion_mask))
        s_pol = _full_vocab_logps(model, input_ids, attention_mask, completion_mask)
        if exact:
            with torch.no_grad():
                s_ref = _full_vocab_logps(ref_model, input_ids, attention_mask, completion_mask)
        else:
            s_ref = ref_logps[index].to(device)
        labels = torch.tensor([train_rows[i][2] for i in index], device=device)
        loss = _rdro_losses(s_pol - s_ref, labels, setup["alpha"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        first_loss = value if first_loss is None else first_loss
        del s_pol, loss
        _sync(cuda)
        times.append(time.perf_counter() - began)
        cpu_times.append(time.process_time() - cpu)
        tokens.append(int(attention_mask.sum()))
    return _result(args, "d", times, tokens, first_loss, startup, cpu_times)


def contender_main(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.contender == "setup":
        result = setup_main(args)
    else:
        setup = json.loads((Path(args.work) / "setup.json").read_text())
        result = {"a": lambda: contender_a(args, setup, lora=args.lora),
                  "b": lambda: contender_trl(args, setup, best=False),
                  "c": lambda: contender_trl(args, setup, best=True),
                  "d": lambda: contender_d(args, setup)}[args.contender]()
    result["loadavg"] = os.getloadavg()
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------------------------
# Driver: set up once, alternate the contenders in fresh subprocesses, compare, report


def _subprocess(argv: list[str], log: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1", PYTHONWARNINGS="ignore")
    with log.open("a") as err:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"train_bench: subprocess {' '.join(argv[:2])} failed (exit {done.returncode}):\n{tail}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def _common_argv(args) -> list[str]:
    argv = ["--work", str(args.work), "--arch", args.arch, "--device", args.device, "--dtype", args.dtype,
            "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--train-rows", str(args.train_rows), "--test-rows", str(args.test_rows), "--seed", str(args.seed),
            "--max-length", str(args.max_length), "--lr", repr(args.lr), "--chunk-size", str(args.chunk_size),
            "--max-tokens-per-batch", str(args.max_tokens_per_batch),
            "--trl-gradient-checkpointing", args.trl_gradient_checkpointing]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.mfu:
        argv.append("--mfu")
    if args.gradient_checkpointing_a:
        argv.append("--gradient-checkpointing-a")
    for item in args.set_a:
        argv += ["--set-a", item]
    return argv


def _ratio(x, y):
    return None if x is None or y is None or y == 0 else x / y


def _amortised(train_tps, ref_tps):
    """Tokens/s over one epoch when the reference log-probs of every token are computed once beforehand."""
    return None if train_tps is None or not ref_tps else 1.0 / (1.0 / train_tps + 1.0 / ref_tps)


def summarize(args, setup: dict, runs: dict[str, list[dict]], exact: float | None = None) -> dict:
    def med(c, key):
        values = [r[key] for r in runs.get(c, []) if r.get(key) is not None]
        return statistics.median(values) if values else None

    tps = {c: med(c, "tokens_per_s") for c in CONTENDERS}
    mem = {c: med(c, "peak_memory_mb") for c in CONTENDERS}
    first = {c: med(c, "first_loss") for c in CONTENDERS}
    spread = {c: (max(r["first_loss"] for r in rs) - min(r["first_loss"] for r in rs)) for c, rs in runs.items()}
    diffs = [abs(first[c] - first["a"]) for c in ("b", "d") if first[c] is not None and first["a"] is not None]
    ref_tps = setup["logprobs_tokens_per_s"]
    precompute = med("c", "precompute_seconds")
    c_ref_tps = setup["train_tokens"] / precompute if precompute else None
    amortised = {"a": _amortised(tps["a"], ref_tps), "b": tps["b"], "c": _amortised(tps["c"], c_ref_tps),
                 "d": _amortised(tps["d"], ref_tps)}
    summary = {
        "speedup_vs_trl": _ratio(tps["a"], tps["b"]), "speedup_vs_trl_best": _ratio(tps["a"], tps["c"]),
        "speedup_vs_plain": _ratio(tps["a"], tps["d"]),
        "memory_ratio_vs_trl": _ratio(mem["a"], mem["b"]), "memory_ratio_vs_trl_best": _ratio(mem["a"], mem["c"]),
        "memory_ratio_vs_plain": _ratio(mem["a"], mem["d"]),
        "first_loss_abs_diff": max(diffs) if diffs else None,
        "first_loss_abs_diff_c": abs(first["c"] - first["a"]) if first["c"] is not None and first["a"] is not None
        else None,
        "first_loss": first, "first_loss_spread_over_rounds": spread, "first_loss_float64": exact,
        "first_loss_error_vs_float64": {c: abs(first[c] - exact) if first[c] is not None and exact is not None
                                        else None for c in CONTENDERS},
        "tokens_per_s": tps, "seconds_per_step": {c: med(c, "seconds_per_step") for c in CONTENDERS},
        "tokens_per_cpu_s": {c: med(c, "tokens_per_cpu_s") for c in CONTENDERS},
        "speedup_vs_plain_cpu_time": _ratio(med("a", "tokens_per_cpu_s"), med("d", "tokens_per_cpu_s")),
        "speedup_vs_trl_cpu_time": _ratio(med("a", "tokens_per_cpu_s"), med("b", "tokens_per_cpu_s")),
        "speedup_vs_trl_best_cpu_time": _ratio(med("a", "tokens_per_cpu_s"), med("c", "tokens_per_cpu_s")),
        "peak_memory_mb": mem, "startup_s": {c: med(c, "startup_s") for c in CONTENDERS},
        "logprobs_stage": {k: setup[k] for k in ("logprobs_seconds", "logprobs_tokens", "logprobs_tokens_per_s",
                                                 "logprobs_peak_memory_mb")},
        "trl_precompute_seconds": precompute, "trl_precompute_tokens_per_s": c_ref_tps,
        "tokens_per_s_amortised": amortised,
        "speedup_vs_trl_amortised": _ratio(amortised["a"], amortised["b"]),
        "speedup_vs_trl_best_amortised": _ratio(amortised["a"], amortised["c"]),
        "speedup_vs_plain_amortised": _ratio(amortised["a"], amortised["d"]),
        "settings": {c: {k: runs[c][0].get(k) for k in ("gradient_checkpointing", "kl_passes",
                                                        "reference_in_memory", "rows_match") if k in runs[c][0]}
                     for c in runs},
        "targets": TARGETS,
    }
    met = {}
    for key, target in TARGETS.items():
        value = summary[key]
        if value is not None:
            met[key] = value >= target if key.startswith("speedup") else value <= target
    tolerance = 1e-5 if args.dtype == "float32" else 5e-2
    if summary["first_loss_abs_diff"] is not None:
        met["first_loss_abs_diff"] = summary["first_loss_abs_diff"] <= tolerance
    summary["first_loss_tolerance"] = tolerance
    summary["targets_met"] = met
    return summary


def print_report(args, setup: dict, summary: dict, meta: dict) -> None:
    print(f"\ntrain_bench: {meta['device_name']}; arch {args.arch} ({meta['params'] / 1e6:.1f}M params), "
          f"{args.dtype}, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"{args.repeats} round(s); train rows {setup['train_rows']} ({setup['train_tokens']} tokens, "
          f"{setup['train_completion_tokens']} completion); loadavg {meta['loadavg_before']:.2f} -> "
          f"{meta['loadavg_after']:.2f}")
    memory = "peak GPU MB" if args.device.startswith("cuda") else "peak RSS MB"
    header = f"{'contender':<46}{'tokens/s':>10}{'s/step':>9}{memory:>13}{'start-up s':>12}{'first loss':>13}" \
             f"{'a / x speed':>13}{'a / x mem':>11}"
    print(header)
    print("-" * len(header))
    tps, mem = summary["tokens_per_s"], summary["peak_memory_mb"]
    for c, name in CONTENDERS.items():
        if tps[c] is None:
            continue
        speed = "" if c == "a" else f"{_ratio(tps['a'], tps[c]) or 0:.2f}x"
        memr = "" if c == "a" else f"{_ratio(mem['a'], mem[c]) or 0:.2f}"
        print(f"({c}) {name:<42}{tps[c]:>10.1f}{summary['seconds_per_step'][c]:>9.2f}{mem[c]:>13.0f}"
              f"{summary['startup_s'][c]:>12.1f}{summary['first_loss'][c]:>13.7f}{speed:>13}{memr:>11}")
    lp = summary["logprobs_stage"]
    cpu = summary["tokens_per_cpu_s"]
    print("tokens per CPU-second (process user+sys time, less sensitive to other load): "
          + ", ".join(f"({c}) {cpu[c]:.1f}" for c in CONTENDERS if cpu[c] is not None))
    print(f"rdro logprobs stage: {lp['logprobs_tokens']} tokens in {lp['logprobs_seconds']:.1f} s "
          f"({lp['logprobs_tokens_per_s']:.0f} tokens/s incl. model load), peak {lp['logprobs_peak_memory_mb']:.0f} MB")
    am = summary["tokens_per_s_amortised"]
    if am["a"] is not None:
        parts = [f"({c}) {am[c]:.1f}" for c in CONTENDERS if am[c] is not None]
        print("amortised over one epoch (reference log-probs computed once per token beforehand): "
              + ", ".join(parts) + " tokens/s")
    if summary["first_loss_abs_diff"] is not None:
        print(f"first-batch loss: max |(b),(d) - (a)| = {summary['first_loss_abs_diff']:.2e} "
              f"(tolerance {summary['first_loss_tolerance']:g})")
    if summary["first_loss_float64"] is not None:
        errors = ", ".join(f"({c}) {e:.1e}" for c, e in summary["first_loss_error_vs_float64"].items()
                           if e is not None)
        print(f"first-batch loss in float64 (plain path, float64 policy and reference): "
              f"{summary['first_loss_float64']:.7f}; |float32 - float64|: {errors}")
    for key, ok in summary["targets_met"].items():
        target = TARGETS.get(key, summary["first_loss_tolerance"])
        sign = ">=" if key.startswith("speedup") else "<="
        print(f"  {key:<24} {summary[key]:.3g}  target {sign} {target:g}  {'met' if ok else 'MISSED'}")


def mfu_main(args) -> dict:
    work = Path(args.work)
    setup = _subprocess(["--contender", "setup", *_common_argv(args)], work / "log.txt")
    (work / "setup.json").write_text(json.dumps(setup))
    peak = args.peak_flops
    if not peak:  # the product's own table (rdro_cli.throughput), H100 SXM's 989e12 if the GPU is unknown
        import torch

        from rdro_cli.lm import throughput

        name = torch.cuda.get_device_name() if args.device.startswith("cuda") else None
        peak = throughput.peak_flops(name) or 989e12
    out = {"mfu_formula": MFU_FORMULA, "peak_flops": peak, "arch": args.arch, "batch_size": args.batch_size,
           "set_a": list(args.set_a)}
    for lora in (False, True):
        argv = ["--contender", "a", *_common_argv(args)] + (["--lora"] if lora else [])
        result = _subprocess(argv, work / "log.txt")
        flops = 6 * result["params"] * sum(result["step_tokens"])
        mfu = flops / sum(result["step_seconds"]) / peak
        key = "lora" if lora else "full"
        product = [m for m in result["metrics_mfu"][args.warmup:] if m is not None]
        out[key] = {"tokens_per_s": result["tokens_per_s"], "seconds_per_step": result["seconds_per_step"],
                    "peak_memory_mb": result["peak_memory_mb"], "params": result["params"], "mfu": mfu,
                    # what `rdro train` itself logs in metrics.jsonl (median over the timed steps)
                    "metrics_mfu": statistics.median(product) if product else None}
        print(f"(a) {key:<5} {result['tokens_per_s']:>10.0f} tokens/s  {result['seconds_per_step']:.3f} s/step  "
              f"peak {result['peak_memory_mb']:.0f} MB  MFU {mfu * 100:.1f}%  ({MFU_FORMULA})", flush=True)
    out["mfu_full"], out["mfu_lora"] = out["full"]["mfu"], out["lora"]["mfu"]
    return out


def driver_main(args) -> dict:
    import torch

    work = Path(args.work)
    log = work / "log.txt"
    load_before = os.getloadavg()[0]
    if args.mfu:
        return mfu_main(args)
    setup = _subprocess(["--contender", "setup", *_common_argv(args)], log)
    (work / "setup.json").write_text(json.dumps(setup))
    print(f"setup: {setup['train_rows']} train rows, alpha {setup['alpha']:.4f}; logprobs stage "
          f"{setup['logprobs_seconds']:.1f} s", flush=True)
    runs: dict[str, list[dict]] = {}
    for round_ in range(args.repeats):
        order = args.contenders if round_ % 2 == 0 else args.contenders[::-1]
        for c in order:
            result = _subprocess(["--contender", c, *_common_argv(args)], log)
            runs.setdefault(c, []).append(result)
            print(f"round {round_ + 1} ({c}) {result['tokens_per_s']:8.1f} tokens/s  "
                  f"{result['seconds_per_step']:.2f} s/step  peak {result['peak_memory_mb']:.0f} MB  "
                  f"first loss {result['first_loss']:.7f}  loadavg {result['loadavg'][0]:.2f}", flush=True)
    # The exact first-batch loss: (d)'s path with float64 policy and float64 reference forwards, one step. In
    # float32 the completion log-prob sums (~ -10 per token under random weights) carry rounding of ~1e-4, so
    # every contender's float32 loss is also compared with this value.
    exact_argv = _common_argv(args)
    for flag, value in (("--dtype", "float64"), ("--steps", "1"), ("--warmup", "0")):
        exact_argv[exact_argv.index(flag) + 1] = value
    exact = _subprocess(["--contender", "d", *exact_argv], log)["first_loss"] if "d" in args.contenders else None
    summary = summarize(args, setup, runs, exact)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(work / "policy")
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        params = AutoModelForCausalLM.from_config(config).num_parameters()
    meta = {"device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
            "params": params, "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}
    print_report(args, setup, summary, meta)
    versions = {"torch": torch.__version__}
    for package in ("transformers", "trl", "peft"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            versions[package] = None
    summary.update(meta=meta, versions=versions, runs=runs, setup=setup,
                   config={k: v for k, v in vars(args).items() if k != "work"})
    return summary


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, short rows, 2 steps, 1 round (smoke)")
    parser.add_argument("--contenders", default="abcd", help="which contenders to run, e.g. ad")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="llama-cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float64"), default="float32",
                        help="weights dtype (float64: used internally for the exact first-batch loss)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of alternating contenders")
    parser.add_argument("--train-rows", type=int, default=0, help="default: exactly the rows the steps take")
    parser.add_argument("--test-rows", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--chunk-size", type=int, default=1024, help="train/logprobs chunk_size of (a)")
    parser.add_argument("--max-tokens-per-batch", type=int, default=16384, help="logprobs stage token budget")
    parser.add_argument("--trl-gradient-checkpointing", choices=("default", "on", "off"), default="default",
                        help="override gradient checkpointing for (b) and (c) (default: (b) TRL's default, "
                             "on; (c) off)")
    parser.add_argument("--gradient-checkpointing-a", action="store_true", help="train.gradient_checkpointing for (a)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mfu", action="store_true", help="(a) only, full and LoRA: model-FLOP utilisation")
    parser.add_argument("--peak-flops", type=float, default=0.0,
                        help="peak FLOP/s for MFU (default: rdro_cli.throughput's bf16 table for the GPU, else "
                             "989e12, H100 SXM dense bf16)")
    parser.add_argument("--set-a", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe setting for (a), e.g. train.packing=on (repeatable)")
    parser.add_argument("--out", type=Path, help="also write the final JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (printed)")
    # internal: one contender in this process
    parser.add_argument("--contender", choices=("setup", "a", "b", "c", "d"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.arch, args.steps, args.warmup, args.repeats, args.max_length = "tiny", 1, 1, 1, 128
        args.test_rows = 2
    if not args.train_rows:
        args.train_rows = (args.warmup + args.steps) * args.batch_size
    args.contenders = [c for c in args.contenders if c in CONTENDERS]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.contender:
        contender_main(args)
        return
    if "a" not in args.contenders and not args.mfu:
        raise SystemExit("train_bench: contender a (rdro train) is the one compared; include it in --contenders")
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        args.work = tmp
        try:
            summary = driver_main(args)
        finally:
            if args.keep:
                kept = Path(tempfile.mkdtemp(prefix="train-bench-kept-"))
                subprocess.run(["cp", "-r", f"{tmp}/.", str(kept)], check=False)
                print(f"work dir kept in {kept}", file=sys.stderr)
    line = json.dumps(summary, default=str)  # config holds paths (--out)
    if args.out:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
