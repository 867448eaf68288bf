import copy

import pytest
import torch

from coformer.calibration.aggregator import Aggregator
from coformer.calibration.booster import BoostConfig, calibrate, update_weights
from coformer.calibration.compute import CPU
from coformer.compiler.families import adapter_for
from coformer.compiler.specs import SubModelSpec
from tests.conftest import tiny_vit


def test_weights_rise_where_the_previous_sub_model_was_wrong():
    w = torch.full((4,), 0.25)
    new = update_weights(w, torch.tensor([0.1, 0.1, 2.0, 0.1]), max_ratio=10.0)
    assert torch.isclose(new.sum(), torch.tensor(1.0))
    assert new[2] > new[0] and torch.isclose(new[0], new[1])
    capped = update_weights(torch.full((10,), 0.1), torch.tensor([30.0] + [0.0] * 9), max_ratio=2.0)
    assert capped.max() <= 2.0 / 10 + 1e-6


def _setup(seed=0):
    teacher = tiny_vit(seed=seed)
    adapter = adapter_for(teacher)
    specs = [SubModelSpec((0, 1, 2), tuple(range(0, 48, 2)), ((0, 1),) * 3, (tuple(range(96)),) * 3),
             SubModelSpec((0, 2), tuple(range(1, 48, 2)), ((2,), (3,)), (tuple(range(96, 192)),) * 2)]
    subs = [adapter.slice(teacher, s) for s in specs]
    heads = [adapter.submodel_head(teacher, s) for s in specs]
    torch.manual_seed(1)
    x = torch.randn(48, 1, 16, 16)
    y = torch.randint(0, 10, (48,))
    with torch.no_grad():
        t_logits = teacher(x)
    return subs, heads, x, y, t_logits


def test_calibration_lowers_the_loss_and_is_reproducible_under_a_seed():
    cfg = BoostConfig(epochs=3, batch_size=16, lr=1e-3, seed=3)
    runs = []
    for _ in range(2):
        subs, heads, x, y, t_logits = _setup()
        report = calibrate(subs, heads, x, t_logits, y, cfg, progress=False)
        runs.append((report, [copy.deepcopy(s.state_dict()) for s in subs]))
    (r1, s1), (r2, s2) = runs
    for losses in r1.losses:
        assert losses[-1] < losses[0]
    assert r1.losses == r2.losses
    assert all(torch.equal(a[k], b[k]) for a, b in zip(s1, s2) for k in a)
    assert torch.allclose(r1.weights[0], torch.full((48,), 1 / 48))
    assert not torch.allclose(r1.weights[1], r1.weights[0])  # eq. 13 moved the weights


def test_without_boosting_every_sub_model_is_distilled_with_uniform_weights():
    """The ablation of eq. 13: the same calibration with the sample weights never updated."""
    subs, heads, x, y, t = _setup()
    boosted = calibrate(copy.deepcopy(subs), copy.deepcopy(heads), x, t, y, BoostConfig(epochs=1), progress=False)
    alone = calibrate(copy.deepcopy(subs), copy.deepcopy(heads), x, t, y, BoostConfig(epochs=1, boosting=False),
                      progress=False)
    uniform = torch.full((48,), 1.0 / 48)
    assert all(torch.allclose(w, uniform) for w in alone.weights)
    assert torch.allclose(boosted.weights[0], uniform) and not torch.allclose(boosted.weights[1], uniform)
    # the first sub-model sees the same weights either way, so it is calibrated the same
    assert alone.losses[0] == pytest.approx(boosted.losses[0])


def test_calibration_works_without_labels():
    subs, heads, x, _, t_logits = _setup()
    report = calibrate(subs, heads, x, t_logits, None, BoostConfig(epochs=2, batch_size=16, lr=1e-3), progress=False)
    assert len(report.losses) == 2 and report.losses[0][-1] < report.losses[0][0]


