import json

import numpy as np
import pytest

from coformer.runtime import protocol
from coformer.runtime.protocol import ProtocolError, TensorLimits

LIMITS = TensorLimits("float32", (1, 4, 4), max_batch=2)


def test_round_trip_keeps_tensor_and_fields():
    x = np.arange(32, dtype=np.float32).reshape(2, 1, 4, 4)
    msg = protocol.decode(protocol.encode("infer", 7, x, note="hi"), LIMITS)
    assert msg.op == "infer" and msg.id == 7 and msg.header["note"] == "hi"
    np.testing.assert_array_equal(msg.tensor, x)
    assert msg.wire_bytes == len(json.dumps(msg.header, separators=(",", ":"))) + x.nbytes


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"{}"], "bad_frames"),
        ([b"not json", b""], "bad_header"),
        ([b"[1, 2]", b""], "bad_header"),
        ([b'{"v": 99, "op": "infer"}', b""], "bad_version"),
        ([b'{"v": 1, "op": "explode"}', b""], "bad_op"),
        ([b'{"v": 1, "op": "infer", "id": -3}', b""], "bad_header"),
        ([b'{"v": 1, "op": "infer", "dtype": "float64", "shape": [1, 1, 4, 4]}', b"\0" * 128], "bad_dtype"),
        ([b'{"v": 1, "op": "infer", "dtype": "float32", "shape": [1, 1, 5, 4]}', b"\0" * 80], "bad_shape"),
        ([b'{"v": 1, "op": "infer", "dtype": "float32", "shape": [3, 1, 4, 4]}', b"\0" * 192], "too_large"),
        ([b'{"v": 1, "op": "infer", "dtype": "float32", "shape": [1, 1, 4, 4]}', b"\0" * 60], "bad_payload"),
        ([b'{"v": 1, "op": "infer", "dtype": "float32", "shape": "big"}', b""], "bad_shape"),
        ([b'{"v": 1, "op": "status"}', b"extra"], "bad_payload"),
        ([b"{" + b" " * 5000 + b"}", b""], "bad_header"),
    ],
)
def test_malformed_messages_raise_with_a_code(frames, code):
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frames, LIMITS)
    assert info.value.code == code


def test_oversized_payload_is_refused_before_it_is_parsed():
    frames = protocol.encode("infer", 1, np.zeros((64, 1, 4, 4), np.float32))
    with pytest.raises(ProtocolError, match="limit is 128"):
        protocol.decode(frames, LIMITS)


def test_a_dynamic_axis_takes_any_length_up_to_its_limit_and_no_more():
    limits = protocol.TensorLimits("int64", (3, 16), max_batch=4, dynamic=(1,))
    for T in (1, 7, 16):
        msg = protocol.decode(protocol.encode("infer", 1, np.zeros((2, 3, T), dtype=np.int64)), limits)
        assert msg.tensor.shape == (2, 3, T)
    for shape in ((2, 3, 17), (2, 2, 8), (2, 3, 0)):
        with pytest.raises(protocol.ProtocolError, match=r"expected \[batch, 3, 1..16\]") as e:
            protocol.decode(protocol.encode("infer", 1, np.zeros(shape, dtype=np.int64)), limits)
        assert e.value.code == "bad_shape"
