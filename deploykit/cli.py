"""The deploykit command line (typer). Each command parses its arguments and calls one
library function; a :class:`deploykit.errors.UserError` becomes one line on stderr and exit
code 2, a missed threshold (run, verify, device-verify) exit code 1."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

import deploykit
from deploykit.errors import EXIT_ACCEPTANCE_FAILED, EXIT_USER_ERROR, UserError

app = typer.Typer(
    name="deploykit",
    help="Take a PyTorch transformer and ship it: export -> INT8 calibrate -> build -> verify -> bench -> package.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _builtin_recipe_names() -> str:
    """The recipes shipped with deploykit, for help texts (no recipe is parsed here)."""
    from importlib import resources

    try:
        names = sorted(p.name[:-5] for p in resources.files("deploykit.recipes").iterdir() if p.name.endswith(".yaml"))
    except (ModuleNotFoundError, OSError):
        return "see the recipes/ folder"
    return ", ".join(names)


def _preset_help() -> str:
    from deploykit.presets import PRESETS

    what = {"gpu-trt": "int8 symmetric, TensorRT", "cpu-ort": "uint8 x int8, ONNX Runtime on x86",
            "paper-w8a8": "the SmoothQuant paper's W8A8: Q/DQ around every MatMul, Add, Softmax, LayerNorm"}
    return " | ".join(f"{name} ({what[name]})" if name in what else name for name in PRESETS)


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"deploykit: error: {exc.one_line()}", file=sys.stderr)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt as exc:
            # SIGINT, or SIGTERM/SIGHUP turned into Interrupted: every finally block has run by now
            code = getattr(exc, "exit_code", 130)
            print(f"deploykit: interrupted ({(exc.args[0] if exc.args else '') or 'SIGINT'}); "
                  "temporary files removed, earlier outputs kept", file=sys.stderr)
            raise typer.Exit(code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"deploykit {deploykit.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or stage messages.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    from deploykit.progress import set_quiet

    set_quiet(quiet)


def _options(items: list[str] | None) -> dict:
    import yaml

    out = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--option '{item}' is not key=value", fix="write e.g. --option max_length=128")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--option {key.strip()}: '{raw}' is not a valid YAML value",
                            fix="quote it, e.g. --option 'name=\"a: b\"', or write a plain number or word") from None
    return out


# Shared option declarations.
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model source (embedded:minilm, embedded:mpnet, embedded:minilm-l3, hf:<folder>, "
                           "a folder, onnx:<file>, timm:<arch>). "
                          "Default: the source recorded in the ONNX file.")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", help="Model option key=value (repeatable).")]
DataOpt = Annotated[str, typer.Option("--data", help="docstrings | digits | <file>.txt | <file>.npz (saved feeds, "
                                                      "used whole).")]
CalibOpt = Annotated[int, typer.Option("--calibration", min=1, help="Calibration samples in the seeded split.")]
EvalOpt = Annotated[int, typer.Option("--evaluation", min=1, help="Evaluation samples in the seeded split.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the calibration/evaluation split.")]
ReportOpt = Annotated[Path, typer.Option("--report", "-r", help="report.json to create or update.")]
TargetOpt = Annotated[Optional[list[str]], typer.Option(
    "--target", "-t", help="Deployment target (deploykit targets; repeatable): the model is checked against it "
                           "before any work.")]


@app.command(short_help="Run a recipe end to end (the default job).")
@_guard
def run(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe file or built-in recipe name "
                                                         "(default: minilm-int8). Built-in: "
                                                         + _builtin_recipe_names() + ".")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder that holds the runs.")] = Path("runs"),
    name: Annotated[Optional[str], typer.Option("--name", help="Run folder name (default: the recipe name).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set data.evaluation=200 "
                                                                   "(repeatable).")] = None,
) -> None:
    """Run a recipe end to end: data, export, calibrate, verify, bench, report."""
    from deploykit.pipeline import run_recipe

    result = run_recipe(recipe, out_root=out, name=name, overrides=set_)
    if not result.accepted:
        print(f"deploykit: acceptance checks failed; see {result.report_path}", file=sys.stderr)
        raise typer.Exit(EXIT_ACCEPTANCE_FAILED)


@app.command(short_help="Export a model to ONNX.")
@_guard
def export(
    source: Annotated[str, typer.Argument(help="Model source.")] = "embedded:minilm",
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write.")] = Path("model.onnx"),
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 18,
    option: OptionOpt = None,
    decode_step: Annotated[bool, typer.Option("--decode-step", help="A causal LM's one-token step with its KV "
                                                                    "cache, instead of the prefill.")] = False,
) -> None:
    """Export a model to ONNX (dynamic batch/sequence) and check parity with torch."""
    from deploykit.pipeline import export_model

    export_model(source, out, options=_options(option), opset=opset, decode_step=decode_step)


def _criteria(items: list[str] | None, *, dotted: bool = False) -> dict[str, str] | None:
    import re

    if not items:
        return None
    out = {}
    name = r"[A-Za-z0-9_.@-]+" if dotted else r"[A-Za-z0-9_]+"
    for item in items:
        match = re.match(rf"^\s*({name})\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*$", item)
        if not match:
            flag, example = ("--threshold", "int8.cosine_mean>=0.99") if dotted else ("--criterion", "cosine_mean>=0.995")
            raise UserError(f"{flag} '{item}' is not <name><op><number>", fix=f"write e.g. {example}")
        out[match.group(1)] = f"{match.group(2)} {match.group(3)}"
    return out


def _alphas(items: list[str] | None) -> list[float | None] | None:
    if not items:
        return None
    out: list[float | None] = []
    for item in items:
        if item.lower() in ("none", "off", "null"):
            out.append(None)
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise UserError(f"--tune-alpha '{item}' is not a number or 'none'", fix="e.g. --tune-alpha 0.8") from None
    return out


_PV_HELP = "Softmax·V as ½(2P−1)·V + ½ΣV: int8 P spans [−1, 1]."
_SHIFT_HELP = "With SmoothQuant: centre each channel first (biases absorb c·W); one-sided channels use all of int8."
_ROUNDING_HELP = "nearest | gptq: int8 weights rounded to keep each Linear's output on the calibration data."


def _set_given(target: object, values: dict) -> None:
    """Set on ``target`` each of ``values`` that the user gave (not None)."""
    for key, value in values.items():
        if value is not None:
            setattr(target, key, value)


@app.command(short_help="Static INT8: explicit Q/DQ ONNX + ranges.")
@_guard
def calibrate(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model (from deploykit export, or your own: "
                                               "docs/onnx-in.md).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Q/DQ model to write "
                                                                     "(default: <model>.int8.onnx).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Take the quantize and data settings from this recipe "
                                                       "(file or built-in name); options below override.")] = None,
    source: ModelOpt = None,
    option: OptionOpt = None,
    data: Annotated[Optional[str], typer.Option("--data", help="docstrings | digits | <file>.txt | <file>.npz.")] = None,
    calibration: Annotated[Optional[int], typer.Option(min=1, help="Calibration samples in the seeded split.")] = None,
    evaluation: Annotated[Optional[int], typer.Option(min=1, help="Evaluation samples in the seeded split.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the split.")] = None,
    preset: Annotated[Optional[str], typer.Option(help=_preset_help() + ".")] = None,
    method: Annotated[Optional[str], typer.Option(help="minmax | running-minmax | percentile | entropy | mse "
                                                       "(default: the preset's).")] = None,
    percentile: Annotated[Optional[float], typer.Option(help="Share of |x| kept by the percentile method.")] = None,
    op_types: Annotated[Optional[str], typer.Option(help="Comma-separated op types to quantize "
                                                         "(default: the preset's).")] = None,
    residual_adds: Annotated[Optional[bool], typer.Option("--residual-adds/--no-residual-adds",
                                                          help="Quantize residual Add inputs.")] = None,
    layernorm: Annotated[Optional[bool], typer.Option("--layernorm/--no-layernorm",
                                                      help="Quantize LayerNormalization inputs.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Node to keep in float (repeatable).")] = None,
    only: Annotated[Optional[list[str]], typer.Option(help="Quantize only these nodes (repeatable).")] = None,
    activation_type: Annotated[Optional[str], typer.Option(help="int8 | uint8 (default: the preset's).")] = None,
    symmetric: Annotated[Optional[bool], typer.Option("--symmetric/--asymmetric",
                                                      help="Activation zero point 0 (TensorRT needs it).")] = None,
    per_channel: Annotated[Optional[bool], typer.Option("--per-channel/--per-tensor",
                                                        help="Weight scales per output channel.")] = None,
    smoothquant: Annotated[Optional[float], typer.Option(help="SmoothQuant strength alpha in [0, 1].")] = None,
    smoothquant_targets: Annotated[Optional[str], typer.Option(help="ln-fed | all")] = None,
    pv_offset: Annotated[Optional[bool], typer.Option("--pv-offset/--no-pv-offset", help=_PV_HELP)] = None,
    shift: Annotated[Optional[bool], typer.Option("--shift/--no-shift", help=_SHIFT_HELP)] = None,
    weight_rounding: Annotated[Optional[str], typer.Option(help=_ROUNDING_HELP)] = None,
    tune: Annotated[Optional[bool], typer.Option("--tune/--no-tune", help="Accuracy-driven search.")] = None,
    criterion: Annotated[Optional[list[str]], typer.Option(help="Tuning target, e.g. cosine_mean>=0.995 "
                                                                "(repeatable).")] = None,
    tune_budget: Annotated[Optional[int], typer.Option(min=1, help="Maximum tuning trials.")] = None,
    tune_alpha: Annotated[Optional[list[str]], typer.Option(help="SmoothQuant alpha to try, or 'none' "
                                                                 "(repeatable).")] = None,
    tune_method: Annotated[Optional[list[str]], typer.Option(help="Calibration method to try (repeatable).")] = None,
    tune_percentile: Annotated[Optional[list[float]], typer.Option(help="Percentile to try (repeatable).")] = None,
    tuning: Annotated[Optional[int], typer.Option(min=1, help="Tuning samples (a split disjoint from calibration "
                                                       "and evaluation).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=1, help="Calibration batch size.")] = None,
    target: TargetOpt = None,
) -> None:
    """Calibrate static INT8 and write explicit QuantizeLinear/DequantizeLinear (optionally
    with SmoothQuant and an accuracy-driven search)."""
    from deploykit.data import DataSpec
    from deploykit.pipeline import calibrate_model
    from deploykit.quantize import QuantConfig
    from deploykit.recipe import load_recipe

    rec = load_recipe(recipe) if recipe else None
    config = rec.quantize if rec else QuantConfig()
    spec = rec.data if rec else DataSpec()
    overrides = {"preset": preset, "method": method, "percentile": percentile, "residual_adds": residual_adds,
                 "layernorm": layernorm, "activation_type": activation_type, "activation_symmetric": symmetric,
                 "per_channel": per_channel, "batch_size": batch_size, "probability_offset": pv_offset,
                 "weight_rounding": weight_rounding,
                 "op_types": [t.strip() for t in op_types.split(",") if t.strip()] if op_types else None,
                 "nodes_to_exclude": list(exclude) if exclude else None,
                 "nodes_to_quantize": list(only) if only else None}
    _set_given(config, overrides)
    _set_given(config.smoothquant, {"alpha": smoothquant, "targets": smoothquant_targets, "shift": shift})
    _set_given(config.tune, {"enabled": tune, "criteria": _criteria(criterion), "budget": tune_budget,
                             "alphas": _alphas(tune_alpha), "methods": list(tune_method) if tune_method else None,
                             "percentiles": list(tune_percentile) if tune_percentile else None,
                             "samples": tuning})
    _set_given(spec, {"source": data, "calibration": calibration, "evaluation": evaluation, "seed": seed})
    out = out or model.with_name(model.stem + ".int8.onnx")
    calibrate_model(model, out, source=source, data=spec.source, options=_options(option), spec=spec,
                    config=config, default_preset=(rec.preset() if rec else "gpu-trt"), targets=list(target or []))


@app.command(short_help="Activation outliers per layer.")
@_guard
def outliers(
    source: Annotated[str, typer.Argument(help="Model source.")] = "embedded:minilm",
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for outliers.json and outliers.png.")] = Path("."),
    option: OptionOpt = None,
    transform: Annotated[Optional[list[str]], typer.Option(
        help="Model transform as an inline mapping, e.g. '{name: gated-attention, fine_tune: true}' "
             "(repeatable, applied in order before --option checkpoint=... loads).")] = None,
    data: DataOpt = "docstrings",
    calibration: CalibOpt = 256,
    evaluation: EvalOpt = 1000,
    seed: SeedOpt = 0,
    samples: Annotated[Optional[int], typer.Option(min=1, help="Evaluation samples to measure (default: all).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Batch size.")] = 32,
) -> None:
    """Activation outliers per layer (max |x| and kurtosis, as in Bondarenko et al. 2023): table and plot."""
    import yaml

    from deploykit.data import DataSpec
    from deploykit.pipeline import outliers_model

    options = _options(option)
    if transform:
        items = []
        for raw in transform:
            try:
                items.append(yaml.safe_load(raw))
            except yaml.YAMLError:
                raise UserError(f"--transform '{raw}' is not a YAML mapping",
                                fix="write e.g. --transform '{name: clipped-softmax, alpha: 3.2, seq_len: 128}'") from None
        options["transforms"] = list(options.get("transforms") or []) + items
    outliers_model(source, out, data=data, samples=samples, batch_size=batch_size, options=options,
                   spec=DataSpec(source=data, calibration=calibration, evaluation=evaluation, seed=seed))


@app.command(short_help="Train or fine-tune a recipe's model.")
@_guard
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe whose model, transforms, data and train section to use.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Checkpoint to write (.safetensors).")] = Path(
        "model.safetensors"),
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key (repeatable).")] = None,
) -> None:
    """Train or fine-tune (distil) a recipe's model with its transforms; write a safetensors checkpoint."""
    from deploykit.pipeline import train_model

    train_model(recipe, out, overrides=set_)


