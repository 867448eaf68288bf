"""The argument groups several ``coformer`` commands share (the teacher, the data, the compute),
and what they load."""

from __future__ import annotations

import argparse
from pathlib import Path


THROTTLES = ["auto", "cgroup", "duty-cycle", "none"]


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The teacher's flags (--model, --checkpoint, --model-kwargs, --max-length), shared by the tools."""
    p.add_argument("--model", required=required,
                   help="'quickstart' (the built-in teacher), 'timm:NAME' with --checkpoint (any timm ViT, DeiT or "
                        "Swin), 'timm-dir:PATH' (timm's local folder: config.json and model.safetensors) or "
                        "'hf:PATH' (a local HuggingFace checkpoint directory: BERT, GPT-2 or T5)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="the timm model's weights: .pth/.pt/.bin or .safetensors, a state_dict or "
                        "{'state_dict'|'model': ...}")
    p.add_argument("--model-kwargs", default="{}", help="JSON keyword arguments for timm.create_model "
                   "(img_size, depth, num_classes, ...: the settings the checkpoint was trained with)")
    p.add_argument("--max-length", type=int, default=128, help="text: longest token sequence a request may carry")


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0.485,0.456,0.406") \
            from None
    return values


def add_data_args(p: argparse.ArgumentParser, bench: bool = False) -> None:
    """The calibration data's flags (--data, the splits, the preprocessing overrides, --task)."""
    g = p.add_argument_group("data")
    g.add_argument("--data", default=None,
                   help="images: a folder (one sub-folder per class, or flat for label-free distillation; JPEG, PNG, "
                        "WebP), 'digits' or 'mnist' (built in); text: 'sentiment' (built in) or a file (.tsv GLUE-style, "
                        ".jsonl, or .txt for label-free distillation). Default: digits for a 1-channel image "
                        "model, sentiment for text" + ("; the bench's test inputs come from its test split" if bench
                                                       else ""))
    g.add_argument("--val-fraction", type=float, default=0.1, help="image folders: share held out for the "
                   "search's validation loss (fixed by --seed)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="image folders: share held out for the "
                   "reported accuracy")
    g.add_argument("--crop-pct", type=float, default=None, help="override the teacher's timm data config: "
                   "resize to size / crop_pct, then crop the centre")
    g.add_argument("--crop-mode", default=None, choices=["center", "squash"], help="override: keep the aspect "
                   "ratio (center) or not (squash)")
    g.add_argument("--interpolation", default=None, choices=["nearest", "bilinear", "bicubic", "box", "hamming",
                                                             "lanczos"], help="override the resize filter")
    g.add_argument("--mean", type=_floats, default=None, help="override the per-channel mean, e.g. 0.5,0.5,0.5")
    g.add_argument("--std", type=_floats, default=None, help="override the per-channel std")
    g.add_argument("--unlabeled", action="store_true", help="calibrate from the teacher's decisions only")
    g.add_argument("--task", default="auto", choices=["auto", "classification", "embedding"],
                   help="what the bundle answers: class logits, or the teacher's pooled feature (auto: embedding "
                        "for a model without a task head and data without labels)")
    g.add_argument("--truncation", action="store_true",
                   help="text: cut texts longer than --max-length instead of refusing them")


def add_compute_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("compute (importance, distillation, aggregator, evaluation)")
    g.add_argument("--device", default="auto", help="auto (CUDA when PyTorch sees a GPU), cpu, cuda or cuda:N")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"],
                   help="mixed precision on CUDA (auto: bf16 where the GPU has it, else fp16; none on the CPU)")
    g.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    g.add_argument("--workers", type=int, default=None,
                   help="processes decoding image folders (default: up to 4, one core left free)")


def teacher_from_args(args: argparse.Namespace):
    """The teacher the flags of :func:`add_model_args` name, loaded from local files."""
    from coformer.compiler.sources import load_teacher

    return load_teacher(args.model, args.checkpoint, args.model_kwargs, getattr(args, "max_length", 128),
                        progress=not getattr(args, "no_progress", False))


def data_from_args(args: argparse.Namespace, teacher):
    """The data the flags of :func:`add_data_args` name, preprocessed for ``teacher``."""
    from coformer.compiler.sources import load_data

    overrides = {k: getattr(args, k) for k in ("crop_pct", "crop_mode", "interpolation", "mean", "std")}
    return load_data(teacher, args.data, unlabeled=args.unlabeled, preprocessing=overrides,
                     val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=getattr(args, "seed", 0),
                     truncation=args.truncation, task=args.task)


def compute_from_args(args: argparse.Namespace):
    from coformer.calibration.compute import Compute

    return Compute.resolve(args.device, args.amp, args.batch_size, args.workers)
