"""Model metadata that travels with the weights (as torchvision's ``Weights``): classes, input size,
normalisation, the preprocessing transform, and the identity of the weights file (path, SHA-256, card).

The model card is read here and only here: :func:`read_card` parses the file, :class:`ModelMeta` answers every
question about it (default thresholds, the recorded FLOP table, the plan head's shape, the validation split,
the dashboard's card rows)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .._checkpoint import CheckpointError
from ..policies.threshold import DECISION_SOURCES
from ..policies.words import exit_blocks_words

__all__ = ["CIFAR10_CLASSES", "CIFAR10_MEAN", "CIFAR10_STD", "IMAGENET_MEAN", "IMAGENET_STD", "ModelMeta", "OperatingPoint", "read_card",
           "sha256_file"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class OperatingPoint:
    """A named threshold the model card records for a decision source (``operating_points.<source>.<name>``): the
    rule it was chosen by on the validation split and whether that split met it."""

    name: str
    threshold: float
    rule: str
    met_on_validation: bool


@dataclass
class ModelMeta:
    """What a run must record to say exactly what it used.

    ``input_size`` is (3, H, W). ``resize`` is the size the shorter image side is resized to before the
    centre crop to (H, W). ``card`` is the model card (training data, accuracy, FLOPs...) when the weights
    have one.
    """

    arch: str
    classes: list[str]
    input_size: tuple[int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int
    weights_name: str | None = None
    weights_path: str | None = None
    weights_sha256: str | None = None
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def default_threshold(self, source: str = "gates") -> float:
        """The card's default threshold for a decision source (:data:`~skipviz.policies.threshold.DECISION_SOURCES`
        says where: the per-block gates' ``default_policy.threshold``, the plan head's ``plan.default_threshold``,
        the early exits' ``early_exit.default_threshold``; an unknown source reads the gates'); the source's
        ``fallback_threshold`` (0.5; exits 0.95) when the card has none."""
        src = DECISION_SOURCES.get(source) or DECISION_SOURCES["gates"]
        section = (self.card or {}).get(src.card_section)
        value = section.get(src.card_field) if isinstance(section, dict) else None
        return float(value if value is not None else src.fallback_threshold)

    def default_source(self, offered: list[str] | None = None) -> str:
        """The decision source the card recommends (``default_source``: e.g. the early exits when their faithful
        point cuts more than the gates' fast one while keeping the network's answers) when ``offered`` (the
        sources the network has heads for, :func:`~skipviz.policies.threshold.offered_sources`) includes it;
        else ``"gates"`` (whose policy is the full network when the network has no gate heads)."""
        want = (self.card or {}).get("default_source")
        if want in DECISION_SOURCES and (offered is None or want in offered):
            return str(want)
        return "gates"

    def source_options(self, source: str) -> dict[str, Any]:
        """The further policy arguments the card records for a decision source (its ``card_options``, e.g. the
        early exits' ``blocks`` and ``min_block`` under ``early_exit``); ``{}`` when the card has none."""
        src = DECISION_SOURCES.get(source)
        section = (self.card or {}).get(src.card_section) if src is not None else None
        if not isinstance(section, dict):
            return {}
        return {k: section[k] for k in src.card_options if section.get(k) is not None}

    def operating_points(self, source: str = "gates") -> dict[str, float]:
        """The named operating points the card records for a decision source (``operating_points.<source>``):
        e.g. ``{"fast": 0.3, "faithful": 0.1}`` (fast: the largest FLOPs cut within the card's accuracy-drop
        bound; faithful: the largest cut keeping >= 99 % top-1 agreement with the full network); ``{}`` when
        the card has none."""
        return {p.name: p.threshold for p in self.operating_point_records(source)}

    def operating_point_records(self, source: str = "gates") -> list[OperatingPoint]:
        """The card's named operating points for a decision source with their rules (see :meth:`operating_points`),
        in the card's order; ``[]`` when it has none."""
        section = ((self.card or {}).get("operating_points") or {}).get(source)
        if not isinstance(section, dict):
            return []
        return [OperatingPoint(name, float(p["threshold"]), str(p.get("rule") or ""),
                               p.get("rule_met_on_validation") is not False)  # a point without the flag met its rule
                for name, p in section.items() if isinstance(p, dict) and p.get("threshold") is not None]

    def operating_point(self, name: str, source: str = "gates") -> float:
        """The threshold of the named operating point; ``KeyError`` naming the ones the card has."""
        points = self.operating_points(source)
        if name not in points:
            known = ", ".join(sorted(points)) or "none"
            raise KeyError(f"{self.display_name} has no {name!r} operating point for {source} (the card has: {known})")
        return points[name]

    def card_flop_table(self) -> dict | None:
        """The per-part FLOP table the card recorded (:meth:`FlopTable.to_dict` form), when the card names these
        weights' SHA-256; else ``None``."""
        card = self.card or {}
        raw = (card.get("flops") or {}).get("table")
        if not raw or not self.weights_sha256 or card.get("weights_sha256") != self.weights_sha256:
            return None
        return raw

    def card_plan_head(self) -> dict:
        """The shape of the plan head the card describes (``grid``, ``hidden``, ``gated_blocks``), or ``{}``."""
        return ((self.card or {}).get("plan") or {}).get("head") or {}

    def card_validation_split(self) -> dict | None:
        """The validation split the card records (``dataset.validation``: how it was carved from ``train/``), or
        ``None``."""
        dataset = (self.card or {}).get("dataset")
        validation = dataset.get("validation") if isinstance(dataset, dict) else None
        return validation if isinstance(validation, dict) else None

    def card_rows(self) -> list[tuple[str, str]]:
        """The card's training data, test metrics, default policy, date and reproduce command as readable
        (field, value) rows (the dashboard's model card table)."""
        card, rows = self.card or {}, []
        ds = card.get("dataset", {})
        if ds:
            rows.append(("training data", f"{ds.get('name', '')}: train {ds.get('train', {}).get('n', '?')}, "
                                          f"validation {ds.get('validation', {}).get('n', '?')}, "
                                          f"test {ds.get('test', {}).get('n', '?')}"))
        m = card.get("metrics_test", {})
        tuned = (card.get("backbone") or {}).get("fine_tuned")
        if tuned:
            test = (tuned.get("full_vs_published") or {}).get("test") or {}
            rows.append(("backbone", "a copy of the published network fine-tuned to be skipped"
                         + (f"; its full network gives the published one's answer on {test['agreement']:.2%} of the "
                            f"test images" if test.get("agreement") is not None else "")))
        if m.get("full_accuracy") is not None:
            rows.append(("test accuracy (full)", f"{m['full_accuracy']:.2%}"))
            if m.get("published_full_accuracy") is not None:
                rows.append(("test accuracy (published network)", f"{m['published_full_accuracy']:.2%}"))
        gated = self._default_point_on_test()
        if gated is not None:
            versus = "the published network" if tuned else "full"
            rows += [("test accuracy (gated)", f"{gated['accuracy']:.2%} at threshold {gated['threshold']:.2f}"),
                     ("FLOPs saved (gated, test)", f"{gated['flops_saved_fraction']:.1%}"),
                     (f"agreement with {versus} (test)", f"{gated['agreement_with_full']:.2%}")]
        rows += self._operating_point_rows("the published network" if tuned else "full")
        if card.get("default_source") in DECISION_SOURCES:
            rows.append(("default decision source", DECISION_SOURCES[card["default_source"]].label))
        if card.get("default_policy"):
            rows.append(("default policy", json.dumps({k: v for k, v in card["default_policy"].items()
                                                       if k not in ("rule", "time_model")})))
        if card.get("date"):
            rows.append(("trained", str(card["date"])))
        if card.get("reproduce"):
            rows.append(("reproduce", str(card["reproduce"])))
        return rows

    def _operating_point_rows(self, versus: str) -> list[tuple[str, str]]:
        """One row per named operating point with a test record (``operating_points.<source>.<name>.test``):
        its threshold, FLOPs saved, agreement and accuracy on the test split."""
        rows = []
        for source, section in ((self.card or {}).get("operating_points") or {}).items():
            if source not in DECISION_SOURCES or not isinstance(section, dict):
                continue
            for name, point in section.items():
                test = point.get("test") if isinstance(point, dict) else None
                if not isinstance(test, dict) or point.get("threshold") is None:
                    continue
                where = exit_blocks_words(point)
                acc = f", accuracy {test['accuracy']:.2%}" if test.get("accuracy") is not None else ""
                rows.append((f"{name} point, {DECISION_SOURCES[source].label} (test)",
                             f"threshold {point['threshold']:.2f}{where}: {test['flops_saved_fraction']:.1%} of FLOPs "
                             f"saved, {test['agreement_with_full']:.2%} agreement with {versus}{acc}"))
        return rows

    def _default_point_on_test(self) -> dict | None:
        """The gates at the card's default threshold on the test split: ``threshold``, ``accuracy``,
        ``flops_saved_fraction``, ``agreement_with_full``; from the flat ``metrics_test`` of a trained CIFAR card
        or the default operating point's ``test`` record of a distilled or fine-tuned card; ``None`` when the card
        has neither (nothing is shown rather than NaN)."""
        card = self.card or {}
        m = card.get("metrics_test") or {}
        if m.get("gated_accuracy") is not None:
            if m.get("gated_threshold") != self.default_threshold("gates"):  # a default since set to 0 (vetoed)
                return None
            return {"threshold": m.get("gated_threshold"), "accuracy": m["gated_accuracy"],
                    "flops_saved_fraction": m.get("gated_flops_saved_fraction"),
                    "agreement_with_full": m.get("agreement_with_full")}
        name = (card.get("default_policy") or {}).get("operating_point") or "fast"
        point = (((card.get("operating_points") or {}).get("gates") or {}).get(name)) or {}
        test = point.get("test") if isinstance(point.get("test"), dict) else point
        keys = ("threshold", "accuracy", "flops_saved_fraction", "agreement_with_full")
        if not test or any(test.get(k) is None for k in keys):
            return None
        return {k: test[k] for k in keys}

    @property
    def display_name(self) -> str:
        return f"{self.arch}.{self.weights_name}" if self.weights_name else f"{self.arch} (random init)"

    def transforms(self):
        """The reference preprocessing, a torchvision ``transforms.v2.Compose``: PIL RGB image (any size) ->
        float tensor (3, H, W), normalised. Shorter side resized to ``resize`` (PIL bilinear, antialiased),
        centre crop to (H, W), scaled to [0, 1], normalised with ``mean``/``std``."""
        from torchvision.transforms import v2  # imported on use: torchvision's import costs ~2 s of start-up

        h, w = self.input_size[1:]
        return v2.Compose([
            v2.Resize(self.resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop((h, w)),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
        ])

    def preprocess(self, images: Image.Image | list[Image.Image]) -> torch.Tensor:
        """One or several PIL RGB images -> (N, 3, H, W) batch, bit for bit what :meth:`transforms` gives
        (a test holds them equal), computed with the same PIL resize and crop calls and the same tensor
        arithmetic but without importing torchvision, so the dashboard's first prediction does not wait for
        it. Falls back to :meth:`transforms` when the crop is larger than the resized image (padding)."""
        if isinstance(images, Image.Image):
            images = [images]
        return torch.stack([self._preprocess_one(im) for im in images])

    def _preprocess_one(self, image: Image.Image) -> torch.Tensor:
        """PIL RGB image -> (3, H, W) float32, normalised."""
        px = self.pixels(image)
        if px is None:
            return self.transforms()(image)
        return self.normalize(torch.from_numpy(px)[None])[0]

    def pixels(self, image: Image.Image) -> np.ndarray | None:
        """PIL image -> (H, W, 3) uint8 array, resized and centre-cropped as :meth:`transforms` does (the same
        PIL calls), or ``None`` when only :meth:`transforms` can do it (a crop larger than the resized image, or
        a mode other than RGB). With :meth:`normalize`, what :meth:`preprocess` computes; an audit stacks a
        batch's pixels and normalises them at once (per image, the tensor arithmetic cost about 0.1 ms of
        Python per input, on the 2-core AMD EPYC)."""
        crop_h, crop_w = self.input_size[1:]
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if crop_h > new_h or crop_w > new_w or image.mode != "RGB":
            return None
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))
        if (crop_w, crop_h) != (new_w, new_h):
            image = image.crop((left, top, left + crop_w, top + crop_h))
        return np.array(image, dtype=np.uint8)  # a new, writable array

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 scaled to [0, 1] and normalised with ``mean``/``std``, as
        :meth:`transforms` computes it element by element (channels-last in memory: the engine's layout)."""
        x = pixels.permute(0, 3, 1, 2).to(torch.float32).mul_(1.0 / 255)
        mean = torch.as_tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.as_tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return x.sub_(mean).div_(std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised -> (N, 3, H, W) in [0, 1] for display."""
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x * std + mean).clamp(0, 1)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "classes": self.classes, "input_size": list(self.input_size),
                "mean": list(self.mean), "std": list(self.std), "resize": self.resize,
                "weights_name": self.weights_name, "weights_path": self.weights_path,
                "weights_sha256": self.weights_sha256}


def read_card(path: str | Path) -> dict[str, Any]:
    """Read a model card (JSON) next to a weights file; empty dict if there is none."""
    p = Path(path)
    if not p.exists():
        return {}
    try:
        card = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p.name}: unreadable model card ({e})") from e
    if not isinstance(card, dict):
        raise CheckpointError(f"{p.name}: a model card must be a JSON object, got {type(card).__name__}")
    return card
