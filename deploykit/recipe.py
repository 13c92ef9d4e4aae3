"""Recipe files: the declarative description of one deployment job.

A recipe names the model source, the data, and the settings of every stage, plus the
acceptance thresholds a run must meet. Built-in recipes ship inside the package
(``deploykit.recipes``), so ``deploykit run`` finds its default from any directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deploykit.bench import BenchConfig
from deploykit.data import DataSpec
from deploykit.errors import UserError
from deploykit.quantize import QuantConfig
from deploykit.train import TrainSpec
from deploykit.verify import parse_rule, passes

DEFAULT_RECIPE = "minilm-int8"


@dataclass
class ModelSpec:
    source: str = "embedded:minilm"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportSpec:
    opset: int = 18


@dataclass
class VerifySpec:
    batch_size: int = 32
    # Backends ``run`` and ``verify`` compare with torch FP32 (each where available here):
    # torch, ort-cpu, ort-cuda, tensorrt. "auto": every one that is usable on this machine.
    backends: list[str] = field(default_factory=lambda: ["auto"])
    localize: bool = True           # per-node error and an --exclude list for a Q/DQ model that misses a threshold
    localize_samples: int = 64


@dataclass
class PackageSpec:
    """Edge bundles ``run`` writes at its end (``deploykit package`` for each target listed)."""
    targets: list[str] = field(default_factory=list)
    samples: int | None = None      # verification inputs carried in the bundle (None: the whole evaluation split)


@dataclass
class BenchSpec(BenchConfig):
    backends: list[str] = field(default_factory=lambda: ["ort-cpu"])
    torch_baseline: bool = True


@dataclass
class LayerLatencySpec:
    """Time one attention layer of each variant's kind (dense, or its swap) on ORT CPU."""
    enabled: bool = False
    lengths: list[int] = field(default_factory=lambda: [128, 512, 2048, 8192])
    heads: int = 12
    head_dim: int = 32
    iterations: int = 10
    threads: int | None = None


@dataclass
class StudySpec:
    """Compare model variants built, trained and quantized the same way (e.g. the outlier study).

    ``variants`` maps a name to the transforms added on top of ``model.options.transforms``
    (a list), or to ``{transforms: [...], stages: [...]}`` for staged fine-tuning; each
    variant is trained (if ``train.enabled``), measured for activation outliers, exported,
    quantized with every preset in ``presets`` and scored on the evaluation split.

    With ``base`` (a variant's name) that variant is trained first with ``train``; every other
    variant starts from its trained weights (the transforms are applied to them) and is
    fine-tuned with ``fine_tune``, distilling from it: compression recipes (binarization,
    sparsity, head pruning) that need a trained full-precision model to start from.
    ``compression: true`` adds sizes, operation counts, sparsity and ORT CPU latency per variant.
    """
    title: str = "variants compared"
    variants: dict[str, Any] = field(default_factory=dict)
    presets: list[str] = field(default_factory=lambda: ["paper-w8a8", "gpu-trt"])
    outlier_samples: int | None = None       # None: the whole evaluation split
    layer_latency: LayerLatencySpec = field(default_factory=LayerLatencySpec)
    base: str | None = None
    fine_tune: TrainSpec = field(default_factory=lambda: TrainSpec(enabled=True, mode="distill", epochs=5.0,
                                                                   lr=3e-4, weight_decay=0.0, warmup=0.05))
    compression: bool = False


