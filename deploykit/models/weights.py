"""Loading local weights safely: safetensors, or torch files with weights_only=True."""

from __future__ import annotations

from pathlib import Path

import torch

from deploykit.errors import UserError


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", path=path, fix="check model.options.checkpoint")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        raise UserError(f"cannot read checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})", path=path,
                        fix="use a .safetensors file or a torch state_dict saved with torch.save") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise UserError("checkpoint is not a state_dict", path=path, fix="save model.state_dict(), not the model")
    return state


def apply_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load ``state`` into ``module`` exactly: tensor names and shapes must match the model's,
    else one error names the checkpoint, a few of the differing names, and the fix."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's tensors missing ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors the model does not have ({some(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} with another shape ({some(wrong)})")
    if problems:
        raise UserError("the checkpoint does not fit the model: " + "; ".join(problems), path=path,
                        fix="use a checkpoint saved from this architecture and these model options "
                            "(its state_dict keys must match)")
    module.load_state_dict(state)


def load_checkpoint_option(module: torch.nn.Module, options: dict) -> None:
    """Load ``options['checkpoint']`` (when given) into ``module`` exactly."""
    if options.get("checkpoint"):
        apply_state_dict(module, load_state_dict(options["checkpoint"]), options["checkpoint"])


def option_int(options: dict, key: str, default: int | None = None, *, minimum: int | None = None) -> int | None:
    """``options[key]`` as an int (YAML or --option text); anything else is the user's to fix."""
    value = options.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)) or \
            (isinstance(value, str) and not value.strip().lstrip("+-").isdigit()):
        raise UserError(f"model option {key} must be a whole number, not {value!r}",
                        path=f"model.options.{key}", fix=f"e.g. --option {key}={default if default else 1}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise UserError(f"model option {key} must be at least {minimum}, not {value}",
                        path=f"model.options.{key}", fix=f"e.g. --option {key}={max(minimum, default or minimum)}")
    return value
