"""merge: fold a LoRA adapter into its base model -> a plain transformers checkpoint.

The merged weights are ``W + (lora_alpha / r) · B A`` per adapted module (peft ``merge_and_unload``), saved
as sharded safetensors with the tokenizer and generation config, so ``AutoModelForCausalLM.from_pretrained``
loads the result with no peft involved. Before loading anything big, the adapter is checked against the
base: every module the adapter's weights touch must exist in the base with the shapes they expect, and the
base's architecture must agree with the config of the base the adapter records.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rdro_cli.errors import UserError
from rdro_cli.lm import fingerprints, loading
from rdro_cli.lm.loading import ADAPTER_CONFIG, TOKENIZER_FILES
from rdro_cli.lm.peft_compat import building_peft_model
from rdro_cli.recipe import Recipe
from rdro_cli.store import digests, diskspace, durable, manifests, outputs
from rdro_cli.training import model_card

ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
MAX_SHARD_SIZE = "5GB"
# Config fields that must agree between the given base and the base the adapter was trained on.
ARCHITECTURE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size",
                       "num_attention_heads", "num_key_value_heads")
PROVENANCE_FILES = ("recipe.toml",)


def _console():
    from rdro_cli.progress import console

    return console


def read_adapter_config(adapter: Path) -> dict:
    try:
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except ValueError as err:
        raise UserError(f"{adapter / ADAPTER_CONFIG}: not valid JSON ({err})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{adapter}: a {config.get('peft_type')} adapter; only LoRA adapters can be merged")
    return config


def _base_config(name: str, cfg: Recipe):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, revision=cfg.model.revision or None,
                                          trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config of base model {name!r}: {' '.join(str(err).split())[:200]}") \
            from None


def _expected_shapes(adapter: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Adapter tensor name (without the peft prefix) -> (kind, shape) as stored in its safetensors."""
    from safetensors import safe_open

    weights = adapter / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"{adapter}: no {ADAPTER_WEIGHTS} (only safetensors adapters are supported)")
    shapes = {}
    with safe_open(str(weights), "pt") as handle:
        for key in handle.keys():
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            shapes[name] = tuple(handle.get_slice(key).get_shape())
    return shapes


def check_adapter_fits(adapter: Path, adapter_config: dict, base: str, cfg: Recipe) -> None:
    """One-line UserError when the adapter cannot have been trained on (a model shaped like) `base`.

    Builds the base on the meta device (no weights read) and checks every adapter tensor against the module
    it adapts: ``lora_A`` is ``[r, in_features]``, ``lora_B`` ``[out_features, r]``, embedding adapters
    ``[r, num_embeddings]`` / ``[dim, r]``, saved full modules (``modules_to_save``) the base parameter's shape.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = _base_config(base, cfg)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    for name, shape in _expected_shapes(adapter).items():
        problem = _shape_problem(skeleton, params, name, shape)
        if problem:
            raise UserError(f"{adapter}: does not fit base model {base!r}: {problem}; "
                            f"pass the base it was trained on with --base")

    # Shapes can agree while the architecture does not (more layers, another vocabulary behind an
    # unadapted head): compare with the recorded base's config when it is at hand.
    recorded = adapter_config.get("base_model_name_or_path") or ""
    if recorded and recorded != base and Path(recorded).expanduser().is_dir():
        trained_on = _base_config(recorded, cfg)
        diffs = [f"{f} {getattr(trained_on, f, None)} vs {getattr(config, f, None)}" for f in ARCHITECTURE_FIELDS
                 if getattr(trained_on, f, None) != getattr(config, f, None)]
        if diffs:
            raise UserError(f"{adapter}: trained on {recorded!r}, whose config differs from base {base!r} "
                            f"({'; '.join(diffs)}); pass the matching base with --base")


# adapter tensor marker -> (attribute of the adapted module, which dimension of the tensor must equal it)
LORA_SHAPES = {".lora_A.": ("in_features", -1), ".lora_B.": ("out_features", 0),
               ".lora_embedding_A": ("num_embeddings", -1), ".lora_embedding_B": ("embedding_dim", 0)}


def _shape_problem(skeleton, params: dict, name: str, shape: tuple[int, ...]) -> str | None:
    for marker, (attribute, dim) in LORA_SHAPES.items():
        if marker in name:
            module_name = name.split(marker)[0]
            try:
                module = skeleton.get_submodule(module_name)
            except AttributeError:
                return f"the adapter has weights for {module_name}, which the base does not have"
            have = getattr(module, attribute, None)
            if have is not None and have != shape[dim]:
                return f"{module_name}.{attribute} is {have} in the base but {shape[dim]} in the adapter"
            return None
    if "lora_" in name:  # DoRA magnitudes and the like: only the module has to exist
        module_name = name.split(".lora_")[0]
        return None if module_name in dict(skeleton.named_modules()) else \
            f"the adapter has weights for {module_name}, which the base does not have"
    if name not in params:  # a fully saved module (modules_to_save)
        return f"the adapter saves {name}, which the base does not have"
    if tuple(params[name].shape) != shape:
        return f"{name} has shape {tuple(params[name].shape)} in the base but {shape} in the adapter"
    return None


def recorded_base(adapter: Path) -> tuple[str | None, str | None]:
    """(name, fingerprint) of the base an rdro adapter was trained on: its model card records both, and an
    adapter still in its run's `train/final` has the train manifest's; (None, None) for a foreign adapter."""
    from huggingface_hub import ModelCard

    if (adapter / model_card.CARD_FILE).is_file():
        try:
            block = ModelCard.load(adapter / model_card.CARD_FILE).data.to_dict().get("rdro") or {}
        except Exception:  # noqa: BLE001 - a card we cannot parse records nothing we can use
            block = {}
        if block.get("base_model_fingerprint"):
            return block.get("base_model"), block["base_model_fingerprint"]
    manifest = manifests.training_manifest(adapter)
    if manifest and manifest.get("inputs", {}).get("model"):
        return manifest.get("config", {}).get("model", {}).get("name"), manifest["inputs"]["model"]
    return None, None


def _check_recorded_base(adapter: Path, base: str, base_fingerprint: str) -> None:
    """Refuses a base whose weights are not the ones the adapter was trained on, also when every shape fits
    (a fine-tune of the same architecture, another checkpoint of the same model)."""
    name, fingerprint = recorded_base(adapter)
    if fingerprint and fingerprint != base_fingerprint:
        raise UserError(f"{adapter}: was trained on {name or 'another base'!r}, and base {base!r} holds other "
                        f"weights (same shapes, different content); pass the base it was trained on with --base")


def _merge_dtype(cfg: Recipe, config) -> str:
    """auto = the dtype the base was saved in (merging a 7B model in float32 on CPU would need 28 GB)."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    saved = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    saved = saved.removeprefix("torch.")
    return saved if saved in ("float32", "bfloat16", "float16") else "float32"


