"""Streaming helpers that make moshi's chunked streaming exact past the attention window."""

from __future__ import annotations

from contextlib import ExitStack

from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import RingKVCache, StreamingMultiheadAttention


def widen_kv_caches(module: StreamingModule, max_chunk: int) -> None:
    """Gives each streaming self-attention KV cache capacity `context + max_chunk - 1`.

    moshi 0.2.13's RingKVCache has capacity = context: a chunk of C > 1 tokens overwrites keys that the chunk's
    first tokens still need once T > context. The attention mask still uses `context`, so with the wider ring a
    chunk of up to `max_chunk` tokens sees exactly the keys of the non-streaming forward. Call it right after
    entering streaming, before the first forward.
    """
    if max_chunk < 1:
        raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
    for m in module.modules():
        if not isinstance(m, StreamingMultiheadAttention):
            continue
        state = m._streaming_state
        if state is None or state.kv_cache is None or m.context is None:
            continue
        old = state.kv_cache
        if bool((old.end_offset > 0).any()):
            raise ValueError("widen_kv_caches must run before the first streaming forward")
        _, batch, heads, _, head_dim = old.cache.shape  # [2, B, H, capacity, D]
        state.kv_cache = RingKVCache(
            batch,
            heads,
            head_dim,
            m.context + max_chunk - 1,
            respect_exec_mask=old.respect_exec_mask,
            device=old.cache.device,
            dtype=old.cache.dtype,
        )


def exact_streaming(module: StreamingModule, batch_size: int, max_chunk: int) -> ExitStack:
    """`module.streaming(batch_size)` whose chunks of up to `max_chunk` tokens match the non-streaming forward."""
    stack = module.streaming(batch_size)
    try:
        widen_kv_caches(module, max_chunk)
    except BaseException:
        stack.close()
        raise
    return stack