@dataclass
class Recipe:
    name: str = DEFAULT_RECIPE
    description: str = ""
    # Deployment targets (deploykit targets): the first is the primary one; every stage checks
    # the model against each (e.g. no FP8 for sm_87, no uint8 activations for TensorRT).
    targets: list[str] = field(default_factory=lambda: ["edge-cpu-x86"])
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    export: ExportSpec = field(default_factory=ExportSpec)
    quantize: QuantConfig = field(default_factory=QuantConfig)
    train: TrainSpec = field(default_factory=TrainSpec)
    study: StudySpec = field(default_factory=StudySpec)
    verify: VerifySpec = field(default_factory=VerifySpec)
    bench: BenchSpec = field(default_factory=BenchSpec)
    package: PackageSpec = field(default_factory=PackageSpec)
    baselines: list[str] = field(default_factory=list)         # e.g. [ort-dynamic]: compared variants
    # "<variant>.<metric>": ">= 0.99" (on every backend the variant ran on) or
    # "<variant>@<backend>.<metric>" (one backend)
    acceptance: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @property
    def target(self) -> str:
        """The primary deployment target."""
        return self.targets[0]

    def preset(self) -> str:
        """The quantization preset: the recipe's, else the primary target's."""
        if self.quantize.preset:
            return self.quantize.preset
        from deploykit.targets import get_target

        return get_target(self.target).preset

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return data


_SCALARS = (int, float, str, bool)


def _coerce(value: Any, typ: Any, where: str, fix_path: str) -> Any:
    if value is None:
        return None
    origin = getattr(typ, "__origin__", None)
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, where, fix_path)
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if typ in _SCALARS:
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise UserError(f"'{fix_path}' must be {typ.__name__}, got {value!r}", path=where,
                            fix=f"give {fix_path} a {typ.__name__} value")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"'{fix_path}' must be a list, got {value!r}", path=where, fix=f"write {fix_path}: [..]")
        return [_coerce(v, typ.__args__[0], where, fix_path) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"'{fix_path}' must be a mapping, got {value!r}", path=where,
                            fix=f"write {fix_path} as key: value lines")
        return dict(value)
    members = [a for a in getattr(typ, "__args__", ()) if a is not type(None)] if _is_union(typ) else []
    if members:             # "int | None", "list[str] | None": the value must fit one member
        first_error = None
        for member in members:
            try:
                return _coerce(value, member, where, fix_path)
            except UserError as exc:
                first_error = first_error or exc
        raise first_error
    return value  # Any, or a type the stage itself checks


def _is_union(typ: Any) -> bool:
    import types
    import typing

    return typing.get_origin(typ) in (typing.Union, types.UnionType)


def _build(cls: type, data: Any, where: str, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise UserError(f"'{prefix or 'recipe'}' must be a mapping", path=where, fix="check the YAML structure")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "path"}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        dotted = [f"{prefix}.{k}" if prefix else k for k in unknown]
        raise UserError(f"unknown recipe key(s) {dotted}", path=where,
                        fix=f"allowed under {prefix or 'the top level'}: {sorted(fields)}")
    hints = _type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], where, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


