"""Collecting audit inputs safely: folders, lists of files and zip archives. Every input is accounted for.

Every input becomes an :class:`InputItem` (a display name, a ``source`` that can be read again later to
reproduce the run, an optional label). Nothing here decodes images; that is :func:`skipviz.load_image`'s job,
so an unreadable file still becomes an item (and later a failed audit row with the reason). Nothing is ever
refused silently and nothing stops the collection:

* an item with ``error`` set becomes a failed row: a refused or damaged archive (one row for the archive), a zip
  member whose name points outside the archive (path traversal), a member over a size or ratio limit (zip
  bomb), a member that does not decompress, a second member of the same name, a path that does not exist;
* an item with ``skipped`` set becomes a "skipped: not an image" row: a file in a folder (or a zip member) that
  is not an image by its name and, for files, by its first bytes (``.svg``, ``.pt``, ``.safetensors``, text), a
  zip inside a zip, a folder entry that is not a regular file (pipe, socket, device).

Zip archives are untrusted and are never extracted to disk: members are decompressed into memory with their
sizes enforced while decompressing (not trusted from the header): ``max_member_bytes`` per member,
``max_total_bytes`` in all, compression ratio ``max_ratio``; more than ``max_members`` members refuses the
archive. Zips found inside a folder are expanded like zips given directly. Folders are walked without
following links to folders (no loops); a link to a file is read as that file.
"""
from __future__ import annotations

import io
import lzma
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable, Sequence

from .._imageio import IMAGE_SUFFIXES as READABLE_SUFFIXES

IMAGE_SUFFIXES = frozenset(READABLE_SUFFIXES)  # what load_image reads: one list with the dashboard's uploaders
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 50 * 1024 * 1024
MAX_TOTAL_BYTES = 1024 * 1024 * 1024
MAX_RATIO = 200.0
ZIP_SEP = "::"  # "archive.zip::folder/image.png" names a zip member as a reproducible source


class ArchiveError(ValueError):
    """An input (path, archive, member) cannot be read; the message says why."""


@dataclass(frozen=True)
class ZipLimits:
    """Limits against zip bombs: member count, per-member and total uncompressed bytes, compression ratio."""

    max_members: int = MAX_MEMBERS
    max_member_bytes: int = MAX_MEMBER_BYTES
    max_total_bytes: int = MAX_TOTAL_BYTES
    max_ratio: float = MAX_RATIO


@dataclass
class InputItem:
    """One input to audit.

    ``source`` is a filesystem path, ``"archive.zip::member"`` for a zip member on disk, or ``None`` for data
    that exists only in memory (an upload); ``data`` holds the bytes when they were already read (zip members,
    uploads). ``label`` is the class name from the parent folder when labels come from folders. ``error``: why
    the input cannot be read (a refused archive or member, a damaged or duplicated member, a missing path);
    :meth:`read` raises it, so the audit records a failed row with the reason. ``skipped``: why the input is not
    audited at all (not an image); the audit records a "skipped" row with that reason.
    """

    name: str
    source: str | None
    data: bytes | None = None
    label: str | None = None
    error: str | None = None
    skipped: str | None = None

    def read(self) -> bytes | str:
        """What to hand to :func:`skipviz.load_image`: the bytes if held, else the path."""
        if self.error is not None:
            raise ArchiveError(self.error)
        if self.skipped is not None:
            raise ArchiveError(self.skipped)
        if self.data is not None:
            return self.data
        if self.source is None:
            raise ArchiveError(f"{self.name}: no data and no path to read it from")
        return self.source


def input_keys(pairs: Iterable[tuple[str, str | None]]) -> list[str]:
    """One identity per input, from its ``(name, source)`` in collection order: the pair and how many identical
    pairs came before it (two uploads may share a name). What a resumed audit compares to skip the inputs an
    interrupted run already recorded."""
    seen: dict[tuple[str, str | None], int] = {}
    keys = []
    for name, source in pairs:
        n = seen.get((name, source), 0)
        seen[(name, source)] = n + 1
        keys.append(f"{name}\x00{source or ''}\x00{n}")
    return keys


