"""Loading weights without unpickling arbitrary objects.

``.safetensors`` files are read with ``safetensors``; anything else with ``torch.load(weights_only=True)``,
which refuses pickled code. Either way the result must be a flat mapping of names to tensors that fits the
model exactly; otherwise :class:`CheckpointError` says what is wrong.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

MAX_CHECKPOINT_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message says why."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (safetensors, or a weights-only torch file) into a name -> tensor dict on CPU."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such weights file")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(f"{p.name}: weights file is empty")
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(f"{p.name}: {size / 2**30:.1f} GiB is over the weights size limit")
    with open(p, "rb") as f:
        head = f.read(16)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p.name}: not a valid safetensors file ({e})") from e
    else:
        if not (head.startswith(b"PK") or head[:1] == b"\x80"):
            raise CheckpointError(f"{p.name}: not a PyTorch weights file (expected .safetensors or a torch.save zip)")
        if head.startswith(b"PK"):  # the size limit holds for what the members unpack to, not just the file
            try:
                with zipfile.ZipFile(p) as zf:
                    unpacked = sum(info.file_size for info in zf.infolist())
            except (zipfile.BadZipFile, OSError, ValueError) as e:
                raise CheckpointError(f"{p.name}: damaged or unreadable weights file ({e})") from e
            if unpacked > MAX_CHECKPOINT_BYTES:
                raise CheckpointError(f"{p.name}: its contents unpack to {unpacked / 2**30:.1f} GiB, over the weights "
                                      "size limit")
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{p.name}: refused: the file holds pickled objects other than weights "
                                  f"(only tensors are loaded, never arbitrary code): {str(e).splitlines()[0]}") from e
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(f"{p.name}: damaged or unreadable weights file ({e})") from e
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{p.name}: holds no named tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{p.name}: entries that are not tensors: {bad[:5]}")
    return state


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly, with a readable message on any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with the wrong shape (e.g. {shapes[:2]})")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
