"""The paper's GPT2-XL memory headline, on a GPT-2 scaled like GPT2-XL.

GPT2-XL (48 layers, d=1600, 25 heads of 64, MLP 4d, a 50,257-token vocabulary)
needs 6.2 GB of fp32 parameters: it does not fit a 4 GB device, while its
CoFormer sub-models do (the paper reports a 76.3% memory reduction). This
script builds a GPT-2 with the same head width, MLP ratio and vocabulary,
scaled down in depth and width (default: 24 layers, d=640, 10 heads: 151 M
parameters, 0.6 GB) so it runs here, and:

1. sizes three sub-models (shares 1.0 / 0.6 / 0.4) with the heuristic policy
   under a memory budget of ``--budget-fraction`` (default 0.25) of the
   teacher's parameter + activation bytes (constraint C6), and reports each
   sub-model's parameter memory against the teacher's;
2. exports the teacher and the largest sub-model to ONNX and, where the
   testbed can run (root, cgroups), runs each inside one emulated device whose
   memory cgroup holds ``--device-mib`` (default: the largest sub-model's ONNX
   file, doubled, plus 256 MiB for the Python runtime): the kernel's OOM killer
   ends the teacher, the sub-model runs, and both peaks are reported.

Accuracy is not part of this run (random weights); the compile of a trained
GPT-2 reports it (``coformer compile --model hf:PATH``, ``memory`` in its report).

    sudo python -m experiments.memory_headline --out /tmp/gpt2-memory
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np


def run(layers: int = 24, width: int = 640, heads: int = 10, vocab: int = 50257, tokens: int = 64,
        budget_fraction: float = 0.25, out_dir: Optional[Path] = None, device_mib: Optional[int] = None,
        use_testbed: bool = True) -> dict[str, Any]:
    import torch
    import transformers

    from coformer.compiler.cost import submodel_cost, teacher_cost
    from coformer.compiler.families import adapter_for
    from coformer.compiler.hf import wrap_hf
    from coformer.compiler.policy import heuristic_policy
    from coformer.compiler.specs import DeviceSpec

    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="coformer-gpt2-memory-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    hf = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=max(tokens, 64),
        bos_token_id=0, eos_token_id=0, pad_token_id=0))
    teacher = wrap_hf(hf, "gpt2-scaled-like-xl", max_length=tokens)
    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher)
    t = teacher_cost(shape)
    budget = int(budget_fraction * t.memory_bytes)
    devices = [DeviceSpec(name=n, memory_bytes=budget, flops_budget=t.flops, cpu_share=s)
               for n, s in (("edge-a", 1.0), ("edge-b", 0.6), ("edge-c", 0.4))]
    x = torch.randint(1, vocab, (8, 2, tokens))
    x[:, 1] = 1
    imp = adapter.importance(teacher, [x])
    policy = heuristic_policy(shape, imp, devices)
    costs = [submodel_cost(s, shape) for s in policy.submodels]
    largest = max(range(len(costs)), key=lambda i: costs[i].param_bytes)
    report: dict[str, Any] = {
        "teacher": {"layers": layers, "embed_dim": width, "heads": heads, "vocab": vocab, "tokens": tokens,
                    "params": t.params, "param_bytes": t.param_bytes, "memory_bytes": t.memory_bytes},
        "budget_bytes_per_device": budget,
        "submodels": [{"device": d, **s.summary(), "params": c.params, "param_bytes": c.param_bytes,
                       "memory_bytes": c.memory_bytes, "param_fraction": c.param_bytes / t.param_bytes}
                      for d, s, c in zip(policy.devices, policy.submodels, costs)],
        "largest_param_fraction": costs[largest].param_bytes / t.param_bytes,
        "reduction_vs_teacher": 1 - costs[largest].param_bytes / t.param_bytes,
    }
    if use_testbed:
        report["testbed"] = _testbed_story(teacher, adapter, policy.submodels[largest], x[:2], out_dir,
                                           device_mib)
    (out_dir / "memory.json").write_text(json.dumps(report, indent=2))
    return report


def _testbed_story(teacher, adapter, spec, x, out_dir: Path, device_mib) -> dict:
    from coformer.compiler.families.textnet import PartsModule
    from coformer.compiler.lower import lower_submodel
    from coformer.compiler.specs import DeviceSpec
    from coformer.runtime.errors import CoFormerError
    from coformer.tools import testbed as tb
    from coformer.tools.bench import memory_story

    try:
        tb.check_can_run()
    except CoFormerError as e:
        return {"skipped": str(e)}
    names = adapter.input_names(teacher)
    parity: dict = {}
    parity["t"] = lower_submodel(PartsModule(adapter.full_net(teacher)), x, out_dir / "teacher.onnx", names, text=True)
    parity["s"] = lower_submodel(PartsModule(adapter.slice(teacher, spec)), x, out_dir / "largest.onnx", names,
                                 text=True)
    np.save(out_dir / "inputs.npy", x.numpy())
    sub_file = (out_dir / "largest.onnx").stat().st_size
    limit = (device_mib << 20) if device_mib else 2 * sub_file + (256 << 20)
    dev = DeviceSpec(name="edge-mem", memory_bytes=int(limit), flops_budget=1, cpu_share=1.0)
    bed = tb.up([replace(dev, name="hub", memory_bytes=1 << 34), dev])
    try:
        story = memory_story(bed, "edge-mem", out_dir / "teacher.onnx", out_dir / "largest.onnx",
                             out_dir / "inputs.npy", timeout_s=300)
    finally:
        bed.down()
    story["onnx_bytes"] = {"teacher": (out_dir / "teacher.onnx").stat().st_size, "largest_submodel": sub_file}
    story["parity"] = parity
    return story


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.memory_headline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--heads", type=int, default=10)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--budget-fraction", type=float, default=0.25)
    p.add_argument("--device-mib", type=int, default=None)
    p.add_argument("--no-testbed", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    r = run(args.layers, args.width, args.heads, args.vocab, args.tokens, args.budget_fraction, args.out,
            args.device_mib, not args.no_testbed)
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
