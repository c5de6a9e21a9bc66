import pickle

import numpy as np
import pytest
from safetensors.numpy import save_file

from adapter_store.errors import AdapterInvalid
from adapter_store.safetensors_header import read_header

from .peft_fixtures import raw_safetensors


def test_reads_names_dtypes_shapes(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros((3, 4), np.float16), "b": np.ones((2,), np.float32)}, str(path), metadata={"k": "v"})
    h = read_header(path)
    assert h.tensors["a"].dtype == "F16" and h.tensors["a"].shape == (3, 4) and h.tensors["a"].nbytes == 24
    assert h.tensors["b"].dtype == "F32" and h.metadata == {"k": "v"}


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros((64, 64), np.float32)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(AdapterInvalid, match="truncated"):
        read_header(path)


@pytest.mark.parametrize("cut", [3, 8, 20])
def test_header_cut_short(tmp_path, cut):
    path = tmp_path / "w.safetensors"
    save_file({"a": np.zeros((4,), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(AdapterInvalid):
        read_header(path)


def test_garbage_header_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes((16).to_bytes(8, "little") + b"\x00{not json!!!!!" + b"x" * 10)
    with pytest.raises(AdapterInvalid, match="JSON"):
        read_header(path)


def test_pickle_is_refused(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=4))
    with pytest.raises(AdapterInvalid, match="pickle"):
        read_header(path)


@pytest.mark.parametrize(
    "header, data, match",
    [
        ({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "spans"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "starts at"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "trailing"),
        ({"a": [1, 2]}, b"", "not an object"),
    ],
)
def test_inconsistent_headers(tmp_path, header, data, match):
    with pytest.raises(AdapterInvalid, match=match):
        read_header(raw_safetensors(tmp_path / "w.safetensors", header, data))
