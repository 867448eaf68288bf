"""PRISM's optional fine-tuning at CR > 1 (issue 23): what a user notices is that the tuned
weights score better on the validation split than the untuned PRISM, that the bundle then
serves exactly the tuned PRISM forward, and that the teacher they passed in is untouched."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from coformer.calibration.data import Dataset, Split, load_digits_dataset
from coformer.compiler.prism_bundle import prism_family, build_prism, prism_scores
from coformer.compiler.prism_finetune import finetune_prism
from coformer.runtime.errors import CoFormerError
from coformer.tools.cluster import LocalCluster
from tests.conftest import tiny_vit
from tests.tools.test_prism_served import DEVICES, LABELS

SHARES = [9, 5, 3]  # what DEVICES' cpu_share gives 17 positions


@pytest.fixture(scope="module")
def digits_teacher():
    """A tiny ViT trained on the built-in digits (about 89% on validation), and the data:
    PRISM at CR = 16 on its 17 positions falls to about 40%, which is what tuning can win back."""
    data = load_digits_dataset(16)
    teacher = tiny_vit(depth=2).train()
    opt = torch.optim.AdamW(teacher.parameters(), 2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):
        for idx, xb in data.train.batches(64, shuffle=True, generator=gen):
            loss = F.cross_entropy(teacher(xb), data.train.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return teacher.eval(), data


def test_finetuning_wins_back_accuracy_and_the_bundle_serves_the_tuned_weights(tmp_path, digits_teacher):
    teacher, data = digits_teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tuned, report = finetune_prism(teacher, data, SHARES, 16, epochs=3, lr=3e-4)
    val = report["validation"]
    assert val["after"]["accuracy"] > val["before"]["accuracy"] + 0.15 and report["kept"]
    assert report["losses"][-1] < report["losses"][0]
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())  # a copy was tuned

    m = build_prism(teacher, DEVICES, data.val.head(3), tmp_path / "b", LABELS, {}, 16, tuned=tuned,
                    finetune=report)
    assert m.model["plan"]["finetune"]["kept"] and m.parity["served_vs_prism_forward"] <= 1e-4
    x = data.test.head(2)
    with LocalCluster(tmp_path / "b", throttle="none") as cluster, cluster.client() as client:
        got = client.infer(x.numpy()).logits
    np.testing.assert_allclose(got, prism_family(tuned).reference(x, SHARES, 16).numpy(), atol=1e-4)
    assert np.abs(got - prism_family(teacher).reference(x, SHARES, 16).numpy()).max() > 1e-3  # not the untuned
    scores = prism_scores(teacher, data, SHARES, [16], weights={16: tuned})["by_cr"][16]
    assert scores["accuracy"] > prism_scores(teacher, data, SHARES, [16])["by_cr"][16]["accuracy"] + 0.1  # test split


def test_tuning_that_does_not_help_is_not_kept(digits_teacher):
    teacher, data = digits_teacher
    _, report = finetune_prism(teacher, data, SHARES, 16, epochs=1, lr=0.5)  # a step this large ruins the weights
    val = report["validation"]
    assert not report["kept"] and val["after"]["accuracy"] <= val["before"]["accuracy"]
    assert report["decided_by"] == "validation accuracy"


def test_finetuning_refuses_what_it_cannot_help(digits_teacher):
    teacher, data = digits_teacher
    with pytest.raises(CoFormerError, match="CR = 1 PRISM is the teacher"):
        finetune_prism(teacher, data, SHARES, 1, epochs=1)
    with pytest.raises(CoFormerError, match="--finetune-epochs 0"):
        finetune_prism(teacher, data, SHARES, 4, epochs=0)
    no_val = Dataset(data.train, Split(data.val.x[:0], data.val.y[:0], np.empty(0)), data.test, LABELS, {})
    with pytest.raises(CoFormerError, match="validation split"):
        finetune_prism(teacher, no_val, SHARES, 4, epochs=1)
