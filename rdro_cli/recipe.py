"""Typed recipe schema, TOML loading, overrides and validation.

A recipe is data only: TOML parsed with `tomllib`, never executed. Values come from three places,
later ones winning: the recipe file, `--set section.key=value`, and a stage's explicit flags
(`--dataset`, `--model`, `--out`, ...). Every problem (unknown key, wrong type, value out of range)
is collected and reported at once, each naming where the value came from and its dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rdro_cli.errors import UserError
from rdro_cli.losses.registry import NAMES, spoken_list

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

LOSS_NAMES = NAMES  # the loss registry's (losses/registry.py)
EVAL_TASKS = ("preference", "generate", "exact_match", "bbh")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# accelerate's trackers (accelerate.utils.LoggerType, less "all"): rdro_cli/tracking.py
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


def _opt(default: Any, help: str, *, choices: tuple | None = None, check=None) -> Any:
    """A recipe field: its default, help text, allowed values and an optional range check.

    `check(value)` returns an error message when the value is out of range, else None.
    """
    meta = {"help": help, "choices": choices, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _positive(v):
    return None if v > 0 else "must be > 0"


def _non_negative(v):
    return None if v >= 0 else "must be >= 0"


def _seed(v):  # numpy's global seed (accelerate's set_seed) takes 0 .. 2**32 - 1
    return _non_negative(v) or (None if v < 2**32 else "must be < 2**32 (4294967296)")


def _open_unit(v):
    return None if 0 < v < 1 else "must be in (0, 1)"


def _half_open_unit(v):
    return None if 0 <= v < 1 else "must be in [0, 1)"


def _auto_or_non_negative(v):
    return None if v == "auto" or v >= 0 else 'must be >= 0 or "auto"'


def _alpha(v):
    return None if v == "auto" or 0 < v < 1 else 'must be in (0, 1) or "auto"'


# Keys that name local paths (or hub ids): a name longer than a filesystem allows is refused here, not met as
# an OSError deep in a stage. model.chat_template is left out: it may be the Jinja text itself.
PATH_KEYS = ("model.name", "model.ref_name", "data.dataset", "eval.model", "eval.exact_match_file",
             "eval.bbh_dir", "eval.bbh_fewshot_dir", "eval.generate_prompts", "output.dir")
NAME_MAX = 255  # bytes in one file or directory name (ext4, xfs, btrfs, ...)
PATH_MAX = 4096  # bytes in a path, its terminating NUL included (Linux)


def path_problem(value: str | Path) -> str | None:
    """Why `value` cannot be a path on this system (a name over NAME_MAX or a path over PATH_MAX bytes), else None."""
    try:
        raw = os.fsencode(value)
    except UnicodeEncodeError:  # not a name this system could hold either: the stage says so in its own words
        return None
    if len(raw) >= PATH_MAX:
        return f"the path is {len(raw)} bytes long, more than the {PATH_MAX - 1} a path may have; use a shorter one"
    for name in raw.split(b"/"):
        if len(name) > NAME_MAX:
            shown = name[:24].decode("utf-8", "replace")
            return (f"a name in this path is {len(name)} bytes long, more than the {NAME_MAX} a file or directory "
                    f"name may have ({shown}...); use a shorter name")
    return None


@dataclass
class ModelSection:
    name: str = _opt("", "policy initialisation: a Hugging Face hub id or a local directory")
    ref_name: str = _opt("", "reference model for `logprobs` (default: model.name)")
    dtype: str = _opt("auto", "weights dtype; auto = bfloat16 on GPU, float32 on CPU", choices=DTYPES)
    revision: str = _opt("", "hub revision (branch, tag or commit) of model.name")
    trust_remote_code: bool = _opt(False, "allow custom modelling code from the hub (off by default)")
    allow_pickle: bool = _opt(False, "allow non-safetensors (pickle) weight files (off by default)")
    chat_template: str = _opt("", "chat template (a file path or the Jinja text) for tokenizers without one")


@dataclass
class DataSection:
    dataset: str = _opt("", "the dataset: mix14k, ufg, demo, a hub id, a .jsonl/.json/.parquet/.csv file or a save_to_disk dir")
    max_length: int = _opt(1024, "max tokens of prompt + completion", check=lambda v: None if v >= 2 else "must be >= 2")
    max_prompt_length: int = _opt(512, "max prompt tokens (prompts keep their end)", check=_positive)
    test_fraction: float = _opt(0.05, "held-out fraction when the source has no test split", check=_open_unit)
    seed: int = _opt(0, "seed for the test split and the fixed mismatched pairs", check=_non_negative)
    limit: int = _opt(0, "keep the first N source rows of each split, in file order (a paired row is one; 0 = all)",
                      check=_non_negative)
    train_split: str = _opt("train", "name of the training split in the source")
    test_split: str = _opt("test", "name of the held-out split in the source")
    drop_duplicates: bool = _opt(False, "drop exact duplicate rows (kept by default: repeats are legitimate "
                                        "when feedback was sampled from the reference policy)")
    num_proc: int = _opt(0, "worker processes for parsing and tokenising (0 = one per CPU core)",
                         check=_non_negative)


@dataclass
class LossSection:
    name: str = _opt("rdro", f"the objective: {spoken_list()} (docs/losses.md)", choices=LOSS_NAMES)
    alpha: Any = _opt("auto", 'RDRO mixture weight in (0, 1), or "auto" = preferred fraction', check=_alpha)
    weighting: str = _opt("batch", "RDRO reduction: batch (published) or balanced (consistent)",
                          choices=("batch", "balanced"))
    beta: float = _opt(0.1, "temperature for kto, bco, dpo, pro, kldo and bpo", check=_positive)
    desirable_weight: float = _opt(1.0, "KTO lambda_D", check=_positive)
    undesirable_weight: float = _opt(1.0, "KTO lambda_U", check=_positive)
    pro_alpha: float = _opt(2.5, "PRO weight of the hyper-response regulariser", check=_positive)
    pro_weighting: str = _opt("balanced", "PRO reduction: balanced (classes count equally) or batch",
                              choices=("balanced", "batch"))
    kldo_estimator: str = _opt("ma", "KLDO log-mean-exp gradient: ma (moving average, the authors' default) "
                               "or biased (this batch)", choices=("ma", "biased"))
    kldo_rate: float = _opt(0.1, "KLDO moving-average rate", check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]")
    bpo_divergence: str = _opt("lr", "BPO Bregman generator (lr = DPO)", choices=("lr", "kliep", "lsif", "ba", "sba"))
    bpo_lam: float = _opt(1.0, "BPO lambda of ba / sba", check=_positive)
    bpo_ratio_min: float = _opt(1e-6, "BPO lower clamp of the ratio R", check=_open_unit)
    pmle_gamma: float = _opt(5e-3, "preference-MLE temperature gamma (reference-free)", check=_positive)


@dataclass
class LogprobsSection:
    max_tokens_per_batch: int = _opt(16384, "token budget per batch (rows x longest row)", check=_positive)
    chunk_size: int = _opt(1024, "completion positions per LM-head chunk", check=_positive)
    shard_rows: int = _opt(4096, "rows per resumable shard", check=_positive)


@dataclass
class TrainSection:
    learning_rate: float = _opt(5e-7, "peak learning rate (AdamW)", check=_positive)
    batch_size: int = _opt(8, "rows per device per micro-step", check=_positive)
    gradient_accumulation_steps: int = _opt(1, "micro-steps per optimizer step", check=_positive)
    epochs: int = _opt(1, "passes over the training split", check=_positive)
    max_steps: int = _opt(0, "stop after this many optimizer steps (0 = epochs decide)", check=_non_negative)
    seed: int = _opt(42, "seed for shuffling, dropout and initialisation", check=_seed)
    lr_scheduler: str = _opt("cosine", "learning-rate schedule after warmup", choices=("cosine", "linear", "constant"))
    warmup_ratio: float = _opt(0.1, "fraction of steps for linear warmup", check=_half_open_unit)
    weight_decay: float = _opt(0.0, "AdamW weight decay", check=_non_negative)
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (0 = off)", check=_non_negative)
    gradient_checkpointing: bool = _opt(False, "recompute activations in backward to save memory")
    shuffle: bool = _opt(True, "reshuffle the training rows each epoch from the seed")
    chunk_size: int = _opt(1024, "completion positions per LM-head chunk", check=_positive)
    max_tokens_per_batch: int = _opt(16384, "padded-token cap of one length group within a micro-batch",
                                     check=_positive)
    group_cost: Any = _opt("auto", 'cost of one more forward in padded tokens when splitting a micro-batch into '
                           'length groups; "auto" = measured on the device at start-up (cached)',
                           check=_auto_or_non_negative)
    packing: str = _opt("auto", "pack a micro-batch into one row without padding: auto = with flash-attention's "
                        "varlen kernels only; on = also with sdpa/eager (exact, dense mask); off",
                        choices=("auto", "on", "off"))
    compile: bool = _opt(False, "torch.compile the transformer body (lengths padded to a few bucket sizes)")
    peak_flops: float = _opt(0.0, "peak FLOP/s of one GPU for the MFU figure (0 = look up the GPU's bf16 peak)",
                             check=_non_negative)
    save_every: int = _opt(0, "checkpoint every N optimizer steps (0 = only at the end)", check=_non_negative)
    keep_checkpoints: int = _opt(2, "how many recent checkpoints to keep", check=_positive)
    log_every: int = _opt(1, "write metrics every N steps", check=_positive)
    report_to: list[str] = _opt([], "experiment trackers (accelerate's): tensorboard (<run>/train/tb), wandb, "
                                    "mlflow, trackio, ...", choices=TRACKERS)


@dataclass
class LoraSection:
    enabled: bool = _opt(False, "train a LoRA adapter instead of all weights")
    r: int = _opt(16, "LoRA rank", check=_positive)
    alpha: float = _opt(32.0, "LoRA scaling alpha", check=_positive)
    dropout: float = _opt(0.05, "LoRA dropout", check=_half_open_unit)
    target_modules: list[str] = _opt(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "module names that get adapters",
    )


@dataclass
class EvalSection:
    tasks: list[str] = _opt(["preference"], "tasks to run: preference, generate, exact_match, bbh", choices=EVAL_TASKS)
    model: str = _opt("", "model dir to evaluate (default: <run>/merged, else <run>/train/final)")
    exact_match_file: str = _opt("", "JSONL of {prompt, answer} for exact_match")
    answer_pattern: str = _opt("", "regex with one group extracting the answer (empty = whole output)")
    bbh_dir: str = _opt("", "directory of BIG-Bench Hard <task>.json files")
    bbh_fewshot_dir: str = _opt("", "optional directory of <task>.txt few-shot prompts")
    generate_prompts: str = _opt("", "AlpacaEval-style JSON with `instruction` (default: test prompts)")
    max_new_tokens: int = _opt(256, "generation length", check=_positive)
    batch_size: int = _opt(16, "rows per generation / scoring batch", check=_positive)
    do_sample: bool = _opt(False, "sample instead of greedy decoding")
    temperature: float = _opt(0.7, "sampling temperature", check=_positive)
    limit: int = _opt(0, "evaluate at most N examples per task (0 = all)", check=_non_negative)


@dataclass
class OutputSection:
    dir: str = _opt("runs/default", "run directory: stages write <dir>/data, logprobs, train, ...")


@dataclass
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    loss: LossSection = field(default_factory=LossSection)
    logprobs: LogprobsSection = field(default_factory=LogprobsSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        lines = []
        for section, values in self.to_dict().items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        return "\n".join(lines)


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Recipe)}
SECTIONS = {name: globals()[t] if isinstance(t, str) else t for name, t in SECTIONS.items()}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


class RecipeError(UserError):
    """All problems found in a recipe, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        if len(problems) == 1:  # one problem, one line
            super().__init__(problems[0])
        else:
            super().__init__(f"recipe has {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems))


def field_help(section: str, key: str) -> str:
    for f in dataclasses.fields(SECTIONS[section]):
        if f.name == key:
            return f.metadata["help"]
    raise KeyError(f"{section}.{key}")


def _parse_set(item: str) -> tuple[str, Any]:
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise RecipeError([f"--set {item}: expected section.key=value"])
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words such as `--set loss.name=kto` are strings
    return key, value


def _check_type(annotation: Any, value: Any) -> tuple[Any, str | None]:
    """Returns (coerced value, error or None) for the few types recipes use."""
    if annotation is Any:  # loss.alpha: float or "auto"
        if value == "auto":
            return value, None
        annotation = float
    if annotation is bool:
        return value, None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value, None if ok else f"must be an integer, got {value!r}"
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value), None
        return value, f"must be a number, got {value!r}"
    if annotation is str:
        return value, None if isinstance(value, str) else f"must be a string, got {value!r}"
    if typing.get_origin(annotation) is list:
        if isinstance(value, str):  # `--set eval.tasks=preference` or a comma list
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value, None
        return value, f"must be a list of strings, got {value!r}"
    raise TypeError(f"unsupported recipe type {annotation}")  # a bug in this module


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {name: (Any if hint is typing.Any else hint) for name, hint in hints.items()}