def test_aggregator_over_a_full_spec_sub_model_is_the_teacher():
    teacher = tiny_vit()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    adapter = adapter_for(teacher)
    spec = SubModelSpec.full(adapter.read_shape(teacher))
    sub = adapter.slice(teacher, spec)
    agg = Aggregator([48], 48, adapter.teacher_head(teacher))
    agg.init_from_index([adapter.feature_index(teacher, spec)])
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(agg(sub(x)), teacher(x), atol=1e-5)


def test_calibration_resumes_after_the_last_finished_sub_model_exactly(tmp_path):
    """Checkpoints per finished sub-model: a run stopped after the first (its successor's
    file is gone) loads it and calibrates the second as an uninterrupted run did."""
    from coformer.calibration.booster import Checkpoints

    cfg = BoostConfig(epochs=2, batch_size=16, lr=1e-3, seed=5)
    subs, heads, x, y, t_logits = _setup()
    full = calibrate(subs, heads, x, t_logits, y, cfg, progress=False, checkpoints=Checkpoints(tmp_path, "k1"))
    expected = [copy.deepcopy(s.state_dict()) for s in subs]
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["sub-0.pt", "sub-1.pt"]
    (tmp_path / "sub-1.pt").unlink()  # stopped while calibrating the second sub-model
    subs2, heads2, *_ = _setup()
    again = calibrate(subs2, heads2, x, t_logits, y, cfg, progress=False, checkpoints=Checkpoints(tmp_path, "k1"))
    assert again.resumed == [0] and full.resumed == []
    assert again.losses == full.losses
    assert all(torch.equal(a[k], b[k]) for a, b in zip(expected, [s.state_dict() for s in subs2]) for k in a)
    # another key (another teacher, policy or data) does not reuse them
    subs3, heads3, *_ = _setup()
    other = calibrate(subs3, heads3, x, t_logits, y, cfg, progress=False, checkpoints=Checkpoints(tmp_path, "k2"))
    assert other.resumed == []
    (tmp_path / "sub-0.pt").write_bytes(b"cut short")  # a file half-written by a crash is calibrated again
    subs4, heads4, *_ = _setup()
    assert calibrate(subs4, heads4, x, t_logits, y, cfg, progress=False,
                     checkpoints=Checkpoints(tmp_path, "k2")).resumed == [1]


def test_a_checkpoint_folder_that_is_not_coformers_is_refused_and_never_emptied(tmp_path):
    from coformer.calibration.booster import Checkpoints
    from coformer.runtime.errors import CoFormerError

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("months of work")
    with pytest.raises(CoFormerError, match="holds files CoFormer did not write"):
        Checkpoints(tmp_path / "mine", "k")
    ours = Checkpoints(tmp_path / "ckpt", "k")
    ours.save("sub-0", {"x": torch.zeros(1)})
    (tmp_path / "ckpt" / "notes.txt").write_text("put here by hand")
    ours.remove()  # only what it wrote goes
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["notes.txt"]


def test_soft_distillation_follows_the_teachers_softened_logits():
    subs, heads, x, y, t_logits = _setup()
    report = calibrate(subs, heads, x, t_logits, None, BoostConfig(epochs=3, batch_size=16, lr=1e-3,
                                                                  distill="soft", temperature=2.0), progress=False)
    assert all(losses[-1] < losses[0] for losses in report.losses)
    from coformer.calibration.booster import calibrate as again

    with pytest.raises(Exception, match="needs the teacher's logits"):
        again(subs, heads, x, t_logits.argmax(-1), None, BoostConfig(distill="soft"), progress=False)


