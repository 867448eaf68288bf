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


# The four messages that once ended the central node (issue 19), and their neighbours: each is
# now a ProtocolError with a code, with limits (client socket) and without (worker socket).
CRASHERS = [
    ([b'{"v":1,"op":"infer","id":1,"dtype":[],"shape":[1]}', b""], "bad_dtype"),
    ([b'{"v":1,"op":"infer","id":1,"dtype":{},"shape":[1]}', b""], "bad_dtype"),
    ([b"[" * 1500 + b"]" * 1500, b""], "bad_header"),
    ([b'{"v":1,"op":"infer","x":' + b"[" * 9 + b"]" * 9 + b"}", b""], "bad_header"),
    ([json.dumps({"v": 1, "op": "features", "id": 1, "dtype": "float32", "shape": [2**62, 4]}).encode(), b""],
     "bad_shape"),
    ([json.dumps({"v": 1, "op": "features", "id": 1, "dtype": "float32", "shape": [2**30, 2**30, 16]}).encode(),
      b""], "bad_payload"),
    ([json.dumps({"v": 1, "op": "features", "id": 1, "dtype": "float32", "shape": [1] * 9}).encode(), b""],
     "bad_shape"),
]


@pytest.mark.parametrize("frames, code", CRASHERS)
@pytest.mark.parametrize("limits", [LIMITS, None], ids=["client-socket", "worker-socket"])
def test_messages_that_once_crashed_the_central_node_are_protocol_errors(frames, code, limits):
    with pytest.raises(ProtocolError) as info:
        protocol.decode(frames, limits)
    if limits is None:
        assert info.value.code == code
    else:  # the client socket checks dtype, shape and size against the bundle's input first
        assert info.value.code in (code, "bad_dtype", "bad_shape", "too_large")


def test_brackets_inside_strings_do_not_count_as_nesting():
    header = {"v": 1, "op": "status", "id": 2, "note": "[[[[[[[[[[{{{{{{{{ \\\" ]"}
    assert protocol.decode([json.dumps(header).encode(), b""]).header["note"] == header["note"]


@pytest.mark.parametrize("value", ["fast", None, [], True, float("nan")])
def test_a_peers_timing_must_be_a_finite_number(value):
    with pytest.raises(ProtocolError, match="compute_ms"):
        protocol.number({"compute_ms": value}, "compute_ms")
    assert protocol.number({"compute_ms": 2}, "compute_ms") == 2.0


def test_the_compilers_header_size_bounds_what_a_worker_sends():
    """The search charges each link a features header of ``features_header_bytes``; a worker's
    real header (any id, any timings) is never larger, and the estimate grows with the name."""
    import json

    from coformer.compiler.search import features_header_bytes as used_by_search

    assert used_by_search is protocol.features_header_bytes
    bound = protocol.features_header_bytes("edge-b", 256)
    for rid, t in ((1, 0.1), (2**31 - 1, 98765.4321098765), (77, 1e-7), (5, 0.00098765432109876543)):
        frames = protocol.encode("features", rid, np.zeros((1, 256), np.float32), device="edge-b",
                                 compute_ms=t, queued_ms=t / 3, service_ms=t * 1.1)
        assert len(frames[0]) <= bound, json.loads(frames[0])
    assert 100 < bound < 300
    assert protocol.features_header_bytes("a-much-longer-device-name", 256) > bound


def test_encoded_images_travel_as_their_bytes_and_a_lying_header_is_refused():
    files = [b"\xff\xd8jpeg-one", b"\x89PNG-two-longer"]
    frames = protocol.encode("infer", 7, images=files, deadline_ms=50.0)
    assert frames[1] == b"".join(files) and json.loads(frames[0])["images"] == [len(f) for f in files]
    limits = protocol.TensorLimits("float32", (3, 4, 4), max_batch=2)
    msg = protocol.decode(frames, limits)
    assert msg.images == tuple(files) and msg.tensor is None and msg.header["deadline_ms"] == 50.0
    header = json.loads(frames[0])
    for sizes, code in (([5, 100], "bad_payload"), ([0, 24], "bad_header"), ("24", "bad_header"),
                        ([1] * 3, "bad_shape")):
        with pytest.raises(ProtocolError) as info:
            protocol.decode([json.dumps({**header, "images": sizes}).encode(), frames[1]], limits)
        assert info.value.code == code, sizes
    with pytest.raises(ProtocolError) as info:  # more bytes than the batch's float32 pixels: a tensor could not
        protocol.decode(protocol.encode("infer", 7, images=[b"x" * 384, b"y"]), limits)
    assert info.value.code == "too_large"
    with pytest.raises(ProtocolError, match="not both"):
        protocol.decode([json.dumps({**header, "dtype": "float32", "shape": [1]}).encode(), frames[1]], limits)
