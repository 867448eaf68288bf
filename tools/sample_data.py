"""Files shaped like a user's, for trying CoFormer on a pretrained-size model without a download:
a timm checkpoint (random init: latency does not depend on the weights), a folder of real
photos in class folders, and a devices file.

    python -m coformer.tools.sample_data DIR [--model deit_small_patch16_224] [--per-class 40]
        [--shares 1.0,0.6,0.4] [--link-mbit 2]

writes ``DIR/teacher.pth``, ``DIR/photos/{china,digit,flower}/`` (crops of scikit-learn's two
sample photos as JPEG, handwritten digits rendered as RGB PNG) and ``DIR/devices.yaml`` (one
device per share; FLOPs budget half the teacher's times the share, as the quickstart's), and
prints the ``coformer compile`` and ``coformer bench`` commands to run on them
(docs/benchmarks.md, "A pretrained-size teacher").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from coformer.runtime.errors import CoFormerError

CLASSES = ("china", "digit", "flower")


def write_photos(root: Path, per_class: int = 24, seed: int = 0) -> list[str]:
    """Three classes of real pictures under ``root``, each file at its own size and aspect."""
    from PIL import Image
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    china, flower = load_sample_images().images
    digits = load_digits().images
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            if name == "digit":
                g = (digits[i % len(digits)] * 255 / 16).astype(np.uint8)
                img = Image.fromarray(np.stack([g, 255 - g, g], -1)).resize((int(rng.integers(40, 120)),) * 2)
                img.save(root / name / f"{i}.png")
                continue
            src = china if name == "china" else flower
            h, w = int(rng.integers(120, 400)), int(rng.integers(120, 600))
            top, left = int(rng.integers(0, src.shape[0] - h)), int(rng.integers(0, src.shape[1] - w))
            Image.fromarray(src[top: top + h, left: left + w]).save(root / name / f"{i}.jpg", quality=88)
    return list(CLASSES)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m coformer.tools.sample_data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--model", default="deit_small_patch16_224", help="a timm ViT, DeiT or Swin name")
    p.add_argument("--model-kwargs", default="{}", help="JSON for timm.create_model")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--shares", default="1.0,0.6,0.4", help="compute share of each device, strongest first")
    p.add_argument("--link-mbit", type=float, default=2.0)
    args = p.parse_args(argv)
    try:
        import json

        import timm
        import torch

        from coformer.compiler.cost import teacher_cost
        from coformer.compiler.families import adapter_for

        shares = [float(s) for s in args.shares.split(",")]
        args.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        kwargs = json.loads(args.model_kwargs)
        model = timm.create_model(args.model, pretrained=False, num_classes=len(CLASSES), **kwargs).eval()
        torch.save(model.state_dict(), args.out / "teacher.pth")
        write_photos(args.out / "photos", args.per_class)
        flops = teacher_cost(adapter_for(model).read_shape(model)).flops
        lines = ["devices:"]
        for i, share in enumerate(shares):
            lines.append(f"  - {{name: edge-{chr(97 + i)}, memory_bytes: {2 << 30 if i == 0 else 1 << 30}, "
                         f"flops_budget: {int(0.5 * share * flops)}, link_mbit_s: {args.link_mbit:g}, "
                         f"cpu_share: {share:g}}}")
        (args.out / "devices.yaml").write_text("\n".join(lines) + "\n")
    except (CoFormerError, ValueError, RuntimeError) as e:
        print(f"sample_data: error: {e}", file=sys.stderr)
        return 2
    model_args = f"--model timm:{args.model} --checkpoint {args.out}/teacher.pth" + (
        f" --model-kwargs '{args.model_kwargs}'" if args.model_kwargs != "{}" else "")
    print(f"{args.out}: teacher.pth ({flops / 1e9:.2f} GFLOPs), photos/ ({len(CLASSES)} x {args.per_class}), "
          f"devices.yaml ({len(shares)} devices)\n"
          f"coformer compile {model_args} --data {args.out}/photos --devices {args.out}/devices.yaml "
          f"--out {args.out}/bundle\n"
          f"sudo coformer bench {args.out}/bundle {model_args} --data {args.out}/photos "
          f"--devices {args.out}/devices.yaml --strategies coformer,teacher --input-source device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
