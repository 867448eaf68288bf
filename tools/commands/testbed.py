"""``coformer testbed``: emulate the devices on this host (namespaces, shaped links, cgroups; root)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coformer.runtime.errors import CoFormerError


def register(sub) -> None:
    p = sub.add_parser("testbed", help="emulate the devices on this host: namespaces, shaped links, cgroups (root)")
    p.add_argument("action", choices=["up", "down", "status", "exec"])
    p.add_argument("--devices", type=Path, default=None, help="devices file (for up)")
    p.add_argument("--link-delay", type=float, default=0.0, help="ms of delay on every link (needs netem)")
    p.add_argument("--device", default=None, help="for exec: the device to run the command in")
    p.add_argument("--slot", type=int, default=None,
                   help="for down and exec: the testbed's slot (`status` lists them; needed when several are up)")
    p.add_argument("--all", action="store_true",
                   help="for down: every testbed on the host, also those a running bench owns")
    p.epilog = ("exec: coformer testbed exec --device NAME -- COMMAND ...  down: without --slot, every testbed "
                "no running process owns (those `up` made, and what crashed runs left)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from coformer.tools import testbed

    if args.action == "up":
        if args.devices is None:
            raise CoFormerError("testbed up needs --devices devices.yaml")
        from coformer.compiler.devices import load_devices

        bed = testbed.up(load_devices(args.devices), args.link_delay, persistent=True)
        for d in bed.devices:
            link = "central node" if d.link_mbit_s is None else f"{d.link_mbit_s:g} Mbit/s to {d.address}"
            print(f"  {d.name:<12} netns {d.namespace:<10} {link:<28} cores {list(d.cores)} share "
                  f"{d.cpu_share:.2f} memory {d.memory_bytes / 2**20:.0f} MiB")
        print(f"testbed up in slot {bed.slot} (clients reach the central node at {bed.client_address}); "
              f"`coformer testbed down --slot {bed.slot}` removes it")
    elif args.action == "down":
        removed = testbed.down(args.slot, everything=args.all)
        print(f"testbed down: removed {len(removed['namespaces'])} namespaces, {len(removed['cgroups'])} cgroups")
    elif args.action == "status":
        print(json.dumps(testbed.status(), indent=2))
    else:
        cmd = getattr(args, "cmd", [])
        if args.device is None or not cmd:
            raise CoFormerError("testbed exec needs --device NAME -- COMMAND ...")
        return testbed.load(args.slot).run(args.device, cmd).returncode
    return 0
