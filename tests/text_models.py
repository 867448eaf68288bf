"""Small language models built from configs, and the word tokenizer they share (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch


def word_tokenizer(path: Path) -> Path:
    from coformer.calibration.text import build_word_tokenizer, sentiment_vocabulary

    return build_word_tokenizer(Path(path), sentiment_vocabulary() + ["cat", "dog", "red", "blue"])


VOCAB = 100  # > the word tokenizer's size


def randomise(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """HF inits leave biases and norms at 0/1: perturb every parameter so a wrong slice cannot hide."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def build(kind: str, seed: int = 0, **over):
    import transformers as tf

    torch.manual_seed(seed)
    if kind in ("bert", "bert-plain"):
        cfg = tf.BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=40, num_labels=2,
                                      pad_token_id=0), **over})
        return randomise(tf.BertForSequenceClassification(cfg) if kind == "bert" else tf.BertModel(cfg))
    if kind in ("gpt2", "gpt2-plain"):
        cfg = tf.GPT2Config(**{**dict(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=40, num_labels=2,
                                      pad_token_id=0, bos_token_id=2, eos_token_id=3), **over})
        return randomise(tf.GPT2ForSequenceClassification(cfg) if kind == "gpt2" else tf.GPT2Model(cfg))
    if kind in ("t5", "t5-relu"):
        cfg = tf.T5Config(**{**dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_heads=4,
                                    feed_forward_proj="gated-gelu" if kind == "t5" else "relu",
                                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                    pad_token_id=0, eos_token_id=3, decoder_start_token_id=0), **over})
        return randomise(tf.T5EncoderModel(cfg))
    raise ValueError(kind)
