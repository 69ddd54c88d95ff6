"""What each kind of mlx-lm cache layer allows the prefix cache to do.

A `KVCache` layer can be cut back to any token. A sliding-window `RotatingKVCache` can be
cut only while nothing has rotated out of it; an `ArraysCache` (recurrent state, as in
GatedDeltaNet or Mamba layers) never. Those layers are resumable only where a copy of their
state was kept: a *snapshot*, one entry per layer, where a `KVCache` with no arrays stands
for "cut the stored KV here" so that snapshots never copy the KV that grows with tokens.
"""

from typing import Any, cast

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import ArraysCache, BatchKVCache, CacheList, KVCache, RotatingKVCache, make_prompt_cache

BATCHABLE = (KVCache, RotatingKVCache, ArraysCache, CacheList)


def is_kv(layer: Any) -> bool:
    return type(layer) is KVCache


def cuttable(layer: Any) -> bool:
    """Whether the layer's state at any earlier token can be had by cutting it."""
    if is_kv(layer):
        return True
    if isinstance(layer, RotatingKVCache):
        return layer.offset <= layer.max_size
    if isinstance(layer, CacheList):
        return all(cuttable(c) for c in layer.caches)
    return False


def cut(layer: Any, n: int) -> Any:
    """The layer's state after its first `n` tokens, sharing the stored arrays (a cuttable layer only)."""
    out: Any
    if is_kv(layer):
        out = KVCache()
        out.keys, out.values, out.offset = layer.keys, layer.values, n
        return out
    if isinstance(layer, RotatingKVCache):
        out = RotatingKVCache(layer.max_size, layer.keep)
        out.keys, out.values, out.offset, out._idx = layer.keys, layer.values, n, n
        return out
    if isinstance(layer, CacheList):
        return CacheList(*(cut(c, n) for c in layer.caches))
    raise ValueError(f"a {type(layer).__name__} layer cannot be cut")


def owned(layer: Any) -> Any:
    """A copy of the layer in arrays of its own, holding its state and nothing more."""
    if isinstance(layer, (KVCache, RotatingKVCache)) and layer.keys is None:
        # not is_kv: a RotatingKVCache (isinstance above cannot tell mypy which)
        return KVCache() if is_kv(layer) else RotatingKVCache(layer.max_size, layer.keep)  # type: ignore[union-attr]
    out: Any
    if is_kv(layer):
        out = KVCache()
        out.keys, out.values = (mx.contiguous(a[..., : layer.offset, :]) for a in (layer.keys, layer.values))
        out.offset = layer.offset
        return out
    if isinstance(layer, CacheList):
        return CacheList(*(owned(c) for c in layer.caches))
    if isinstance(layer, ArraysCache):
        out = ArraysCache(len(layer.cache))
        out.cache = [None if a is None else mx.contiguous(a) for a in layer.cache]
        return out
    if isinstance(layer, RotatingKVCache):
        out = RotatingKVCache(layer.max_size, layer.keep)
        end = layer.offset if layer.offset <= layer.max_size else layer.keys.shape[2]  # rotated: all of it
        out.keys, out.values = (mx.contiguous(a[..., :end, :]) for a in (layer.keys, layer.values))
        out.offset, out._idx = layer.offset, min(layer._idx, end)
        return out
    raise ValueError(f"a {type(layer).__name__} layer cannot be kept")


def snapshot(layer: Any) -> Any:
    """What a snapshot keeps of a layer: a copy of it, with `KVCache()` in place of any KV."""
    if is_kv(layer):
        return KVCache()
    if isinstance(layer, CacheList):
        return CacheList(*(snapshot(c) for c in layer.caches))
    return owned(layer)


def snapshot_row(generator: BatchGenerator, uid: int) -> list:
    """A snapshot of one row of mlx-lm's batch, read from the batch caches so that no KV is copied."""

    def row(layer: Any) -> Any:
        if isinstance(layer, BatchKVCache):
            return KVCache()
        if isinstance(layer, CacheList):
            return CacheList(*(row(c) for c in layer.caches))
        return owned(layer.extract(idx))

    [(stage, idx)] = generator._find_uids([uid]).values()  # BatchGenerator has no public per-row access
    batch = generator._prompt_batch if stage == 1 else generator._generation_batch
    kept = [row(layer) for layer in batch.prompt_cache]
    mx.eval([arrays(layer) for layer in kept])  # so that the copies, not the batch, hold the state
    return kept


def resume(end: Any, kept: Any, n: int) -> Any:
    """The layer's state after `n` tokens, from its state at the entry's end and a snapshot's `kept` part."""
    if is_kv(kept):
        return cut(end, n)
    if isinstance(kept, CacheList):
        return CacheList(*(resume(e, k, n) for e, k in zip(end.caches, kept.caches, strict=False)))
    return kept


def arrays(layer: Any) -> list[mx.array]:
    """Every array the layer holds."""
    if is_kv(layer) or isinstance(layer, RotatingKVCache):
        return [] if layer.keys is None else [layer.keys, layer.values]
    if isinstance(layer, CacheList):
        return [a for c in layer.caches for a in arrays(c)]
    return [a for a in layer.cache if a is not None]


