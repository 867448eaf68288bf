"""``coformer-runtime infer``: one input (a .npy, text or image files) through a served bundle, the answer printed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from coformer.runtime.commands.args import add_security_args, role_keys
from coformer.runtime.errors import CoFormerError


def model_input(x: np.ndarray) -> np.ndarray:
    """Integer arrays (token ids) stay int64; anything else becomes float32."""
    return x.astype(np.int64) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)


def register(sub) -> None:
    p = sub.add_parser("infer", help="send one input (.npy, model input or raw data, or text) and print the answer")
    p.add_argument("bundle", type=Path)
    p.add_argument("--central", default="tcp://127.0.0.1:5555", help="the central node's front endpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help=".npy file")
    src.add_argument("--text", nargs="+", metavar="TEXT",
                     help="text bundles: one text per argument (a sentence-pair bundle takes exactly two: the pair)")
    src.add_argument("--image", nargs="+", type=Path, metavar="FILE",
                     help="image bundles: JPEG, PNG or WebP files, preprocessed here as the bundle records "
                          "(needs Pillow: pip install 'coformer[image]')")
    p.add_argument("--top-k", type=int, default=5, help="with --image: the most likely labels to print")
    p.add_argument("--embed", action="store_true",
                   help="an embedding bundle: print the embedding of each text, image or input row")
    p.add_argument("--raw", action="store_true", help="apply the bundle's preprocessing to the input first")
    p.add_argument("--timeout", type=float, default=30.0)
    add_security_args(p, "client")
    p.set_defaults(run=infer)


def infer(args: argparse.Namespace) -> int:
    from coformer.runtime.client import Client
    from coformer.runtime.manifest import load_manifest
    from coformer.runtime.preprocess import preprocess

    keys = role_keys(args, "client")
    manifest = load_manifest(args.bundle, verify=False, trust=keys.operator if keys else None)
    connect = {"timeout_s": args.timeout, "keys": keys, "insecure": args.insecure}
    if args.embed or manifest.task_kind == "embedding":
        if manifest.task_kind != "embedding":
            raise CoFormerError("--embed needs an embedding bundle; this one classifies (drop --embed)")
        if args.text is not None:
            items = [args.text] if manifest.input.preprocessing.get("pair") else args.text
        elif args.image is not None:
            items = [str(f) for f in args.image]
        else:
            if not args.input.is_file():
                raise CoFormerError(f"input file {args.input} does not exist")
            items = np.load(args.input)
            items = preprocess(manifest.input.preprocessing, items) if args.raw else model_input(items)
            if items.ndim == len(manifest.input.shape):
                items = items[None]
        with Client(args.central, **connect) as client:
            vectors = client.embed(items, args.bundle)
        print(json.dumps({"embedding": vectors.tolist(), "dim": int(vectors.shape[1]),
                          "normalized": bool(manifest.task.get("normalize"))}))
        return 0
    if args.text is not None:
        from coformer.runtime.text import TextEncoder

        encoder = TextEncoder.from_bundle(args.bundle, manifest)
        texts = [args.text] if encoder.spec["pair"] else args.text
        with Client(args.central, **connect) as client:
            labels, result = client.classify(texts, encoder, manifest.labels)
        print(json.dumps({"label": labels, "logits": result.logits.tolist(),
                          "round_trip_ms": round(result.round_trip_ms, 3)}))
        return 0
    if args.image is not None:
        with Client(args.central, **connect) as client:
            answers, results = client.classify_images(args.image, manifest, top_k=args.top_k)
        print(json.dumps({"images": [{"file": str(f), "top_k": [{"label": lab, "probability": round(p, 6)}
                                                                  for lab, p in a]}
                                     for f, a in zip(args.image, answers)],
                          "round_trip_ms": round(sum(r.round_trip_ms for r in results), 3)}))
        return 0
    if manifest.input.is_text:
        raise CoFormerError("this bundle takes text: use --text")
    if not args.input.is_file():
        raise CoFormerError(f"input file {args.input} does not exist")
    x = np.load(args.input)
    x = preprocess(manifest.input.preprocessing, x) if args.raw else x.astype(np.float32)
    if x.ndim == len(manifest.input.shape):
        x = x[None]
    with Client(args.central, **connect) as client:
        result = client.infer(x)
    labels = manifest.labels
    print(json.dumps({
        "label": [labels[i] if i < len(labels) else i for i in result.label_index],
        "logits": result.logits.tolist(),
        "round_trip_ms": round(result.round_trip_ms, 3),
    }))
    return 0
