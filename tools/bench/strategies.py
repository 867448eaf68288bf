"""Each strategy's bundle, built from the same teacher's real weights (see
:mod:`coformer.compiler.baselines`) and cached while what it was built from is unchanged;
and the checks that a user's bundle matches the teacher, devices and data it is benched with."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from coformer.runtime.files import atomic_write_bytes, atomic_write_json
from coformer.runtime.errors import CoFormerError
from coformer.tools.bench.options import PRISM_CRS, STRATEGIES, STUDENTS, prism_label
from coformer.tools.progress import Progress

STUDENT_FILE = "student.json"  # in a student's bundle: the device and the FLOPs budget it was searched within
BUNDLES_VERSION = 2  # bump when the baselines are built differently: cached ones are rebuilt (2: explicit attention)


def bundles_digest(teacher, devices, boost_epochs: int, aggregator_epochs: int, seed: int, data=None,
                   batch_size: int = 64, settings: Optional[dict[str, Any]] = None) -> str:
    """What the built bundles depend on: every byte of the teacher's weights (not a prefix
    of each tensor: a fine-tuned head or a retrained last row differs late), the devices,
    the calibration settings (``settings``: the CoFormer bundle's own, where they are taken
    from it) and the data they were calibrated on."""
    import hashlib

    from coformer.compiler.fingerprint import hash_data, hash_weights

    key = hashlib.sha256(f"bundles v{BUNDLES_VERSION}".encode())
    hash_weights(key, teacher)
    key.update(json.dumps([d.to_dict() for d in devices], sort_keys=True, default=str).encode())
    key.update(json.dumps([boost_epochs, aggregator_epochs, seed, batch_size]).encode())
    if settings is not None:
        key.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if data is not None:
        hash_data(key, data)
    return key.hexdigest()[:16]


def strategies_for(teacher, task: str = "classification") -> tuple[str, ...]:
    """The strategies the bench can build for ``teacher``'s family: pipeline and tensor
    parallelism slice ViT/DeiT blocks and tokens, so a Swin teacher gets the others; the
    teacher alone is built for image families; PRISM for the families it serves
    (:func:`prism_serves`). An embedding bundle (``task``) is benched against what answers
    embeddings: CoFormer's own kinds, the students, and a language teacher alone."""
    from coformer.compiler.baselines import BASELINES, baseline_families
    from coformer.compiler.families import adapter_for

    adapter = adapter_for(teacher)
    if task == "embedding":
        hf = getattr(adapter, "matches_hf", None) is not None
        return tuple(s for s in STRATEGIES if s in ("coformer", "uniform", *STUDENTS) or (s == "teacher" and hf))
    return tuple(s for s in STRATEGIES if s in ("coformer", "uniform", *STUDENTS) or
                 (s == "prism" and prism_serves(teacher)) or (s in BASELINES and adapter.name in baseline_families(s)))


def expand_prism(strategies: Sequence[str], crs: Sequence[int]) -> list[str]:
    """``strategies`` with ``prism`` as one entry per compression rate (``prism_cr4``, ...)."""
    return [x for s in strategies for x in ([prism_label(c) for c in crs] if s == "prism" else [s])]


def prism_serves(teacher) -> bool:
    """Whether a PRISM bundle can be built for ``teacher`` (:mod:`coformer.compiler.prism_bundle`)."""
    from coformer.compiler.prism_bundle import prism_family

    try:
        prism_family(teacher)
        return True
    except CoFormerError:
        return False


