"""Importing the public CIFAR-10 ResNet checkpoints (akamaster/pytorch_resnet_cifar10) as SkipViz weights.

Those files are legacy ``torch.save`` dicts ``{'best_prec1': float, 'state_dict': {...}}`` whose keys carry a
``module.`` prefix (DataParallel): ``conv1``, ``bn1``, ``layerS.B.{conv1,bn1,conv2,bn2}``, ``linear``. The
architecture is :func:`~skipviz.models.cifar_resnet.cifar_resnet` exactly (option-A shortcuts have no
parameters); the inputs are normalised with the ImageNet mean and std. They are read with
``torch.load(weights_only=True)`` (:func:`~skipviz._checkpoint.load_checkpoint`), never unpickling code.

:func:`import_cifar_resnet` writes a ``.safetensors`` file and its model card; ``create_model(arch,
weights=that_file)`` then rebuilds the network with the right normalisation and no gate or probe heads.
"""
from __future__ import annotations

import json
import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

from .._checkpoint import CheckpointError, apply_state_dict, load_checkpoint
from .weights import IMAGENET_MEAN, IMAGENET_STD, sha256_file
from .cifar_resnet import DEPTHS, cifar_resnet

__all__ = ["AKAMASTER_ENV", "SOURCE_REPOSITORY", "akamaster_dir", "akamaster_file", "convert_state_dict",
           "import_cifar_resnet"]

AKAMASTER_ENV = "SKIPVIZ_AKAMASTER"
SOURCE_REPOSITORY = "https://github.com/akamaster/pytorch_resnet_cifar10"

_BLOCK_KEY = re.compile(r"layer([123])\.(\d+)\.(conv1|bn1|conv2|bn2)\.(\w+)")
_STEM_KEY = re.compile(r"(conv1|bn1)\.(\w+)")
_HEAD_KEY = re.compile(r"linear\.(weight|bias)")


def akamaster_dir() -> Path | None:
    """The folder of the public checkpoints (``$SKIPVIZ_AKAMASTER``, else
    ``../shared/weights/cifar10-resnet-akamaster`` beside the repository), or ``None`` when it is absent."""
    env = os.environ.get(AKAMASTER_ENV)
    root = (Path(env) if env else
            Path(__file__).resolve().parents[3] / "shared" / "weights" / "cifar10-resnet-akamaster")
    return root if root.is_dir() else None


def akamaster_file(depth: int) -> Path | None:
    """The public checkpoint of ResNet-``depth`` (``resnet<depth>-<hash>.th``), or ``None`` when absent."""
    root = akamaster_dir()
    found = sorted(root.glob(f"resnet{depth}-*.th")) if root is not None else []
    return found[0] if found else None


def convert_state_dict(state: dict[str, torch.Tensor], source: str = "checkpoint") -> tuple[int, dict[str, torch.Tensor]]:
    """Map an akamaster state dict (``module.`` prefix optional) onto ``cifar_resnet<depth>``'s backbone keys.

    Returns ``(depth, state)``: ``stem.0``/``stem.1`` for ``conv1``/``bn1``, ``blocks.i.*`` for
    ``layerS.B.*`` (i counted over the stages), ``head.fc`` for ``linear``; BatchNorm ``num_batches_tracked``
    counters the file lacks are zero. Raises :class:`CheckpointError` when keys do not map (another
    architecture) or the stages are not three of equal depth.
    """
    keys = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
    blocks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for k, v in keys.items():
        if m := _BLOCK_KEY.fullmatch(k):
            blocks.setdefault((int(m[1]), int(m[2])), {})[f"{m[3]}.{m[4]}"] = v
        elif m := _STEM_KEY.fullmatch(k):
            out[f"stem.{0 if m[1] == 'conv1' else 1}.{m[2]}"] = v
        elif _HEAD_KEY.fullmatch(k):
            out[f"head.fc.{k.split('.')[1]}"] = v
        else:
            unmapped.append(k)
    if unmapped:
        hint = (" (projection shortcuts: an option-B ResNet, not the option-A CIFAR ResNet)"
                if any("shortcut" in k or "downsample" in k for k in unmapped) else "")
        raise CheckpointError(f"{source}: not a CIFAR ResNet in the akamaster layout: {len(unmapped)} keys do not "
                              f"map onto cifar_resnet (e.g. {unmapped[:4]}){hint}")
    per_stage = [sorted(b for s, b in blocks if s == stage) for stage in (1, 2, 3)]
    n = len(per_stage[0])
    if n == 0 or any(ids != list(range(n)) for ids in per_stage):
        raise CheckpointError(f"{source}: not a CIFAR ResNet: the three stages hold blocks "
                              f"{[ids[:3] + (['...'] if len(ids) > 3 else []) for ids in per_stage]}, "
                              "expected the same number 0..n-1 in each")
    depth = 6 * n + 2
    if depth not in DEPTHS:
        raise CheckpointError(f"{source}: a ResNet-{depth}; SkipViz has cifar_resnet{list(DEPTHS)}")
    for (stage, b), tensors in blocks.items():
        i = (stage - 1) * n + b
        out.update({f"blocks.{i}.{k}": v for k, v in tensors.items()})
    for k in [k for k in out if k.endswith(".running_var")]:
        out.setdefault(k.replace(".running_var", ".num_batches_tracked"), torch.tensor(0, dtype=torch.long))
    return depth, out


