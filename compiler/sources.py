"""Where a compile's teacher and data come from (``--model``, ``--data``): the
checkpoints and folders users have, loaded offline, never downloaded.

Teachers (:func:`load_teacher`):

* ``quickstart``: the built-in ViT trained on digits (:mod:`coformer.compiler.builtin`);
  ``quickstart:mnist``: the same ViT trained on the built-in MNIST subset;
* ``timm:NAME`` with ``--checkpoint FILE``: timm builds the architecture from its
  config (``timm.create_model(NAME, pretrained=False)``, with ``--model-kwargs``)
  and the weights come from the file: ``.pth``/``.pt``/``.bin`` (``torch.load``
  with ``weights_only``) or ``.safetensors``, a bare state_dict or one wrapped as
  ``{"state_dict"|"model": ...}`` (an EMA copy is preferred where the file has one,
  as timm does; ``module.`` prefixes of DDP are dropped). The class count is read
  off the checkpoint's classifier when ``num_classes`` is not given;
* ``timm-dir:PATH``: timm's local Hugging Face layout, ``config.json`` (with
  ``architecture`` and ``pretrained_cfg``) beside ``model.safetensors`` or
  ``pytorch_model.bin``, loaded with timm's ``local-dir:`` source;
* ``hf:PATH``: a HuggingFace language checkpoint (:mod:`coformer.compiler.hf`).

Every teacher carries ``coformer_source`` (the spec, the checkpoint file and its
SHA-256), which the bundle's manifest records.

Data (:func:`load_data`): image folders (:mod:`coformer.calibration.images`) and
the built-in digits and MNIST subset for vision teachers; text files and the built-in
sentiment task for language teachers (:mod:`coformer.calibration.text`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from coformer.runtime.files import sha256_file
from coformer.runtime.errors import CoFormerError

MODEL_FORMS = "'quickstart', 'quickstart:mnist', 'timm:NAME' (with --checkpoint), 'timm-dir:PATH' or 'hf:PATH'"


def _kwargs(model_kwargs: Union[str, Mapping[str, Any], None]) -> dict[str, Any]:
    if model_kwargs is None:
        return {}
    if isinstance(model_kwargs, Mapping):
        return dict(model_kwargs)
    try:
        out = json.loads(model_kwargs)
    except json.JSONDecodeError as e:
        raise CoFormerError(f"--model-kwargs is not JSON: {e}") from None
    if not isinstance(out, dict):
        raise CoFormerError(f"--model-kwargs must be a JSON object, got {model_kwargs!r}")
    return out


def load_teacher(model: str, checkpoint: Optional[Path] = None,
                 model_kwargs: Union[str, Mapping[str, Any], None] = None, max_length: int = 128,
                 progress: bool = True) -> nn.Module:
    """The teacher named by ``model`` (see the module doc), in eval mode, on the CPU."""
    if model == "quickstart" or model.startswith("quickstart:"):
        from coformer.compiler.builtin import BUILTIN_TEACHERS, quickstart_teacher

        name = model.partition(":")[2] or "digits"
        if name not in BUILTIN_TEACHERS:
            raise CoFormerError(f"--model {model!r}: the built-in teacher is trained on one of "
                                f"{', '.join(BUILTIN_TEACHERS)} (quickstart:NAME)")
        teacher, path = quickstart_teacher(BUILTIN_TEACHERS[name], progress=progress)
        return _mark(teacher, model, path)
    if model.startswith("timm:"):
        return _mark(_timm_from_checkpoint(model[5:], checkpoint, _kwargs(model_kwargs)), model, checkpoint)
    if model.startswith("timm-dir:"):
        return _timm_from_dir(Path(model[9:]), _kwargs(model_kwargs))
    if model.startswith("hf:"):
        from coformer.compiler.hf import load_hf

        return load_hf(Path(model[3:]), max_length=max_length)
    raise CoFormerError(f"--model {model!r}: expected {MODEL_FORMS}")


def source_of(teacher: nn.Module) -> dict[str, Any]:
    """Where a teacher came from, for the manifest (empty for a teacher built in Python)."""
    return dict(getattr(teacher, "coformer_source", None) or {})


def _mark(teacher: nn.Module, spec: str, checkpoint: Optional[Path]) -> nn.Module:
    record: dict[str, Any] = {"source": spec}
    if checkpoint is not None and Path(checkpoint).is_file():
        # the file's name, not its workstation path: the manifest travels to the devices
        record.update(checkpoint=Path(checkpoint).name, checkpoint_sha256=sha256_file(Path(checkpoint)))
    teacher.coformer_source = record  # a plain attribute, not a parameter or submodule
    return teacher.eval()


def _classifier_key(model: nn.Module) -> Optional[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if head is not None and module is head and isinstance(module, nn.Linear):
            return f"{name}.weight"
    return None


def _timm_from_checkpoint(name: str, checkpoint: Optional[Path], kwargs: dict[str, Any]) -> nn.Module:
    import timm
    from timm.models import load_state_dict

    if checkpoint is None or not Path(checkpoint).is_file():
        raise CoFormerError(f"--model timm:{name} needs --checkpoint pointing at a local state_dict or .safetensors "
                            f"file (got {checkpoint}); weights are never downloaded")
    try:
        state = load_state_dict(str(checkpoint), weights_only=True)
    except Exception as e:  # torch.load, safetensors and pickle each raise their own kinds
        raise CoFormerError(f"checkpoint {checkpoint} cannot be read as a state_dict: {str(e)[:300]}") from None
    if not isinstance(state, dict) or not state or not all(hasattr(v, "shape") for v in state.values()):
        raise CoFormerError(f"checkpoint {checkpoint} holds no state_dict of tensors (keys: {list(state)[:8]})")
    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
        key = _classifier_key(model)
        if "num_classes" not in kwargs and key in state and state[key].shape[0] != model.num_classes:
            model = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": int(state[key].shape[0])})
    except (RuntimeError, TypeError, ValueError, AssertionError) as e:
        raise CoFormerError(f"timm cannot build {name!r} with {kwargs}: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CoFormerError(f"checkpoint {checkpoint} does not fit timm:{name} built with {kwargs or 'its defaults'}; "
                            f"give the settings it was trained with in --model-kwargs (img_size, patch_size, depth, "
                            f"num_classes...): {str(e)[:500]}") from None
    return model


def _timm_from_dir(path: Path, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    from coformer.runtime.files import read_json

    cfg = read_json(path / "config.json", f"timm-dir:{path} is not a timm model folder: no config.json in it")
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise CoFormerError(f"timm-dir:{path}: config.json names no 'architecture' (a timm model folder does; "
                            "a HuggingFace transformers folder loads with hf:PATH)")
    weights = [f for f in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
               if (path / f).is_file()]
    if not weights and not list(path.glob("*.safetensors")) and not list(path.glob("*.bin")) \
            and not list(path.glob("*.pth")):
        raise CoFormerError(f"timm-dir:{path} holds no weights (model.safetensors or pytorch_model.bin)")
    try:
        model = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True, **kwargs)
    except (RuntimeError, ValueError, TypeError, FileNotFoundError, KeyError, AssertionError) as e:
        raise CoFormerError(f"timm-dir:{path}: timm cannot build {cfg['architecture']!r} from it: {str(e)[:400]}") \
            from None
    found = weights[0] if weights else None
    return _mark(model, f"timm-dir:{path}", path / found if found else None)


# -- data ----------------------------------------------------------------------------------
def is_vision(teacher: nn.Module) -> bool:
    """Whether ``teacher`` is an image model of a supported family (raises for an unsupported one)."""
    from coformer.compiler.families import adapter_for

    return adapter_for(teacher).name in ("vit", "swin")


def load_data(teacher: nn.Module, data: Optional[str] = None, *, unlabeled: bool = False,
              preprocessing: Optional[Mapping[str, Any]] = None, val_fraction: float = 0.1,
              test_fraction: float = 0.2, seed: int = 0, truncation: bool = False, task: str = "auto"):
    """The calibration data for ``teacher`` (``--data``) and, for a language teacher without a
    task head compiled as a classifier, the head fitted on its labels: ``(dataset, head_report)``.
    ``task`` (see :func:`coformer.compiler.tasks.resolve_task`) decides whether a head is fitted.

    Vision: a folder of images (see :mod:`coformer.calibration.images`; preprocessed by the
    teacher's own timm data config, with ``preprocessing`` overrides), or ``digits`` or
    ``mnist``, the built-in data (digits: the default for a one-channel square teacher). A labelled folder must
    have as many classes as the teacher, in the order of its sorted folder names; with
    ``unlabeled`` a folder of other classes is used without its labels.
    """
    if is_vision(teacher):
        return _vision_data(teacher, data, unlabeled, preprocessing, val_fraction, test_fraction, seed), {}
    if preprocessing and any(v is not None for v in preprocessing.values()):
        raise CoFormerError("image preprocessing flags (--crop-pct, --mean, ...) are for image models")
    return _text_data(teacher, data, truncation, task)


def _vision_data(teacher: nn.Module, data: Optional[str], unlabeled: bool, preprocessing, val_fraction: float,
                 test_fraction: float, seed: int):
    from coformer.calibration.data import BUILTIN_IMAGE_DATA, load_builtin_images

    in_chans, h, w = teacher.patch_embed.proj.in_channels, *teacher.patch_embed.img_size
    spec = str((getattr(teacher, "coformer_source", None) or {}).get("source", ""))
    if data is None and spec.startswith("quickstart:"):  # the built-in teacher's own data by default
        data = spec.partition(":")[2]
    if data is None or data in BUILTIN_IMAGE_DATA:
        if in_chans != 1 or h != w:
            hint = "" if data else "--data DIR is needed (a folder of images: one sub-folder per class, or flat " \
                                   "for label-free calibration); "
            raise CoFormerError(f"{hint}the built-in {data or 'digits'} data is 1-channel square; the model "
                                f"takes {in_chans}x{h}x{w}")
        if preprocessing and any(v is not None for v in preprocessing.values()):
            raise CoFormerError("preprocessing flags (--crop-pct, --mean, ...) apply to image folders, not to the "
                                f"built-in {data or 'digits'}")
        return load_builtin_images(data or "digits", h, seed=seed)
    if data == "sentiment":
        raise CoFormerError("--data sentiment holds text; an image model takes an image folder, 'digits' or 'mnist'")
    root = Path(data)
    if not root.is_dir():
        raise CoFormerError(f"--data {data!r}: an image model takes a folder of images (one sub-folder per class, "
                            "or flat for label-free calibration), 'digits' or 'mnist'")
    from coformer.calibration.images import image_folder_dataset, scan_image_folder, timm_preprocessing

    record = timm_preprocessing(teacher, preprocessing)
    names = (getattr(teacher, "pretrained_cfg", None) or {}).get("label_names")
    teacher_labels = [str(n) for n in names] if names and len(names) == teacher.num_classes else \
        [str(i) for i in range(teacher.num_classes)]
    scan = scan_image_folder(root)
    if scan.targets is not None and len(scan.classes) != teacher.num_classes:
        if not unlabeled:
            raise CoFormerError(f"--data {root} has {len(scan.classes)} class folders ({scan.classes[:6]}...), the "
                                f"teacher {teacher.num_classes} classes; give a folder of the teacher's classes "
                                "(sorted folder names in its class order), or --unlabeled to distil from its "
                                "decisions alone")
    dataset = image_folder_dataset(root, record, val_fraction, test_fraction, seed, label_names=teacher_labels,
                                   scan=scan)
    if scan.targets is not None and len(scan.classes) != teacher.num_classes:  # --unlabeled: labels dropped
        from dataclasses import replace

        dataset = replace(dataset, train=replace(dataset.train, y=None), val=replace(dataset.val, y=None),
                          test=replace(dataset.test, y=None), labels=teacher_labels)
    return dataset


def _text_data(teacher: nn.Module, data: Optional[str], truncation: bool, task: str = "auto"):
    from coformer.calibration.text import read_records, sentiment_records, text_dataset
    from coformer.compiler.hf import encoder_for, fit_head

    if data in ("digits", "mnist"):
        raise CoFormerError(f"--data {data} holds images; a language model needs 'sentiment' or a text file")
    if data is not None and Path(data).is_dir():
        raise CoFormerError(f"--data {data} is a folder; a language model takes a .tsv, .jsonl or .txt file")
    records = sentiment_records() if data in (None, "sentiment") else read_records(Path(data))
    label_names = None
    id2label = getattr(teacher.hf.config, "id2label", None) or {}
    labelled = records[0]["label"] is not None
    if teacher.head_fitted and id2label and (not labelled or not all(str(v).startswith("LABEL_")
                                                                     for v in id2label.values())):
        label_names = [str(id2label[i]) for i in sorted(id2label)]
    encoder = encoder_for(teacher, pair=len(records[0]["text"]) == 2, truncation=truncation)
    dataset = text_dataset(records, encoder, labels=label_names)
    from coformer.compiler.tasks import resolve_task

    if resolve_task(teacher, labelled, task) == "embedding":
        return dataset, {}  # distilled to the teacher's feature: no head to fit
    return dataset, fit_head(teacher, dataset)
