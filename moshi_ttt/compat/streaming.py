"""Streaming helpers that make moshi's chunked streaming exact past the attention window."""

from __future__ import annotations

from contextlib import ExitStack

from moshi.modules.streaming import StreamingModule
from moshi.modules.transformer import StreamingMultiheadAttention

from moshi_ttt.compat.moshi import kv_cache_capacity, widen_kv_cache


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
        if isinstance(m, StreamingMultiheadAttention) and m.context is not None and kv_cache_capacity(m) is not None:
            widen_kv_cache(m, m.context + max_chunk - 1)


def start_streaming(module: StreamingModule, batch_size: int) -> ExitStack:
    """`module.streaming(batch_size)`, undone when it fails part-way.

    moshi 0.2.13 registers the stop of its streaming session only once every submodule has started: a failure in
    between (out of memory allocating a layer's state) would leave the earlier submodules streaming for good, and
    every later session on the model refused ("already streaming"). The submodules this call started (and only
    those: another session's modules are left alone) are stopped again before the error goes on."""
    idle: list[StreamingModule] = []
    module._apply_named_streaming(lambda _, m: idle.append(m) if m._streaming_state is None else None)
    try:
        return module.streaming(batch_size)
    except BaseException:
        for m in idle:
            m._streaming_state = None
        raise


def exact_streaming(module: StreamingModule, batch_size: int, max_chunk: int) -> ExitStack:
    """`module.streaming(batch_size)` whose chunks of up to `max_chunk` tokens match the non-streaming forward."""
    stack = start_streaming(module, batch_size)
    try:
        widen_kv_caches(module, max_chunk)
    except BaseException:
        stack.close()
        raise
    return stack
