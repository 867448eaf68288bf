"""Where the offline work runs: the workstation's accelerator, mixed precision, batch
size and data-loading workers (``coformer compile --device auto|cpu|cuda[:N] --amp
--batch-size --workers``).

Importance, distillation, aggregator training and the accuracy evaluation all
take a :class:`Compute`; lowering to ONNX always runs on the CPU in float32
(the parity check compares against float32 PyTorch). Mixed precision is a CUDA
feature here: autocast to bf16 where the GPU has it (Ampere and newer: no loss
scaling needed), else fp16 with a gradient scaler; the CPU stays in float32.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from coformer.runtime.errors import CoFormerError

AMP_MODES = ("auto", "bf16", "fp16", "none")


@dataclass(frozen=True)
class Compute:
    """Args:
    device: a torch device string, ``cpu`` or ``cuda[:N]``.
    amp: ``bf16``, ``fp16`` or ``none`` (always ``none`` on the CPU).
    batch_size: samples per batch for every pass over data (training and inference).
    workers: data-loading processes for streamed data (image folders); 0 decodes in
        the main process.
    """

    device: str = "cpu"
    amp: str = "none"
    batch_size: int = 64
    workers: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise CoFormerError(f"--batch-size {self.batch_size} must be >= 1")
        if self.workers < 0:
            raise CoFormerError(f"--workers {self.workers} must be >= 0")
        if self.amp not in AMP_MODES[1:]:
            raise CoFormerError(f"--amp {self.amp!r} is not one of {list(AMP_MODES)}")
        if self.amp != "none" and not self.cuda:
            raise CoFormerError(f"--amp {self.amp} needs a CUDA device; on {self.device} compile runs in float32")

    @classmethod
    def resolve(cls, device: str = "auto", amp: str = "auto", batch_size: int = 64,
                workers: Optional[int] = None) -> "Compute":
        """``device="auto"``: the first CUDA device when PyTorch sees one, else the CPU.
        ``amp="auto"``: bf16 on a GPU that supports it, fp16 on another GPU, none on the CPU.
        ``workers=None``: up to 4 loader processes, leaving one core to the main process."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            _check_cuda(device)
        cuda = device.startswith("cuda")
        if amp == "auto":  # bf16 natively from compute capability 8 (Ampere) on; emulated before, so fp16
            native = cuda and torch.cuda.get_device_capability(torch.device(device))[0] >= 8
            amp = ("bf16" if native else "fp16") if cuda else "none"
        if workers is None:
            workers = max(0, min(4, (os.cpu_count() or 1) - 1))
        return cls(device, amp, batch_size, workers)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for a forward pass (a no-op without AMP)."""
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)

    def scaler(self) -> Any:
        """A gradient scaler for fp16 training (bf16 and float32 need none), or None."""
        return torch.amp.GradScaler("cuda") if self.amp == "fp16" else None

    def describe(self) -> str:
        name = self.device
        if self.cuda:
            name += f" ({torch.cuda.get_device_name(self.torch_device)})"
        return f"{name}, {'float32' if self.amp == 'none' else self.amp + ' autocast'}, batch {self.batch_size}"

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "amp": self.amp, "batch_size": self.batch_size, "workers": self.workers}


CPU = Compute()


def _check_cuda(device: str) -> None:
    if device != "cuda" and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise CoFormerError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise CoFormerError(f"--device {device}: PyTorch sees no CUDA device (torch.cuda.is_available() is False; "
                            f"torch {torch.__version__}, built for CUDA {torch.version.cuda}); use --device cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise CoFormerError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                            f"(0..{torch.cuda.device_count() - 1})")