def test_feature_distillation_reweights_by_the_ensembles_residual():
    """Embedding targets: each sub-model learns the teacher's feature through a linear head, and
    after each one the weights rise where the sub-models so far, together, miss it most."""
    from coformer.calibration.objectives import Objective
    from coformer.compiler.tasks import feature_heads

    teacher = tiny_vit()
    adapter = adapter_for(teacher)
    specs = [SubModelSpec((0, 1, 2), tuple(range(0, 48, 2)), ((0, 1),) * 3, (tuple(range(96)),) * 3),
             SubModelSpec((0, 2), tuple(range(1, 48, 2)), ((2,), (3,)), (tuple(range(96, 192)),) * 2)]
    subs = [adapter.slice(teacher, s) for s in specs]
    heads = feature_heads(adapter, teacher, specs, 48)
    torch.manual_seed(1)
    x = torch.randn(48, 1, 16, 16)
    with torch.no_grad():
        target = adapter.teacher_features(teacher, x)
    report = calibrate(subs, heads, x, target, None, BoostConfig(epochs=4, batch_size=16, lr=2e-3, distill="feature"),
                       progress=False)
    assert all(losses[-1] < losses[0] for losses in report.losses)
    assert [f.shape for f in report.features] == [(48, 24), (48, 24)]
    assert report.residual[1] < report.residual[0]  # two sub-models together reconstruct better than one
    objective = Objective("feature", target)
    from coformer.calibration.booster import ensemble_residual

    residual = ensemble_residual(report.features[:1], objective)
    worst, best = int(residual.argmax()), int(residual.argmin())
    assert report.weights[1][worst] > report.weights[1][best]  # eq. 13's analogue raised the worst-fitted sample


def test_feature_loss_and_ridge():
    from coformer.calibration.objectives import feature_loss, feature_moments, ridge_fit

    torch.manual_seed(0)
    t = torch.randn(64, 8) + 5.0  # anisotropic: a large common direction
    center, scale = feature_moments(t)
    assert torch.allclose(feature_loss(t, t, center, scale), torch.zeros(64), atol=1e-5)
    shifted = t + 0.3 * torch.randn(64, 8)
    raw_cos = torch.nn.functional.cosine_similarity(shifted, t).mean()
    centered = feature_loss(shifted, t, center, scale).mean()
    assert raw_cos > 0.99 and centered > 0.05  # the common direction hides the error; the centred loss sees it
    x = torch.randn(200, 5)
    W = torch.randn(5, 3)
    w_fit, b_fit = ridge_fit(x, x @ W + 2.0, reg=1e-8)
    assert torch.allclose(w_fit, W, atol=1e-3) and torch.allclose(b_fit, torch.full((3,), 2.0), atol=1e-3)


@pytest.mark.parametrize("distill", ["feature", "soft"])
def test_residual_calibration_teaches_later_sub_models_what_the_earlier_ones_miss(distill):
    """With ``residual`` the heads' outputs add up to the teacher's output: the second sub-model
    learns what the first leaves, so the sum is closer than the first alone. Without it both learn
    the whole target and their sum counts it twice."""
    from coformer.calibration.booster import _outputs, _WithHead, as_split
    from coformer.compiler.tasks import feature_heads

    teacher = tiny_vit()
    adapter = adapter_for(teacher)
    specs = [SubModelSpec((0, 1, 2), tuple(range(0, 48, 2)), ((0, 1),) * 3, (tuple(range(96)),) * 3),
             SubModelSpec((0, 2), tuple(range(1, 48, 2)), ((2,), (3,)), (tuple(range(96, 192)),) * 2)]
    torch.manual_seed(1)
    x = torch.randn(96, 1, 16, 16)
    with torch.no_grad():
        target = adapter.teacher_features(teacher, x) if distill == "feature" else teacher(x)
    error = {}
    for residual in (False, True):
        subs = [adapter.slice(teacher, s) for s in specs]
        heads = (feature_heads(adapter, teacher, specs, 48) if distill == "feature"
                 else [adapter.submodel_head(teacher, s) for s in specs])
        calibrate(subs, heads, x, target, None, BoostConfig(epochs=6, batch_size=16, lr=2e-3, distill=distill,
                                                           residual=residual), progress=False)
        first, second = (_outputs(_WithHead(b, h), as_split(x), CPU) for b, h in zip(subs, heads))
        error[residual] = [float((o - target).pow(2).mean()) for o in (first, first + second)]
    assert error[True][1] < error[True][0]  # the second sub-model fills in what the first misses
    assert error[True][1] < 0.5 * error[False][1]  # without residual targets the sum overshoots
