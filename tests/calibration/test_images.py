"""Image folders as users have them, timm's preprocessing, and the device side's copy of it."""

from pathlib import Path

import numpy as np
import pytest
import torch

from coformer.runtime.errors import CoFormerError


def _photos(folder: Path, n: int = 6, seed: int = 0, formats=("jpg",)) -> list[Path]:
    """Crops of scikit-learn's two sample photos (real JPEG content), of varied size and aspect."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images = load_sample_images().images
    out = []
    for i in range(n):
        img = images[i % 2]
        h, w = rng.integers(60, 400), rng.integers(60, 600)
        top, left = rng.integers(0, img.shape[0] - h), rng.integers(0, img.shape[1] - w)
        path = folder / f"p{i}.{formats[i % len(formats)]}"
        Image.fromarray(img[top: top + h, left: left + w]).save(path, quality=90)
        out.append(path)
    return out


def _deit(**kwargs):
    import timm

    return timm.create_model("deit_tiny_patch16_224", pretrained=False, depth=1, **kwargs).eval()


def test_class_folders_give_labels_by_sorted_name_and_flat_folders_none(tmp_path):
    from coformer.calibration.images import scan_image_folder

    for name in ("tulip", "daisy", "rose"):
        _photos(tmp_path / "classes" / name, 3, formats=("jpg", "png", "webp"))
    (tmp_path / "classes" / "daisy" / "notes.txt").write_text("not an image")
    (tmp_path / "classes" / "rose" / "deeper").mkdir()
    _photos(tmp_path / "classes" / "rose" / "deeper", 2)
    scan = scan_image_folder(tmp_path / "classes")
    assert scan.classes == ["daisy", "rose", "tulip"]
    assert len(scan.paths) == 11 and scan.targets.count(1) == 5
    assert all(p.suffix in (".jpg", ".png", ".webp") for p in scan.paths)
    flat = scan_image_folder(tmp_path / "classes" / "tulip")
    assert flat.targets is None and len(flat.paths) == 3


@pytest.mark.parametrize("layout, message", [
    ("empty", "holds no jpg/jpeg/png/webp images"),
    ("mixed", "holds 2 images beside 1 class folders"),
    ("missing", "no such folder"),
])
def test_bad_folders_are_refused_with_what_is_wrong(tmp_path, layout, message):
    from coformer.calibration.images import scan_image_folder

    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "mixed":
        _photos(root, 2)
        _photos(root / "cats", 2)
    with pytest.raises(CoFormerError, match=message):
        scan_image_folder(root)


def test_the_split_is_fixed_by_seed_and_stratified(tmp_path):
    from coformer.calibration.images import split_indices

    targets = [i % 3 for i in range(90)]
    a = split_indices(90, targets, 0.1, 0.2, seed=1)
    b = split_indices(90, targets, 0.1, 0.2, seed=1)
    c = split_indices(90, targets, 0.1, 0.2, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and not np.array_equal(a[2], c[2])
    train, val, test = a
    assert (len(train), len(val), len(test)) == (63, 9, 18)
    assert sorted(np.concatenate(a).tolist()) == list(range(90))
    assert np.bincount(np.asarray(targets)[test]).tolist() == [6, 6, 6]
    with pytest.raises(CoFormerError, match="--val-fraction 1.5"):
        split_indices(90, targets, 1.5, 0.2, 0)


@pytest.mark.parametrize("overrides", [{}, {"crop_mode": "squash"}, {"interpolation": "bilinear", "crop_pct": 1.0},
                                       {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}])
def test_the_device_side_preprocessing_matches_timms_transform_on_real_jpegs(tmp_path, overrides):
    """numpy + Pillow (what a device runs, no torch) against timm's own eval transform."""
    from PIL import Image

    from coformer.calibration.images import timm_preprocessing, torch_transform
    from coformer.runtime.images import preprocess_image

    model = _deit()
    record = timm_preprocessing(model, overrides)
    own = model.pretrained_cfg  # DeiT's own data config: bicubic, crop_pct 0.9 in this timm
    assert record["interpolation"] == overrides.get("interpolation", own["interpolation"])
    assert record["crop_pct"] == overrides.get("crop_pct", own["crop_pct"])
    transform = torch_transform(record)
    for path in _photos(tmp_path, 8, formats=("jpg", "png")):
        expected = transform(Image.open(path).convert("RGB")).numpy()
        got = preprocess_image(path, record)
        assert got.shape == expected.shape == (3, 224, 224)
        assert np.abs(got - expected).max() <= 1e-3


