"""``coformer-runtime verify``, ``keys`` and ``sign``: a bundle's files, its keys and its signature."""

from __future__ import annotations

import argparse
from pathlib import Path

from coformer.runtime.errors import CoFormerError


def register(sub) -> None:
    p = sub.add_parser("verify", help="check a bundle's manifest and the SHA-256 of every artifact")
    p.add_argument("bundle", type=Path)
    p.add_argument("--keys", type=Path, default=None,
                   help="a key folder holding operator.pub: also check the operator's signature")
    p.set_defaults(run=verify)

    p = sub.add_parser("keys", help="write CURVE key pairs for the central node, each device and each client, "
                                    "and the operator's signing key; sign the bundle")
    p.add_argument("out", type=Path, help="folder for the keys: one sub-folder per role, to copy to its machine")
    p.add_argument("--bundle", type=Path, required=True, help="the bundle whose devices get keys (and is signed)")
    p.add_argument("--clients", nargs="+", default=["client"], metavar="NAME", help="one key per client")
    p.set_defaults(run=keys)

    p = sub.add_parser("sign", help="sign a bundle's manifest with the operator's key (after a recompile)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="operator/operator.signing from `coformer-runtime keys`")
    p.set_defaults(run=sign)


def verify(args: argparse.Namespace) -> int:
    from coformer.runtime.manifest import load_manifest

    from coformer.runtime.security import SIGNATURE_NAME, load_keys

    trust = None
    if args.keys is not None:
        trust = load_keys(args.keys, "central" if (args.keys / "clients").is_dir() else "worker").operator
        if trust is None:
            raise CoFormerError(f"key folder {args.keys} has no operator.pub to check the signature with")
    m = load_manifest(args.bundle, verify=True, trust=trust)
    signed = ("signature checked" if trust is not None else
              "signature present, not checked (give --keys)" if (args.bundle / SIGNATURE_NAME).is_file()
              else "not signed")
    print(f"{args.bundle}: OK, {len(m.files)} files verified, {signed}, devices {[d.device for d in m.devices]}")
    return 0


def keys(args: argparse.Namespace) -> int:
    from coformer.runtime.manifest import load_manifest
    from coformer.runtime.security import OPERATOR_SECRET, sign_bundle, write_keys

    m = load_manifest(args.bundle, verify=True)
    folders = write_keys(args.out, [w.device for w in m.workers], args.clients)
    sig = sign_bundle(args.bundle, folders["operator"] / OPERATOR_SECRET)
    print(f"{args.out}: keys for central ({m.central.device}), workers {[w.device for w in m.workers]} and "
          f"clients {args.clients}; {args.bundle} signed ({sig.name})")
    for role, folder in folders.items():
        where = ("stays with the operator: its secret signs bundles" if role == "operator" else
                 f"copy to the machine of {role}, and run it with --keys pointing there")
        print(f"  {folder}: {where}")
    return 0


def sign(args: argparse.Namespace) -> int:
    from coformer.runtime.manifest import load_manifest
    from coformer.runtime.security import sign_bundle

    load_manifest(args.bundle, verify=True)  # never sign a bundle whose files do not match
    print(f"{args.bundle}: signed ({sign_bundle(args.bundle, args.key).name})")
    return 0
