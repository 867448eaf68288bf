"""AdamW's step on the CPU, per tensor (PyTorch's default there), foreach and fused, on the
parameter shapes calibration trains (issue 40: the suite's and the compile's time):

- a MiniLM sub-model's: 6 MLP matrices 384x1536, 16 matrices 384x384, 60 vectors of 384
  (5.9 M parameters in 82 tensors), what the booster steps on real text;
- an aggregator's 384x384 map and its bias, what the fusion steps thousands of times.

    python -m experiments.adamw_step [--steps 50]

Prints the milliseconds per step of each, the mean of ``--steps`` after 3 warm-up steps.
:func:`coformer.calibration.loop.fit` takes the fused update by default because of it.
"""

import argparse
import time

import torch
from torch import nn


def step_ms(params, steps: int, **kw) -> float:
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, **kw)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):
        opt.step()
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    shapes = {
        "MiniLM sub-model": [(384, 1536)] * 6 + [(384, 384)] * 16 + [(384,)] * 60,
        "aggregator 384x384": [(384, 384), (384,)],
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| parameters | per tensor ms | foreach ms | fused ms |\n|---|---:|---:|---:|")
    for name, shape in shapes.items():
        params = [nn.Parameter(torch.randn(s)) for s in shape]
        n = sum(p.numel() for p in params)
        cells = [step_ms(params, args.steps, **kw) for kw in ({"foreach": False}, {"foreach": True}, {"fused": True})]
        print(f"| {name} ({n:,} in {len(params)} tensors) | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