def builtin_recipes() -> dict[str, Path]:
    root = resources.files("deploykit.recipes")
    return {p.name[:-5]: Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


def resolve_recipe_path(recipe: str | Path | None) -> Path:
    if recipe is None:
        recipe = DEFAULT_RECIPE
    path = Path(recipe)
    if path.is_file():
        return path
    builtins = builtin_recipes()
    if str(recipe) in builtins:
        return builtins[str(recipe)]
    raise UserError("recipe not found", path=recipe,
                    fix=f"give a recipe file path or a built-in name: {', '.join(sorted(builtins))}")


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise UserError(f"cannot set '{dotted}': '{key}' is not a section", fix="check the --set key")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise UserError(f"--set {dotted}: '{raw}' is not a valid YAML value",
                        fix="quote it, or write a plain number, word, or [list]") from None
    if _expanded_size(value, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
        raise UserError(f"--set {dotted}: the value expands to more than {MAX_RECIPE_VALUES} values",
                        fix="write the value out instead of anchors and aliases")
    node[keys[-1]] = value


# Counts and sizes a stage divides by or loops over: below these a stage would divide by
# zero, time nothing, or run on no data.
_AT_LEAST = {
    "data.calibration": 1, "data.evaluation": 1, "data.tuning": 0, "data.training": -1,
    "verify.batch_size": 1, "verify.localize_samples": 1,
    "bench.seq_len": 1, "bench.iterations": 1, "bench.warmup": 0, "bench.threads": 1,
    "quantize.batch_size": 1, "quantize.num_bins": 2, "quantize.tune.budget": 1, "quantize.tune.samples": 1,
    "train.batch_size": 1, "train.max_steps": 1, "train.threads": 1,
    "study.layer_latency.heads": 1, "study.layer_latency.head_dim": 1, "study.layer_latency.iterations": 1,
    "study.outlier_samples": 1, "study.fine_tune.batch_size": 1,
}


def _check_counts(rec: Recipe, where: str) -> None:
    for dotted, least in _AT_LEAST.items():
        value: Any = rec
        for key in dotted.split("."):
            value = getattr(value, key)
        if value is not None and value < least:
            raise UserError(f"{dotted} is {value}, below {least}", path=where,
                            fix=f"set {dotted} to at least {least}")
    for dotted, values in (("bench.batches", rec.bench.batches), ("study.layer_latency.lengths",
                                                                  rec.study.layer_latency.lengths)):
        if not values or min(values) < 1:
            raise UserError(f"{dotted} must be a non-empty list of positive sizes, got {values}", path=where,
                            fix=f"e.g. {dotted.split('.')[-1]}: [1, 8, 32]")


# A recipe is a few hundred values; YAML aliases can make a tiny file expand to billions
# ("billion laughs"). Counting the expanded values bounds that before anything copies them.
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_BYTES = 1 << 20


def _expanded_size(data: Any, budget: int) -> int:
    """Values in ``data`` with every alias expanded, counting up to ``budget`` + 1."""
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        count += 1
        if count > budget:
            return count
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return count


def _read_recipe_yaml(path: Path) -> Any:
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"the recipe is larger than {MAX_RECIPE_BYTES >> 20} MiB", path=path,
                            fix="a recipe is a short YAML file: check that this is the file you meant")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"the recipe is not UTF-8 text (byte {exc.start})", path=path,
                        fix="save the recipe as a UTF-8 YAML file") from None
    except OSError as exc:
        raise UserError(f"cannot read the recipe ({exc.strerror})", path=path, fix="check the path and its permissions") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"the recipe is not valid YAML{where}", path=path, fix="fix the YAML syntax") from None
    except RecursionError:
        raise UserError("the recipe nests too deeply", path=path, fix="flatten the YAML structure") from None
    if _expanded_size(data, MAX_RECIPE_VALUES) > MAX_RECIPE_VALUES:
        raise UserError(f"the recipe expands to more than {MAX_RECIPE_VALUES} values (YAML aliases)", path=path,
                        fix="write the values out instead of nesting anchors and aliases")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"the recipe's top level is a {type(data).__name__}, not a mapping", path=path,
                        fix="write the recipe as key: value sections (name:, model:, data:, ...)")
    return data


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe_path(recipe)
    data = _read_recipe_yaml(path)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set '{item}' is not key=value", fix="write e.g. --set data.evaluation=200")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw)
    recipe_obj = _build(Recipe, data, str(path))
    recipe_obj.path = str(path)
    _check_counts(recipe_obj, str(path))
    check_acceptance(recipe_obj.acceptance, str(path))
    _check_model(recipe_obj, str(path))
    _check_tune_criteria(recipe_obj.quantize.tune.criteria, str(path))
    _check_targets(recipe_obj, str(path))
    return recipe_obj


def _check_targets(rec: Recipe, where: str) -> None:
    from deploykit.runners import BACKENDS
    from deploykit.targets import check_quant_config, get_target

    if not rec.targets:
        raise UserError("the recipe names no deployment targets", path=where,
                        fix="write e.g. targets: [edge-cpu-x86] (deploykit targets lists them)")
    for name in rec.targets:
        try:
            target = get_target(name)
        except UserError as exc:
            raise UserError(f"targets: {exc.message}", path=where, fix=exc.fix) from None
        check_quant_config(rec.quantize, rec.quantize.preset or get_target(rec.target).preset, target, where)
    stray = [t for t in rec.package.targets if t not in rec.targets]
    if stray:
        raise UserError(f"package.targets {stray} are not among the recipe's targets {rec.targets}", path=where,
                        fix="add them to targets: or package for one of those")
    bad = [b for b in rec.verify.backends if b != "auto" and b not in BACKENDS]
    if bad:
        raise UserError(f"unknown verify.backends {bad}", path=where, fix=f"use auto or {', '.join(BACKENDS)}")
    if rec.package.samples is not None and rec.package.samples < 1:
        raise UserError("package.samples must be at least 1", path=where, fix="or null for the whole evaluation split")