def nbytes(layers: list) -> int:
    """Bytes held, each array counted once however many layers or snapshots share it."""
    seen = {id(a): a.nbytes for layer in layers for a in arrays(layer)}
    return sum(seen.values())


def kinds(model: Any) -> list[str]:
    """The cache kind of each layer, as `make_prompt_cache` builds them."""

    def kind(layer: Any) -> str:
        if isinstance(layer, CacheList):
            return "+".join(kind(c) for c in layer.caches)
        return type(layer).__name__

    return [kind(layer) for layer in make_prompt_cache(model)]


def unbatchable(model: Any) -> str | None:
    """Why mlx-lm's BatchGenerator cannot run this model's cache, or None."""

    def bad(layer: Any) -> str | None:
        if isinstance(layer, CacheList):
            return next((b for c in layer.caches if (b := bad(c))), None)
        return None if type(layer) in BATCHABLE else type(layer).__name__

    found = next((b for layer in make_prompt_cache(model) if (b := bad(layer))), None)
    return found and f"its {found} layers cannot be batched by mlx-lm's BatchGenerator"


def mode(model: Any) -> str:
    """How the prefix cache can reuse this model's state, in a few words for people."""
    cache = make_prompt_cache(model)

    def flat(layer: Any) -> list:
        return [x for c in layer.caches for x in flat(c)] if isinstance(layer, CacheList) else [layer]

    layers = [x for layer in cache for x in flat(layer)]
    parts = []
    if windows := sorted({x.max_size for x in layers if isinstance(x, RotatingKVCache)}):
        parts.append("sliding window " + "/".join(map(str, windows)))
    if any(isinstance(x, ArraysCache) for x in layers):
        parts.append("recurrent state")
    if not parts:
        return "any token"
    return f"snapshots at message boundaries ({', '.join(parts)})"


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of cache one more token adds, counting only the layers that grow with tokens.

    Measured by running the model on one token: sliding-window and recurrent layers hold a
    fixed size whatever the length, and the KV's dtype is the activations' (a quantized
    model's KV is not quantized). In a group every rank runs it, each counting its shard.
    """
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)

    def grows(layer: Any) -> list:
        if isinstance(layer, CacheList):
            return [x for c in layer.caches for x in grows(c)]
        return [layer] if is_kv(layer) and layer.keys is not None else []

    kv = [x for layer in cache for x in grows(layer)]
    mx.eval([(x.keys, x.values) for x in kv])
    return sum((x.keys.nbytes + x.values.nbytes) // x.keys.shape[2] for x in kv)


def snapshot_bytes(model: Any, prefill_step: int) -> int:
    """Bytes of one snapshot at its largest: the layers that do not grow with tokens, windows full.

    A sliding window taken at the end of a prefill chunk holds the chunk and the window
    before it (mlx-lm's `RotatingKVCache` trims before it appends).
    """
    cache = make_prompt_cache(model)
    model(mx.array([[0]]), cache=cache)

    def fixed(layer: Any) -> int:
        if isinstance(layer, CacheList):
            return sum(fixed(c) for c in layer.caches)
        if is_kv(layer):
            return 0
        if isinstance(layer, RotatingKVCache):
            held = layer.max_size - 1 + prefill_step
            return held * (layer.keys.nbytes + layer.values.nbytes) // layer.keys.shape[2]
        return nbytes([layer])

    mx.eval([arrays(layer) for layer in cache])
    return sum(fixed(layer) for layer in cache)


def padded_prefill_sound(model: Any) -> bool:
    """Whether mlx-lm prefills prompts of different lengths together as it does each alone.

    Prompts in one prefill batch are right-padded, and a recurrent layer that does not stop
    its state at a row's end (as mlx-lm 0.32's `nemotron_h` Mamba layers) carries the
    padding into that row's state. Checked once at load on two short prompts.
    """
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]

    def first_logprobs(batch: list) -> list:
        generator = BatchGenerator(model, max_tokens=1, completion_batch_size=2, prefill_batch_size=2)
        uids = generator.insert(batch)
        out: dict[int, np.ndarray] = {}
        while len(out) < len(uids):
            out |= {r.uid: np.array(r.logprobs.astype(mx.float32)) for r in generator.next_generated()}
        generator.close()
        return [out[u] for u in uids]

    together = first_logprobs(prompts)
    alone = [first_logprobs([p])[0] for p in prompts]
    tolerance = 1e-3 if _dtype(model) == mx.float32 else 5e-2
    return all(np.allclose(a, b, atol=tolerance) for a, b in zip(together, alone, strict=False))


def _dtype(model: Any) -> mx.Dtype:
    flat = cast(list[tuple[str, mx.array]], tree_flatten(model.parameters()))  # typed as a dict too
    return next(v.dtype for _, v in flat if mx.issubdtype(v.dtype, mx.floating))
