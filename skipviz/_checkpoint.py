"""Loading weights without unpickling arbitrary objects.

``.safetensors`` files are read with ``safetensors``; anything else with ``torch.load(weights_only=True)``,
which refuses pickled code. Either way the result must be a flat mapping of names to tensors that fits the
model exactly; otherwise :class:`CheckpointError` says what is wrong.
"""
from __future__ import annotations

import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch
from torch import nn

MAX_CHECKPOINT_BYTES = 2 * 1024**3


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message says why.

    The message never passes on advice to load the file unsafely: any sentence that suggests
    ``weights_only=False`` (or turning the weights-only check off another way), as torch's own errors do, is
    removed, whichever path raised it (:func:`safe_message`)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(safe_message(str(message)))


# a sentence that advises loading unsafely, or belongs to that advice (torch's "Weights only load failed" text)
_UNSAFE_ADVICE = re.compile(
    r"weights_only|safe_globals|allowlist|TORCH_FORCE_(NO_)?WEIGHTS_ONLY_LOAD|trust|arbitrary code|"
    r"documentation of torch\.load|file an issue|can still be loaded|two options|Please use|Weights only load failed",
    re.IGNORECASE)


def safe_message(text: str) -> str:
    """``text`` without any sentence that suggests loading a weights file unsafely (``weights_only=False``,
    allow-listing globals, the environment switches that turn the check off) or belongs to that advice."""
    kept = []
    for line in str(text).splitlines():
        sentences = re.split(r"(?<=[.!?])\s+", line.strip())
        line = " ".join(s for s in sentences if s and not _UNSAFE_ADVICE.search(s))
        line = re.sub(r"^WeightsUnpickler error:\s*", "", line).strip()
        if line:
            kept.append(line)
    return " ".join(kept)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file (safetensors, or a weights-only torch file) into a name -> tensor dict on CPU."""
    return load_checkpoint(path)[0]


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Read a weights file into ``(name -> tensor dict on CPU, the entries stored beside it)``.

    A torch file may wrap its state dict in a dict (``{'state_dict': ..., 'best_prec1': 93.6}``); the second
    item holds that dict's other entries as loaded (``{}`` for a safetensors file or a bare state dict).
    """
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
    extras: dict[str, object] = {}
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(p), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p.name}: not a valid safetensors file ({e})") from e
    else:
        state = _torch_load(p, head)
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                extras = {k: v for k, v in state.items() if k != key}
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{p.name}: holds no named tensors")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{p.name}: entries that are not tensors: {bad[:5]}")
    return state, extras


def _torch_load(p: Path, head: bytes) -> object:
    """``torch.load(weights_only=True)`` of a zip or legacy torch file, every failure a :class:`CheckpointError`."""
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):
        raise CheckpointError(f"{p.name}: not a PyTorch weights file (expected .safetensors or a torch.save zip)")
    if head.startswith(b"PK"):  # the size limit holds for what the members unpack to, not just the file
        try:
            with zipfile.ZipFile(p) as zf:
                unpacked = sum(info.file_size for info in zf.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(f"{p.name}: damaged, truncated or unreadable weights file ({e})") from e
        if unpacked > MAX_CHECKPOINT_BYTES:
            raise CheckpointError(f"{p.name}: its contents unpack to {unpacked / 2**30:.1f} GiB, over the weights "
                                  "size limit")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if head[:1] == b"\x80" and _legacy_pickles_truncated(p):
            raise CheckpointError(f"{p.name}: truncated weights file (it ends inside its pickled index)") from e
        raise CheckpointError(f"{p.name}: refused: the file holds pickled objects other than tensors and numbers "
                              f"(only weights are loaded, never code): {_refusal_reason(e)}") from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, struct.error) as e:
        reason = str(e).splitlines()[0] if str(e) else f"{type(e).__name__}: the data ends early"
        raise CheckpointError(f"{p.name}: damaged, truncated or unreadable weights file ({reason})") from e


def _refusal_reason(e: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler refused (e.g. ``Unsupported global: GLOBAL builtins.print ...``), without
    torch's advice on how to load the file anyway: a file that needs it is not loaded by this project."""
    reason = safe_message(str(e))
    return reason or type(e).__name__


def _legacy_pickles_truncated(p: Path, pickles: int = 5) -> bool:
    """Whether a legacy (non-zip) torch file ends inside one of its leading pickles (magic number, protocol,
    system info, the object, the storage keys). Parsed with :mod:`pickletools`, which reads opcodes and runs
    nothing. A file whose pickles are complete was refused for what it holds, not for being cut short."""
    import pickletools

    size = p.stat().st_size
    with open(p, "rb") as f:
        for _ in range(pickles):
            start = f.tell()
            if start >= size:  # the file ended cleanly between pickles: fewer than a torch file has, not cut short
                return False
            try:
                for _op in pickletools.genops(f):
                    pass
            except ValueError:  # ran out of data ("pickle exhausted before seeing STOP", "not enough data")
                return f.tell() >= size
    return False


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
