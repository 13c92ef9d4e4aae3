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
    return value  # unions such as "int | None": accepted as given, checked by the stage


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
    node[keys[-1]] = yaml.safe_load(raw)


def load_recipe(recipe: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe_path(recipe)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"the recipe is not valid YAML{where}", path=path, fix="fix the YAML syntax") from None
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"--set '{item}' is not key=value", fix="write e.g. --set data.evaluation=200")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw)
    recipe_obj = _build(Recipe, data, str(path))
    recipe_obj.path = str(path)
    _check_acceptance(recipe_obj.acceptance, str(path))
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


def _check_acceptance(acceptance: dict[str, str], where: str) -> None:
    for key, rule in acceptance.items():
        if key.count(".") != 1 or key.count("@") > 1 or parse_rule(rule) is None:
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
        variant, metric = key.split(".")
        value = accuracy.get(variant, {}).get(metric)
        results.append({"check": key, "value": value, "threshold": " ".join(str(rule).split()),
                        "passed": passes(value, rule)})
    return results
