"""Writer/reader round trips, byte equality with safetensors.save_file, dtype table."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from loraforge.formats import dtypes
from loraforge.formats.safetensors_reader import open_safetensors
from loraforge.formats.safetensors_writer import (
    SafetensorsWriter,
    TensorPlan,
    encode_header,
    save_file_order,
    save_tensors,
)

ALL_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
ITEMSIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}


def random_tensor(code: str, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs and infinities included) of the dtype; bools are 0/1."""
    generator = torch.Generator().manual_seed(seed)
    numel = 1
    for size in shape:
        numel *= size
    if code == "BOOL":
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (numel * ITEMSIZES[code],), dtype=torch.uint8, generator=generator)
    return raw.view(ALL_TORCH_DTYPES[code]).reshape(shape)


def bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---- dtype table ---------------------------------------------------------


def test_dtype_table_matches_torch():
    assert dtypes.DTYPE_CODES == tuple(ALL_TORCH_DTYPES)
    for code, torch_dtype in ALL_TORCH_DTYPES.items():
        assert dtypes.torch_dtype(code) is torch_dtype
        assert dtypes.dtype_code(torch_dtype) == code
        assert dtypes.itemsize(code) == ITEMSIZES[code] == torch.empty(0, dtype=torch_dtype).element_size()


def test_dtype_errors():
    with pytest.raises(ValueError, match="F4"):
        dtypes.torch_dtype("F4")
    with pytest.raises(ValueError, match="complex64"):
        dtypes.dtype_code(torch.complex64)
    with pytest.raises(ValueError, match="U64"):
        dtypes.itemsize("U64")


@pytest.mark.parametrize(
    "name, code",
    [("float16", "F16"), ("bfloat16", "BF16"), ("float32", "F32"), ("float64", "F64"), ("fp16", "F16"),
     ("BF16", "BF16"), (" Float32 ", "F32")],
)
def test_precision_names(name, code):
    assert dtypes.precision_code(name) == code


def test_precision_unknown():
    with pytest.raises(ValueError, match="int8"):
        dtypes.precision_code("int8")


# ---- round trips ---------------------------------------------------------


@pytest.mark.parametrize("code", list(ALL_TORCH_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (5,), (2, 3, 1, 1)])
def test_round_trip_every_dtype_is_bit_exact(tmp_path, code, shape):
    tensor = random_tensor(code, shape, seed=len(shape))
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"x": tensor})
    with open_safetensors(path) as reader:
        back = reader.read("x")
        info = reader.info("x")
        raw = reader.read_bytes("x")
    assert back.dtype == tensor.dtype and tuple(back.shape) == shape
    assert bits(back) == bits(tensor) == raw
    assert info.nbytes == tensor.numel() * ITEMSIZES[code]
    assert info.dtype == code and info.shape == shape


def test_read_tensor_owns_exactly_its_bytes(tmp_path):
    path = tmp_path / "t.safetensors"
    save_tensors(path, {"a": torch.arange(10, dtype=torch.float32), "b": torch.arange(3, dtype=torch.float64)})
    with open_safetensors(path) as reader:
        a = reader.read("a")
        # frombuffer over a bytearray of exactly the tensor: storage is 40 bytes, writable, independent.
        assert a.untyped_storage().nbytes() == 40
        a += 1
        assert torch.equal(reader.read("a"), torch.arange(10, dtype=torch.float32))


def test_reader_api(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"zeta": torch.ones(2, dtype=torch.float16), "alpha": torch.zeros(3, dtype=torch.float32)}
    result = save_tensors(path, tensors, {"k": "v"})
    with open_safetensors(path) as reader:
        assert reader.metadata == {"k": "v"}
        assert len(reader) == 2 and "zeta" in reader and "nope" not in reader
        # F32 sorts before F16 in save_file order, so alpha's bytes come first.
        assert reader.names() == ["alpha", "zeta"]
        assert reader.file_size == result.size == path.stat().st_size
        header_length = struct.unpack("<Q", path.read_bytes()[:8])[0]
        assert reader.header_size == 8 + header_length
        assert reader.info("alpha").start == reader.header_size
        assert reader.info("alpha").end == reader.header_size + 12 == reader.info("zeta").start
        assert reader.info("zeta").end == reader.file_size
        with pytest.raises(KeyError, match="nope"):
            reader.info("nope")
    assert reader.closed


def test_iter_bytes_chunks(tmp_path):
    path = tmp_path / "t.safetensors"
    tensor = torch.arange(1000, dtype=torch.int32)
    save_tensors(path, {"x": tensor})
    with open_safetensors(path) as reader:
        chunks = list(reader.iter_bytes("x", chunk_size=300))
    assert [len(c) for c in chunks] == [300, 300, 300, 300, 300, 300, 300, 300, 300, 300, 300, 300, 300, 100]
    assert b"".join(chunks) == bits(tensor)


