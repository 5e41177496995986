"""A batched KV cache with one row ("slot") per sequence, for continuous batching.

transformers' own caches grow all sequences of a batch together; here every row has its own
length, sequences join and leave between steps, and a decode step runs on rows [0, n) with a
4D attention mask hiding each row's unused tail. The model's attention layers call
`update()` exactly as they would on a transformers Cache (Llama-style models need nothing
else when they get explicit position ids and a 4D mask).

Storage is two tensors [layers, rows, kv_heads, tokens + 1, head_dim] (keys, values), grown by
doubling. The extra last token column is a write-only sink for left-padding positions of a
padded prefill, so padding never overwrites a real position. Memory is zeroed, never
`empty`: masked positions still enter attention's matmul with weight 0, and 0 * NaN garbage
would poison real rows.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu", *, max_rows: int, max_tokens: int,
                 initial_rows: int = 4, initial_tokens: int = 256, keep_bytes: int | None = None):
        self.shape_tail = (n_kv_heads, head_dim)
        self.n_layers = n_layers
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.initial = (min(initial_rows, max_rows), min(initial_tokens, max_tokens))
        self.keep_bytes = keep_bytes
        self.release()

    def release(self) -> None:
        """Drop everything and shrink back to the initial size (when no sequence is active:
        a burst of long conversations should not pin its memory forever)."""
        self.rows = self.tokens = 0
        self.keys = self.values = None
        self.reserve(*self.initial)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else 2 * self.keys.numel() * self.keys.element_size()

    def can_grow_rows(self) -> bool:
        """Whether doubling the rows stays within the rows limit and what an idle cache keeps
        (`oversized`): room for one more kept prefix instead of evicting one."""
        if self.rows >= self.max_rows:
            return False
        if self.keep_bytes is not None:
            return 2 * self.nbytes <= self.keep_bytes
        return 2 * self.rows * self.tokens <= 4 * self.initial[0] * self.initial[1]

    @property
    def oversized(self) -> bool:
        """Worth releasing when idle: more than `keep_bytes` (without it, four times its initial
        size). What is kept holds the prefixes of the conversations that left rows, for their
        next turns; a burst of long ones should not pin its memory forever."""
        if self.keep_bytes is not None:
            return self.nbytes > self.keep_bytes
        return self.rows * self.tokens > 4 * self.initial[0] * self.initial[1]

    @property
    def sink(self) -> int:
        """The write-only column padding positions are written to."""
        return self.tokens

    def reserve(self, rows: int, tokens: int) -> None:
        """Make room for `rows` rows of `tokens` positions, growing by doubling."""
        if rows > self.max_rows or tokens > self.max_tokens:
            raise ValueError(f"KV cache limit: {rows} rows x {tokens} tokens > {self.max_rows} x {self.max_tokens}")
        if rows <= self.rows and tokens <= self.tokens:
            return
        new_rows = self.rows or 1
        while new_rows < rows:
            new_rows *= 2
        new_tokens = self.tokens or 1
        while new_tokens < tokens:
            new_tokens *= 2
        new_rows = min(max(new_rows, self.rows), self.max_rows)
        new_tokens = min(max(new_tokens, self.tokens), self.max_tokens)
        shape = (self.n_layers, new_rows, self.shape_tail[0], new_tokens + 1, self.shape_tail[1])
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        if self.keys is not None:
            keys[:, : self.rows, :, : self.tokens] = self.keys[:, :, :, : self.tokens]
            values[:, : self.rows, :, : self.tokens] = self.values[:, :, :, : self.tokens]
        self.keys, self.values = keys, values
        self.rows, self.tokens = new_rows, new_tokens

    def copy_row(self, source: int, target: int, length: int) -> None:
        """Row `target` takes row `source`'s first `length` positions."""
        if source != target and length > 0:
            self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
            self.values[:, target, :, :length] = self.values[:, source, :, :length]

    def swap_rows(self, a: int, b: int, length_a: int, length_b: int) -> None:
        if a == b:
            return
        for store in (self.keys, self.values):
            saved = store[:, a, :, :length_a].clone()
            if length_b:
                store[:, a, :, :length_b] = store[:, b, :, :length_b]
            store[:, b, :, :length_a] = saved

    def decode_view(self, n_rows: int, positions: torch.Tensor, kv_length: int) -> _StepCache:
        """For a decode step on rows [0, n_rows): one new token per row at `positions` [n]."""
        return _StepCache(self, rows=None, n_rows=n_rows, positions=positions, kv_length=kv_length)

    def prefill_view(self, rows: torch.Tensor, positions: torch.Tensor, kv_length: int) -> _StepCache:
        """For a prefill of `rows` [k]: tokens written at `positions` [k, q] (sink for padding)."""
        return _StepCache(self, rows=rows, n_rows=len(rows), positions=positions, kv_length=kv_length)


class _StepCache:
    """What one forward pass sees as `past_key_values`: writes the new keys/values where each
    row's tokens go, returns each row's whole history for attention."""

    is_compileable = False

    def __init__(self, cache: SlotKVCache, *, rows: torch.Tensor | None, n_rows: int,
                 positions: torch.Tensor, kv_length: int):
        self.cache = cache
        self.rows = rows  # None: the contiguous rows [0, n_rows)
        self.n_rows = n_rows
        self.positions = positions
        self.kv_length = kv_length
        if rows is None:
            self._row_index = torch.arange(n_rows, device=cache.device)
        else:
            self._row_index = rows[:, None]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        if self.rows is None:  # decode: [n, heads, 1, dim] -> one position per row
            keys[self._row_index, :, self.positions] = key_states[:, :, 0]
            values[self._row_index, :, self.positions] = value_states[:, :, 0]
            return keys[: self.n_rows, :, : self.kv_length], values[: self.n_rows, :, : self.kv_length]
        # prefill: [k, heads, q, dim] -> [k, q, heads, dim] to match the advanced-index layout
        keys[self._row_index, :, self.positions] = key_states.transpose(1, 2)
        values[self._row_index, :, self.positions] = value_states.transpose(1, 2)
        return keys[self.rows, :, : self.kv_length], values[self.rows, :, : self.kv_length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_length
