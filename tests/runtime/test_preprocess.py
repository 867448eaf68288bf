import numpy as np
import pytest

from coformer.calibration.data import digits_preprocessing, preprocess_torch
from coformer.runtime.errors import CoFormerError
from coformer.runtime.preprocess import preprocess


@pytest.mark.parametrize("size", [8, 16, 32, 13])
def test_numpy_preprocessing_equals_the_training_preprocessing(size):
    raw = np.random.default_rng(0).integers(0, 17, size=(5, 8, 8)).astype(np.float32)
    spec = digits_preprocessing(size)
    np.testing.assert_allclose(preprocess(spec, raw), preprocess_torch(spec, raw).numpy(), atol=1e-5)


def test_wrong_raw_shape_is_named():
    with pytest.raises(CoFormerError, match=r"spatial shape \[9, 9\], the bundle expects \[8, 8\]"):
        preprocess(digits_preprocessing(16), np.zeros((1, 9, 9)))