# the first bytes of the image formats Pillow reads that the audit accepts without an image suffix
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
                b"P1", b"P2", b"P3", b"P4", b"P5", b"P6", b"\x00\x00\x01\x00")


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _looks_like_image(path: Path) -> bool:
    """Whether a regular file starts like an image (PNG, JPEG, GIF, BMP, TIFF, PNM, ICO, WebP)."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def _not_an_image(name: str, what: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    kind = f"a {suffix} file" if suffix else "a file without a suffix"
    return f"{name}: skipped: not an image ({kind}{what})"


def _member_name_problem(name: str, archive: str) -> str | None:
    """Why a member name is refused (absolute, a drive, or climbing out with ``..``), or ``None``."""
    normalised = name.replace("\\", "/")
    p = PurePosixPath(normalised)
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":") or ".." in p.parts:
        return f"{archive}: member {name!r} refused: it points outside the archive (path traversal); not extracted"
    return None


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ZipLimits, archive: str,
                 budget: int) -> bytes:
    """Decompress one member, stopping as soon as it passes a size or ratio limit (:class:`ArchiveError`)."""
    cap = min(limits.max_member_bytes, budget)
    chunks, total = [], 0
    with zf.open(info) as f:
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > limits.max_member_bytes:
                raise ArchiveError(f"{archive}: member {info.filename!r} refused: over the "
                                   f"{limits.max_member_bytes / 2**20:.0f} MiB limit (possible zip bomb)")
            if total > cap:
                raise ArchiveError(f"{archive}: member {info.filename!r} refused: more than "
                                   f"{limits.max_total_bytes / 2**20:.0f} MiB uncompressed in all (possible zip bomb)")
            if total > 1 << 20 and total / max(info.compress_size, 1) > limits.max_ratio:
                raise ArchiveError(f"{archive}: member {info.filename!r} refused: expands more than "
                                   f"{limits.max_ratio:.0f}x (possible zip bomb)")
            chunks.append(chunk)
    return b"".join(chunks)


def _declared_problem(info: zipfile.ZipInfo, limits: ZipLimits, archive: str) -> str | None:
    """Why a member is refused from its declared sizes alone, before decompressing anything, or ``None``."""
    if info.file_size > limits.max_member_bytes:
        return (f"{archive}: member {info.filename!r} refused: declares {info.file_size / 2**20:.0f} MiB (over the "
                f"{limits.max_member_bytes / 2**20:.0f} MiB limit; possible zip bomb)")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > 1 << 20 and ratio > limits.max_ratio:
        return f"{archive}: member {info.filename!r} refused: would expand {ratio:.0f}x (possible zip bomb)"
    return None


def _read_image_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, item: InputItem, limits: ZipLimits,
                       archive: str, used: int) -> int:
    """Decompress an image member into ``item.data`` within the limits (``used``: the uncompressed bytes the
    archive's earlier members took), or set ``item.error`` with the reason and drop its source. Returns the
    bytes it took (0 when refused)."""
    item.error = _declared_problem(info, limits, archive)
    if item.error is None and used + info.file_size > limits.max_total_bytes:
        item.error = (f"{archive}: member {info.filename!r} refused: the archive's members pass "
                      f"{limits.max_total_bytes / 2**20:.0f} MiB uncompressed in all (possible zip bomb)")
    if item.error is None:
        try:
            item.data = _read_member(zf, info, limits, archive, limits.max_total_bytes - used)
        except ArchiveError as e:
            item.error = str(e)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, ValueError,
                zlib.error, lzma.LZMAError) as e:  # a damaged stream: deflate and LZMA raise their own
            item.error = f"{archive}: member {info.filename!r} could not be decompressed ({e})"
    if item.error is not None:
        item.source = None
    return len(item.data) if item.error is None else 0


def read_zip(source: str | Path | bytes | BinaryIO, labels_from_folders: bool = False,
             limits: ZipLimits | None = None, name: str | None = None, prefix: str | None = None) -> list[InputItem]:
    """Every member of a zip archive as an :class:`InputItem` (sorted by member name; folders left out).

    Never raises for what the archive holds: a damaged or refused archive (not a zip, too many members) is ONE
    item with ``error`` set; a member whose name points outside the archive, one over a size or ratio limit,
    one that fails to decompress and a second member of the same name (which a recorded source could not tell
    apart from the first) are items with ``error`` set; members that are not images by their name (and zips
    inside the archive) are items with ``skipped`` set. ``prefix``: the display name's start (default: the
    archive's name).
    """
    limits = limits or ZipLimits()
    on_disk = isinstance(source, (str, Path))
    archive = name or (Path(source).name if on_disk else getattr(source, "name", "<upload.zip>"))
    prefix = archive if prefix is None else prefix

    def refused(why: str) -> list[InputItem]:
        return [InputItem(name=prefix, source=str(source) if on_disk else None, error=why)]

    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return refused(f"{archive}: not a readable zip archive ({e})")
    items: list[InputItem] = []
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            return refused(f"{archive}: refused: {len(infos)} members is over the {limits.max_members} limit")
        used = 0
        seen: set[str] = set()
        for info in sorted(infos, key=lambda i: i.filename):  # stable: duplicates keep the archive's order
            if info.is_dir():
                continue
            display = f"{prefix}/{info.filename}"
            problem = _member_name_problem(info.filename, archive)
            if problem is not None:
                items.append(InputItem(name=display, source=None, error=problem))
                continue
            member = PurePosixPath(info.filename.replace("\\", "/"))
            if not _is_image_name(info.filename):
                nested = " inside a zip archive: nested archives are not expanded" if member.suffix.lower() == ".zip" \
                    else ""
                items.append(InputItem(name=display, source=None, skipped=_not_an_image(display, nested)))
                continue
            label = (member.parent.name or None) if labels_from_folders else None
            item = InputItem(name=display, source=f"{source}{ZIP_SEP}{info.filename}" if on_disk else None,
                             label=label)
            if info.filename in seen:
                item.source, item.error = None, (f"{archive}: a second member named {info.filename!r}; it cannot "
                                                 "be told apart from the first, so it is not audited")
            else:
                seen.add(info.filename)
                used += _read_image_member(zf, info, item, limits, archive, used)
            items.append(item)
    return items


def _split_zip_source(source: str) -> tuple[str, str] | None:
    """``"archive.zip::member"`` -> ``(archive, member)``, at the first separator whose left part is an existing
    file (an archive's own path may contain the separator), or ``None``."""
    at = source.find(ZIP_SEP)
    while at != -1:
        if Path(source[:at]).is_file():
            return source[:at], source[at + len(ZIP_SEP):]
        at = source.find(ZIP_SEP, at + 1)
    return None


def read_source(source: str, limits: ZipLimits | None = None,
                cache: dict[str, dict[str, InputItem]] | None = None) -> bytes | str:
    """Re-read a recorded source: a path is returned as is, ``archive.zip::member`` is extracted safely.

    ``cache``: archive path -> its items by source, filled on first use, so that replaying a batch of many
    members reads each archive once (pass the same dict for the whole batch)."""
    split = _split_zip_source(source) if ZIP_SEP in source and not Path(source).exists() else None
    if split is None:
        return source
    archive, member = split
    items = cache.get(archive) if cache is not None else None
    if items is None:
        items = {item.source: item for item in read_zip(archive, limits=limits) if item.source is not None}
        if cache is not None:
            cache[archive] = items
    item = items.get(f"{archive}{ZIP_SEP}{member}")
    if item is None:
        raise ArchiveError(f"{archive}: has no member {member!r} any more")
    return item.read()


def _is_zip_file(p: Path) -> bool:
    if p.suffix.lower() == ".zip":
        return True
    try:
        return not _is_image_name(p.name) and zipfile.is_zipfile(p)
    except OSError:
        return False


def _walk(root: Path) -> list[Path]:
    """Every entry under ``root`` that is not a folder, sorted; links to folders are not followed."""
    out: list[Path] = []
    for folder, dirs, files in os.walk(root, followlinks=False):
        base = Path(folder)
        out.extend(base / d for d in dirs if (base / d).is_symlink())  # reported, not followed
        out.extend(base / f for f in files)
    return sorted(out)


def _folder_items(root: Path, labels_from_folders: bool, limits: ZipLimits | None) -> list[InputItem]:
    items: list[InputItem] = []
    for f in _walk(root):
        display = str(f.relative_to(root.parent))
        label = f.parent.name if labels_from_folders and f.parent != root else None
        if f.is_symlink() and f.is_dir():
            items.append(InputItem(name=display, source=None, skipped=f"{display}: skipped: a link to a folder "
                                                                      "(links to folders are not followed)"))
        elif f.is_symlink() and not f.exists():
            items.append(InputItem(name=display, source=None, error=f"{display}: a link to nothing (broken link)"))
        elif not f.is_file():
            items.append(InputItem(name=display, source=None,
                                   skipped=f"{display}: skipped: not a regular file (a pipe, socket or device)"))
        elif _is_zip_file(f):
            items.extend(read_zip(f.resolve(), labels_from_folders=labels_from_folders, limits=limits, name=f.name,
                                  prefix=display))
        elif _is_image_name(f.name) or _looks_like_image(f):
            items.append(InputItem(name=display, source=str(f.resolve()), label=label))
        else:
            items.append(InputItem(name=display, source=str(f.resolve()), skipped=_not_an_image(display, "")))
    return items


def collect_inputs(paths: Sequence[str | Path], labels_from_folders: bool = False,
                   limits: ZipLimits | None = None) -> list[InputItem]:
    """Expand folders (recursively), zip archives and single files into inputs; never raises for an input.

    With ``labels_from_folders`` the label is the name of the file's parent folder (ImageFolder layout:
    ``root/cat/1.png`` is a cat). In a folder, files that are images by their suffix or their first bytes are
    inputs, zips are expanded, and everything else is a skipped item with the reason. A single file given
    directly is always an input, whatever its suffix, so that a wrongly named or damaged file is reported; a
    path that does not exist is a failed item.
    """
    items: list[InputItem] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists() and not p.is_symlink():
            items.append(InputItem(name=str(raw), source=None, error=f"{raw}: no such file or folder"))
        elif p.is_dir():
            items.extend(_folder_items(p, labels_from_folders, limits))
        elif p.is_file() and _is_zip_file(p):
            items.extend(read_zip(p.resolve(), labels_from_folders=labels_from_folders, limits=limits,
                                  name=p.name))
        else:
            label = (p.resolve().parent.name or None) if labels_from_folders else None  # "0.png": its folder
            items.append(InputItem(name=p.name, source=str(p.resolve()), label=label))
    return items


def items_from_uploads(files: Iterable[tuple[str, bytes]], labels_from_folders: bool = False,
                       limits: ZipLimits | None = None) -> list[InputItem]:
    """Uploaded ``(name, bytes)`` pairs as inputs; ``.zip`` uploads are expanded safely (never raises).

    A name like ``"cat/1.png"`` gives the label ``cat`` when ``labels_from_folders``.
    """
    items: list[InputItem] = []
    for name, data in files:
        if str(name).lower().endswith(".zip"):
            items.extend(read_zip(bytes(data), labels_from_folders=labels_from_folders, limits=limits,
                                  name=str(name)))
            continue
        parent = PurePosixPath(str(name).replace("\\", "/")).parent.name
        items.append(InputItem(name=str(name), source=None, data=bytes(data),
                               label=(parent or None) if labels_from_folders else None))
    return items