def _license_notice(path: Path) -> dict:
    lic = path.parent / "LICENSE"
    if lic.is_file():
        return {"file": "LICENSE (beside the source checkpoint)", "notice": lic.read_text(encoding="utf-8").strip()}
    return {"file": None, "notice": None, "note": f"no LICENSE file beside {path.name}; check the source's terms"}


def _weights_path(dest: str | Path | None, arch: str) -> Path:
    """Where :func:`import_cifar_resnet` writes: ``dest`` when it names a ``.safetensors`` file, else
    ``<arch>_akamaster.safetensors`` in the folder ``dest`` (default: the current folder)."""
    if dest is None or Path(dest).is_dir() or Path(dest).suffix == "":
        folder = Path(dest) if dest is not None else Path.cwd()
        out = folder / f"{arch}_akamaster.safetensors"
    else:
        out = Path(dest)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: the imported weights are written as .safetensors")
    return out


def import_cifar_resnet(path: str | Path, dest: str | Path | None = None,
                        repository: str = SOURCE_REPOSITORY) -> tuple[Path, dict]:
    """Import a public CIFAR ResNet checkpoint and write SkipViz weights plus their model card.

    Args:
        path: the ``.th`` file (``{'best_prec1', 'state_dict'}``, ``module.``-prefixed keys).
        dest: the ``.safetensors`` file to write, or a folder for ``cifar_resnet<depth>_akamaster.safetensors``
            (default: that name in the current folder). The card is written beside it (``.json``).
        repository: where the checkpoint comes from, recorded in the card.
    Returns:
        ``(weights path, card)``; ``create_model(card["arch"], weights=path)`` rebuilds the network.
    Raises:
        CheckpointError: a file that is not such a checkpoint (other architecture, truncated, or a pickle
            holding anything but tensors and numbers).
    """
    from safetensors.torch import save_file

    from .._env import package_version

    src = Path(path)
    state, extras = load_checkpoint(src)
    not_numbers = [k for k, v in extras.items() if not isinstance(v, (int, float))]
    if not_numbers:
        raise CheckpointError(f"{src.name}: holds entries other than tensors and numbers: {not_numbers[:5]}")
    depth, mapped = convert_state_dict(state, source=src.name)
    arch = f"cifar_resnet{depth}"
    model_kwargs = {"gates": False, "probes": False, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    net = cifar_resnet(depth, **model_kwargs)
    apply_state_dict(net, mapped, source=src.name)
    out = _weights_path(dest, arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    source_sha = sha256_file(src)
    weights = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    save_file(weights, str(out), metadata={"arch": arch, "format": "skipviz.SkipNetwork", "source_sha256": source_sha})
    card = {
        "name": f"{arch}.{out.stem}",
        "arch": arch,
        "architecture": {"arch": arch, "blocks": net.num_blocks, "gated_blocks": net.gated_blocks,
                         "block_names": net.block_names, "params": sum(p.numel() for p in net.parameters()),
                         "shortcut": "option A (stride-2 subsampling + zero channel padding, no parameters)"},
        "model_kwargs": model_kwargs,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "note": "inputs in [0, 1], ImageNet statistics, as the source was trained"},
        "source": {"file": src.name, "sha256": source_sha, "repository": repository,
                   "best_prec1": extras.get("best_prec1"),
                   "best_prec1_note": "top-1 % stored in the file by its authors (original CIFAR-10 test set)",
                   "key_mapping": "module. prefix dropped; conv1/bn1 -> stem.0/stem.1; layerS.B -> blocks.i; "
                                  "linear -> head.fc; BatchNorm num_batches_tracked set to 0",
                   "trained_by": "the source's authors, not by SkipViz"},
        "license": _license_notice(src),
        "weights_sha256": sha256_file(out),
        "software": {"python": platform.python_version(), "torch": torch.__version__,
                     "safetensors": package_version("safetensors")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "reproduce": f"skipviz import-weights {src.name} --out {out.name}",
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2))
    return out, card
