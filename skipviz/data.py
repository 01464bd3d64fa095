"""Data: any torchvision ``ImageFolder`` root (CIFAR-10 from ``../shared`` by default), decoded once into
uint8 tensors, a seeded validation split carved from ``train/``, and batched GPU/CPU augmentation.

The data set is never copied into the project: it is found at ``$SKIPVIZ_CIFAR10`` or
``<repo>/../shared/datasets/cifar10``; decoded tensors are cached under ``$SKIPVIZ_CACHE`` (default
``~/.cache/skipviz``), keyed by a hash of the file list.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

CIFAR10_ENV = "SKIPVIZ_CIFAR10"


def cifar10_root() -> Path | None:
    """The CIFAR-10 ImageFolder root, or ``None`` when it is not on this machine."""
    env = os.environ.get(CIFAR10_ENV)
    root = Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "cifar10"
    return root if (root / "train").is_dir() and (root / "test").is_dir() else None


IMAGENETTE_ENV = "SKIPVIZ_IMAGENETTE"


def imagenette_root() -> Path | None:
    """The Imagenette ImageFolder root (``$SKIPVIZ_IMAGENETTE``, else ``../shared/datasets/imagenette`` beside
    the repository), or ``None`` when it is not on this machine."""
    env = os.environ.get(IMAGENETTE_ENV)
    root = (Path(env) if env else
            Path(__file__).resolve().parent.parent.parent / "shared" / "datasets" / "imagenette")
    return root if (root / "train").is_dir() and (root / "val").is_dir() else None


def held_out_files(num_classes: int, n: int) -> tuple[list[Path], str]:
    """About ``n`` held-out image files for a model of ``num_classes`` classes, spread evenly over the split in
    sorted order (so every class is in): Imagenette ``val/`` for a 1000-class (ImageNet) model, CIFAR-10
    ``test/`` otherwise; and their description. ``FileNotFoundError`` (naming the environment variable) when the
    data set is not on this machine. What the benchmarks time real images on."""
    if num_classes == 1000:
        root, split, what, env = imagenette_root(), "val", "Imagenette val photos", IMAGENETTE_ENV
    else:
        root, split, what, env = cifar10_root(), "test", "CIFAR-10 test images", CIFAR10_ENV
    if root is None:
        raise FileNotFoundError(f"the {what} are not on this machine (../shared/datasets, or set ${env})")
    files = sorted(p for p in (root / split).rglob("*") if p.is_file())
    step = max(1, len(files) // max(1, n))
    return files[::step][:n], f"{min(n, len(files[::step]))} {what} (every {step}th in sorted order)"


def held_out_images(meta, n: int) -> tuple[torch.Tensor, str]:
    """:func:`held_out_files` for a model's metadata (``ModelMeta``), decoded and preprocessed as the model
    expects: ``((N, 3, H, W) normalised batch, description)``."""
    files, what = held_out_files(meta.num_classes, n)
    return torch.cat([meta.preprocess(Image.open(f).convert("RGB")) for f in files]), what


def _imagenet_index_of_wnid() -> dict[str, int]:
    from timm.data import ImageNetInfo  # the WordNet ids of the 1,000 classes, in index order

    return {w: i for i, w in enumerate(ImageNetInfo().label_names())}


def load_imagenette(root: str | Path, split: str, progress: bool = True) -> TensorDataset:
    """An Imagenette split decoded at 224x224, labels as ImageNet-1k indices (its folders are WordNet ids)."""
    return imagenet_labels(load_split(root, split, size=(224, 224), progress=progress))


def imagenet_labels(data: TensorDataset) -> TensorDataset:
    """``data`` (an ImageFolder whose folders are ImageNet WordNet ids) with labels as ImageNet-1k indices."""
    index = _imagenet_index_of_wnid()
    unknown = [c for c in data.classes if c not in index]
    if unknown:
        raise ValueError(f"{data.root}: folders that are not ImageNet WordNet ids: {unknown[:3]}")
    lut = torch.tensor([index[c] for c in data.classes])
    return TensorDataset(data.images, lut[data.labels], data.classes, data.files, data.root, data.files_sha256)


def cache_dir() -> Path:
    d = Path(os.environ.get("SKIPVIZ_CACHE", Path.home() / ".cache" / "skipviz"))
    d.mkdir(parents=True, exist_ok=True)
    return d


@dataclass
class TensorDataset:
    """A decoded split: ``images`` (N, 3, H, W) uint8, ``labels`` (N,) long, plus provenance."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: list[str]
    root: str
    files_sha256: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor | np.ndarray | list[int]) -> "TensorDataset":
        idx_t = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        files = [self.files[i] for i in idx_t.tolist()]
        return TensorDataset(self.images[idx_t], self.labels[idx_t], self.classes, files, self.root,
                             file_list_sha256(files))


