"""The quickstart teacher's shape and schedule, trained side by side on digits: time and test accuracy.

    python -m experiments.teacher_variants p16_b64 p16_5ep_b32 ... [--precision auto|bf16|float32]

Each name is a change to :class:`coformer.compiler.builtin.QuickstartTeacher` (``bs``: the batch
size); ``fast`` is ``coformer quickstart --fast``'s teacher. Training runs under bf16 autocast
where the CPU has it (``--precision auto``, as the quickstart's default does), or as
``--precision`` says. Issue 40's choice of 16x16 patches at batch 64 came from this, and the fast
teacher's float32 (docs/benchmarks.md, "The quickstart's time").
"""

import argparse
import dataclasses
import time

import torch

VARIANTS = {
    "patch8_b32": dict(patch_size=8, bs=32),  # the teacher before issue 40
    "3ep_lr2e-3": dict(patch_size=8, bs=32, epochs=3, lr=2e-3),
    "p16_b32": dict(bs=32),
    "d384_patch8": dict(patch_size=8, bs=32, embed_dim=384, num_heads=12),
    "p16_b64": dict(),  # the teacher since issue 40
    "p16_b64_lr2e-3": dict(lr=2e-3),
    "p16_5ep_b32": dict(epochs=5, bs=32),
    # quickstart --fast's (coformer.tools.quickstart.FAST)
    "fast": dict(embed_dim=96, depth=3, num_heads=6, img_size=16, patch_size=4, epochs=4, lr=2e-3, bs=32),
}


def main() -> None:
    from coformer.calibration.data import load_builtin_images
    from coformer.calibration.train import cpu_bf16_supported, train_classifier
    from coformer.compiler.builtin import QuickstartTeacher, build_quickstart_teacher

    p = argparse.ArgumentParser(prog="python -m experiments.teacher_variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    p.add_argument("--precision", choices=["auto", "bf16", "float32"], default="auto")
    args = p.parse_args()
    bf16 = cpu_bf16_supported() if args.precision == "auto" else args.precision == "bf16"
    for name in args.variants:
        v = dict(VARIANTS[name])
        bs = v.pop("bs", 64)
        cfg = dataclasses.replace(QuickstartTeacher(), **v)
        data = load_builtin_images("digits", size=cfg.img_size, seed=0)
        model = build_quickstart_teacher(cfg)
        t = time.perf_counter()
        train_classifier(model, data.train.x, data.train.y, cfg.epochs, lr=cfg.lr, seed=0, progress=False,
                         bf16=bf16, batch_size=bs)
        seconds = time.perf_counter() - t
        with torch.no_grad():
            acc = (model(data.test.x).argmax(-1) == data.test.y).float().mean().item()
        print(f"{name} ({'bf16' if bf16 else 'float32'}): {seconds:.1f} s, {100 * acc:.1f}% on {len(data.test)} "
              "test images", flush=True)


if __name__ == "__main__":
    main()
