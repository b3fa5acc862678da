"""Model cards for the models rdro writes: `<run>/train/final` (weights or LoRA adapter) and `<run>/merged`.

A card is the `README.md` the Hugging Face Hub reads: YAML metadata built with `huggingface_hub`'s
`ModelCardData` (base model, library, tags, dataset, eval results as `model-index`) plus an `rdro` block with
the method and its hyper-parameters, then a body saying what the model is, how it was made and how to load
it, and the RDRO citation. The body is rendered from the metadata alone, so `merge` can rebuild the card of
the adapter it folds in (`merged_metadata`) without the training run at hand.

`base_model` and `datasets` are Hub fields: they are filled only with Hub ids. A local model or dataset
is named in the `rdro` block and in the body instead, where a wrong id could not mislead the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rdro_cli import __version__
from rdro_cli.dataprep.sources import SHORT_NAMES
from rdro_cli.losses.registry import LOSSES
from rdro_cli.recipe import Recipe
from rdro_cli.store import manifests

CARD_FILE = "README.md"
ARXIV = "2604.04410"
CITATION = f"""@misc{{rdro,
  note          = {{Relative Density Ratio Optimization (RDRO)}},
  eprint        = {{{ARXIV}}},
  archivePrefix = {{arXiv}},
  url           = {{https://arxiv.org/abs/{ARXIV}}},
}}"""




TRAIN_KEYS = ("learning_rate", "batch_size", "gradient_accumulation_steps", "epochs", "max_steps", "lr_scheduler",
              "warmup_ratio", "weight_decay", "max_grad_norm", "seed")




def _display(method: str) -> str:
    spec = LOSSES.get(method)
    return spec.display if spec and spec.display else method


def _hub_id(name: str) -> str | None:
    """`name` when it can only be a Hub id (not an existing local path), else None."""
    if not name or Path(name).expanduser().exists():
        return None
    return name


def _dataset_id(spec: str) -> str | None:
    if spec in SHORT_NAMES:  # the dataset short names `rdro prepare` accepts
        return SHORT_NAMES[spec]
    if spec == "demo" or Path(spec).suffix in (".jsonl", ".json", ".parquet", ".csv"):
        return None  # the packaged demo set, or a local file that is not there any more
    return _hub_id(spec)


def training_metadata(cfg: Recipe, *, adapter: bool, steps: int, alpha: float | None, dataset: str,
                      processes: int = 1, base_fingerprint: str | None = None,
                      reference: dict | None = None) -> dict[str, Any]:
    """Card metadata of a model `train` wrote from `cfg` (the resolved recipe).

    `base_fingerprint` (modeling.model_fingerprint of the policy's initialisation) lets `merge` refuse a base
    with other weights; `reference` ({"name", "fingerprint"}) is the model the reference log-probs came from.
    """
    spec = LOSSES[cfg.loss.name]  # its keys, with alpha recorded as resolved
    loss = {"name": cfg.loss.name, **{k: getattr(cfg.loss, k) for k in spec.recipe_keys}}
    if spec.resolved_alpha:
        loss.update(alpha=alpha, alpha_setting=cfg.loss.alpha)
    rdro = {"version": __version__, "method": cfg.loss.name, "loss": loss,
            "training": {**{k: getattr(cfg.train, k) for k in TRAIN_KEYS}, "steps": steps, "processes": processes},
            "base_model": cfg.model.name, "dataset": dataset}
    if base_fingerprint:
        rdro["base_model_fingerprint"] = base_fingerprint
    if reference:
        rdro["reference_model"] = dict(reference)
    if cfg.lora.enabled:
        rdro["lora"] = {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "dropout": cfg.lora.dropout,
                        "target_modules": list(cfg.lora.target_modules)}
    dataset_id = _dataset_id(dataset)
    return {"base_model": _hub_id(cfg.model.name), "library_name": "peft" if adapter else "transformers",
            "pipeline_tag": "text-generation", "datasets": [dataset_id] if dataset_id else None,
            "tags": ["rdro-cli", cfg.loss.name, "binary-feedback", "alignment", *(["lora"] if adapter else [])],
            "rdro": rdro}


def merged_metadata(adapter: Path, base: str) -> dict[str, Any]:
    """The merged model's metadata: the adapter's card (when rdro wrote it) as a plain transformers model."""
    from huggingface_hub import ModelCard

    metadata: dict[str, Any] = {}
    if (adapter / CARD_FILE).is_file():
        metadata = ModelCard.load(adapter / CARD_FILE).data.to_dict()
    if "rdro" not in metadata:  # an adapter from elsewhere (or PEFT's empty template): what merge knows
        metadata = {"tags": ["rdro-cli"], "rdro": {"version": __version__}}
    metadata.pop("model-index", None)  # results of the adapter's own card are re-read from the run
    metadata.pop("model_name", None)
    metadata["rdro"] = {**metadata["rdro"], "base_model": base, "merged_from": str(adapter)}
    tags = [t for t in metadata.get("tags") or [] if t != "lora"]
    return {**metadata, "base_model": _hub_id(base), "library_name": "transformers",
            "pipeline_tag": "text-generation", "tags": [*tags, "merged"]}


def eval_results_for(model_fingerprint: str, eval_dirs: list[Path]) -> dict | None:
    """`eval.json` tasks of the first finished eval artifact that evaluated exactly this model, if any."""
    for directory in eval_dirs:
        manifest = manifests.read_manifest(directory)
        if manifest and manifest.get("stage") == "eval" \
                and manifest.get("inputs", {}).get("model") == model_fingerprint:
            try:
                return json.loads((Path(directory) / "eval.json").read_text(encoding="utf-8"))["tasks"]
            except (OSError, ValueError, KeyError):
                return None
    return None


def _results(tasks: dict, dataset: str, dataset_id: str | None) -> list:
    """An `EvalResult` for every headline number of eval.json's tasks. exact_match and bbh read their own local
    task files: each gets a dataset config of its own, as the Hub groups results by task type, dataset
    (type, config, split, revision)."""
    from huggingface_hub import EvalResult

    preference = tasks.get("preference") or {}
    held_out = {"task_name": "Preference on held-out feedback", "dataset_name": dataset,
                "dataset_type": dataset_id or "local", "dataset_split": "test"}
    found = []
    if preference.get("auc") is not None:
        found.append({**held_out, "metric_type": "roc_auc", "metric_name": "AUC of the log-ratio",
                      "metric_value": preference["auc"]})
    if preference.get("pair_accuracy") is not None:
        found.append({**held_out, "metric_type": "accuracy", "metric_name": "pair accuracy",
                      "metric_value": preference["pair_accuracy"]})
    if (tasks.get("exact_match") or {}).get("accuracy") is not None:
        found.append({"task_name": "Exact match", "dataset_name": "eval.exact_match_file", "dataset_type": "local",
                      "dataset_config": "exact_match",
                      "metric_type": "exact_match", "metric_name": "exact-match accuracy",
                      "metric_value": tasks["exact_match"]["accuracy"]})
    if (tasks.get("bbh") or {}).get("mean_accuracy") is not None:
        found.append({"task_name": "BIG-Bench Hard", "dataset_name": "BIG-Bench Hard (eval.bbh_dir)",
                      "dataset_type": "local", "dataset_config": "bbh", "metric_type": "accuracy", "metric_name": "mean accuracy",
                      "metric_value": tasks["bbh"]["mean_accuracy"]})
    return [EvalResult(task_type="text-generation", **{**r, "metric_value": float(r["metric_value"])}) for r in found]


def build(metadata: dict[str, Any], *, name: str, eval_tasks: dict | None = None):
    """A `huggingface_hub.ModelCard` for `metadata` (from training_metadata or merged_metadata)."""
    from huggingface_hub import ModelCard, ModelCardData

    dataset = metadata.get("rdro", {}).get("dataset") or "unknown"
    results = _results(eval_tasks or {}, dataset, (metadata.get("datasets") or [None])[0])
    fields = {k: v for k, v in metadata.items() if v is not None}
    data = ModelCardData(**fields, model_name=name if results else None, eval_results=results or None)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(metadata, name, results)}")


def write(directory: Path, metadata: dict[str, Any], *, name: str, eval_tasks: dict | None = None) -> Path:
    path = Path(directory) / CARD_FILE
    build(metadata, name=name, eval_tasks=eval_tasks).save(path)
    return path


def _body(metadata: dict[str, Any], name: str, results) -> str:
    rdro = metadata.get("rdro", {})
    base = rdro.get("base_model") or metadata.get("base_model") or "its base model"
    base_text = f"[`{base}`](https://huggingface.co/{base})" if metadata.get("base_model") else f"`{base}`"
    method = rdro.get("method")
    merged = "merged_from" in rdro
    adapter = metadata.get("library_name") == "peft"
    what = ("a LoRA adapter for" if adapter else "the LoRA adapter of a training run merged into" if merged
            else "a fine-tune of")
    lines = [f"# {name}", ""]
    if method:
        lines += [f"{what[0].upper()}{what[1:]} {base_text}, trained with **{_display(method)}** on binary "
                  f"feedback (a thumbs up or down on single completions) by `rdro` {rdro.get('version', '')}.", ""]
    else:
        lines += [f"The LoRA adapter `{rdro.get('merged_from')}` merged into {base_text} by `rdro merge` "
                  f"{rdro.get('version', '')}; the adapter carried no rdro model card, so how it was trained "
                  f"is not recorded here.", ""]
    if method:
        lines += ["## Training", "", "| setting | value |", "|---|---|", f"| method | `{method}` |",
                  f"| dataset | `{rdro.get('dataset') or 'unknown'}` |"]
        for section, key in (("loss", "loss"), ("train", "training"), ("lora", "lora")):
            lines += [f"| {section}.{k} | `{_text(v)}` |" for k, v in rdro.get(key, {}).items() if k != "name"]
        lines.append("")
    if results:
        lines += ["## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        lines += [f"| {r.task_name} | {r.metric_name} | {r.metric_value:.4f} |" for r in results]
        lines += ["", "Measured by `rdro eval` on the held-out split of the training data (and the task files "
                      "its recipe names).", ""]
    if method:
        lines += ["## How it was made", "", "`recipe.toml` next to this card is the resolved recipe; with it the "
                  "stages re-run as", "", "```bash",
                  "rdro prepare --recipe recipe.toml   # tokenise the feedback",
                  "rdro logprobs --recipe recipe.toml  # reference log-probs, once",
                  "rdro train --recipe recipe.toml     # the policy learns against them",
                  *(["rdro merge --recipe recipe.toml     # fold the LoRA adapter into the base"] if merged else []),
                  "```", ""]
    loader = "from peft import AutoPeftModelForCausalLM as Model" if adapter else \
        "from transformers import AutoModelForCausalLM as Model"
    lines += ["## Usage", "", "```python", loader, "from transformers import AutoTokenizer", "",
              'model = Model.from_pretrained("path/to/this/model")',
              'tokenizer = AutoTokenizer.from_pretrained("path/to/this/model")', "```", "",
              "## Citation", "", f"RDRO is described in [arXiv:{ARXIV}](https://arxiv.org/abs/{ARXIV}).", "",
              "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _text(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)
