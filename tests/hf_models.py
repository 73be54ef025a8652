"""Tiny random-initialised Hugging Face causal LMs of the architectures poisonmech supports
(GPT-2, GPT-NeoX, Llama with grouped-query attention, Qwen2), for tests. Nothing is downloaded:
the models are built from a config and seeded; ``hf_bridge`` wraps one as a TransformerBridge."""

from __future__ import annotations

import torch

HF_ARCHS = ("gpt2", "neox", "llama", "qwen2")


def hf_module(arch: str, vocab: int = 60, *, n_layers: int = 2, d_model: int = 32, n_heads: int = 4,
              n_kv_heads: int = 2, d_mlp: int = 64, n_ctx: int = 32, seed: int = 0):
    """A random ``transformers`` causal LM (eval mode) of ``arch`` (one of :data:`HF_ARCHS`)."""
    import transformers as tf

    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                            n_inner=d_mlp, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=0, eos_token_id=0)
        cls = tf.GPT2LMHeadModel
    elif arch == "neox":  # parallel residual, partial rotary, biases
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                               num_attention_heads=n_heads, intermediate_size=d_mlp, max_position_embeddings=n_ctx,
                               rotary_pct=0.25, hidden_dropout=0.0, attention_dropout=0.0, bos_token_id=0,
                               eos_token_id=0)
        cls = tf.GPTNeoXForCausalLM
    elif arch == "llama":  # RMSNorm, rotary, SwiGLU, no biases, grouped-query attention
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                             num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, intermediate_size=d_mlp,
                             max_position_embeddings=n_ctx)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":  # like Llama, with q/k/v biases
        cfg = tf.Qwen2Config(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layers,
                             num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, intermediate_size=d_mlp,
                             max_position_embeddings=n_ctx)
        cls = tf.Qwen2ForCausalLM
    else:
        raise ValueError(f"arch must be one of {HF_ARCHS}, got {arch!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg).eval()


def hf_bridge(arch: str, vocab: int = 60, **kw):
    """:func:`hf_module` wrapped as a TransformerBridge (eval mode)."""
    import poisonmech as pm

    return pm.wrap_hf_model(hf_module(arch, vocab, **kw))
