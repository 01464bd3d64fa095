"""Safe input collection: folders, file lists, uploads and zip archives (traversal and zip bombs refused)."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skipviz.audit.archive import ArchiveError, ZipLimits, collect_inputs, items_from_uploads, read_source, read_zip


def _png(seed: int = 0, size: tuple[int, int] = (32, 32)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_folder_labels_and_suffix_filter(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(2):
            (tmp_path / "imgs" / cls / f"{i}.png").write_bytes(_png(i))
    (tmp_path / "imgs" / "notes.txt").write_text("not an input")
    everything = collect_inputs([tmp_path / "imgs"], labels_from_folders=True)
    items = [it for it in everything if it.skipped is None]
    assert [it.name for it in items] == ["imgs/cat/0.png", "imgs/cat/1.png", "imgs/dog/0.png", "imgs/dog/1.png"]
    assert [it.label for it in items] == ["cat", "cat", "dog", "dog"]
    assert all(Path(it.source).is_file() and it.data is None for it in items)
    assert [(it.name, it.skipped) for it in everything if it.skipped] == [
        ("imgs/notes.txt", "imgs/notes.txt: skipped: not an image (a .txt file)")]
    assert collect_inputs([tmp_path / "imgs"])[0].label is None


def test_a_folder_accounts_for_every_entry(tmp_path):
    """Unrecognised files, zips inside the folder, pipes and links are all items: none is dropped silently."""
    import os

    root = tmp_path / "mixed"
    (root / "sub").mkdir(parents=True)
    (root / "a.png").write_bytes(_png(1))
    (root / "IMG_0001").write_bytes(_png(2))  # an image without a suffix: recognised by its first bytes
    (root / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "model.pt").write_bytes(b"PK\x03\x04 not really")
    (root / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _zip(root / "sub" / "inner.zip", {"x/1.png": _png(3), "../up.png": _png(4), "deeper.zip": b"PK", "r.md": b"#"})
    os.mkfifo(root / "pipe.png")
    os.symlink(root / "sub", root / "loop")  # a link to a folder: reported, not followed
    os.symlink(root / "gone.png", root / "dangling.png")
    items = {it.name: it for it in collect_inputs([root], labels_from_folders=True)}
    inputs = {n for n, it in items.items() if it.error is None and it.skipped is None}
    assert inputs == {"mixed/a.png", "mixed/IMG_0001", "mixed/sub/inner.zip/x/1.png"}
    assert items["mixed/sub/inner.zip/x/1.png"].label == "x" and items["mixed/sub/inner.zip/x/1.png"].data == _png(3)
    assert "path traversal" in items["mixed/sub/inner.zip/../up.png"].error
    assert "nested archives are not expanded" in items["mixed/sub/inner.zip/deeper.zip"].skipped
    for name, kind in (("logo.svg", ".svg"), ("model.pt", ".pt"), ("weights.safetensors", ".safetensors"),
                       ("sub/inner.zip/r.md", ".md")):
        assert f"not an image (a {kind} file)" in items[f"mixed/{name}"].skipped
    assert "not a regular file" in items["mixed/pipe.png"].skipped
    assert "links to folders are not followed" in items["mixed/loop"].skipped
    assert "broken link" in items["mixed/dangling.png"].error
    assert len(items) == 12


def test_file_list_keeps_oddly_named_files(tmp_path):
    good = tmp_path / "a.png"
    good.write_bytes(_png())
    odd = tmp_path / "b.dat"
    odd.write_bytes(b"whatever")
    items = collect_inputs([good, odd])
    assert [it.name for it in items] == ["a.png", "b.dat"]
    assert items[1].read() == str(odd.resolve())
    missing, = collect_inputs([tmp_path / "missing.png"])  # accounted for, as a failed input
    assert "no such file or folder" in missing.error
    with pytest.raises(ArchiveError, match="no such file"):
        missing.read()


def test_zip_members_labels_and_reread(tmp_path):
    z = _zip(tmp_path / "set.zip", {"cat/1.png": _png(1), "dog/2.png": _png(2), "readme.txt": b"x",
                                     "dir/": b""})
    items = collect_inputs([z], labels_from_folders=True)
    assert [it.label for it in items if not it.skipped] == ["cat", "dog"]
    assert [it.name for it in items if it.skipped] == ["set.zip/readme.txt"]
    items = [it for it in items if not it.skipped]
    assert items[0].data == _png(1)
    assert items[0].source.endswith("set.zip::cat/1.png")
    assert read_source(items[1].source) == _png(2)


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/etc/evil.png", "..\\evil.png",
                                  "C:/evil.png"])
def test_zip_path_traversal_member_is_refused_and_the_rest_kept(tmp_path, name):
    z = _zip(tmp_path / "bad.zip", {"ok.png": _png(), name: _png(1)})
    items = collect_inputs([z])
    good = [it for it in items if it.error is None]
    bad = [it for it in items if it.error is not None]
    assert [it.name for it in good] == ["bad.zip/ok.png"] and good[0].read() == _png()
    assert len(bad) == 1 and "outside the archive (path traversal)" in bad[0].error and bad[0].data is None
    assert bad[0].source is None  # never extracted, never re-read
    assert not (tmp_path.parent / "evil.png").exists() and not Path("/etc/evil.png").exists()


def test_zip_bomb_member_refused_by_ratio(tmp_path):
    z = _zip(tmp_path / "bomb.zip", {"big.png": b"\0" * (20 * 1024 * 1024), "ok.png": _png(2)})
    assert z.stat().st_size < 100_000  # 20 MiB of zeros compress ~1000x
    items = {it.name: it for it in collect_inputs([z])}
    assert "zip bomb" in items["bomb.zip/big.png"].error and items["bomb.zip/big.png"].data is None
    assert items["bomb.zip/ok.png"].read() == _png(2)


def test_zip_size_and_count_limits(tmp_path):
    z = _zip(tmp_path / "many.zip", {f"{i}.png": _png(i) for i in range(5)}, compression=zipfile.ZIP_STORED)
    refused, = read_zip(z, limits=ZipLimits(max_members=4))  # the whole archive: one failed item
    assert refused.name == "many.zip" and "members is over the 4 limit" in refused.error
    member = len(_png(0))
    items = read_zip(z, limits=ZipLimits(max_member_bytes=member - 1))
    assert len(items) == 5 and all("over the" in it.error for it in items)
    items = read_zip(z, limits=ZipLimits(max_total_bytes=3 * member))
    assert [it.error is None for it in items] == [True, True, True, False, False]
    assert all("uncompressed in all" in it.error for it in items[3:])
    assert all(it.error is None for it in read_zip(z, limits=ZipLimits(max_members=5)))


def test_damaged_zip_is_one_failed_item(tmp_path):
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip")
    item, = collect_inputs([bad])
    assert item.name == "broken.zip" and "not a readable zip" in item.error


def test_uploads_with_zip_and_labels():
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("bird/3.png", _png(3))
    items = items_from_uploads([("cat/1.png", _png(1)), ("2.png", _png(2)), ("more.zip", zipped.getvalue())],
                               labels_from_folders=True)
    assert [(it.name, it.label, it.source) for it in items] == [
        ("cat/1.png", "cat", None), ("2.png", None, None), ("more.zip/bird/3.png", "bird", None)]
    assert items[2].read() == _png(3)
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../x.png", _png())
    refused, = items_from_uploads([("evil.zip", evil.getvalue())])
    assert refused.name == "evil.zip/../x.png" and "path traversal" in refused.error


def test_damaged_and_duplicated_members_become_failed_items(tmp_path):
    # one bad member does not refuse the archive: it comes back with the reason, and the audit records it
    good, bad = _png(1), _png(2)
    path = _zip(tmp_path / "mixed.zip", {"a.png": good, "b.png": bad}, compression=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    at = raw.find(bad[100:120])
    raw[at] ^= 0xFF  # a flipped byte inside b.png's stored data: its CRC check fails
    path.write_bytes(bytes(raw))
    with zipfile.ZipFile(tmp_path / "dup.zip", "w") as zf:
        zf.writestr("c.png", good)
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("c.png", bad)  # a second member of the same name: zipfile warns and writes it
    items = {i.name: i for i in read_zip(path)}
    assert items["mixed.zip/a.png"].read() == good
    with pytest.raises(ArchiveError, match="could not be decompressed"):
        items["mixed.zip/b.png"].read()
    first, second = read_zip(tmp_path / "dup.zip")
    assert first.read() == good and read_source(first.source) == good
    with pytest.raises(ArchiveError, match="second member named"):
        second.read()
    assert second.source is None


def test_reread_survives_the_separator_in_the_archive_path_and_reads_each_archive_once(tmp_path, monkeypatch):
    import skipviz.audit.archive as archive_module

    folder = tmp_path / "v1::b"
    folder.mkdir()
    path = _zip(folder / "in.zip", {f"{i}.png": _png(i) for i in range(4)})
    items = read_zip(path)
    assert read_source(items[2].source) == _png(2)
    calls = []
    real = archive_module.read_zip
    monkeypatch.setattr(archive_module, "read_zip", lambda *a, **k: calls.append(a) or real(*a, **k))
    cache: dict = {}
    assert [read_source(i.source, cache=cache) for i in items] == [_png(i) for i in range(4)]
    assert len(calls) == 1


def test_a_relative_single_file_takes_its_folders_label(tmp_path, monkeypatch):
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "0.png").write_bytes(_png(0))
    monkeypatch.chdir(tmp_path / "dog")
    assert [i.label for i in collect_inputs(["0.png"], labels_from_folders=True)] == ["dog"]


def test_a_damaged_deflate_stream_is_a_failed_item(tmp_path):
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 255, 4000, dtype=np.uint8).tobytes() + b"\x00" * 4000  # compresses, but not to nothing
    path = _zip(tmp_path / "z.zip", {"a.png": _png(1), "b.png": noisy})
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("b.png")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    for k in range(8, 40):  # scramble the start of b.png's deflate stream
        raw[start + k] ^= 0x5A
    path.write_bytes(bytes(raw))
    items = {i.name: i for i in read_zip(path)}
    assert items["z.zip/a.png"].read() == _png(1)
    assert items["z.zip/b.png"].error is not None and "could not be decompressed" in items["z.zip/b.png"].error
