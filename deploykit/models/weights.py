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