def test_non_square_inputs_and_one_channel_models_match_too(tmp_path):
    from PIL import Image

    from coformer.calibration.images import timm_preprocessing, torch_transform
    from coformer.runtime.images import preprocess_image

    for model in (_deit(img_size=(160, 224)), _deit(in_chans=1, img_size=96)):
        record = timm_preprocessing(model)
        transform = torch_transform(record)
        mode = "RGB" if record["input_size"][0] == 3 else "L"
        for path in _photos(tmp_path, 4):
            expected = transform(Image.open(path).convert(mode)).numpy()
            assert np.abs(preprocess_image(path, record) - expected).max() <= 1e-3
            assert expected.shape == tuple(record["input_size"])


def test_a_bad_image_is_named(tmp_path):
    from coformer.calibration.images import timm_preprocessing
    from coformer.runtime.images import preprocess_image

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    record = timm_preprocessing(_deit())
    with pytest.raises(CoFormerError, match="broken.jpg is not an image Pillow can read"):
        preprocess_image(tmp_path / "broken.jpg", record)
    with pytest.raises(CoFormerError, match="does not exist"):
        preprocess_image(tmp_path / "gone.png", record)
    with pytest.raises(CoFormerError, match="crop_mode 'border'"):
        preprocess_image(tmp_path / "gone.png", {**record, "crop_mode": "border"})


def test_an_image_folder_streams_its_splits_through_worker_processes(tmp_path):
    from PIL import Image

    from coformer.calibration.images import image_folder_dataset, timm_preprocessing, torch_transform

    for name in ("a", "b"):
        _photos(tmp_path / name, 8, seed=ord(name))
    record = timm_preprocessing(_deit())
    data = image_folder_dataset(tmp_path, record, 0.125, 0.25, seed=0)
    assert data.labels == ["a", "b"] and data.train.streamed and data.train.x is None
    assert len(data.train) + len(data.val) + len(data.test) == 16
    assert data.preprocessing["source"] == "timm" and data.preprocessing["images"] == 16
    seen, transform = [], torch_transform(record)
    for idx, x in data.train.batches(3, shuffle=True, generator=torch.Generator().manual_seed(0), workers=1):
        assert x.shape[1:] == (3, 224, 224) and len(idx) == len(x)
        for i, row in zip(idx.tolist(), x):
            expected = transform(Image.open(data.train.raw[i]).convert("RGB"))
            assert torch.equal(row, expected)  # item i is image i, whatever the order and process
            seen.append(i)
    assert sorted(seen) == list(range(len(data.train)))
    assert data.train.y.tolist() == [0 if "/a/" in p else 1 for p in data.train.raw]


def test_raw_pixels_through_the_runtimes_preprocess(tmp_path):
    from PIL import Image

    from coformer.calibration.images import timm_preprocessing
    from coformer.runtime.images import preprocess_image
    from coformer.runtime.preprocess import preprocess

    path = _photos(tmp_path, 1)[0]
    record = timm_preprocessing(_deit())
    pixels = np.asarray(Image.open(path).convert("RGB"))
    assert np.array_equal(preprocess(record, pixels)[0], preprocess_image(path, record))
    assert preprocess(record, np.stack([pixels[:100, :100]] * 2)).shape == (2, 3, 224, 224)
    with pytest.raises(CoFormerError, match="uint8 pixels"):
        preprocess(record, pixels.astype(np.float32))
    with pytest.raises(CoFormerError, match=r"uint8 pixels \[H, W, 3\] or \[B, H, W, 3\], got uint8 \[3, 50, 50\]"):
        preprocess(record, np.zeros((3, 50, 50), np.uint8))  # channels first is not pixels
    gray = timm_preprocessing(_deit(in_chans=1, img_size=96))
    assert preprocess(gray, np.zeros((4, 50, 60), np.uint8)).shape == (4, 1, 96, 96)  # a batch of 4, not RGB


