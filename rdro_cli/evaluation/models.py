"""Which model eval scores and how it is loaded: eval.model, else `<run>/merged` (when made from the current
adapter), else `<run>/train/final`; an adapter on its base; its input fingerprints; and the provenance
warnings (trained on other data or against other reference log-probs than eval is given).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rdro_cli.errors import UserError
from rdro_cli.lm.loading import ADAPTER_CONFIG, TOKENIZER_FILES
from rdro_cli.progress import console
from rdro_cli.recipe import Recipe
from rdro_cli.store import manifests


def resolve_model(cfg: Recipe) -> str:
    """eval.model, else <run>/merged when complete and made from the current adapter, else <run>/train/final."""
    if cfg.eval.model:
        return cfg.eval.model
    merged, final = cfg.run_dir / "merged", cfg.run_dir / "train" / "final"
    manifest = manifests.read_manifest(merged)
    if manifest is not None and manifest.get("stage") == "merge":
        if (final / ADAPTER_CONFIG).is_file():
            from rdro_cli.lm.fingerprints import model_fingerprint

            if manifest.get("inputs", {}).get("adapter") != model_fingerprint(final):
                console.print(f"eval: {merged} was merged from an older adapter; evaluating {final} "
                                 f"(re-run `rdro merge` to refresh it)")
                return str(final)
        return str(merged)
    if final.is_dir():
        return str(final)
    raise UserError(f"no model to evaluate: neither {merged} nor {final} exists; "
                    f"pass --model DIR or run `rdro train` first")


def _adapter_base(directory: Path, cfg: Recipe) -> str:
    recorded = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("base_model_name_or_path")
    if recorded and Path(recorded).expanduser().is_dir():
        return recorded
    base = cfg.model.name or recorded
    if not base:
        raise UserError(f"{directory}: the adapter does not record its base model; set model.name")
    return base


def check_model(name: str, cfg: Recipe) -> dict:
    """Input fingerprints of the model (and an adapter's base); one-line errors for unusable dirs."""
    from rdro_cli.lm.fingerprints import model_fingerprint

    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise UserError(f"{name}: a file; pass the model directory (with config.json)")
    if local.is_dir():
        manifests.require_finished_model(local)
        if not any((local / f).is_file() for f in ("config.json", ADAPTER_CONFIG)):
            raise UserError(f"{name}: not a model directory (no config.json or {ADAPTER_CONFIG})")
        if not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise UserError(f"{name}: no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}); save the tokenizer "
                            f"next to the model with tokenizer.save_pretrained(DIR)")
        if (local / ADAPTER_CONFIG).is_file():
            base = _adapter_base(local, cfg)
            return {"model": model_fingerprint(local),
                    "base": model_fingerprint(base, revision=cfg.model.revision or None)}
        return {"model": model_fingerprint(local)}
    return {"model": model_fingerprint(name, revision=cfg.model.revision or None)}


def provenance_warnings(model_name: str, inputs: dict) -> list[str]:
    """What eval should say when the model was trained by rdro on another prepare artifact than the one it
    scores (whose test split may then hold its training prompts), or against other reference log-probs."""
    local = Path(model_name).expanduser()
    manifest = manifests.training_manifest(local) if local.is_dir() else None
    if manifest is None:
        return []
    found = []
    trained = manifest.get("inputs", {})
    if inputs.get("data") and trained.get("data") and trained["data"] != inputs["data"]:
        found.append(f"{model_name} was trained on another prepare artifact (data {trained['data'][:12]}) than "
                     f"the one scored here ({inputs['data'][:12]}); its test split may hold prompts the model "
                     f"was trained on")
    if inputs.get("logprobs") and trained.get("logprobs") and trained["logprobs"] != inputs["logprobs"]:
        found.append(f"{model_name} was trained against other reference log-probs (logprobs "
                     f"{trained['logprobs'][:12]}) than the ones its preference log-ratios are taken against "
                     f"here ({inputs['logprobs'][:12]})")
    return found


def load_eval_model(name: str, cfg: Recipe):
    """(model in eval mode on the accelerator if any, tokenizer); an adapter dir is loaded with peft on its base."""
    from rdro_cli.lm.loading import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    local = Path(name).expanduser()
    is_adapter = (local / ADAPTER_CONFIG).is_file()
    revision = None if local.is_dir() else cfg.model.revision or None
    tokenizer = load_tokenizer(name, revision=revision, trust_remote_code=cfg.model.trust_remote_code)
    options = dict(dtype=cfg.model.dtype, device=device, trust_remote_code=cfg.model.trust_remote_code,
                   allow_pickle=cfg.model.allow_pickle)
    if is_adapter:
        from peft import PeftModel

        from rdro_cli.lm.peft_compat import building_peft_model

        base = _adapter_base(local, cfg)
        with building_peft_model():
            model = PeftModel.from_pretrained(load_model(base, revision=cfg.model.revision or None, **options),
                                              str(local)).eval()
    else:
        model = load_model(name, revision=revision, **options)
    return model, tokenizer


