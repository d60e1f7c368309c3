"""Transformer Engine's THD attention stood in for on CPU, to test the THD path without TE
(tests/training/test_packing.py, the packed_thd scenarios of tests/parallel/multirank.py)."""

from __future__ import annotations

import torch

from soft.training.step import causal_mask


class ReferenceThdAttention(torch.nn.Module):
    """Transformer Engine's THD attention, on CPU: the local DotProductAttention run on each
    cu_seqlens sequence alone with a plain causal mask. Takes what megatron-core's Attention
    hands TE on the THD path (q/k/v [t, heads, dim], no mask) and returns [t, 1, heads*dim];
    other batches go to the local attention as they are."""

    def __init__(self, local: torch.nn.Module) -> None:
        super().__init__()
        self.local = local
        self.thd_calls = 0  # so a test can tell that THD streams did come through

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        params = kwargs.pop("packed_seq_params")
        if params is None:  # an unpacked batch: TE's usual [s, b] path
            return self.local(query, key, value, attention_mask, attn_mask_type, **kwargs)
        assert params.qkv_format == "thd" and attention_mask is None and query.dim() == 3
        bounds = params.cu_seqlens_q.tolist()
        assert bounds[-1] == query.shape[0]
        assert (
            max(e - s for s, e in zip(bounds[:-1], bounds[1:], strict=True)) == params.max_seqlen_q
        )
        self.thd_calls += 1
        out = []
        for start, end in zip(bounds[:-1], bounds[1:], strict=True):
            q, k, v = (t[start:end].unsqueeze(1) for t in (query, key, value))
            out.append(self.local(q, k, v, causal_mask(end - start, q.device), attn_mask_type))
        return torch.cat(out)


def use_reference_thd(model) -> None:
    """Make a local-spec SoftModel take packed batches as THD streams, its attention run by
    ReferenceThdAttention (what Transformer Engine's does, on CPU)."""
    for chunk in model.unwrapped:
        for layer in chunk.decoder.layers:
            attention = layer.self_attention
            attention.core_attention = ReferenceThdAttention(attention.core_attention)
    model.thd = True


def thd_calls(model) -> int:
    """THD forwards seen by the model's ReferenceThdAttention modules."""
    return sum(
        layer.self_attention.core_attention.thd_calls
        for chunk in model.unwrapped
        for layer in chunk.decoder.layers
        if isinstance(layer.self_attention.core_attention, ReferenceThdAttention)
    )
