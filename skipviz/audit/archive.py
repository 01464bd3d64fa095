"""Collecting audit inputs safely: folders, lists of files and zip archives.

Every input becomes an :class:`InputItem` (a display name, a ``source`` that can be read again later to
reproduce the run, an optional label). Nothing here decodes images; that is :func:`skipviz.load_image`'s job,
so an unreadable file still becomes an item (and later a failed audit row with the reason).

Zip archives are untrusted: a member whose name is absolute or climbs out with ``..`` makes the whole archive
refused (:class:`ArchiveError`), and so do more than ``max_members`` members, a member over
``max_member_bytes``, more than ``max_total_bytes`` uncompressed in all, or a member whose compression ratio
is over ``max_ratio`` (zip bombs). Sizes are enforced while decompressing, not trusted from the header.
"""
from __future__ import annotations

import io
import lzma
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable, Sequence

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                            ".pbm", ".ico"})
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = 50 * 1024 * 1024
MAX_TOTAL_BYTES = 1024 * 1024 * 1024
MAX_RATIO = 200.0
ZIP_SEP = "::"  # "archive.zip::folder/image.png" names a zip member as a reproducible source


class ArchiveError(ValueError):
    """An input collection (path, list, archive) was refused; the message says why."""


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
    the input cannot be read (a damaged or duplicated zip member); :meth:`read` raises it, so the audit records
    a failed row with the reason.
    """

    name: str
    source: str | None
    data: bytes | None = None
    label: str | None = None
    error: str | None = None

    def read(self) -> bytes | str:
        """What to hand to :func:`skipviz.load_image`: the bytes if held, else the path."""
        if self.error is not None:
            raise ArchiveError(self.error)
        if self.data is not None:
            return self.data
        if self.source is None:
            raise ArchiveError(f"{self.name}: no data and no path to read it from")
        return self.source


def _is_image_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in IMAGE_SUFFIXES


def _check_member_name(name: str, archive: str) -> PurePosixPath:
    normalised = name.replace("\\", "/")
    p = PurePosixPath(normalised)
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":") or ".." in p.parts:
        raise ArchiveError(f"{archive}: refused, member {name!r} points outside the archive (path traversal)")
    return p


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: ZipLimits, archive: str,
                 budget: int) -> bytes:
    """Decompress one member, stopping as soon as it passes a size or ratio limit."""
    cap = min(limits.max_member_bytes, budget)
    chunks, total = [], 0
    with zf.open(info) as f:
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            total += len(chunk)
            if total > limits.max_member_bytes:
                raise ArchiveError(f"{archive}: refused, member {info.filename!r} is over the "
                                   f"{limits.max_member_bytes / 2**20:.0f} MiB limit (possible zip bomb)")
            if total > cap:
                raise ArchiveError(f"{archive}: refused, more than {limits.max_total_bytes / 2**20:.0f} MiB "
                                   "uncompressed in all (possible zip bomb)")
            if total > 1 << 20 and total / max(info.compress_size, 1) > limits.max_ratio:
                raise ArchiveError(f"{archive}: refused, member {info.filename!r} expands more than "
                                   f"{limits.max_ratio:.0f}x (possible zip bomb)")
            chunks.append(chunk)
    return b"".join(chunks)


def read_zip(source: str | Path | bytes | BinaryIO, labels_from_folders: bool = False,
             limits: ZipLimits | None = None, name: str | None = None) -> list[InputItem]:
    """Image members of a zip archive as :class:`InputItem` (sorted by member name).

    Raises :class:`ArchiveError` for a damaged archive, a path-traversal member or a zip bomb. Members that
    do not look like images by their suffix are skipped; members that do are returned even if they are
    damaged (the audit turns them into failed rows): a member that fails to decompress, and a second member of
    the same name (which a recorded source could not tell apart from the first), come back with ``error`` set.
    """
    limits = limits or ZipLimits()
    on_disk = isinstance(source, (str, Path))
    archive = name or (Path(source).name if on_disk else getattr(source, "name", "<upload.zip>"))
    try:
        zf = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ArchiveError(f"{archive}: not a readable zip archive ({e})") from e
    items: list[InputItem] = []
    with zf:
        infos = zf.infolist()
        if len(infos) > limits.max_members:
            raise ArchiveError(f"{archive}: refused, {len(infos)} members is over the {limits.max_members} limit")
        for info in infos:  # check every name and declared size before decompressing anything
            _check_member_name(info.filename, archive)
            if info.file_size > limits.max_member_bytes:
                raise ArchiveError(f"{archive}: refused, member {info.filename!r} declares "
                                   f"{info.file_size / 2**20:.0f} MiB (over the "
                                   f"{limits.max_member_bytes / 2**20:.0f} MiB limit)")
            if info.file_size > 1 << 20 and info.file_size / max(info.compress_size, 1) > limits.max_ratio:
                raise ArchiveError(f"{archive}: refused, member {info.filename!r} would expand "
                                   f"{info.file_size / max(info.compress_size, 1):.0f}x (possible zip bomb)")
        if sum(i.file_size for i in infos) > limits.max_total_bytes:
            raise ArchiveError(f"{archive}: refused, {sum(i.file_size for i in infos) / 2**20:.0f} MiB "
                               f"uncompressed is over the {limits.max_total_bytes / 2**20:.0f} MiB limit")
        used = 0
        seen: set[str] = set()
        for info in sorted(infos, key=lambda i: i.filename):  # stable: duplicates keep the archive's order
            if info.is_dir() or not _is_image_name(info.filename):
                continue
            member = _check_member_name(info.filename, archive)
            label = (member.parent.name or None) if labels_from_folders else None
            item = InputItem(name=f"{archive}/{info.filename}",
                             source=f"{source}{ZIP_SEP}{info.filename}" if on_disk else None, label=label)
            if info.filename in seen:
                item.source, item.error = None, (f"{archive}: a second member named {info.filename!r}; it cannot "
                                                 "be told apart from the first, so it is not audited")
            else:
                seen.add(info.filename)
                try:
                    item.data = _read_member(zf, info, limits, archive, limits.max_total_bytes - used)
                    used += len(item.data)
                except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, zlib.error,
                        lzma.LZMAError) as e:  # a damaged stream: deflate and LZMA raise their own errors
                    item.error = f"{archive}: member {info.filename!r} could not be decompressed ({e})"
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


def collect_inputs(paths: Sequence[str | Path], labels_from_folders: bool = False,
                   limits: ZipLimits | None = None) -> list[InputItem]:
    """Expand folders (recursively, image suffixes only), zip archives and single files into inputs.

    With ``labels_from_folders`` the label is the name of the file's parent folder (ImageFolder layout:
    ``root/cat/1.png`` is a cat). A single file given directly is always included, whatever its suffix, so
    that a wrongly named or damaged file is reported rather than silently ignored. Raises
    :class:`ArchiveError` for a path that does not exist or a refused archive.
    """
    items: list[InputItem] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise ArchiveError(f"{p}: no such file or folder")
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _is_image_name(f.name))
            for f in files:
                label = f.parent.name if labels_from_folders and f.parent != p else None
                items.append(InputItem(name=str(f.relative_to(p.parent)), source=str(f.resolve()), label=label))
        elif p.suffix.lower() == ".zip" or (zipfile.is_zipfile(p) and not _is_image_name(p.name)):
            items.extend(read_zip(p.resolve(), labels_from_folders=labels_from_folders, limits=limits,
                                  name=p.name))
        else:
            label = (p.resolve().parent.name or None) if labels_from_folders else None  # "0.png": its folder
            items.append(InputItem(name=p.name, source=str(p.resolve()), label=label))
    return items


def items_from_uploads(files: Iterable[tuple[str, bytes]], labels_from_folders: bool = False,
                       limits: ZipLimits | None = None) -> list[InputItem]:
    """Uploaded ``(name, bytes)`` pairs as inputs; ``.zip`` uploads are expanded safely.

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
