"""The deploykit command line (typer). Each command parses its arguments and calls one
library function; a :class:`deploykit.errors.UserError` becomes one line on stderr and exit
code 2, a failed acceptance check exit code 3."""

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
    help="Take a PyTorch transformer and ship it: export -> INT8 calibrate -> verify -> bench -> report.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)


def _guard(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"deploykit: error: {exc.one_line()}", file=sys.stderr)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            print("deploykit: interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

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
        out[key.strip()] = yaml.safe_load(raw)
    return out


# Shared option declarations.
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model source (embedded:minilm, hf:<folder>, a folder, timm:<arch>). "
                          "Default: the source recorded in the ONNX file.")]
OptionOpt = Annotated[Optional[list[str]], typer.Option("--option", help="Model option key=value (repeatable).")]
DataOpt = Annotated[str, typer.Option("--data", help="docstrings | digits | <file>.txt | <file>.npz (saved feeds, "
                                                      "used whole).")]
CalibOpt = Annotated[int, typer.Option("--calibration", help="Calibration samples in the seeded split.")]
EvalOpt = Annotated[int, typer.Option("--evaluation", help="Evaluation samples in the seeded split.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the calibration/evaluation split.")]
ReportOpt = Annotated[Path, typer.Option("--report", "-r", help="report.json to create or update.")]


@app.command()
@_guard
def run(
    recipe: Annotated[Optional[str], typer.Argument(help="Recipe file or built-in recipe name "
                                                         "(default: minilm-int8, shipped with deploykit).")] = None,
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


@app.command()
@_guard
def export(
    source: Annotated[str, typer.Argument(help="Model source.")] = "embedded:minilm",
    out: Annotated[Path, typer.Option("--out", "-o", help="ONNX file to write.")] = Path("model.onnx"),
    opset: Annotated[int, typer.Option(help="ONNX opset (>= 17).")] = 18,
    option: OptionOpt = None,
) -> None:
    """Export a model to ONNX (dynamic batch/sequence) and check parity with torch."""
    from deploykit.pipeline import export_model

    export_model(source, out, options=_options(option), opset=opset)


@app.command()
@_guard
def calibrate(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model (from deploykit export).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Q/DQ model to write "
                                                                     "(default: <model>.int8.onnx).")] = None,
    source: ModelOpt = None,
    option: OptionOpt = None,
    data: DataOpt = "docstrings",
    calibration: CalibOpt = 256,
    evaluation: EvalOpt = 1000,
    seed: SeedOpt = 0,
    method: Annotated[str, typer.Option(help="minmax | percentile | entropy")] = "percentile",
    percentile: Annotated[float, typer.Option(help="Share of |x| kept by the percentile method.")] = 99.99,
    op_types: Annotated[str, typer.Option(help="Comma-separated op types to quantize.")] = "MatMul,Gemm",
    exclude: Annotated[Optional[list[str]], typer.Option(help="Node name to keep in float (repeatable).")] = None,
    activation_type: Annotated[str, typer.Option(help="int8 (TensorRT) or uint8 (x86 ORT).")] = "int8",
    asymmetric: Annotated[bool, typer.Option(help="Asymmetric activations (not TensorRT-legal).")] = False,
    per_channel: Annotated[bool, typer.Option(help="Per-channel weight scales.")] = True,
    batch_size: Annotated[int, typer.Option(help="Calibration batch size.")] = 16,
) -> None:
    """Calibrate static INT8 and write explicit QuantizeLinear/DequantizeLinear."""
    from deploykit.data import DataSpec
    from deploykit.pipeline import calibrate_model
    from deploykit.quantize import QuantConfig

    config = QuantConfig(method=method, percentile=percentile,
                         op_types=[t.strip() for t in op_types.split(",") if t.strip()],
                         nodes_to_exclude=list(exclude or []), per_channel=per_channel,
                         activation_type=activation_type, activation_symmetric=not asymmetric, batch_size=batch_size)
    out = out or model.with_name(model.stem + ".int8.onnx")
    calibrate_model(model, out, source=source, data=data, options=_options(option),
                    spec=DataSpec(source=data, calibration=calibration, evaluation=evaluation, seed=seed),
                    config=config)


@app.command()
@_guard
def verify(
    models: Annotated[list[Path], typer.Argument(help="ONNX models to verify against torch FP32.")],
    source: ModelOpt = None,
    option: OptionOpt = None,
    data: DataOpt = "docstrings",
    calibration: CalibOpt = 256,
    evaluation: EvalOpt = 1000,
    seed: SeedOpt = 0,
    reference: Annotated[Optional[Path], typer.Option(help="Saved torch outputs (reference.npz of a run).")] = None,
    backend: Annotated[str, typer.Option(help="ort-cpu | ort-cuda")] = "ort-cpu",
    batch_size: Annotated[int, typer.Option(help="Inference batch size.")] = 32,
    report: ReportOpt = Path("report.json"),
) -> None:
    """Accuracy of ONNX models vs the torch FP32 model on the evaluation set."""
    from deploykit.data import DataSpec
    from deploykit.pipeline import verify_models

    verify_models(models, report, source=source, data=data, reference=reference, backend=backend,
                  batch_size=batch_size, options=_options(option),
                  spec=DataSpec(source=data, calibration=calibration, evaluation=evaluation, seed=seed))


@app.command()
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
    seq: Annotated[int, typer.Option(help="Sequence length for text models.")] = 128,
    threads: Annotated[Optional[int], typer.Option(help="Threads (default: all cores available).")] = None,
    warmup: Annotated[int, typer.Option(help="Warm-up runs per configuration.")] = 3,
    iterations: Annotated[int, typer.Option(help="Timed runs per configuration (at least).")] = 20,
    torch_baseline: Annotated[bool, typer.Option("--torch/--no-torch", help="Time eager torch FP32 too.")] = True,
    report: ReportOpt = Path("report.json"),
) -> None:
    """Latency p50/p90/p99 and throughput per model, backend and batch size."""
    from deploykit.bench import BenchConfig
    from deploykit.data import DataSpec
    from deploykit.pipeline import bench_models

    config = BenchConfig(batches=list(batch or [1, 8, 32]), seq_len=seq, warmup=warmup, iterations=iterations,
                         threads=threads)
    bench_models(list(models or []), report, source=source, data=data, backends=list(backend or ["ort-cpu"]),
                 config=config, torch_baseline=torch_baseline, options=_options(option),
                 spec=DataSpec(source=data, calibration=calibration, evaluation=evaluation, seed=seed))


@app.command()
@_guard
def report(
    report_json: Annotated[Path, typer.Argument(help="report.json to render.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.md and plots "
                                                                     "(default: next to report.json).")] = None,
) -> None:
    """Render report.md and plots from a report.json."""
    from deploykit.report import render_report

    path = render_report(report_json, out)
    print(path)


@app.command()
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
