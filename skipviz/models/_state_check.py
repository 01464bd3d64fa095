"""Checking a weights file against an architecture before loading it, with a message that names the first
mismatch (in the model's own key order) and what to change when the mismatch is the classifier's size."""
from __future__ import annotations

import torch
from torch import nn

from .._checkpoint import CheckpointError

__all__ = ["check_state_dict", "strip_common_prefix"]


def strip_common_prefix(state: dict[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.",)) -> dict:
    """``state`` without a prefix that every key carries (``module.`` of a DataParallel / DDP save)."""
    for prefix in prefixes:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, what: str,
                     classifier_keys: tuple[str, ...] = ()) -> None:
    """Raise :class:`CheckpointError` unless ``state`` holds exactly ``model``'s tensors with their shapes.

    The message names the first mismatch in the model's key order (a missing tensor or a shape), else the
    first tensor of the file the model has no place for, and counts all of them. When the first mismatch is
    one of ``classifier_keys`` (the classifier's weight/bias), it says which ``num_classes`` the file has.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    unexpected = [k for k in state if k not in own]
    if not (missing or shapes or unexpected):
        return
    first_bad = next(k for k in own if k in missing or k in shapes) if (missing or shapes) else None
    if first_bad is None:
        first = f"the file has {unexpected[0]} {tuple(state[unexpected[0]].shape)}, which the model has no place for"
    elif first_bad in missing:
        first = f"the model needs {first_bad} {tuple(own[first_bad].shape)}, which the file does not have"
    else:
        first = f"{first_bad} is {tuple(state[first_bad].shape)} in the file but {tuple(own[first_bad].shape)} in the model"
    counts = ", ".join(f"{n} {label}" for n, label in ((len(missing), "missing"), (len(shapes), "of another shape"),
                                                       (len(unexpected), "unexpected")) if n)
    hint = ""
    if first_bad in shapes and first_bad in classifier_keys:
        hint = f"; the file's classifier has {state[first_bad].shape[0]} classes: pass num_classes={state[first_bad].shape[0]}"
    elif first_bad in missing and len(missing) == len(own):
        hint = "; the file holds no tensor of this architecture: is it the weights of another model?"
    raise CheckpointError(f"{source} does not fit {what}: first mismatch: {first} ({counts}){hint}")
