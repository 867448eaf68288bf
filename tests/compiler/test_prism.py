"""PRISM's arithmetic: shares by speed, Segment Means, the restructured attention and its causal
mask, and the bytes an inference exchanges. The anchor: with CR = 1 the partitioned forward is
the teacher's own, within 1e-5."""

import pytest
import torch
import torch.nn.functional as F

from coformer.compiler.prism import (communication, prism_vit_forward, segment_attention, segment_means,
                                     share_positions)
from coformer.runtime.errors import CoFormerError
from tests.conftest import tiny_vit


def test_positions_are_shared_by_speed_and_every_device_gets_one():
    assert share_positions(17, [1.0, 0.6, 0.4]) == [9, 5, 3]
    assert share_positions(3, [100.0, 1.0, 1.0]) == [1, 1, 1]
    assert sum(share_positions(197, [1.0, 0.7, 0.3, 0.2])) == 197
    with pytest.raises(CoFormerError, match="2 positions cannot be shared among 3"):
        share_positions(2, [1, 1, 1])
    with pytest.raises(CoFormerError, match="must be positive"):
        share_positions(10, [1, 0])


def test_segment_means_average_consecutive_positions_and_count_them():
    x = torch.arange(10, dtype=torch.float32).reshape(1, 5, 2)
    means, sizes = segment_means(x, 2)
    assert sizes.tolist() == [2, 2, 1]
    assert means[0].tolist() == [[1.0, 2.0], [5.0, 6.0], [8.0, 9.0]]
    with pytest.raises(CoFormerError, match="compression rate 0"):
        segment_means(x, 0)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_cr_1_reproduces_the_vit_teacher(pool):
    model = tiny_vit(global_pool=pool)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    for shares in ([17], [9, 5, 3], [1, 8, 8]):
        got = prism_vit_forward(model, x, shares, cr=1)
        assert (got - want).abs().max().item() <= 1e-5, shares
    approx = prism_vit_forward(model, x, [9, 5, 3], cr=4)
    assert approx.shape == want.shape and (approx - want).abs().max().item() > 1e-6  # CR > 1 approximates
    with pytest.raises(CoFormerError, match="sum to the 17 positions"):
        prism_vit_forward(model, x, [9, 5], cr=1)


def _parts(n_parts=(3, 4, 5), heads=2, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(n_parts)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g) for _ in range(3))
    split = lambda t: list(torch.split(t, list(n_parts), dim=2))  # noqa: E731
    return q, k, v, split


def test_the_causal_mask_at_cr_1_is_the_ordinary_causal_attention():
    q, k, v, split = _parts()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = torch.cat(segment_attention(split(q), split(k), split(v), 1, q.shape[-1] ** -0.5, causal=True), dim=2)
    assert (got - want).abs().max().item() <= 1e-6
    full = torch.cat(segment_attention(split(q), split(k), split(v), 1, q.shape[-1] ** -0.5), dim=2)
    assert (full - F.scaled_dot_product_attention(q, k, v)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("cr", [1, 2, 4, 16])
def test_a_later_token_never_changes_an_earlier_position_at_any_cr(cr):
    q, k, v, split = _parts()
    base = torch.cat(segment_attention(split(q), split(k), split(v), cr, 0.5, causal=True), dim=2)
    for later in (5, 11):  # in the second device's share, and the last position
        k2, v2, q2 = k.clone(), v.clone(), q.clone()
        k2[..., later, :] += 3.0
        v2[..., later, :] -= 2.0
        q2[..., later, :] *= -1
        moved = torch.cat(segment_attention(split(q2), split(k2), split(v2), cr, 0.5, causal=True), dim=2)
        assert torch.equal(moved[..., :later, :], base[..., :later, :]), (cr, later)
        assert not torch.equal(moved[..., later, :], base[..., later, :])


def test_communication_counts_the_segment_means_and_falls_as_the_paper_says():
    # 4 devices of 128 positions, BERT-base width, 12 layers: at CR = 128 each device sends one mean
    c = communication([128] * 4, 128, 768, 12, via="direct")
    assert c["rounds_per_inference"] == 12
    assert c["bytes_per_inference"] == 12 * 4 * 3 * (2 * 768 * 1 * 4)
    assert c["reduction"] == pytest.approx(1 - 1 / 128)  # 99.2%, the abstract's figure for BERT at CR = 128
    one = communication([9, 5, 3], 1, 48, 3)
    assert one["reduction"] == 0 and one["bytes_per_inference"] == one["uncompressed_bytes"]
    # through the central node: workers' means go up once, and everyone's come down to each worker
    assert one["bytes_per_inference"] == 3 * 2 * 48 * 4 * ((5 + 3) + (9 + 3) + (9 + 5))


def _gpt2():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=4)).eval()


def test_cr_1_reproduces_gpt2_and_a_later_token_never_moves_an_earlier_output():
    from coformer.compiler.prism import prism_gpt2_forward

    model = _gpt2()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    for shares in ([12], [5, 4, 3]):
        assert (prism_gpt2_forward(model, ids, shares, 1) - want).abs().max().item() <= 1e-5, shares
    for cr in (1, 2, 4):
        base = prism_gpt2_forward(model, ids, [5, 4, 3], cr)
        for later in (6, 11):
            changed = ids.clone()
            changed[:, later] = (changed[:, later] + 7) % 50
            moved = prism_gpt2_forward(model, changed, [5, 4, 3], cr)
            assert torch.equal(moved[:, :later], base[:, :later]), (cr, later)
            assert not torch.equal(moved[:, later], base[:, later])


def test_cr_1_reproduces_bert_with_padding_left_out():
    from transformers import BertConfig, BertModel

    from coformer.compiler.prism import prism_bert_forward

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=64, max_position_embeddings=32)).eval()
    ids = torch.randint(5, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # the second text is 7 tokens long: its padding spans two devices' shares
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask)
    for shares in ([12], [5, 4, 3]):
        hidden, pooled = prism_bert_forward(model, ids, mask, shares, 1)
        real = mask.bool()
        assert (hidden[real] - want.last_hidden_state[real]).abs().max().item() <= 1e-5, shares
        assert (pooled - want.pooler_output).abs().max().item() <= 1e-5, shares
    # at CR > 1 what the padding holds still changes nothing
    other = ids.clone()
    other[1, 7:] = 9
    a, _ = prism_bert_forward(model, ids, mask, [5, 4, 3], 4)
    b, _ = prism_bert_forward(model, other, mask, [5, 4, 3], 4)
    assert (a[1, :7] - b[1, :7]).abs().max().item() <= 1e-6
