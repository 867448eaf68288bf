"""Does a teacher's capacity matter on a built-in task? Train a built-in-style ViT teacher
on it, then calibrate the largest student that fits a fraction of the teacher's FLOPs
(uniform decoding on one device, no search), and print both accuracies on the test split.

    python -m experiments.capacity_check --data mnist                       # the MNIST teacher
    python -m experiments.capacity_check --data mnist --embed-dim 768 --depth 7 --heads 24 \\
        --img-size 32 --patch-size 8 --epochs 8 --shift 0                      # the digits teacher's shape

How the built-in MNIST teacher was chosen (:data:`coformer.compiler.builtin.BUILTIN_TEACHERS`):
the digits teacher's shape overfits MNIST's 3,500 training images and leaves a small
student little to lose. Trains from scratch (minutes), nothing cached; writes the student
under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from coformer.runtime.errors import CoFormerError


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.capacity_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist", choices=["digits", "mnist"])
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--img-size", type=int, default=28)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--shift", type=int, default=3, help="train the teacher on images shifted by up to this")
    p.add_argument("--fraction", type=float, default=0.1, help="the student's FLOPs as a fraction of the teacher's")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        import torch

        from coformer.calibration.booster import BoostConfig
        from coformer.calibration.data import load_builtin_images
        from coformer.calibration.train import cpu_bf16_supported, train_classifier
        from coformer.compiler.builtin import QuickstartTeacher, build_quickstart_teacher
        from coformer.compiler.cost import teacher_cost
        from coformer.compiler.families import adapter_for
        from coformer.compiler.job import CompileJob, run_job
        from coformer.compiler.specs import DeviceSpec

        if not 0 < args.fraction <= 1:
            raise CoFormerError(f"--fraction {args.fraction} must be in (0, 1]")
        data = load_builtin_images(args.data, args.img_size)
        cfg = QuickstartTeacher(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads,
                                img_size=args.img_size, patch_size=args.patch_size, epochs=args.epochs, lr=args.lr,
                                shift=args.shift, data=args.data)
        teacher = build_quickstart_teacher(cfg)
        t0 = time.perf_counter()
        train_classifier(teacher, data.train.x, data.train.y, cfg.epochs, lr=cfg.lr, seed=cfg.seed, progress=False,
                         bf16=cpu_bf16_supported(), shift=cfg.shift)
        with torch.no_grad():
            acc = float((teacher.eval()(data.test.x).argmax(-1) == data.test.y).float().mean())
        flops = teacher_cost(adapter_for(teacher).read_shape(teacher)).flops
        print(f"teacher: {flops / 1e6:.1f} MFLOPs, {acc:.1%} on {len(data.test)} test images "
              f"(trained in {time.perf_counter() - t0:.0f} s)", flush=True)
        device = DeviceSpec(name="edge-a", memory_bytes=512 << 20, flops_budget=int(args.fraction * flops),
                            link_mbit_s=1000.0, cpu_share=1.0)
        out = args.out or Path(tempfile.mkdtemp(prefix="coformer-capacity-")) / "student"
        torch.manual_seed(0)
        job = run_job(CompileJob(teacher, [device], data, out, search="uniform", boost=BoostConfig(epochs=5),
                                 aggregator_epochs=60, progress=False))
        spec = job.result.policy.submodels[0]
        print(f"student at {args.fraction:g} of its FLOPs ({job.result.manifest.central.flops / 1e6:.1f} MFLOPs, "
              f"{spec.summary()}): {job.result.accuracy['ensemble_accuracy']:.1%}; bundle {out}")
        return 0
    except CoFormerError as e:
        print(f"capacity_check: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