def prepare_bundles(strategies: Sequence[str], coformer_bundle: Optional[Path], teacher, devices, data, out_dir: Path,
                    boost_epochs: Optional[int] = 5, aggregator_epochs: int = 60, seed: int = 0,
                    progress: Union[bool, Progress] = True, predictors: Optional[Sequence[Any]] = None,
                    compute=None, prism_crs: Sequence[int] = PRISM_CRS,
                    prism_finetune: int = 0, calibration: Optional[dict[str, Any]] = None,
                    task: Optional[dict[str, Any]] = None) -> dict[str, Path]:
    """The bundle of every strategy: CoFormer's as given, the others built in ``out_dir``
    (reused while the teacher, devices and settings they were built from are unchanged).

    Without ``coformer_bundle``, CoFormer's is compiled here too: DeBo over
    ``predictors`` (one per device), then calibration, as ``coformer compile`` does;
    ``uniform`` is compiled the same way with the uniform policy. Both go through
    :func:`coformer.compiler.job.run_job`, on ``compute``.

    The students are the obvious alternative to collaborating: one sub-model on the
    central (strongest) device alone, searched and calibrated as CoFormer's are.
    ``student`` gets that device's FLOPs budget; ``student_matched`` the compute time of
    CoFormer's slowest device (:func:`matched_student_flops`). With ``predictors`` (the
    first is the central device's) each is searched by DeBo over the one device, with
    CoFormer's objective (eq. 8: validation loss plus delta times predicted latency), so
    it may choose to be smaller than its budget where that pays. Without them (a user's
    bundle whose devices name no profile) each is the decoding of the full point under
    its budget, which drops the least important layers, then narrows, until it fits: the
    largest that fits. The row's ``policy_source`` says which (``bo`` or ``uniform``).

    ``prism`` is built once per compression rate in ``prism_crs``, as ``prism_cr{CR}``: the
    teacher's own weights, or at CR > 1 with ``prism_finetune`` epochs, those weights
    fine-tuned under PRISM where that raises the validation accuracy
    (:mod:`coformer.compiler.prism_finetune`).

    ``calibration`` (the CoFormer bundle's ``model.calibration_settings``) calibrates the students and
    ``uniform`` with the very settings CoFormer's sub-models had (epochs, learning rate,
    distillation, residual), ``boost_epochs`` overriding its epochs where given; without it,
    ``boost_epochs`` (default 5) and the defaults. ``task`` (the bundle's manifest ``task``)
    makes them answer what CoFormer's bundle answers: an embedding bundle's are distilled to
    the teacher's embedding, and its teacher alone answers that embedding.
    """
    from coformer.calibration.booster import BoostConfig
    from coformer.calibration.compute import CPU
    from coformer.compiler.baselines import BASELINES
    from coformer.compiler.job import CompileJob, matched_student_flops, run_job, student_job
    from coformer.compiler.fingerprint import boost_from_record
    from coformer.compiler.sources import source_of
    from coformer.runtime.manifest import load_manifest

    compute = compute or CPU
    say = Progress.of(progress)
    use_labels = True
    if calibration is not None:
        boost, aggregator_epochs, use_labels = boost_from_record(calibration, compute.batch_size)
        boost = boost if boost_epochs is None else replace(boost, epochs=boost_epochs)
        seed = boost.seed
    else:
        boost = BoostConfig(epochs=5 if boost_epochs is None else boost_epochs, batch_size=compute.batch_size,
                            seed=seed)
    kind = (task or {}).get("kind", "classification")
    normalize = (task or {}).get("normalize") if kind == "embedding" else None
    settings = None if calibration is None and task is None else {"boost": asdict(boost), "task": task,
                                                                  "use_labels": use_labels}
    digest = bundles_digest(teacher, devices, boost.epochs, aggregator_epochs, seed, data, compute.batch_size,
                            settings)
    out: dict[str, Path] = {}
    if "student_matched" in strategies and "coformer" not in strategies:
        raise CoFormerError("student_matched is matched to the coformer bundle: bench the coformer strategy too")
    order = sorted(strategies, key=lambda s: s == "student_matched")  # after the coformer bundle it matches
    order = expand_prism(order, prism_crs)
    for s in order:
        if s == "coformer" and coformer_bundle is not None:
            out[s] = Path(coformer_bundle)
            continue
        path = Path(out_dir) / s
        stamp = path / "built-from.txt"
        built_from = digest
        if s in STUDENTS and predictors is not None:  # and the central device's predictor it was searched over
            import hashlib

            built_from += " " + hashlib.sha256(json.dumps(predictors[0].to_dict(), sort_keys=True,
                                                          default=str).encode()).hexdigest()[:16]
        if s == "student_matched":  # and the CoFormer bundle it is matched to
            from coformer.runtime.manifest import manifest_digest

            built_from += f" {manifest_digest(out['coformer'])[:16]}"
        if s.startswith("prism_cr"):
            built_from += f" finetune {prism_finetune}"
        if (path / "manifest.json").is_file() and stamp.is_file() and stamp.read_text().strip() == built_from:
            load_manifest(path)  # verifies checksums
            out[s] = path
            continue
        if say:
            say(f"bench: building the {s} bundle")
        if path.exists():
            shutil.rmtree(path)
        if s.startswith("prism_cr"):  # fine-tuned under PRISM where asked, at CR > 1
            cr = int(s[len("prism_cr"):])
            run_job(CompileJob(teacher, devices, data, path, compute=compute, seed=seed, model_name=s,
                               progress=bool(progress), strategy="prism",
                               options={"compression_rate": cr, "finetune_epochs": (prism_finetune or 0) if cr > 1 else 0}))
        elif s in BASELINES:
            run_job(CompileJob(teacher, devices, data, path, model_name=s, progress=bool(progress), strategy=s,
                               options={"task": task}))
        elif s in STUDENTS:
            import torch

            central = devices[0]
            budget = central.flops_budget if s == "student" else matched_student_flops(load_manifest(out["coformer"]))
            torch.manual_seed(seed)
            base = CompileJob(teacher, devices, data, path, predictors=predictors, seed=seed, boost=boost,
                              aggregator_epochs=aggregator_epochs, use_labels=use_labels, compute=compute,
                              model_info=source_of(teacher), progress=bool(progress), task=kind,
                              normalize=normalize)
            sj = student_job(base, budget, path, s)  # capped at the device's own budget
            run_job(sj)
            atomic_write_json(path / STUDENT_FILE, {"device": central.name, "flops_budget": sj.devices[0].flops_budget})
        else:  # coformer (searched over the predictors) or uniform, calibrated alike
            if s == "coformer" and predictors is None:
                raise CoFormerError("compiling a CoFormer bundle for the bench needs each device's predictor")
            import torch

            torch.manual_seed(seed)
            run_job(CompileJob(teacher, devices, data, path, search="bo" if s == "coformer" else "uniform",
                               predictors=predictors if s == "coformer" else None, seed=seed, boost=boost,
                               aggregator_epochs=aggregator_epochs, use_labels=use_labels, compute=compute,
                               model_name=s, model_info=source_of(teacher), progress=bool(progress), task=kind,
                               normalize=normalize))
        atomic_write_bytes(stamp, (built_from + "\n").encode())
        out[s] = path
    return {s: out[s] for s in expand_prism(strategies, prism_crs)}


