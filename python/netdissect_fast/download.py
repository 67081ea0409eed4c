"""download_broden: fetch, check, unpack, validate and pack a published Broden zip.

Only urllib: the download resumes a partial file with an HTTP Range request (also after
the connection drops mid-body), checks the size against Content-Length /
Content-Range, and tests the archive (zipfile.testzip) before unpacking.
"""
from __future__ import annotations

import http.client
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

BASE_URL = "http://netdissect.csail.mit.edu/data/broden1_{variant}.zip"
VARIANTS = ("224", "227", "384")
_BLOCK = 1 << 20


class DownloadError(RuntimeError):
    pass


def download_broden(dest, variant: str = "224", url: str | None = None, retries: int = 5,
                    timeout: float = 60.0, validate: bool = True, pack: bool = True,
                    progress: bool = True) -> Path:
    """Download Broden ``variant`` (224, 227 or 384) into ``dest`` and return the dataset
    directory. ``url``: a mirror URL or a local zip path (default: the published zip).
    An already unpacked dataset is reused; a partial download is resumed."""
    variant = str(variant)
    if variant not in VARIANTS:
        raise ValueError(f"download_broden: variant must be one of {', '.join(VARIANTS)} (got {variant!r})")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    name = f"broden1_{variant}"
    dataset = dest / name
    if not (dataset / "index.csv").exists():
        source = url or BASE_URL.format(variant=variant)
        if re.match(r"^[a-z][a-z0-9+.-]*://", source) and not source.startswith("file://"):
            archive = dest / f"{name}.zip"
            if not archive.exists():
                fetch(source, archive, retries=retries, timeout=timeout, progress=progress)
        else:
            archive = Path(source[len("file://"):] if source.startswith("file://") else source)
            if not archive.is_file():
                raise FileNotFoundError(f"download_broden: no zip file at {archive}")
        dataset = unpack(archive, dest)

    from .broden import Broden
    with Broden(dataset) as ds:
        if validate:
            ds.validate(workers=None, progress=progress)
        if pack:
            from .labelstore import LabelStore
            LabelStore.open_or_build(ds, progress=progress).close()
    return dataset


def fetch(url: str, target: Path, retries: int = 5, timeout: float = 60.0, progress: bool = True) -> None:
    """Download ``url`` to ``target`` via ``target.part``, resuming with Range requests."""
    part = target.with_name(target.name + ".part")
    total = None
    bar = None
    try:
        for attempt in range(retries + 1):
            have = part.stat().st_size if part.exists() else 0
            if total is not None and have == total:
                break
            request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    if have and response.status == 206:
                        total = _total_from_content_range(response.headers.get("Content-Range"), url)
                        mode = "ab"
                    else:                      # no resume support: start again
                        length = response.headers.get("Content-Length")
                        total = int(length) if length is not None else None
                        have, mode = 0, "wb"
                    if progress and bar is None:
                        from tqdm import tqdm
                        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=target.name)
                    elif bar is not None:
                        bar.reset(total)
                        bar.update(have)
                    with open(part, mode) as out:
                        while True:
                            block = response.read(_BLOCK)
                            if not block:
                                break
                            out.write(block)
                            if bar is not None:
                                bar.update(len(block))
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:     # our partial file is already complete (or bogus)
                    part.unlink()
                    continue
                raise DownloadError(f"download of {url} failed: HTTP {e.code} {e.reason}") from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:   # dropped: resume
                if attempt == retries:
                    raise DownloadError(f"download of {url} failed after {retries + 1} attempts: {e}") from None
                continue
            if total is None:                  # the server gave no length: trust the end of stream
                break
    finally:
        if bar is not None:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        raise DownloadError(f"download of {url} is incomplete: {size} of {total} bytes after "
                            f"{retries + 1} attempts ({part} kept; run again to resume)")
    os.replace(part, target)


def _total_from_content_range(value: str | None, url: str) -> int:
    m = re.match(r"bytes \d+-\d+/(\d+)", value or "")
    if not m:
        raise DownloadError(f"download of {url}: unexpected Content-Range {value!r}")
    return int(m.group(1))


def unpack(archive: Path, dest: Path) -> Path:
    """Test and extract ``archive`` into ``dest``; return the directory holding index.csv."""
    try:
        with zipfile.ZipFile(archive) as z:
            bad = z.testzip()
            if bad is not None:
                raise DownloadError(f"{archive} is corrupt: CRC error in {bad} (delete it and download again)")
            root = dest.resolve()
            for member in z.namelist():            # refuse entries escaping dest
                if not (root / member).resolve().is_relative_to(root):
                    raise DownloadError(f"{archive}: unsafe path {member!r}")
            index = [m for m in z.namelist() if m.endswith("index.csv")]
            if not index:
                raise DownloadError(f"{archive} holds no index.csv: not a Broden archive")
            tmp = dest / (archive.stem + ".unpacking")
            shutil.rmtree(tmp, ignore_errors=True)
            z.extractall(tmp)
    except zipfile.BadZipFile as e:
        raise DownloadError(f"{archive} is not a valid zip ({e}); delete it and download again") from None
    inner = (tmp / min(index, key=len)).parent
    target = dest / inner.name if inner != tmp else dest / archive.stem
    if target.exists():
        shutil.rmtree(target)
    os.replace(inner, target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def download_main(argv=None) -> int:
    """``netdissect-fast download-broden``."""
    import argparse
    p = argparse.ArgumentParser(prog="netdissect-fast download-broden", description=download_main.__doc__)
    p.add_argument("dest")
    p.add_argument("--variant", default="224", choices=VARIANTS)
    p.add_argument("--url", default=None, help="mirror URL or local zip path")
    a = p.parse_args(argv)
    path = download_broden(a.dest, a.variant, a.url)
    print(f"Broden ready at {path}", file=sys.stderr)
    return 0