def _check_model(rec: Recipe, where: str) -> None:
    from deploykit.quantize import PRESETS
    from deploykit.recipes.transforms import check_transforms

    check_transforms(rec.model.options.get("transforms"), where)
    for name, value in rec.study.variants.items():
        transforms, stages = variant_spec(value, name, where)
        check_transforms(transforms, where)
    if rec.study.base is not None and rec.study.base not in rec.study.variants:
        raise UserError(f"study.base '{rec.study.base}' is not one of the variants", path=where,
                        fix=f"use one of {', '.join(rec.study.variants)}")
    if rec.study.base is not None:
        rec.study.fine_tune.validate(where)
    for preset in rec.study.presets:
        if preset not in PRESETS:
            raise UserError(f"unknown preset '{preset}' in study.presets", path=where,
                            fix=f"use {', '.join(PRESETS)}")
    if rec.train.enabled:
        rec.train.validate(where)


STAGES = ("attention", "all")


def variant_spec(value: Any, name: str = "", where: str | None = None) -> tuple[list[Any], list[str]]:
    """(transforms, stages) of a study variant: a list of transforms, or a mapping with
    ``transforms`` and ``stages`` (fine-tuning stages, e.g. [attention, all] for BiViT's
    attention-first schedule)."""
    if value is None:
        return [], []
    if isinstance(value, list):
        return value, []
    if isinstance(value, dict) and set(value) <= {"transforms", "stages"}:
        stages = list(value.get("stages") or [])
        bad = [s for s in stages if s not in STAGES]
        if bad:
            raise UserError(f"study variant '{name}' has unknown stages {bad}", path=where,
                            fix=f"use stages from {', '.join(STAGES)}")
        return list(value.get("transforms") or []), stages
    raise UserError(f"study variant '{name}' must be a list of transforms or {{transforms, stages}}", path=where,
                    fix="write e.g. binary: {transforms: [{name: binary-attention}], stages: [attention, all]}")


def check_acceptance(acceptance: dict[str, str], where: str) -> None:
    """Refuse, naming ``where`` (a recipe path or a CLI option), a rule that is not
    ``<variant>[@<backend>].<metric>: <op> <number>``. The metric is what follows the last dot,
    so every variant name a report shows (``m.naive.int8`` included) can carry a threshold."""
    for key, rule in acceptance.items():
        variant, _, metric = str(key).rpartition(".")
        if (not variant or not metric.isidentifier() or key.count("@") > 1 or variant.startswith("@")
                or variant.endswith("@") or parse_rule(rule) is None):
            raise UserError(f"acceptance rule '{key}: {rule}' is not '<variant>[@<backend>].<metric>: <op> <number>'",
                            path=where, fix="write e.g. int8.cosine_mean: '>= 0.99' or int8@tensorrt.top1: '>= 0.95'")


def _check_tune_criteria(criteria: dict[str, str], where: str) -> None:
    for metric, rule in criteria.items():
        if "." in metric or parse_rule(rule) is None:
            raise UserError(f"tuning criterion '{metric}: {rule}' is not '<metric>: <op> <number>'",
                            path=where, fix="write e.g. cosine_mean: '>= 0.995'")


def evaluate_acceptance(acceptance: dict[str, str], accuracy: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    results = []
    for key, rule in acceptance.items():
        variant, metric = key.rsplit(".", 1)
        value = accuracy.get(variant, {}).get(metric)
        results.append({"check": key, "value": value, "threshold": " ".join(str(rule).split()),
                        "passed": passes(value, rule)})
    return results