def test_names_follow_data_order_not_header_order(tmp_path):
    path = tmp_path / "t.safetensors"
    plan = [TensorPlan("b", "F32", (1,)), TensorPlan("a", "F32", (2,))]
    with SafetensorsWriter(path, plan) as writer:
        writer.write("b", torch.tensor([1.0]))
        writer.write("a", torch.tensor([2.0, 3.0]))
    with open_safetensors(path) as reader:
        assert reader.names() == ["b", "a"]
        assert torch.equal(reader.read("a"), torch.tensor([2.0, 3.0]))


# ---- byte equality with safetensors.save_file ----------------------------


def assert_same_bytes_as_save_file(tmp_path, tensors, metadata=None):
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_tensors(ours, tensors, metadata)
    save_file(tensors, theirs, metadata)
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize("code", list(ALL_TORCH_DTYPES))
def test_save_tensors_equals_save_file_single_dtype(tmp_path, code):
    tensors = {f"t{i}": random_tensor(code, shape, seed=i) for i, shape in enumerate([(3, 2), (), (0,), (7,)])}
    assert_same_bytes_as_save_file(tmp_path, tensors)


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}, {"ss_network_dim": "4"}])
def test_save_tensors_equals_save_file_mixed_dtypes(tmp_path, metadata):
    tensors = {
        f"{code.lower()}.{i}": random_tensor(code, shape, seed=i)
        for i, (code, shape) in enumerate(
            (code, shape) for code in ALL_TORCH_DTYPES for shape in [(2, 3), (), (0, 4)]
        )
    }
    assert_same_bytes_as_save_file(tmp_path, tensors, metadata)


def test_save_tensors_equals_save_file_unicode_and_escapes(tmp_path):
    tensors = {"é\nname\x01": torch.ones(1), 'quote"back\\slash': torch.zeros(2, dtype=torch.float16)}
    assert_same_bytes_as_save_file(tmp_path, tensors, {"k\t": "ü\u2028\x1f"})


def test_save_tensors_equals_save_file_empty(tmp_path):
    assert_same_bytes_as_save_file(tmp_path, {})
    with open_safetensors(tmp_path / "ours.safetensors") as reader:
        assert len(reader) == 0 and reader.file_size == 16


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
        st.tuples(st.sampled_from(list(ALL_TORCH_DTYPES)), st.lists(st.integers(0, 3), max_size=3)),
        max_size=6,
    ),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=1)),
)
def test_save_tensors_equals_save_file_property(tmp_path_factory, spec, metadata):
    if not spec and metadata == {}:
        return  # safetensors 0.8 writes invalid JSON here ('{},"__metadata__":{}}'); see the next test
    tmp_path = tmp_path_factory.mktemp("prop")
    tensors = {name: random_tensor(code, tuple(shape), seed=i) for i, (name, (code, shape)) in enumerate(spec.items())}
    assert_same_bytes_as_save_file(tmp_path, tensors, metadata)
    loaded = load_file(tmp_path / "ours.safetensors")
    assert {name: bits(t) for name, t in loaded.items()} == {name: bits(t) for name, t in tensors.items()}


def test_empty_metadata_without_tensors_is_valid_json(tmp_path):
    # safetensors.save_file({}, path, metadata={}) emits a header its own loader rejects; ours stays valid.
    path = tmp_path / "empty.safetensors"
    save_tensors(path, {}, {})
    assert path.read_bytes() == b"\x18" + b"\x00" * 7 + b'{"__metadata__":{}}     '
    with open_safetensors(path) as reader:
        assert reader.metadata == {} and len(reader) == 0


def test_save_file_order_is_dtype_rank_then_name():
    tensors = {code: torch.zeros(1, dtype=dtype) for code, dtype in ALL_TORCH_DTYPES.items()}
    tensors["a_f32"] = torch.zeros(1)
    # Within one dtype, names sort by code point ("F32" < "a_f32").
    assert save_file_order(tensors) == [
        "I64", "F64", "F32", "a_f32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"
    ]


# ---- header encoding -----------------------------------------------------


def test_header_metadata_first_sorted_and_padded():
    header = encode_header([TensorPlan("w", "F16", (2, 2)), TensorPlan("b", "I64", ())], {"z": "1", "a": "2"})
    length = struct.unpack("<Q", header[:8])[0]
    assert length == len(header) - 8 and length % 8 == 0
    text = header[8:].decode()
    assert text.rstrip(" ") == (
        '{"__metadata__":{"a":"2","z":"1"},'
        '"w":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},'
        '"b":{"dtype":"I64","shape":[],"data_offsets":[8,16]}}'
    )
    assert json.loads(text)["b"]["data_offsets"] == [8, 16]


def test_header_is_independent_of_metadata_insertion_order():
    plan = [TensorPlan("x", "F32", (1,))]
    keys = [f"k{i}" for i in range(20)]
    forward = encode_header(plan, {k: k for k in keys})
    backward = encode_header(plan, {k: k for k in reversed(keys)})
    assert forward == backward
