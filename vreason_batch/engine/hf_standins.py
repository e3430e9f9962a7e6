"""Stand-ins for transformers pieces: a KV-cache layer with spare capacity, and a module that takes the last decoder layer's place.

The engine's only subclasses of transformers classes (DynamicLayer) and its only use of
transformers' cache classes; LoadedModel (models.py) reaches them through `new_cache` and
`last_layer_input`. The classes are built on first use, so importing this module imports no
transformers.
"""

from __future__ import annotations

import functools

SLAB_HEADROOM = 128  # tokens of spare capacity a SlabLayer allocates when it grows


def new_cache(model_config, slab: bool = True):
    """An empty KV cache for a model of `model_config` (every layer's keys/values [b, kv_heads, S, head_dim]).

    With `slab`, full-attention layers write new tokens into spare capacity (`SlabLayer`)
    instead of concatenating the whole cache every step.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model_config)
    if slab:
        cache.layers = [_slab_layer_class()() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def is_slab(layer) -> bool:
    # a class attribute, not `type(layer) is SlabLayer`: torch.compile traces an attribute read, not the
    # class factory (the whole greedy step compiles as one fullgraph graph, tests/engine/test_stack.py)
    return getattr(type(layer), "is_slab", False)


def allocate(layer, rows: int, cols: int, like_k, like_v) -> None:
    """Give `layer` zeroed keys/values [rows, kv_heads, cols, head_dim] shaped like `like_k` / `like_v`
    (a SlabLayer: with spare capacity after them). Zeros, not garbage: a masked column still meets a
    zero probability, and 0 * NaN would be NaN."""
    spare = SLAB_HEADROOM if is_slab(layer) else 0
    k = like_k.new_zeros((rows, like_k.shape[1], cols + spare, like_k.shape[3]))
    v = like_v.new_zeros((rows, like_v.shape[1], cols + spare, like_v.shape[3]))
    if is_slab(layer):
        layer.dtype, layer.device, layer.is_initialized = k.dtype, k.device, True
        layer._k, layer._v, layer._n = k, v, cols
    else:
        layer.keys, layer.values = k, v


def pad_left(layer, g: int) -> int:
    """`g` zeroed cache columns before every row's (a whole-cache copy); returns the bytes copied."""
    k, v = layer.keys, layer.values
    allocate(layer, k.shape[0], g + k.shape[2], k, v)
    layer.keys[:, :, g:], layer.values[:, :, g:] = k, v
    return k.numel() * k.element_size() + v.numel() * v.element_size()


def drop_left(layer, j: int) -> None:
    """Drop the first `j` cache columns of every row; nothing is copied (a SlabLayer keeps its spare capacity)."""
    if is_slab(layer):
        layer._k, layer._v, layer._n = layer._k[:, :, j:], layer._v[:, :, j:], layer._n - j
    else:
        layer.keys, layer.values = layer.keys[:, :, j:], layer.values[:, :, j:]


def slab_buffers(layer):
    """(keys buffer, values buffer, first filled column, filled columns n) of an allocated SlabLayer with
    room for one more token: its keys are buffer[:, :, first:first + n]; the caller writes column
    first + n of both, then calls `advance`. stack.py's step uses it; HF's forward goes through `update`.
    After `drop_left` the layer's buffers are views of the buffers they were cut from: those whole
    buffers are given, so the step's inputs are never views (torch.compile guards on a view's strides
    and base: a graph per kind of input)."""
    if layer._n + 1 > layer._k.shape[2]:  # full: views as the shape/dtype template of the new buffer
        layer.reserve(layer._k[:, :, :1], layer._v[:, :, :1])
    k, v = layer._k, layer._v
    first = _column_cut(k)
    if first is not None and first == _column_cut(v):
        return k._base, v._base, first, layer._n
    return k, v, 0, layer._n


def _column_cut(view):
    """j when `view` is its base's [:, :, j:...] (drop_left's cut), else None."""
    base = view._base
    if base is None or base.dim() != 4 or base.shape[:2] != view.shape[:2] or base.stride() != view.stride():
        return None
    offset = view.storage_offset() - base.storage_offset()
    return offset // view.stride(2) if offset % view.stride(2) == 0 else None


def advance(layer, t: int = 1) -> None:
    """Count `t` more filled columns in a SlabLayer (written by the caller after `slab_buffers`)."""
    layer._n += t


def is_last_layer_input(module) -> bool:
    return type(module) is _last_layer_input_class()


def last_layer_input():
    """A module that stands in for the last decoder layer: it records its input and the rotary
    (cos, sin) it is given (`.hidden`, `.position_embeddings`) and returns the input unchanged."""
    return _last_layer_input_class()()


@functools.lru_cache(maxsize=None)
def _slab_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlabLayer(DynamicLayer):
        """A DynamicLayer whose keys/values live in a buffer with spare capacity along the sequence.

        `update` writes the new tokens in place and returns views of the filled part; the buffer is
        reallocated (with SLAB_HEADROOM tokens to spare, `reserve`) only when it is full, so a decode
        step copies the cache once every SLAB_HEADROOM tokens instead of every token. Assigning `keys` /
        `values` (row selection, merges, pruning) adopts the given tensors as the buffer.
        """
        is_slab = True  # hf_standins.is_slab

        def __init__(self, **kwargs) -> None:
            self._k = self._v = None
            self._n = 0
            super().__init__(**kwargs)

        @property
        def keys(self):
            return None if self._k is None else self._k[:, :, : self._n]

        @keys.setter
        def keys(self, t) -> None:
            self._k = t
            self._n = 0 if t is None or t.dim() < 3 else t.shape[2]

        @property
        def values(self):
            return None if self._v is None else self._v[:, :, : self._n]

        @values.setter
        def values(self, t) -> None:
            self._v = t

        def lazy_initialization(self, key_states, value_states) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self._k, self._v, self._n = None, None, 0
            self.is_initialized = True

        def reserve(self, key_states, value_states) -> None:  # room for key_states' tokens after the filled ones
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, t = self._n, key_states.shape[2]
            if self._k is None or n + t > self._k.shape[2] or self._k.shape[:2] != key_states.shape[:2]:
                shape = (*key_states.shape[:2], n + t + SLAB_HEADROOM, key_states.shape[3])
                k, v = key_states.new_empty(shape), value_states.new_empty(shape)
                if n:
                    k[:, :, :n], v[:, :, :n] = self._k[:, :, :n], self._v[:, :, :n]
                self._k, self._v = k, v

        def update(self, key_states, value_states, *args, **kwargs):
            self.reserve(key_states, value_states)
            n, t = self._n, key_states.shape[2]
            self._k[:, :, n:n + t] = key_states
            self._v[:, :, n:n + t] = value_states
            self._n = n + t
            return self.keys, self.values

    return SlabLayer


@functools.lru_cache(maxsize=None)
def _last_layer_input_class():
    import torch

    class LastLayerInput(torch.nn.Module):
        """Stands in for the last decoder layer: records its input and rotary embeddings, returns the input."""

        def __init__(self) -> None:
            super().__init__()
            self.hidden = None
            self.position_embeddings = None

        def forward(self, hidden_states, *args, position_embeddings=None, **kwargs):
            self.hidden, self.position_embeddings = hidden_states, position_embeddings
            return hidden_states

    return LastLayerInput