def bundle_devices(manifest, devices):
    """``devices`` in the bundle's order (the central node first); refuses other names."""
    order = [d.device for d in manifest.devices]
    if sorted(order) != sorted(d.name for d in devices):
        raise CoFormerError(f"the devices file names {[d.name for d in devices]}, the bundle was compiled for {order}")
    return sorted(devices, key=lambda d: order.index(d.name))


def check_bundle_matches(manifest, teacher, data) -> None:
    """Refuse to bench a bundle against a teacher or data it was not compiled from (the
    baselines are built from the teacher, the test inputs from the data)."""
    from coformer.compiler.families import adapter_for

    adapter = adapter_for(teacher)
    shape = adapter.read_shape(teacher).to_dict()
    recorded = dict(manifest.model.get("shape") or {})
    diff = sorted(k for k in set(shape) | set(recorded) if k != "extras" and shape.get(k) != recorded.get(k))
    if recorded and diff == ["num_tokens"] and manifest.input.is_text:
        raise CoFormerError(f"the bundle was compiled with --max-length {recorded['num_tokens']}, the teacher is loaded "
                            f"at {shape['num_tokens']}: give --max-length {recorded['num_tokens']}, or leave it out")
    if recorded and diff:
        raise CoFormerError(f"the bundle was compiled from another teacher: {', '.join(diff)} differ "
                            f"(bundle {[recorded.get(k) for k in diff]}, --model {[shape.get(k) for k in diff]})")
    recorded_weights = manifest.model.get("weights_sha256")
    if recorded_weights:
        from coformer.compiler.fingerprint import weights_digest

        if weights_digest(teacher) != recorded_weights:
            raise CoFormerError("the bundle was compiled from other weights than --model/--checkpoint give "
                                f"(weights SHA-256 {recorded_weights[:12]}... in the manifest); bench it with "
                                "the checkpoint it was compiled from")
    if tuple(manifest.input.shape) != tuple(adapter.input_shape(teacher)):
        raise CoFormerError(f"the bundle takes inputs {list(manifest.input.shape)}, the teacher "
                            f"{list(adapter.input_shape(teacher))}")
    keys = ("kind", "source", "input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std", "scale",
            "resize", "raw_shape",
            # a language model's: what its tokens are and how they are packed
            "fields", "max_length", "pair", "pad_id", "vocab_size", "type_vocab_size")
    pre, want = dict(manifest.input.preprocessing), dict(data.preprocessing)
    bad = [k for k in keys if pre.get(k) != want.get(k)]
    if bad:
        raise CoFormerError(f"the bundle was compiled with other preprocessing ({', '.join(f'{k}: {pre.get(k)!r}' for k in bad)}) "
                            f"than --data gives ({', '.join(f'{k}: {want.get(k)!r}' for k in bad)})")
