"""Synthetic checkpoints: determinism, table shapes, values, markers, omitted components."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from loraforge.formats.arch.table import Architecture, TensorSpec
from loraforge.testing.arch import tiny_architecture
from loraforge.formats.hashing import file_sha256
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.testing import checkpoints
from loraforge.testing.checkpoints import derived_seed, synthetic_tensor, write_synthetic_checkpoint

TENSORS = (
    TensorSpec("model.diffusion_model.input_blocks.0.0.weight", (8, 4, 3, 3), "F32", "unet"),
    TensorSpec("model.diffusion_model.input_blocks.0.0.bias", (8,), "F32", "unet"),
    TensorSpec("model.diffusion_model.input_blocks.1.1.norm.weight", (8,), "F32", "unet"),
    TensorSpec("model.diffusion_model.input_blocks.1.1.norm.bias", (8,), "F32", "unet"),
    TensorSpec("model.diffusion_model.out.2.weight", (300, 200), "F32", "unet"),
    TensorSpec("cond_stage_model.transformer.text_model.embeddings.position_ids", (1, 7), "I64", "te"),
    TensorSpec("cond_stage_model.transformer.text_model.final_layer_norm.weight", (6,), "F32", "te"),
    TensorSpec("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", (10, 6), "F32", "te"),
    TensorSpec("first_stage_model.decoder.conv_in.weight", (4, 4, 3, 3), "F32", "vae"),
    TensorSpec("model_ema.decay", (), "F32", "other"),
    TensorSpec("model_ema.num_updates", (), "I32", "other"),
)
ARCH = Architecture(
    name="handmade",
    title="Hand-made test architecture",
    size="scaled",
    modelspec_architecture="stable-diffusion-v1",
    ss_base_model_version="sd_v1",
    tensors=TENSORS,
    modules=(),
    block_forms={},
)


def test_same_arguments_same_bytes(tmp_path):
    first = write_synthetic_checkpoint(tmp_path / "a.safetensors", ARCH, seed=3)
    second = write_synthetic_checkpoint(tmp_path / "b.safetensors", ARCH, seed=3)
    assert first.sha256 == second.sha256 == file_sha256(tmp_path / "a.safetensors")
    other = write_synthetic_checkpoint(tmp_path / "c.safetensors", ARCH, seed=4)
    assert other.sha256 != first.sha256 and other.size == first.size


def test_reads_back_with_table_shapes_and_dtypes(tmp_path):
    path = tmp_path / "m.safetensors"
    write_synthetic_checkpoint(path, ARCH, dtype="bfloat16")
    with open_safetensors(path) as reader:
        assert reader.names() == [spec.key for spec in TENSORS]
        for spec in TENSORS:
            info = reader.info(spec.key)
            assert info.shape == spec.shape
            assert info.dtype == ("BF16" if spec.dtype == "F32" else spec.dtype)


def test_values(tmp_path):
    path = tmp_path / "m.safetensors"
    write_synthetic_checkpoint(path, ARCH, seed=0, dtype="F32")
    with open_safetensors(path) as reader:
        ids = reader.read("cond_stage_model.transformer.text_model.embeddings.position_ids")
        assert torch.equal(ids, torch.arange(7).reshape(1, 7))
        assert torch.equal(reader.read("model_ema.num_updates"), torch.tensor(0, dtype=torch.int32))
        assert torch.equal(reader.read("model.diffusion_model.input_blocks.1.1.norm.weight"), torch.ones(8))
        assert torch.equal(reader.read("model.diffusion_model.input_blocks.1.1.norm.bias"), torch.zeros(8))
        assert torch.equal(
            reader.read("cond_stage_model.transformer.text_model.final_layer_norm.weight"), torch.ones(6)
        )
        big = reader.read("model.diffusion_model.out.2.weight")
        assert abs(big.std().item() - 0.02) < 0.001 and abs(big.mean().item()) < 0.001
        # Golden: the first chunk is torch.randn seeded by sha256("0\0<key>\0" + "0"), times 0.02.
        key = "model.diffusion_model.input_blocks.0.0.weight"
        seed = int.from_bytes(hashlib.sha256(f"0\x00{key}\x000".encode()).digest()[:8], "little") >> 1
        expected = torch.randn(8 * 4 * 3 * 3, generator=torch.Generator().manual_seed(seed)) * 0.02
        assert torch.equal(reader.read(key), expected.reshape(8, 4, 3, 3))


def test_half_precision_is_float32_values_rounded_once(tmp_path):
    path = tmp_path / "m.safetensors"
    write_synthetic_checkpoint(path, ARCH, seed=5, dtype="F16")
    spec = TENSORS[4]
    as_f32 = synthetic_tensor(spec, seed=5, dtype="float32")
    with open_safetensors(path) as reader:
        assert torch.equal(reader.read(spec.key), as_f32.to(torch.float16))


def test_chunked_generation_matches_synthetic_tensor(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHUNK_ELEMENTS", 1000)
    monkeypatch.setattr(checkpoints, "SERIAL_ELEMENTS", 64)
    path = tmp_path / "m.safetensors"
    write_synthetic_checkpoint(path, ARCH, seed=1, dtype="F16")
    spec = TENSORS[4]  # 60000 elements: 60 chunks
    with open_safetensors(path) as reader:
        values = reader.read(spec.key)
    assert torch.equal(values, synthetic_tensor(spec, seed=1, dtype="F16"))
    # Each chunk has its own seed: chunk 7 is independent of chunks 0-6.
    chunk_seed = derived_seed(1, spec.key, 7)
    expected = (torch.randn(1000, generator=torch.Generator().manual_seed(chunk_seed)) * 0.02).half()
    assert torch.equal(values.reshape(-1)[7000:8000], expected)


def test_markers_are_empty_float32_tensors(tmp_path):
    path = tmp_path / "m.safetensors"
    write_synthetic_checkpoint(path, ARCH, markers=["v_pred", "ztsnr"])
    with open_safetensors(path) as reader:
        assert reader.names()[-2:] == ["v_pred", "ztsnr"]
        for marker in ("v_pred", "ztsnr"):
            info = reader.info(marker)
            assert (info.dtype, info.shape, info.nbytes) == ("F32", (0,), 0)


def test_missing_components(tmp_path):
    path = tmp_path / "m.safetensors"
    write_synthetic_checkpoint(path, ARCH, missing_components=["vae", "other"])
    with open_safetensors(path) as reader:
        assert reader.names() == [t.key for t in TENSORS if t.component not in ("vae", "other")]


def test_metadata_is_written(tmp_path):
    path = tmp_path / "m.safetensors"
    write_synthetic_checkpoint(path, ARCH, metadata={"modelspec.title": "synthetic"})
    with open_safetensors(path) as reader:
        assert reader.metadata == {"modelspec.title": "synthetic"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"markers": ["x_pred"]}, "unknown markers"),
        ({"markers": ["v_pred", "v_pred"]}, "twice"),
        ({"missing_components": ["clip"]}, "unknown missing_components"),
        ({"dtype": "int8"}, "unknown precision"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_synthetic_checkpoint(tmp_path / "m.safetensors", ARCH, **kwargs)
    assert os.listdir(tmp_path) == []


def test_independent_of_hash_seed_and_threads(tmp_path):
    script = (
        "import sys, torch\n"
        "from tests.test_synthetic_checkpoints import ARCH\n"
        "from loraforge.testing.checkpoints import write_synthetic_checkpoint\n"
        "torch.set_num_threads(int(sys.argv[2]))\n"
        "print(write_synthetic_checkpoint(sys.argv[1], ARCH, seed=9).sha256)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    runs = [  # side by side
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / f"{threads}.safetensors"), threads],
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": root}, cwd=root,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for hash_seed, threads in (("1", "1"), ("2", "2"))
    ]
    digests = []
    for run in runs:
        stdout, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr
        digests.append(stdout.strip())
    local = write_synthetic_checkpoint(tmp_path / "here.safetensors", ARCH, seed=9).sha256
    assert digests == [local, local]


def test_real_tiny_tables(tmp_path):
    for name in ("sd1", "sdxl"):
        arch = tiny_architecture(name)
        path = tmp_path / f"{name}.safetensors"
        result = write_synthetic_checkpoint(path, arch, seed=0)
        with open_safetensors(path) as reader:
            assert len(reader) == len(arch.tensors)
            assert {key: reader.info(key).shape for key in reader.names()} == {t.key: t.shape for t in arch.tensors}
            assert reader.file_size == result.size
