"""The audit's shadow run: which inputs also go through the full network, and reusing the full network's output
for input bytes it has already seen.

An audit says, for every input, whether skipping changed the answer: that takes the full network's output on the
same input (the shadow run), which costs a full forward per input on top of the skipped one. A
:class:`ShadowPlan` says how that output is obtained:

* ``reuse`` (default on): the full network's logits recorded earlier in the same database for the same model,
  parameters (SHA-256 over the state dict), preprocessing, device and input bytes (SHA-256) are taken instead of
  running the full network again. The full network is deterministic on a given device, so this is the same
  output; the record says it was reused and from which record (:attr:`AuditRecord.shadow_from`). Re-auditing a
  set under another threshold or policy then costs the skipped run alone.
* ``fraction`` (default 1: every input): only inputs whose SHA-256 falls in the first ``fraction`` of the hash
  space are checked against the full network (deterministic: the same inputs on every run and on resume). The
  others are recorded with ``shadow = "not checked"`` and no agreement; the report states the agreement over
  the checked inputs with its Wilson 95 % interval and how many were not checked.

The full network's output for an input it runs on is resumed from the skipped run where that got
(:func:`skipviz.engine.resume.full_logits`): an input that ran every block already has it, one that left at an
early exit continues from its state there, the others start from the image (the run's configuration says
``shadow_resumed``, which the replay of a record follows).

Each record's ``shadow`` field is ``"run"`` (the full network ran on it in its batch), ``"reused"`` or
``"not checked"``; records written before this field existed read as ``None`` (they were all run).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..engine.network import SkipNetwork

__all__ = ["SHADOW_NOT_CHECKED", "SHADOW_REUSED", "SHADOW_RUN", "ShadowPlan", "full_output_key",
           "preprocessing_fingerprint", "shadow_words"]

SHADOW_RUN = "run"
SHADOW_REUSED = "reused"
SHADOW_NOT_CHECKED = "not checked"


@dataclass(frozen=True)
class ShadowPlan:
    """How an audit obtains the full network's output for each input (see the module docstring).

    ``fraction``: share of inputs (chosen by their SHA-256) checked against the full network, in (0, 1].
    ``reuse``: take the full network's output from an earlier record of the same model, parameters,
    preprocessing, device and input bytes in the same database when there is one.
    """

    fraction: float = 1.0
    reuse: bool = True

    def __post_init__(self) -> None:
        f = float(self.fraction)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"the shadow fraction must be in (0, 1], got {self.fraction}")
        object.__setattr__(self, "fraction", f)

    @property
    def every_input(self) -> bool:
        return self.fraction >= 1.0

    def checks(self, input_sha256: str | None) -> bool:
        """Whether the input with this SHA-256 (hex) is checked against the full network: always when the
        fraction is 1, else when the first 64 bits of its hash, as a fraction of 2**64, are below it."""
        if self.every_input:
            return True
        if not input_sha256:
            return True  # not identifiable: checked rather than silently left out
        return int(input_sha256[:16], 16) < self.fraction * 2.0 ** 64

    def config(self) -> dict:
        """JSON-ready, stored in the run's configuration."""
        return {"fraction": self.fraction, "reuse": self.reuse}

    def describe(self) -> str:
        """Words for a report or a progress line."""
        part = "every input" if self.every_input else f"{self.fraction:.0%} of inputs (chosen by their SHA-256)"
        return part + (", reusing earlier full-network outputs of the same input bytes" if self.reuse else "")

    @classmethod
    def parse(cls, text: str, reuse: bool = True) -> "ShadowPlan":
        """``"all"``, a fraction (``"0.1"``) or a percentage (``"10%"``) -> a plan (``ValueError`` otherwise)."""
        t = str(text).strip().lower()
        if t in ("all", "every", "1", "1.0", "100%"):
            return cls(1.0, reuse)
        try:
            value = float(t[:-1]) / 100.0 if t.endswith("%") else float(t)
        except ValueError:
            raise ValueError(f"shadow: expected 'all', a fraction such as 0.1 or a percentage such as 10%, "
                             f"got {text!r}") from None
        return cls(value, reuse)

    @classmethod
    def from_config(cls, config: dict | None) -> "ShadowPlan":
        config = config or {}
        return cls(config.get("fraction", 1.0), config.get("reuse", True))


def preprocessing_fingerprint(net: "SkipNetwork") -> str:
    """What turns an image's bytes into the network's input: size, resize, mean and std of the model card."""
    meta = net.meta
    return json.dumps({"input_size": list(meta.input_size), "resize": getattr(meta, "resize", None),
                       "mean": list(meta.mean), "std": list(meta.std)}, sort_keys=True)


def full_output_key(model_name: str, params_sha256: str, preprocessing: str, device: str, input_sha256: str) -> str:
    """The key under which the full network's output on one input is kept: SHA-256 over the model's name, its
    parameters' hash, its preprocessing, the device and the input bytes' hash."""
    text = "\n".join((model_name, params_sha256, preprocessing, device, input_sha256))
    return hashlib.sha256(text.encode()).hexdigest()


def shadow_words(shadow: dict | None) -> str:
    """How the agreement was obtained, when not every input ran through the full network in this run: how
    many were checked by a shadow run, how many took a kept full output, how many were not checked."""
    if not shadow or (not shadow.get("reused") and not shadow.get("not_checked")):
        return ""
    parts = [f"{shadow.get('run', 0)} inputs run through the full network"]
    if shadow.get("reused"):
        parts.append(f"{shadow['reused']} compared with the full network's output kept from an earlier audit of the "
                     "same bytes")
    if shadow.get("not_checked"):
        parts.append(f"{shadow['not_checked']} not checked (the shadow run covered "
                     f"{shadow.get('plan', {}).get('fraction', 1.0):.0%} of inputs, chosen by SHA-256): the "
                     "agreement is over the checked inputs")
    return "; ".join(parts)
