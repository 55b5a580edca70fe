"""The n-gram lookup table: a native count table with Laplace smoothing and backoff.

``NgramTable`` is the Python face of the native class ``torch.classes.fastspec.NgramTable``
(C++ core ``csrc/cpu/ngram.cpp``, CUDA drafting ``csrc/cuda/ngram.cu``).
``ReferenceNgramTable`` is its pure-Python/torch twin (dict of counts) and the executable
specification; the tests require both to agree exactly.

Model
-----
``fit`` counts every n-gram of orders 1..n in the training sequences (``-1`` is padding
and breaks a sequence: no n-gram spans it). For a context ``x_1..x_L`` the model uses the
**longest seen suffix**: the largest ``k = min(n-1, L), ..., 0`` such that the context
``x_{L-k+1}..x_L`` was followed by some token in the fitted data. At that order::

    p(w | ctx) = (count(ctx, w) + s) / (total(ctx) + s * V)          (computed in float64,
                                                                       returned as float32)

The empty context (the unigram) is seen as soon as anything was fitted, so backoff always
ends there; a table with nothing fitted gives the uniform ``1/V``. With ``s = 0`` tokens
never seen after the chosen context get probability 0.

Greedy drafting takes the argmax (smallest id on ties, i.e. ``torch.argmax`` of the
probabilities above), appends it to the context and repeats ``gamma`` times, all rows and
steps in one native call. The native table keeps each context's argmax, so tokens-only
drafting never builds a V-wide vector. (It is the argmax of the counts; the float32
probabilities could only tie two different counts above ~2^23 occurrences.)

Example
-------
>>> import torch, fastspec
>>> t = fastspec.NgramTable(n=3, vocab_size=5)
>>> t.fit([[1, 2, 3, 1, 2, 4]])
NgramTable(n=3, vocab_size=5, smoothing=1.0, num_entries=12)
>>> t.draft(torch.tensor([[1, 2]]), gamma=4)
tensor([[3, 1, 2, 3]])
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["NgramTable", "ReferenceNgramTable"]

_MAX_ORDER = 16
_MAX_GAMMA = 1 << 16

Sequences = Union[torch.Tensor, Sequence[Sequence[int]]]


def _native_class():
    try:
        import fastspec._C  # noqa: F401  (registers torch.classes.fastspec.NgramTable)
    except ImportError as e:  # pragma: no cover - depends on the build
        raise RuntimeError(
            "fastspec.NgramTable needs the compiled extension fastspec._C "
            "(pip install --no-build-isolation .); ReferenceNgramTable works without it"
        ) from e
    return torch.classes.fastspec.NgramTable


def _check_table_args(n, vocab_size, smoothing) -> Tuple[int, int, float]:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= _MAX_ORDER:
        raise ValueError(f"n must be an int in [1, {_MAX_ORDER}], got {n!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size < 2**31:
        raise ValueError(f"vocab_size must be an int in [1, 2^31), got {vocab_size!r}")
    smoothing = float(smoothing)
    if not (smoothing >= 0.0 and smoothing != float("inf")):
        raise ValueError(f"smoothing must be finite and >= 0, got {smoothing!r}")
    return n, vocab_size, smoothing


def _as_int_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise ValueError(f"{name} must be integer token ids: {e}") from e
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{name} must hold integer token ids, got dtype {t.dtype}")
    return t.to(torch.int64)


def flatten_sequences(seqs: Sequences) -> Tuple[torch.Tensor, torch.Tensor]:
    """Training data as (tokens [T] int64, offsets [N+1] int64), sequence i being
    ``tokens[offsets[i]:offsets[i+1]]``. Accepts a [N, L] (or [L]) integer tensor, or a
    list of sequences (lists / 1-D tensors) of ints. Values are checked by the table."""
    if not isinstance(seqs, (torch.Tensor, list, tuple)) and hasattr(seqs, "__array__"):
        seqs = torch.as_tensor(seqs)  # a NumPy array
    if isinstance(seqs, torch.Tensor):
        t = _as_int_tensor("seqs", seqs).cpu()
        if t.dim() == 1:
            t = t.unsqueeze(0)
        if t.dim() != 2:
            raise ValueError(f"seqs tensor must be [N, L] or [L], got shape {tuple(t.shape)}")
        rows, length = t.shape
        return t.reshape(-1).contiguous(), torch.arange(rows + 1, dtype=torch.int64) * length
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise ValueError(f"seqs must be a list of token sequences or an int tensor, got {type(seqs).__name__}")
    parts = []
    for i, s in enumerate(seqs):
        if isinstance(s, torch.Tensor) or hasattr(s, "__array__"):
            p = _as_int_tensor(f"seqs[{i}]", s).cpu()
        elif isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
            raise ValueError(f"seqs[{i}] must be a sequence of ints, got {type(s).__name__}")
        else:
            p = _as_int_tensor(f"seqs[{i}]", list(s)) if len(s) else torch.zeros(0, dtype=torch.int64)
        if p.dim() != 1:
            raise ValueError(f"seqs[{i}] must be 1-D, got shape {tuple(p.shape)}")
        parts.append(p)
    lengths = torch.tensor([len(p) for p in parts], dtype=torch.int64)
    offsets = torch.zeros(len(parts) + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=offsets[1:])
    tokens = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
    return tokens, offsets


def _as_context(context_ids, lengths) -> Tuple[torch.Tensor, Optional[torch.Tensor], bool]:
    """-> (context [B, L] int64, lengths [B] int64 or None, was_1d)."""
    ctx = _as_int_tensor("context_ids", context_ids)
    was_1d = ctx.dim() == 1
    if was_1d:
        ctx = ctx.unsqueeze(0)
    if ctx.dim() != 2:
        raise ValueError(f"context_ids must be [B, L] or [L], got shape {tuple(ctx.shape)}")
    if lengths is not None:
        lengths = _as_int_tensor("lengths", lengths)
        if was_1d and lengths.dim() == 0:
            lengths = lengths.reshape(1)
        if lengths.shape != (ctx.shape[0],):
            raise ValueError(f"lengths must be [B] = [{ctx.shape[0]}], got shape {tuple(lengths.shape)}")
        if lengths.device != ctx.device:
            raise ValueError(f"lengths is on {lengths.device} but context_ids is on {ctx.device}")
    return ctx, lengths, was_1d


def _check_gamma(gamma) -> int:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or not 1 <= gamma <= _MAX_GAMMA:
        raise ValueError(f"gamma must be an int in [1, {_MAX_GAMMA}], got {gamma!r}")
    return gamma


class NgramTable:
    """Native n-gram table: counts of orders 1..n, Laplace smoothing, backoff to the longest
    seen suffix (see the module docstring for the exact model).

    Parameters
    ----------
    n : int
        The order, 1 <= n <= 16 (contexts of up to n-1 tokens).
    vocab_size : int
        V; token ids are in [0, V).
    smoothing : float
        Laplace constant s >= 0.

    Storage: a suffix trie of contexts in an open-addressing hash table plus a hash of
    (context, token) counts chained per context; ``memory_bytes / num_entries`` is the
    cost per distinct n-gram. ``to("cuda")`` uploads a flat copy (hash of contexts + CSR of
    continuations) that drafts for CUDA contexts use; it is refreshed after ``fit``/``update``.
    """

    def __init__(self, n: int, vocab_size: int, smoothing: float = 1.0):
        n, vocab_size, smoothing = _check_table_args(n, vocab_size, smoothing)
        self._impl = _native_class()(n, vocab_size, smoothing)

    @classmethod
    def _wrap(cls, impl) -> "NgramTable":
        table = cls.__new__(cls)
        table._impl = impl
        return table

    # ---- counting -------------------------------------------------------------------------
    def fit(self, seqs: Sequences) -> "NgramTable":
        """Reset, then count all n-grams of orders 1..n in ``seqs``.

        Shape: seqs is [N, L] int (``-1`` = padding, also a sequence break) or a list of
        int sequences of any lengths. Ids outside [-1, V) raise ValueError and leave the
        table unchanged."""
        tokens, offsets = flatten_sequences(seqs)
        self._impl.fit(tokens, offsets)
        return self

    def update(self, seqs: Sequences) -> "NgramTable":
        """Add the counts of ``seqs`` (same forms as :meth:`fit`) to the table."""
        tokens, offsets = flatten_sequences(seqs)
        self._impl.update(tokens, offsets)
        return self

    def clear(self) -> "NgramTable":
        self._impl.clear()
        return self

    # ---- queries --------------------------------------------------------------------------
    def next_probs(self, context_ids, lengths=None) -> torch.Tensor:
        """Smoothed next-token distribution after each context.

        Shape: context_ids [B, L] int64 (rows may start with -1 left padding) or [L];
        lengths [B] optional, row b's context is then its first lengths[b] ids (right
        padding). Returns [B, V] float32 ([V] for a 1-D context), on the context's device.
        """
        ctx, lengths, was_1d = _as_context(context_ids, lengths)
        probs = self._impl.next_probs(ctx, lengths)
        return probs[0] if was_1d else probs

    def draft(self, context_ids, gamma: int, return_probs: bool = False, lengths=None):
        """Greedy drafting of ``gamma`` tokens per row in one native call.

        Shape: context_ids [B, L] int64 (-1 left padding) or [L]; lengths [B] optional (see
        :meth:`next_probs`). Returns tokens [B, gamma] int64, and with ``return_probs`` also
        probs [B, gamma, V] float32: the distribution each token was the argmax of. A 1-D
        context gives [gamma] / [gamma, V]. CUDA contexts run the CUDA kernel.
        """
        gamma = _check_gamma(gamma)
        ctx, lengths, was_1d = _as_context(context_ids, lengths)
        tokens, probs = self._impl.draft(ctx, lengths, gamma, bool(return_probs))
        if was_1d:
            tokens, probs = tokens[0], probs[0] if return_probs else probs
        return (tokens, probs) if return_probs else tokens

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the versioned binary format (magic, version, n, V, smoothing, sizes,
        payload, FNV-1a-64 checksum)."""
        self._impl.save(os.fspath(path))

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "NgramTable":
        """Read a file written by :meth:`save`. A missing, empty, truncated, corrupted,
        foreign or wrong-version file raises ValueError (never crashes)."""
        path = os.fspath(path)
        impl_class = _native_class()
        try:
            impl = impl_class.load(path)
        except RuntimeError as e:
            raise ValueError(f"cannot load n-gram table: {e}") from None
        return cls._wrap(impl)

    def __getstate__(self):
        return {"bytes": self._impl.to_bytes()}

    def __setstate__(self, state):
        self._impl = _native_class().from_bytes(state["bytes"])

    # ---- devices ----------------------------------------------------------------------------
    def to(self, device: Union[str, torch.device]) -> "NgramTable":
        """Upload the flat table to ``device`` (a no-op for CPU). Drafting follows the
        context's device; a CUDA draft re-uploads automatically after fit/update."""
        self._impl.to_device(str(torch.device(device)))
        return self

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return self._impl.n()

    @property
    def vocab_size(self) -> int:
        return self._impl.vocab_size()

    @property
    def smoothing(self) -> float:
        return self._impl.smoothing()

    @property
    def num_entries(self) -> int:
        """Distinct n-grams over all orders 1..n."""
        return self._impl.num_entries()

    @property
    def num_contexts(self) -> int:
        """Distinct seen contexts, including the empty one."""
        return self._impl.num_contexts()

    @property
    def num_tokens(self) -> int:
        """Tokens counted so far."""
        return self._impl.num_tokens()

    @property
    def memory_bytes(self) -> int:
        """Host bytes held by the table (allocated capacity)."""
        return self._impl.memory_bytes()

    @property
    def device_memory_bytes(self) -> int:
        """Bytes of the uploaded GPU copy (0 when none)."""
        return self._impl.device_memory_bytes()

    def __repr__(self) -> str:
        return (f"NgramTable(n={self.n}, vocab_size={self.vocab_size}, smoothing={self.smoothing}, "
                f"num_entries={self.num_entries})")


