"""Read a devices file (YAML or JSON): the cluster a bundle is compiled for.

    devices:
      - name: edge-a          # first device = central node
        memory_bytes: 4.0e9   # Phi_n
        flops_budget: 2.0e9   # Omega_n, FLOPs per inference
        link_mbit_s: 2        # r_n, link to the central node
        cpu_share: 1.0        # compute relative to the strongest device
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from coformer.compiler.specs import DeviceSpec
from coformer.runtime.errors import CoFormerError

_INT_FIELDS = ("memory_bytes", "flops_budget")


def parse_devices(doc: Any, source: str = "devices") -> list[DeviceSpec]:
    if not isinstance(doc, dict) or not isinstance(doc.get("devices"), list) or not doc["devices"]:
        raise CoFormerError(f"{source}: expected a mapping with a non-empty list 'devices'")
    out = []
    for i, entry in enumerate(doc["devices"]):
        where = f"{source}: devices[{i}]"
        if not isinstance(entry, dict):
            raise CoFormerError(f"{where} is {entry!r}, expected a mapping")
        entry = dict(entry)
        for f in ("memory_bytes", "flops_budget", "link_mbit_s", "cpu_share"):
            v = entry.get(f)
            if isinstance(v, str):  # YAML 1.1 reads 1.0e9 (no exponent sign) as a string
                try:
                    entry[f] = v = float(v)
                except ValueError:
                    pass
        for f in _INT_FIELDS:
            v = entry.get(f)
            if isinstance(v, float) and v.is_integer():
                entry[f] = int(v)
            elif v is None:
                raise CoFormerError(f"{where} ({entry.get('name', '?')}): missing field '{f}'")
        for f in ("link_mbit_s", "cpu_share"):
            if f in entry and not isinstance(entry[f], (int, float)):
                raise CoFormerError(f"{where}: field '{f}' is {entry[f]!r}, expected a number")
        try:
            out.append(DeviceSpec.from_dict(entry))
        except TypeError as e:
            raise CoFormerError(f"{where}: {e}") from None
        except CoFormerError as e:
            raise CoFormerError(f"{where}: {e}") from None
    names = [d.name for d in out]
    if len(set(names)) != len(names):
        raise CoFormerError(f"{source}: device names {names} repeat")
    return out


def load_devices(path: Path) -> list[DeviceSpec]:
    path = Path(path)
    if not path.is_file():
        raise CoFormerError(f"devices file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            doc = json.loads(text)
        else:
            import yaml

            doc = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise their own types
        raise CoFormerError(f"devices file {path} cannot be parsed: {e}") from None
    devices = parse_devices(doc, str(path))
    from dataclasses import replace

    return [replace(d, profile=str((path.parent / d.profile).resolve())) if d.profile else d for d in devices]
