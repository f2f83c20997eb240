"""Opt-in downloads of public dataset files: atomic writes, one-line errors, safe tar extraction."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 60.0


def fetch(url: str, dest: Path) -> Path:
    """Download `url` to `dest` through a temp file in the same folder, then os.replace."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as err:
        Path(tmp).unlink(missing_ok=True)
        raise ValueError(f"could not download {url} to {dest}: {err}") from None
    return dest


def extract_tar(archive: Path, root: Path, top: str) -> None:
    """Extract the members of `archive` under folder `top` into `root`, refusing unsafe paths."""
    try:
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if _is_safe(m, top)]
            if not members:
                raise ValueError(f"archive {archive} holds no {top}/ folder")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(root, members=members, filter="data")
            else:  # Python < 3.10.12 / 3.11.4: _is_safe already kept only plain files and dirs
                tar.extractall(root, members=members)
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"could not extract {archive}: {err}") from None


def _is_safe(member: tarfile.TarInfo, top: str) -> bool:
    parts = Path(member.name).parts
    plain = member.isfile() or member.isdir()
    return (
        plain
        and bool(parts)
        and parts[0] == top
        and ".." not in parts
        and not Path(member.name).is_absolute()
    )