def load_recipe(path: str | Path | None = None, sets: list[str] | None = None,
                flags: dict[str, Any] | None = None) -> Recipe:
    """Builds a Recipe from a TOML file, `--set` overrides and explicit flags (dotted keys).

    Flags whose value is None were not given and do not override.
    """
    values: dict[tuple[str, str], tuple[Any, str]] = {}  # (section, key) -> (value, where)
    problems: list[str] = []
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{path}: recipe file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"{path}: cannot read recipe ({err})") from None
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"{path}: not valid TOML: {err}") from None
        for section, body in raw.items():
            if not isinstance(body, dict):
                problems.append(f"{path}: {section}: expected a [section] table, got a value")
                continue
            for key, value in body.items():
                values[(section, key)] = (value, str(path))
    for item in sets or []:
        key, value = _parse_set(item)
        section, _, name = key.partition(".")
        values[(section, name)] = (value, "--set")
    for key, value in (flags or {}).items():
        if value is not None:
            section, _, name = key.partition(".")
            values[(section, name)] = (value, "command line")

    legacy_tensorboard = values.pop(("train", "tensorboard"), None)
    recipe = Recipe()
    all_keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    for (section, key), (value, where) in values.items():
        dotted = f"{section}.{key}"
        if section not in SECTIONS:
            hint = difflib.get_close_matches(section, SECTIONS, n=1)
            problems.append(f"{where}: {dotted}: unknown section [{section}]"
                            + (f" (did you mean [{hint[0]}]?)" if hint else ""))
            continue
        cls = SECTIONS[section]
        types_ = _section_types(cls)
        if key not in types_:
            hint = difflib.get_close_matches(key, types_, n=1) or difflib.get_close_matches(dotted, all_keys, n=1)
            problems.append(f"{where}: {dotted}: unknown key"
                            + (f" (did you mean {hint[0] if '.' in hint[0] else section + '.' + hint[0]}?)"
                               if hint else f" (known: {', '.join(types_)})"))
            continue
        value, error = _check_type(types_[key], value)
        meta = next(f.metadata for f in dataclasses.fields(cls) if f.name == key)
        if error is None and meta["choices"]:
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in meta["choices"]]
            if bad:
                error = f"{bad[0]!r} is not one of {', '.join(meta['choices'])}"
        if error is None and meta["check"]:
            error = meta["check"](value)
        if error is None and dotted in PATH_KEYS:
            error = path_problem(value)
        if error:
            problems.append(f"{where}: {dotted}: {error}")
            continue
        setattr(getattr(recipe, section), key, value)

    if legacy_tensorboard is not None:
        _legacy_tensorboard(recipe, *legacy_tensorboard, problems)
    if recipe.data.max_prompt_length >= recipe.data.max_length:
        where = values.get(("data", "max_prompt_length"), (None, "recipe"))[1]
        problems.append(f"{where}: data.max_prompt_length: must be < data.max_length "
                        f"({recipe.data.max_prompt_length} >= {recipe.data.max_length})")
    if problems:
        raise RecipeError(problems)
    return recipe


def _legacy_tensorboard(recipe: Recipe, value: Any, where: str, problems: list[str]) -> None:
    """`train.tensorboard = true` (before train.report_to): still works, and says what to write instead."""
    if not isinstance(value, bool):
        problems.append(f"{where}: train.tensorboard: must be true or false, got {value!r} "
                        f"(deprecated: use train.report_to = [\"tensorboard\"])")
        return
    if value:
        if "tensorboard" not in recipe.train.report_to:
            recipe.train.report_to.append("tensorboard")
        print(f"{where}: train.tensorboard is deprecated; write train.report_to = [\"tensorboard\"] instead "
              f"(it is read as that for now)", file=sys.stderr)


def recipe_from_dict(raw: dict) -> Recipe:
    """Rebuilds a Recipe saved by `to_dict` (manifests, checkpoints), validating it again."""
    sets = [f"{section}.{key}={_toml_value(value)}" for section, body in raw.items() for key, value in body.items()]
    return load_recipe(None, sets)