def concat_datasets(first: TensorDataset, second: TensorDataset, prefix: str) -> TensorDataset:
    """``first`` then ``second`` as one data set (``first``'s classes; ``second``'s files named ``prefix/<file>``,
    so the file list, and its SHA-256, says where every image came from). Images must have the same size."""
    if first.images.shape[1:] != second.images.shape[1:]:
        raise ValueError(f"images of {tuple(first.images.shape[1:])} and {tuple(second.images.shape[1:])} do not "
                         "concatenate")
    files = list(first.files) + [f"{prefix}/{f}" for f in second.files]
    return TensorDataset(torch.cat([first.images, second.images]), torch.cat([first.labels, second.labels]),
                         first.classes, files, first.root, file_list_sha256(files))


def file_list_sha256(files: list[str]) -> str:
    """SHA-256 of the sorted relative file list: identifies exactly which images a split holds."""
    return hashlib.sha256("\n".join(sorted(files)).encode()).hexdigest()


def _decode(path: str, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != size:
            im = im.resize(size, Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def _image_folder(root: str | Path, split: str):
    """torchvision's ``ImageFolder`` of ``root/split`` (file listing only) and its files relative to it."""
    from torchvision.datasets import ImageFolder  # on use: the dashboard's first prediction does not need it

    folder = ImageFolder(str(Path(root) / split))
    return folder, [os.path.relpath(p, folder.root) for p, _ in folder.samples]


def load_split(root: str | Path, split: str, size: tuple[int, int] = (32, 32), progress: bool = True) -> TensorDataset:
    """Decode ``root/split`` (ImageFolder layout) to uint8 tensors, using the on-disk cache when valid."""
    folder, rel = _image_folder(root, split)
    digest = file_list_sha256(rel)
    cache = cache_dir() / f"{Path(root).name}_{split}_{size[0]}x{size[1]}_{digest[:16]}.pt"
    if cache.is_file():
        blob = torch.load(cache, weights_only=True)
        return TensorDataset(blob["images"], blob["labels"], folder.classes, rel, str(root), digest)
    images = _decode_all([p for p, _ in folder.samples], lambda p: _decode(p, size), f"decoding {split}", progress)
    labels = torch.tensor(folder.targets, dtype=torch.long)
    _save_cache(cache, images, labels)
    return TensorDataset(images, labels, folder.classes, rel, str(root), digest)


def _decode_all(paths: list[str], decode, desc: str, progress: bool) -> torch.Tensor:
    """``decode`` (path -> (3, H, W) uint8 array) over ``paths`` on a thread pool: (N, 3, H, W) uint8."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        arrays = list(tqdm(pool.map(decode, paths, chunksize=256), total=len(paths), desc=desc, disable=not progress))
    return torch.from_numpy(np.stack(arrays))


def _save_cache(cache: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    tmp = cache.with_suffix(".tmp")
    torch.save({"images": images, "labels": labels}, tmp)
    tmp.replace(cache)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def _decode_crop(path: str, crop: tuple[int, int], resize: int) -> np.ndarray:
    """An image file as a model's preprocessing sees it before normalisation: RGB, shorter side resized to
    ``resize`` (PIL bilinear), centre crop ``crop`` (H, W): (3, H, W) uint8 (as :meth:`ModelMeta.preprocess`)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resize / min(w, h)
        new_w, new_h = max(crop[1], round(w * scale)), max(crop[0], round(h * scale))
        if (new_w, new_h) != (w, h):
            im = im.resize((new_w, new_h), Image.BILINEAR)
        top, left = int(round((new_h - crop[0]) / 2.0)), int(round((new_w - crop[1]) / 2.0))
        im = im.crop((left, top, left + crop[1], top + crop[0]))
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def load_images(root: str | Path, crop: tuple[int, int], resize: int, classes: list[str] | None = None,
                progress: bool = True, limit: int | None = None, seed: int = 0) -> TensorDataset:
    """Every image file under ``root`` (searched recursively, in sorted order), decoded as a model's
    preprocessing crops it (:func:`_decode_crop`): ``images`` (N, 3, H, W) uint8, cached like :func:`load_split`.
    ``limit``: only that many files, a seeded choice (``seed``) kept in sorted order, chosen before decoding.

    Labels are optional: when every image sits in a class folder (``root/<class>/...``) and every folder name is
    one of ``classes`` (or, for a 1,000-class model, an ImageNet WordNet id), the label is that class's index in
    ``classes``; otherwise every label is -1 (unlabelled: only agreement with the full network can be measured).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such image folder")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or below")
    if limit is not None and limit < len(files):
        pick = np.random.default_rng(seed).choice(len(files), size=max(0, int(limit)), replace=False)
        files = [files[i] for i in sorted(pick)]
    folders = [Path(f).parts[0] if len(Path(f).parts) > 1 else None for f in files]
    index = {c: i for i, c in enumerate(classes or [])}
    if classes is not None and len(classes) == 1000 and not all(f in index for f in folders):
        index = _imagenet_index_of_wnid()
    labelled = all(f is not None and f in index for f in folders)
    labels = torch.tensor([index[f] for f in folders] if labelled else [-1] * len(files), dtype=torch.long)
    digest = file_list_sha256(files)
    cache = cache_dir() / f"images_{root.name}_{crop[0]}x{crop[1]}_r{resize}_{digest[:16]}.pt"
    if cache.is_file():
        images = torch.load(cache, weights_only=True)["images"]
    else:
        images = _decode_all([str(root / f) for f in files], lambda p: _decode_crop(p, crop, resize),
                             f"decoding {root.name}", progress)
        _save_cache(cache, images, labels)
    names = list(classes) if labelled and classes is not None else sorted({f for f in folders if f is not None})
    return TensorDataset(images, labels, names, files, str(root), digest)


def load_validation_subset(root: str | Path, validation: dict, n: int, seed: int = 0,
                           size: tuple[int, int] = (32, 32)) -> TensorDataset | None:
    """``n`` images (a seeded choice) of the validation split a model card records (``dataset.validation``:
    ``n``, ``seed``, ``files_sha256``, carved from ``train/`` by :func:`train_val_split`), decoding only those
    images, not the whole of ``train/``. ``None`` when ``root/train`` does not give the recorded split (its
    file-list hash differs) or the card records none."""
    try:
        val_n, val_seed, expected = int(validation["n"]), int(validation["seed"]), validation["files_sha256"]
    except (KeyError, TypeError, ValueError):
        return None
    folder, rel = _image_folder(root, "train")
    if val_n > len(rel):
        return None
    _, val_idx = train_val_split(len(rel), val_n, val_seed)
    if file_list_sha256([rel[i] for i in val_idx]) != expected:
        return None
    pick = np.sort(np.random.default_rng(seed).choice(val_idx, size=min(n, len(val_idx)), replace=False))
    images = torch.from_numpy(np.stack([_decode(folder.samples[i][0], size) for i in pick]))
    labels = torch.tensor([folder.targets[i] for i in pick], dtype=torch.long)
    files = [rel[i] for i in pick]
    return TensorDataset(images, labels, folder.classes, files, str(root), file_list_sha256(files))


def train_val_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train indices, validation indices)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float32 normalised."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def augment(images: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip, batched. (N, 3, H, W) uint8 -> same shape."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def batches(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None = None):
    """Index tensors covering ``range(n)`` in batches."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        yield order[i: i + batch_size]