class ReferenceNgramTable:
    """Pure-Python twin of :class:`NgramTable` (dict of counts, dense float64 rows): the
    executable specification of the model in the module docstring. Slow by design."""

    def __init__(self, n: int, vocab_size: int, smoothing: float = 1.0):
        self.n, self.vocab_size, self.smoothing = _check_table_args(n, vocab_size, smoothing)
        self.counts: dict = {}  # context tuple (oldest first) -> {token: count}

    def fit(self, seqs: Sequences) -> "ReferenceNgramTable":
        tokens, offsets = flatten_sequences(seqs)
        self._check_ids(tokens)
        self.counts = {}
        self._count(tokens, offsets)
        return self

    def update(self, seqs: Sequences) -> "ReferenceNgramTable":
        tokens, offsets = flatten_sequences(seqs)
        self._check_ids(tokens)
        self._count(tokens, offsets)
        return self

    def _check_ids(self, tokens: torch.Tensor) -> None:
        if tokens.numel() and (int(tokens.min()) < -1 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be -1 (padding) or in [0, {self.vocab_size})")

    def _count(self, tokens: torch.Tensor, offsets: torch.Tensor) -> None:
        flat = tokens.tolist()
        bounds = offsets.tolist()
        for begin, end in zip(bounds[:-1], bounds[1:]):
            seq = flat[begin:end]
            for i, w in enumerate(seq):
                if w < 0:
                    continue
                for k in range(self.n):  # context length k
                    if k > i or any(t < 0 for t in seq[i - k:i]):
                        break
                    row = self.counts.setdefault(tuple(seq[i - k:i]), {})
                    row[w] = row.get(w, 0) + 1

    @property
    def num_entries(self) -> int:
        return sum(len(row) for row in self.counts.values())

    def _rows(self, ctx: torch.Tensor, lengths: Optional[torch.Tensor]):
        """The context of each row as a list of ids, after validating like the native op."""
        V = self.vocab_size
        rows = []
        for b, row in enumerate(ctx.cpu().tolist()):
            if lengths is not None:
                length = int(lengths[b])
                if not 0 <= length <= len(row):
                    raise ValueError(f"lengths[{b}] = {length} outside [0, {len(row)}]")
                row = row[:length]
                if any(not 0 <= t < V for t in row):
                    raise ValueError(f"context ids must be in [0, {V})")
            else:
                if any(not -1 <= t < V for t in row):
                    raise ValueError(f"context ids must be in [0, {V}) (-1 = left padding)")
                real = [i for i, t in enumerate(row) if t >= 0]
                if real and any(t < 0 for t in row[real[0]:]):
                    raise ValueError("-1 padding must be on the left of each context row")
                row = [t for t in row if t >= 0]
            rows.append(row)
        return rows

    def _probs(self, context: list) -> torch.Tensor:  # [V] float32
        V, s = self.vocab_size, self.smoothing
        for k in range(min(self.n - 1, len(context)), -1, -1):
            seen = self.counts.get(tuple(context[len(context) - k:]))
            if seen:
                dense = torch.full((V,), s, dtype=torch.float64)
                dense[torch.tensor(list(seen.keys()))] += torch.tensor(list(seen.values()), dtype=torch.float64)
                return (dense / (sum(seen.values()) + s * V)).to(torch.float32)
        return torch.full((V,), 1.0 / V, dtype=torch.float64).to(torch.float32)

    def next_probs(self, context_ids, lengths=None) -> torch.Tensor:
        ctx, lengths, was_1d = _as_context(context_ids, lengths)
        probs = torch.stack([self._probs(row) for row in self._rows(ctx, lengths)]) if ctx.shape[0] else \
            torch.zeros(0, self.vocab_size)
        probs = probs.to(ctx.device)
        return probs[0] if was_1d else probs

    def draft(self, context_ids, gamma: int, return_probs: bool = False, lengths=None):
        gamma = _check_gamma(gamma)
        ctx, lengths, was_1d = _as_context(context_ids, lengths)
        rows = self._rows(ctx, lengths)
        tokens = torch.zeros(len(rows), gamma, dtype=torch.int64)
        probs = torch.zeros(len(rows), gamma, self.vocab_size) if return_probs else torch.zeros(0)
        for b, row in enumerate(rows):
            for j in range(gamma):
                p = self._probs(row)
                token = int(torch.argmax(p))  # first maximal index
                tokens[b, j] = token
                if return_probs:
                    probs[b, j] = p
                row = row + [token]
        tokens, probs = tokens.to(ctx.device), probs.to(ctx.device)
        if was_1d:
            tokens, probs = tokens[0], probs[0] if return_probs else probs
        return (tokens, probs) if return_probs else tokens