def _save_tokenizer(adapter: Path, base: str, tmp: Path, cfg: Recipe) -> None:
    from rdro_cli.lm.loading import load_tokenizer

    # The adapter dir's tokenizer wins: training may have set a chat template or a pad token.
    source = adapter if any((adapter / f).is_file() for f in TOKENIZER_FILES) else base
    load_tokenizer(source, revision=None if source is adapter else cfg.model.revision or None,
                   trust_remote_code=cfg.model.trust_remote_code).save_pretrained(tmp)


def run(cfg: Recipe, *, adapter: Path | None = None, out: Path | None = None, force: bool = False) -> Path:
    started = time.time()
    adapter = Path(adapter or cfg.run_dir / "train" / "final")
    out = Path(out or cfg.run_dir / "merged")
    if not adapter.is_dir():
        raise UserError(f"{adapter}: adapter directory does not exist; run `rdro train` first or pass --adapter")
    manifests.require_finished_model(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        if (adapter / "config.json").is_file():
            _console().print(f"merge: {adapter} is already a full model (no {ADAPTER_CONFIG}); "
                             f"nothing to merge, use it as it is")
            return adapter
        raise UserError(f"{adapter}: neither a LoRA adapter ({ADAPTER_CONFIG}) nor a model (config.json)")
    outputs.claim(out, "merge", inputs=[adapter, *outputs.local_paths(cfg.model.name)])

    adapter_config = read_adapter_config(adapter)
    base = cfg.model.name or adapter_config.get("base_model_name_or_path") or ""
    if not base:
        raise UserError(f"{adapter}: the adapter does not record its base model; pass --base")
    check_adapter_fits(adapter, adapter_config, base, cfg)

    inputs = {"adapter": fingerprints.model_fingerprint(adapter),
              "base": fingerprints.model_fingerprint(base, revision=cfg.model.revision or None)}
    _check_recorded_base(adapter, base, inputs["base"])
    base_config = _base_config(base, cfg)
    dtype = _merge_dtype(cfg, base_config)
    fingerprint = digests.fingerprint_json({"inputs": inputs, "dtype": dtype})
    if not force and manifests.is_done(out, fingerprint):
        _console().print(f"merge: {out} is up to date (use --force to recompute)", soft_wrap=True)
        return out

    from peft import PeftModel

    from rdro_cli.progress import status

    with status(f"merge: folding {adapter} into {base} ({dtype})"):
        model = loading.load_model(base, dtype=dtype, device="cpu", revision=cfg.model.revision or None,
                                    trust_remote_code=cfg.model.trust_remote_code,
                                    allow_pickle=cfg.model.allow_pickle)
        with building_peft_model():
            peft_model = PeftModel.from_pretrained(model, str(adapter))
        merged_modules = sum(1 for name, _ in peft_model.named_modules() if name.endswith(".lora_A"))
        merged = peft_model.merge_and_unload()
        n_params = sum(p.numel() for p in merged.parameters())
        # the merged weights, plus the tokenizer and provenance files copied next to them
        need = sum(p.numel() * p.element_size() for p in merged.parameters()) + diskspace.tree_size(
            adapter, skip_suffixes=(".safetensors", ".bin"))
        with diskspace.writing(out, need), durable.atomic_dir(out) as tmp:
            merged.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
            if merged.generation_config is not None and not (tmp / "generation_config.json").is_file():
                merged.generation_config.save_pretrained(tmp)
            _save_tokenizer(adapter, base, tmp, cfg)
            for name in PROVENANCE_FILES:
                if (adapter / name).is_file():
                    shutil.copy2(adapter / name, tmp / name)
            # the merged model computes what the adapter does: an eval of the adapter is its eval too
            run_dirs = dict.fromkeys([cfg.run_dir, adapter.parent.parent, out.parent])
            model_card.write(tmp, model_card.merged_metadata(adapter, base), name=out.resolve().parent.name,
                             eval_tasks=model_card.eval_results_for(inputs["adapter"],
                                                                    [d / "eval" for d in run_dirs]))
            manifests.write_manifest(
                tmp, stage="merge", fingerprint=fingerprint, inputs=inputs, config=cfg.to_dict(),
                counts={"lora_modules": merged_modules, "parameters": n_params}, started=started,
                adapter=str(adapter), base_model=base, dtype=dtype,
            )
    _console().print(f"merge: folded {merged_modules} LoRA modules into {base} -> {out}")
    return out