@app.command("debug-quant", short_help="Error each node's quantization adds.")
@_guard
def debug_quant(
    fp32: Annotated[Path, typer.Argument(help="FP32 ONNX model the INT8 model was calibrated from.")],
    int8: Annotated[Path, typer.Argument(help="INT8 Q/DQ model (its .ranges.json next to it, if smoothed).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for debug_quant.json and .png.")] = Path("."),
    source: ModelOpt = None,
    option: OptionOpt = None,
    data: DataOpt = "docstrings",
    calibration: CalibOpt = 256,
    evaluation: EvalOpt = 1000,
    seed: SeedOpt = 0,
    samples: Annotated[int, typer.Option(min=1, help="Evaluation samples to run.")] = 64,
    top: Annotated[int, typer.Option(min=1, help="Nodes to list and plot.")] = 20,
) -> None:
    """Per ONNX node, the error quantization adds (SNR / cosine), worst first, with torch module names."""
    from deploykit.data import DataSpec
    from deploykit.pipeline import debug_quant as run_debug

    run_debug(fp32, int8, out, source=source, data=data, samples=samples, top=top, options=_options(option),
              spec=DataSpec(source=data, calibration=calibration, evaluation=evaluation, seed=seed))


@app.command(short_help="Accuracy of every model on every backend.")
@_guard
def verify(
    models: Annotated[list[Path], typer.Argument(help="ONNX models (FP32 and/or Q/DQ) to verify against torch FP32, "
                                                      "or a run folder (its models, saved inputs, reference "
                                                      "outputs, thresholds and report).")],
    source: ModelOpt = None,
    option: OptionOpt = None,
    data: DataOpt = "docstrings",
    calibration: CalibOpt = 256,
    evaluation: EvalOpt = 1000,
    seed: SeedOpt = 0,
    inputs: Annotated[Optional[Path], typer.Option(help="Saved inputs (.npz): used if it exists (its hash is "
                                                        "checked), else the evaluation split is saved there once.")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="Saved torch outputs (reference.npz of a run).")] = None,
    backend: Annotated[Optional[list[str]], typer.Option(help="auto | torch | ort-cpu | ort-cuda | tensorrt "
                                                              "(repeatable; default auto: every one usable here).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Take the thresholds (acceptance) from this recipe.")] = None,
    threshold: Annotated[Optional[list[str]], typer.Option(help="A threshold, e.g. 'int8.cosine_mean>=0.99' or "
                                                                "'int8@tensorrt.top1>=0.95' (repeatable).")] = None,
    localize: Annotated[bool, typer.Option("--localize/--no-localize", help="Per-node error and an --exclude list "
                                                                          "for a Q/DQ model that misses.")] = True,
    target: TargetOpt = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Inference batch size.")] = 32,
    report: Annotated[Optional[Path], typer.Option("--report", "-r", help="report.json to create or update "
                                                                          "(default: report.json, or the run's).")] = None,
) -> None:
    """Every model on every usable backend (torch, ORT CPU/CUDA, TensorRT) against torch FP32 on the
    same saved inputs: task metric, cosine, SNR, max abs; exit code 1 when a threshold is missed."""
    from deploykit.data import DataSpec
    from deploykit.pipeline import verify_models
    from deploykit.recipe import check_acceptance, load_recipe

    rules: dict[str, str] = {}
    ranges = None
    if len(models) == 1 and models[0].is_dir():
        from deploykit.pipeline import run_artifacts

        run = run_artifacts(models[0])
        models, inputs, reference = run["models"], inputs or run["inputs"], reference or run["reference"]
        report = report or run["report"]
        ranges = run["ranges"]
        if recipe is None and not threshold:
            rules.update(run["rules"])
    report = report or Path("report.json")
    if recipe is not None:
        from deploykit.engine import ShapeRanges

        rec = load_recipe(recipe)
        rules.update(rec.acceptance)
        ranges = ShapeRanges.from_recipe(rec)
    for key, rule in (_criteria(threshold, dotted=True) or {}).items():
        rules[key] = rule
    check_acceptance(rules, "--threshold")
    result = verify_models(models, report, source=source, data=data, inputs=inputs, reference=reference,
                           backends=list(backend or ["auto"]), batch_size=batch_size, options=_options(option),
                           rules=rules, localize_failures=localize, targets=list(target or []), ranges=ranges,
                           spec=DataSpec(source=data, calibration=calibration, evaluation=evaluation, seed=seed))
    if not result["passed"]:
        failed = [c["check"] for c in result["verification"]["checks"] if not c["passed"]]
        print(f"deploykit: verification failed: {', '.join(failed)}; see {report}", file=sys.stderr)
        raise typer.Exit(EXIT_ACCEPTANCE_FAILED)


