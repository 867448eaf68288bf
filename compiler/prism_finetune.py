"""Light fine-tuning of PRISM at CR > 1 (issue 23, item 3's option; the paper's "minor
degradation" is after fine-tuning): ``coformer compile --strategy prism --finetune-epochs N``.

At CR > 1 a device's queries see the other devices' keys and values only as segment means,
which the teacher was never trained on. Fine-tuning teaches the weights to work with them.

Choices written down:

* **What trains.** A copy of every teacher weight, run by PRISM's own forward at the bundle's
  compression rate and shares (:func:`coformer.compiler.prism.vit_logits`,
  :func:`~coformer.compiler.prism.bert_states`). The weights stay one model that every device
  holds, as PRISM wants; the bundle is lowered from the tuned copy and checked against the
  tuned PRISM forward, as an untuned one is against the teacher's.
* **Objective and trainer.** Calibration's ``soft`` objective: ``T^2 KL`` to the teacher's
  softened logits (T = 4), averaged with the labels' cross-entropy where there are labels
  (:mod:`coformer.calibration.objectives`). It runs through calibration's own trainer
  (:func:`coformer.calibration.booster.calibrate`: AdamW, short warm-up, cosine decay) as
  one sub-model without boosting. The default learning rate, 1e-4, is a fifth of
  calibration's 5e-4, because training starts from trained weights and should move them a
  little.
* **Kept only if it helps.** The validation split decides, and the test split stays
  untouched for the report. The tuned weights are served only if PRISM's accuracy with them
  on the validation split beats the untuned PRISM's, or, without labels, its agreement with
  the teacher. Otherwise the bundle runs the teacher's weights, and the report says so.
* **CR = 1 is refused.** There PRISM *is* the teacher, so there is nothing to recover.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

from coformer.calibration.compute import CPU, Compute
from coformer.runtime.errors import CoFormerError

DEFAULT_LR = 1e-4
TEMPERATURE = 4.0


class PrismModel(nn.Module):
    """``model``'s weights run by PRISM's forward on ``shares`` at ``cr``: packed inputs -> logits
    (text is right-padded to the bundle's fixed length first, as the central node pads it)."""

    def __init__(self, model: nn.Module, shares: Sequence[int], cr: int, pad_id: Optional[int] = None) -> None:
        from coformer.compiler.prism_bundle import prism_family

        super().__init__()
        self.model = model
        self.fam = prism_family(model)
        self.shares, self.cr, self.pad_id = list(shares), int(cr), pad_id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fam.text and x.shape[-1] != self.fam.tokens():
            from coformer.runtime.prism import pad_tokens

            x = torch.from_numpy(pad_tokens(x.cpu().numpy(), self.fam.tokens(), int(self.pad_id or 0))).to(x.device)
        return self.fam.logits(x, self.shares, self.cr)


def _decisions(model: nn.Module, data, compute: Compute) -> torch.Tensor:
    from coformer.compiler.inference import run_batched

    return run_batched(model, data.val, compute, reduce=lambda y: y.argmax(-1))


def _scores(t: torch.Tensor, prism: nn.Module, data, compute: Compute) -> dict[str, Any]:
    """PRISM's accuracy (None without labels) and agreement with the teacher's decisions ``t`` on ``data.val``."""
    p = _decisions(prism, data, compute)
    y = data.val.y
    return {"accuracy": None if y is None else float((p == y).float().mean()),
            "agreement_with_teacher": float((p == t).float().mean())}


def finetune_prism(teacher: nn.Module, data, shares: Sequence[int], cr: int, epochs: int,
                   lr: float = DEFAULT_LR, compute: Compute = CPU, seed: int = 0,
                   progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Fine-tune a copy of ``teacher`` under PRISM at ``cr`` on ``shares`` for ``epochs`` over
    ``data.train`` (module doc). Returns the tuned copy and what happened: the validation
    scores before and after, ``kept`` (whether the tuned copy is to be served: it did better on
    ``data.val``; else serve the teacher's weights), the losses and the seconds."""
    from coformer.calibration.booster import BoostConfig, calibrate
    from coformer.compiler.inference import run_batched

    if int(epochs) < 1:
        raise CoFormerError(f"--finetune-epochs {epochs} must be >= 1")
    if int(cr) <= 1:
        raise CoFormerError("--finetune-epochs needs --compression-rate > 1: at CR = 1 PRISM is the teacher")
    if not lr > 0:
        raise CoFormerError(f"--finetune-lr {lr} must be > 0")
    if len(data.train) == 0 or len(data.val) == 0:
        raise CoFormerError("fine-tuning PRISM needs a training split, and a validation split to decide whether "
                            f"it helps; these have {len(data.train)} and {len(data.val)} samples")
    start = time.perf_counter()
    teacher = teacher.eval()
    pad_id = (data.preprocessing or {}).get("pad_id")
    t = _decisions(teacher, data, compute)
    before = _scores(t, PrismModel(teacher, shares, cr, pad_id), data, compute)
    targets = run_batched(teacher, data.train, compute)  # logits, once
    student = PrismModel(copy.deepcopy(teacher), shares, cr, pad_id)
    report = calibrate([student], [nn.Identity()], data.train, targets, labels=data.train.y,
                       config=BoostConfig(epochs=int(epochs), batch_size=compute.batch_size, lr=float(lr), seed=seed,
                                          distill="soft", temperature=TEMPERATURE, boosting=False),
                       progress=progress, compute=compute)
    student.eval()
    after = _scores(t, student, data, compute)
    key = "accuracy" if before["accuracy"] is not None else "agreement_with_teacher"
    kept = after[key] > before[key]
    result = {"epochs": int(epochs), "lr": float(lr), "compression_rate": int(cr), "kept": bool(kept),
              "decided_by": f"validation {key}", "validation": {"samples": len(data.val), "before": before,
                                                                 "after": after},
              "losses": [float(v) for v in report.losses[0]], "seconds": round(time.perf_counter() - start, 1)}
    return student.model, result


def finetune_for_devices(teacher: nn.Module, devices: Sequence[Any], data, cr: int, epochs: int,
                         lr: float = DEFAULT_LR, compute: Compute = CPU, seed: int = 0,
                         progress: bool = False) -> tuple[Optional[nn.Module], dict[str, Any]]:
    """:func:`finetune_prism` on the shares ``devices`` get (by ``cpu_share``, as
    :func:`coformer.compiler.prism_bundle.build_prism` gives them). Returns what ``build_prism``
    takes: ``tuned`` (None where the tuned copy was not kept) and ``finetune`` (the report)."""
    from coformer.compiler.prism import share_positions
    from coformer.compiler.prism_bundle import prism_family

    shares = share_positions(prism_family(teacher.eval()).tokens(), [d.cpu_share for d in devices])
    tuned, report = finetune_prism(teacher, data, shares, cr, epochs, lr, compute, seed, progress)
    return (tuned if report["kept"] else None), report
