"""One owner for compiling (issue 40): every strategy's bundle is built through
:func:`coformer.compiler.job.run_job`, which hands the job to the builder its ``strategy``
names (:mod:`coformer.compiler.strategies`); settings a builder does not take are refused by
name, as is a strategy no builder is registered for."""

import numpy as np
import pytest
import torch

from coformer.calibration.data import load_digits_dataset
from coformer.compiler.job import CompileJob, run_job
from coformer.compiler.specs import DeviceSpec
from coformer.runtime.engines import open_engine
from coformer.runtime.errors import CoFormerError
from coformer.runtime.manifest import load_manifest
from tests.conftest import tiny_vit

DEVICES = [DeviceSpec(name=n, memory_bytes=1 << 29, flops_budget=10**9, cpu_share=s)
           for n, s in (("a", 1.0), ("b", 0.6))]


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(size=16)


@pytest.mark.parametrize("strategy,options", [("teacher", {}), ("pipeline", {}),
                                              ("prism", {"compression_rate": 2})])
def test_each_strategy_is_built_through_the_one_job(tmp_path, digits, strategy, options):
    torch.manual_seed(0)
    teacher = tiny_vit(depth=2).eval()
    out = run_job(CompileJob(teacher, DEVICES, digits, tmp_path / "b", strategy=strategy, options=options,
                             progress=False))
    m = load_manifest(tmp_path / "b")
    assert m.strategy == strategy and out.report["strategy"] == strategy
    if strategy == "teacher":  # the teacher alone: its ONNX answers what the teacher does
        x = digits.test.x[:2]
        engine = open_engine(tmp_path / "b" / m.central.artifact, "onnxruntime", 1)
        got = next(iter(engine.infer({engine.input_names[0]: x.numpy()}).values()))
        with torch.no_grad():
            np.testing.assert_allclose(got, teacher(x).numpy(), atol=1e-4)


def test_a_builder_refuses_settings_it_does_not_take_and_unknown_strategies(tmp_path, digits):
    teacher = tiny_vit(depth=2)
    with pytest.raises(CoFormerError, match="the pipeline strategy takes no 'compression_rate'"):
        run_job(CompileJob(teacher, DEVICES, digits, tmp_path / "p", strategy="pipeline",
                           options={"compression_rate": 4}, progress=False))
    with pytest.raises(CoFormerError, match="the coformer strategy takes no 'task'"):
        run_job(CompileJob(teacher, DEVICES, digits, tmp_path / "c", options={"task": {}}, progress=False))
    with pytest.raises(CoFormerError, match="strategy 'sharded' is not one of"):
        run_job(CompileJob(teacher, DEVICES, digits, tmp_path / "s", strategy="sharded", progress=False))
    assert not any(tmp_path.iterdir())  # nothing written for a refused job