@app.command(short_help="Latency and throughput per model/backend.")
@_guard
def bench(
    models: Annotated[Optional[list[Path]], typer.Argument(help="ONNX models to time.")] = None,
    source: ModelOpt = None,
    option: OptionOpt = None,
    data: DataOpt = "docstrings",
    calibration: CalibOpt = 256,
    evaluation: EvalOpt = 1000,
    seed: SeedOpt = 0,
    backend: Annotated[Optional[list[str]], typer.Option(help="ort-cpu | ort-cuda | torch (repeatable).")] = None,
    batch: Annotated[Optional[list[int]], typer.Option(help="Batch size (repeatable; default 1, 8, 32).")] = None,
    seq: Annotated[int, typer.Option(min=1, help="Sequence length for text models.")] = 128,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Threads (default: all cores available).")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up runs per configuration.")] = 3,
    iterations: Annotated[int, typer.Option(min=1, help="Timed runs per configuration (at least).")] = 20,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved rounds the timed runs are spread over (ratios to "
                                                    "FP32 and their spread are taken per round).")] = 5,
    torch_baseline: Annotated[bool, typer.Option("--torch/--no-torch", help="Time eager torch FP32 too.")] = True,
    target: Annotated[Optional[list[str]], typer.Option(
        "--target", "-t", help="Emulate a deployment target's budget instead (batch 1, its threads, peak memory "
                               "against its budget; repeatable); targets this machine cannot run are reported "
                               "as not measurable here.")] = None,
    report: ReportOpt = Path("report.json"),
) -> None:
    """Latency p50/p90/p99 and throughput per model, backend and batch size (or per target: --target)."""
    from deploykit.bench import BenchConfig
    from deploykit.data import DataSpec
    from deploykit.pipeline import bench_models, bench_models_on_targets

    config = BenchConfig(batches=list(batch or [1, 8, 32]), seq_len=seq, warmup=warmup, iterations=iterations,
                         threads=threads, rounds=rounds)
    if target:
        bench_models_on_targets(list(models or []), report, list(target), source=source, data=data, config=config,
                                options=_options(option),
                                spec=DataSpec(source=data, calibration=calibration, evaluation=evaluation, seed=seed))
        return
    bench_models(list(models or []), report, source=source, data=data, backends=list(backend or ["ort-cpu"]),
                 config=config, torch_baseline=torch_baseline, options=_options(option),
                 spec=DataSpec(source=data, calibration=calibration, evaluation=evaluation, seed=seed))