def test_a_file_that_is_not_an_image_is_named_before_a_compile_starts(tmp_path):
    from coformer.calibration.images import scan_image_folder

    _photos(tmp_path / "cats", 3)
    (tmp_path / "cats" / "clip.jpg").write_bytes(b"GIF89a, not really")
    with pytest.raises(CoFormerError, match=r"1 file\(s\) are not images Pillow can read: .*clip.jpg"):
        scan_image_folder(tmp_path)


def test_a_truncated_image_fails_in_a_loader_process_with_one_clean_line(tmp_path):
    """Its header reads, its pixels do not: the error comes from a DataLoader worker, and reaches
    the user as the file's name and what is wrong, without the worker's traceback."""
    from coformer.calibration.images import image_folder_dataset, timm_preprocessing

    for name in ("a", "b"):
        _photos(tmp_path / name, 6, seed=ord(name))
    victim = sorted((tmp_path / "a").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    data = image_folder_dataset(tmp_path, timm_preprocessing(_deit()), 0.2, 0.2, seed=0)
    split = next(s for s in (data.train, data.val, data.test) if str(victim) in list(s.raw))
    with pytest.raises(CoFormerError) as e:
        for _ in split.batches(2, workers=1):
            pass
    assert str(victim) in str(e.value) and "Traceback" not in str(e.value) and "worker" not in str(e.value)


def test_a_small_folder_is_decoded_once_and_a_large_one_on_every_pass(tmp_path, monkeypatch):
    """Calibration passes over its training split once per epoch and sub-model: a folder whose
    decoded images fit DECODED_CACHE_BYTES is decoded on the first whole pass only, with the
    same batches after; a larger one (here: a budget below one image) is decoded every pass."""
    from coformer.calibration import data as data_mod
    from coformer.calibration.images import ImageFiles, image_folder_dataset, timm_preprocessing

    for name in ("a", "b"):
        _photos(tmp_path / "photos" / name, 5, seed=len(name) + ord(name))
    decoded = []
    plain = ImageFiles.__getitem__
    monkeypatch.setattr(ImageFiles, "__getitem__", lambda self, i: decoded.append(i) or plain(self, i))
    record = timm_preprocessing(_deit(num_classes=2))

    def passes(split, k=3):
        gen = torch.Generator().manual_seed(0)
        return [sorted((int(i), xb.sum().item()) for idx, x in split.batches(4, shuffle=True, generator=gen)
                       for i, xb in zip(idx, x)) for _ in range(k)]

    small = image_folder_dataset(tmp_path / "photos", record, val_fraction=0.2, test_fraction=0.2).train
    got = passes(small)
    assert len(decoded) == len(small) == 6 and got[0] == got[1] == got[2]  # one decode each, the same inputs
    assert torch.equal(small.head(2), torch.stack([plain(small.source, i) for i in range(2)]))
    decoded.clear()
    partial = image_folder_dataset(tmp_path / "photos", record, val_fraction=0.2, test_fraction=0.2).train
    list(partial.batches(4, limit=3))  # a pass over part of the split keeps nothing
    assert len(decoded) == 3 and not partial._decoded
    monkeypatch.setattr(data_mod, "DECODED_CACHE_BYTES", 1000)
    decoded.clear()
    large = image_folder_dataset(tmp_path / "photos", record, val_fraction=0.2, test_fraction=0.2).train
    assert passes(large) == got and len(decoded) == 3 * len(large)
