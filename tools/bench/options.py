"""What ``coformer bench``'s command line names: strategies, input sources, link rates and
device counts, parsed with an error that names the bad entry."""

from __future__ import annotations

import re
from typing import Sequence

from coformer.runtime.errors import CoFormerError

STRATEGIES = ("coformer", "uniform", "student", "student_matched", "teacher", "pipeline", "tensor_parallel", "prism")
# ``prism`` is benched at each of these compression rates, one row each (``prism_cr4``, ...)
PRISM_CRS = (4, 16)
# and first fine-tuned for this many epochs at CR > 1 (kept where validation accuracy rises)
PRISM_FINETUNE_EPOCHS = 2
STUDENTS = ("student", "student_matched")  # one sub-model on the central device alone
# the strategies that are CoFormer bundles (sub-models, features, an aggregator): their rows get a physical limit
DECOMPOSED = ("coformer", "uniform", *STUDENTS)
INPUT_SOURCES = ("device", "central")  # the default pair; also "files": the central node forwards the
# encoded image files as the client sent them, each device decoding them (an image-folder bench only)
ALL_INPUT_SOURCES = (*INPUT_SOURCES, "files")
DEFAULT_BANDWIDTHS = "2mbit"
DEFAULT_THROUGHPUT = "1,8"  # concurrent clients whose answers per second every run reports
_UNITS = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}


def parse_bandwidths(text: str) -> list[float]:
    """``"2mbit,100mbit,1gbit"`` -> ``[2.0, 100.0, 1000.0]`` (Mbit/s); names the bad entry."""
    out = []
    for part in [p.strip().lower() for p in str(text).split(",")]:
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(kbit|mbit|gbit)", part)
        if not m or float(m.group(1)) <= 0:
            raise CoFormerError(f"--bandwidth {part!r}: expected a rate such as 2mbit, 500kbit or 1gbit")
        out.append(float(m.group(1)) * _UNITS[m.group(2)])
    return out


def parse_counts(text: str) -> list[int]:
    """``"1..3"`` or ``"1,3"`` -> device counts; names the bad entry."""
    out: list[int] = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        m = re.fullmatch(r"(\d+)(?:\.\.(\d+))?", part)
        if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise CoFormerError(f"--devices-count {part!r}: expected a count such as 3, a list 1,3 or a range 1..3")
        out += list(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
    if not out:
        raise CoFormerError(f"--devices-count {text!r}: name at least one count")
    return sorted(set(out))


def parse_clients(text: str) -> list[int]:
    """``"1,8"`` -> ``[1, 8]`` concurrent clients; ``"none"`` -> ``[]``; names the bad entry."""
    if str(text).strip().lower() == "none":
        return []
    out = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        if not part.isdigit() or not 1 <= int(part) <= 256:
            raise CoFormerError(f"--throughput {part!r}: expected client counts such as 1,8 (1-256), or none")
        out.append(int(part))
    if not out:
        raise CoFormerError(f"--throughput {text!r}: name at least one client count, or none")
    return sorted(set(out))


def prism_label(cr: int) -> str:
    """The bench's name for PRISM at compression rate ``cr``."""
    return f"prism_cr{int(cr)}"


def parse_crs(text: str) -> list[int]:
    """``"4,16"`` -> ``[4, 16]`` compression rates; names the bad entry."""
    out = []
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        if not part.isdigit() or int(part) < 1:
            raise CoFormerError(f"--prism-cr {part!r}: expected whole compression rates >= 1, such as 4,16")
        out.append(int(part))
    if not out:
        raise CoFormerError(f"--prism-cr {text!r}: name at least one compression rate")
    return sorted(set(out))


def parse_choice(text: str, allowed: Sequence[str], what: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]``, each one of ``allowed``; names the bad entry."""
    items = [p.strip() for p in str(text).split(",") if p.strip()]
    for p in items:
        if p not in allowed:
            raise CoFormerError(f"{what} {p!r} is not one of {list(allowed)}")
    if not items:
        raise CoFormerError(f"{what}: name at least one of {list(allowed)}")
    return items


def bandwidth_name(mbit: float) -> str:
    """2.0 -> ``"2mbit"``, 1000.0 -> ``"1gbit"``, 0.5 -> ``"500kbit"``."""
    return f"{mbit / 1e3:g}gbit" if mbit >= 1e3 else f"{mbit:g}mbit" if mbit >= 1 else f"{mbit * 1e3:g}kbit"
