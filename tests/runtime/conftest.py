"""Bundles the runtime's in-process tests serve: a tiny ViT compiled for one device and for two."""

import pytest

from coformer.calibration.booster import BoostConfig
from coformer.calibration.data import load_digits_dataset
from coformer.compiler.pipeline import compile_bundle
from coformer.compiler.specs import DeviceSpec
from tests.conftest import tiny_vit


@pytest.fixture(scope="package")
def bundles(tmp_path_factory):
    """``({"one": result, "two": result}, data)``: a bundle for a single device, and one for two
    (edge-a central, edge-b a worker, and a fallback without it)."""
    data = load_digits_dataset(size=16)
    out = {}
    for name, shares in (("one", (1.0,)), ("two", (1.0, 0.6))):
        devices = [DeviceSpec(name=f"edge-{'ab'[i]}", memory_bytes=1 << 30, flops_budget=10**10, cpu_share=s)
                   for i, s in enumerate(shares)]
        out[name] = compile_bundle(tiny_vit(), devices, data, tmp_path_factory.mktemp(name) / "bundle",
                                   boost=BoostConfig(epochs=1), aggregator_epochs=2, progress=False)
    return out, data