def _range(text: str | None, name: str) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        lo, opt, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--{name} must be MIN,OPT,MAX (three integers), got '{text}'",
                        fix=f"e.g. --{name} 1,8,32") from None
    return lo, opt, hi


@app.command(short_help="ONNX -> TensorRT engine.")
@_guard
def build(
    model: Annotated[Path, typer.Argument(help="ONNX model (FP32 or Q/DQ INT8) to build.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Engine file (default: <model>.engine).")] = None,
    recipe: Annotated[Optional[str], typer.Option(help="Recipe whose shapes set the optimization profile.")] = None,
    batch: Annotated[Optional[str], typer.Option(help="Batch range MIN,OPT,MAX (default 1,8,32).")] = None,
    seq: Annotated[Optional[str], typer.Option(help="Sequence range MIN,OPT,MAX (default 1,128,128).")] = None,
    timing_cache: Annotated[Optional[Path], typer.Option(help="Timing cache (read if present, then updated).")] = None,
    workspace_mib: Annotated[int, typer.Option(min=1, help="Builder workspace limit in MiB.")] = 4096,
    aot: Annotated[bool, typer.Option("--aot/--jit", help="AOT plugin kernels in the engine (no Python needed to "
                                                          "run it) or the Python plugin implementations.")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print TensorRT's whole log.")] = False,
    target: Annotated[Optional[str], typer.Option(help="Deployment target the engine is for (deploykit "
                                                       "targets); refuses a model or GPU that does not fit.")] = None,
) -> None:
    """ONNX -> TensorRT engine (strongly typed, explicit Q/DQ, deploykit plugins); needs TensorRT and a GPU."""
    from deploykit.engine import ShapeRanges, build_engine

    if target is not None:
        from deploykit.targets import check_model, get_target

        chosen = get_target(target)
        if chosen.runtime.name != "tensorrt":
            raise UserError(f"target '{target}' runs {chosen.runtime.name}, not TensorRT engines",
                            fix="ship its ONNX model instead (no engine to build)")
        for note in check_model(model, chosen):
            print(f"note: {note}")

    ranges = ShapeRanges()
    if recipe is not None:
        from deploykit.recipe import load_recipe

        ranges = ShapeRanges.from_recipe(load_recipe(recipe))
    ranges = ShapeRanges(batch=_range(batch, "batch") or ranges.batch, sequence=_range(seq, "seq") or ranges.sequence)
    result = build_engine(model, out or model.with_suffix(".engine"), ranges=ranges, timing_cache=timing_cache,
                          workspace_mib=workspace_mib, aot=aot, verbose=verbose, target=target)
    print(f"engine: {result.engine} (TensorRT {result.info['tensorrt']}, {result.info['gpu']}, "
          f"sm {result.info['compute_capability']}, {result.info['build_seconds']} s); log: {result.log}")


@app.command(short_help="One edge bundle for a target.")
@_guard
def package(
    run_dir: Annotated[Path, typer.Argument(help="Folder of a finished run (runs/<name>).")],
    target: Annotated[str, typer.Option("--target", "-t", help="The deployment target (deploykit targets).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Bundle to write (default: "
                                                                     "<run>/bundles/<run>-<target>.tar.gz).")] = None,
    samples: Annotated[Optional[int], typer.Option(min=1, help="Verification inputs to carry (default: the whole "
                                                        "evaluation split).")] = None,
    variant: Annotated[Optional[str], typer.Option(help="For a study run: the variant to ship (its folder "
                                                        "name, e.g. na3x3).")] = None,
    targets_file: Annotated[Optional[Path], typer.Option(help="Your own targets file.")] = None,
    allow_failing: Annotated[bool, typer.Option("--allow-failing", help="Package models that miss their "
                                                                        "thresholds here (to debug on the device).")] = False,
) -> None:
    """One archive for a target: Q/DQ + FP32 ONNX, ranges (+ TensorRT calibration cache), plugin sources and PTX,
    matching engines, verification inputs/expected outputs/thresholds, manifest with SHA-256s. Models that miss
    their thresholds here are not packaged (exit code 1) unless --allow-failing."""
    from deploykit.package import package_run

    from deploykit.package import GateFailed

    try:
        result = package_run(run_dir, target, out, samples=samples, targets_file=targets_file, variant=variant,
                             allow_failing=allow_failing)
    except GateFailed as exc:
        print(f"deploykit: {exc}; --allow-failing packages it anyway", file=sys.stderr)
        raise typer.Exit(EXIT_ACCEPTANCE_FAILED) from None
    print(f"{result.path} (sha256 {result.sha256})")


@app.command(short_help="Unpack a bundle safely.")
@_guard
def unpack(
    bundle: Annotated[Path, typer.Argument(help="Bundle archive (.tar.gz) from deploykit package.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="New folder to unpack into "
                                                                     "(default: ./<bundle name>).")] = None,
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Refuse a bundle for any other target.")] = None,
) -> None:
    """Unpack a bundle safely: refuses unsafe members, hash mismatches and bundles for another target."""
    from deploykit.package import unpack_bundle

    print(unpack_bundle(bundle, out, target=target))


@app.command("device-verify", short_help="On the device: check and run a bundle.")
@_guard
def device_verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle archive or unpacked bundle folder.")],
    target: Annotated[Optional[str], typer.Option("--target", "-t", help="Refuse a bundle for any other target.")] = None,
    variant: Annotated[Optional[list[str]], typer.Option(help="Variant to check (repeatable; default: all).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="Threads (default: the target's).")] = None,
    iterations: Annotated[int, typer.Option(min=1, help="Timed batch-1 runs per variant.")] = 20,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the result as JSON too.")] = None,
    allow_other_arch: Annotated[bool, typer.Option("--allow-other-arch", help="Check the numerics on a machine "
                                                                                "of another architecture.")] = False,
) -> None:
    """On the device: check the bundle's hashes and target, build the engine if needed, compare with the
    expected outputs under the bundle's thresholds, time batch 1; exit code 1 on a miss."""
    from deploykit.package import device_verify as run_device_verify

    result = run_device_verify(bundle, target=target, out=out, variants=list(variant) if variant else None,
                               threads=threads, iterations=iterations, allow_other_arch=allow_other_arch)
    print(f"device-verify {result['name']}: {'PASS' if result['passed'] else 'FAIL'}")
    if not result["passed"]:
        raise typer.Exit(EXIT_ACCEPTANCE_FAILED)


@app.command(short_help="The deployment targets, or a model vs one.")
@_guard
def targets(
    check: Annotated[Optional[Path], typer.Option(help="ONNX model to check against --target.")] = None,
    target: Annotated[Optional[str], typer.Option(help="Target name (see the list).")] = None,
    targets_file: Annotated[Optional[Path], typer.Option(help="Your own targets (extends the built-in ones).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Every column (precisions, 2:4, description, source); "
                                                      "needs a wide terminal.")] = False,
) -> None:
    """The deployment targets (GPUs, Jetsons, edge CPUs), or whether a model fits one (--check)."""
    from deploykit.targets import check_model, get_target, load_targets

    if check is not None or target is not None:
        if check is None or target is None:
            raise UserError("--check and --target go together", fix="e.g. deploykit targets --check m.onnx "
                                                                     "--target jetson-orin")
        chosen = get_target(target, targets_file)
        notes = check_model(check, chosen)
        print(f"{check}: fits target {chosen.name} ({chosen.description})")
        for note in notes:
            print(f"  note: {note}")
        return
    table = load_targets(targets_file)
    if as_json:
        print(json.dumps({k: v.to_dict() for k, v in table.items()}, indent=2))
        return
    from deploykit.targets import render_targets

    render_targets(table, wide=wide)


@app.command(short_help="Render report.md and plots.")
@_guard
def report(
    report_json: Annotated[Path, typer.Argument(help="report.json to render.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.md and plots "
                                                                     "(default: next to report.json).")] = None,
) -> None:
    """Render report.md and plots from a report.json."""
    from deploykit import study_report
    from deploykit.report import render_report

    study_report.register()                  # a study's report.json renders with its section
    path = render_report(report_json, out)
    print(path)


@app.command(short_help="What is usable here (backends, devices).")
@_guard
def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Which backends, devices and versions are usable here, and why not where not."""
    from deploykit.doctor import checks_to_json, render_checks, run_checks

    checks = run_checks()
    if as_json:
        print(json.dumps(checks_to_json(checks), indent=2))
    else:
        render_checks(checks)


# The click that typer runs on: the click package, or the copy newer typer releases carry.
_click_errors = sys.modules[next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException").__module__]
_NoArgsIsHelp = getattr(_click_errors, "NoArgsIsHelpError", None) or type("_Never", (Exception,), {})
# Not every click copy typer bundles defines Abort in its exceptions module; typer re-exports it.
_Abort = getattr(_click_errors, "Abort", None) or typer.Abort


def _usage_error(exc: Exception) -> int:
    """A click/typer usage error as deploykit's one line (exit 2)."""
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "deploykit"
    message = " ".join(exc.format_message().split()).rstrip(".")
    print(f"deploykit: error: {where}: {message}; fix: see '{where} --help'", file=sys.stderr)
    return exc.exit_code if exc.exit_code else EXIT_USER_ERROR


def main() -> None:
    from deploykit.io import install_signal_handlers

    install_signal_handlers()
    try:
        rc = app(standalone_mode=False)
    except _NoArgsIsHelp as exc:
        exc.show()
        rc = exc.exit_code
    except _click_errors.ClickException as exc:
        rc = _usage_error(exc)
    except _Abort:
        print("deploykit: interrupted", file=sys.stderr)
        rc = 130
    except KeyboardInterrupt as exc:     # outside any command (e.g. while importing)
        rc = getattr(exc, "exit_code", 130)
        print("deploykit: interrupted", file=sys.stderr)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
