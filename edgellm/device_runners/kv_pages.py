"""Host bookkeeping of edgellm's own paged KV cache (CUDA artifacts built with `--opt cuda_kv=owned`; the kernels
and the layout are in kernels/owned_kv.py). Pure Python: the Engine keeps the page tensor on the device and passes
each forward the page rows and positions this class computes.

Semantics follow TVM's PagedKVCache as the Engine and the batch scheduler use it: sequences are added empty,
grow a 16-token page at a time as tokens are appended (prefill chunks or decode steps), and give every page back
when removed; `fork` shares the parent's full pages (reference counts) and gives the child its own copy of the
partial last page (the caller copies that page's slots on the device); `free` counts the pages no sequence holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAGE = 16
# batch_decode of the owned cache is planned for at most this many rows (compile/pipeline.static_decode_inputs):
# its storage has a fixed size, so each batch size is captured as a CUDA graph; the Engine splits larger batches
GRAPH_BATCH_BOUND = 64
# The page tensor holds the pool's pages, then the scratch page, then one control page: int32 words the decode
# kernels use across blocks (control_words; kernels/owned_kv.py), zero when no kernel runs. The Engine zeroes it
# when it allocates the tensor; every kernel that uses a word leaves it zero again.
EXTRA_PAGES = 2  # scratch + control


def control_words(kv_heads: int, head_dim: int) -> int:
    """int32 words of the control page: page P - 1 of layer 0 of the page tensor [L, P, 2, KV, 16, D] fp16, whose
    2 x KV x 16 x D halves are KV x 16 x D words. The decode attention of owned_kv.cu counts the finished splits of
    (token i, kv head kvh) in word i * KV + kvh; its merging block resets it."""
    return kv_heads * PAGE * head_dim


def control_page(tvm, pages):
    """The control page of the page tensor `pages` as an int32 tensor view (`tvm`: edgellm._tvm), for copies into
    or out of it (the kernels take the whole tensor)."""
    _, total, _, kv_heads, _, head_dim = pages.shape
    words = control_words(kv_heads, head_dim)
    return tvm.view(pages, (words,), "int32", (total - 1) * words * 4)  # layer 0, last page: words x 4 bytes a page


class CacheFullError(RuntimeError):
    """No free page is left for a sequence's new tokens."""


@dataclass
class _Seq:
    pages: list[int] = field(default_factory=list)
    length: int = 0


class PagePool:
    """`total` pages for sequences of up to `max_pages` pages each. Page ids are 0..total-1; `scratch` (= total) is
    one more page that no sequence ever holds: padding rows of a batch write there."""

    def __init__(self, total: int, max_pages: int):
        if total <= 0 or max_pages <= 0:
            raise ValueError(f"a KV page pool needs pages, got total {total} and max_pages {max_pages}")
        self.total, self.max_pages, self.scratch = total, max_pages, total
        self._free = list(range(total - 1, -1, -1))  # a stack: the lowest free page is handed out first
        self._refs = [0] * total
        self._seqs: dict[int, _Seq] = {}

    # ---- sequences ---------------------------------------------------------------------------------------------
    def add(self, seq: int) -> None:
        if seq in self._seqs:
            raise ValueError(f"sequence {seq} is already in the KV cache")
        self._seqs[seq] = _Seq()

    def remove(self, seq: int) -> None:
        s = self._get(seq)
        for p in s.pages:
            self._release(p)
        del self._seqs[seq]

    def fork(self, parent: int, child: int) -> tuple[int, int, int] | None:
        """`child` starts as a copy of `parent`'s tokens. Full pages are shared; a partial last page gets a fresh
        page for the child: returns (source page, destination page, slots to copy) for the caller's device copy,
        None when there is no partial page."""
        src = self._get(parent)
        if child in self._seqs:
            raise ValueError(f"sequence {child} is already in the KV cache")
        full = src.length // PAGE
        copy = None
        if src.length % PAGE:
            if not self._free:
                raise CacheFullError(f"no free KV page to fork sequence {parent}")
            dst = self._take()
            copy = (src.pages[full], dst, src.length % PAGE)
        for p in src.pages[:full]:
            self._refs[p] += 1
        self._seqs[child] = _Seq(src.pages[:full] + ([copy[1]] if copy else []), src.length)
        return copy

    def length(self, seq: int) -> int:
        return self._get(seq).length

    def pages(self, seq: int) -> list[int]:
        return list(self._get(seq).pages)

    # ---- growth ------------------------------------------------------------------------------------------------
    def append(self, seq: int, n: int) -> None:
        """Make room for `n` more tokens of `seq` (new pages as needed) and count them as cached. A page shared with
        a fork is never written: appending into a shared partial page cannot happen, because fork copies it."""
        s = self._get(seq)
        need = -(-(s.length + n) // PAGE)
        if need > self.max_pages:
            raise CacheFullError(f"sequence {seq} would hold {s.length + n} tokens, over the {self.max_pages * PAGE} "
                                 "of a sequence's page table")
        if need - len(s.pages) > len(self._free):
            raise CacheFullError(f"sequence {seq} needs {need - len(s.pages)} more KV pages and {len(self._free)} "
                                 "are free")
        while len(s.pages) < need:
            s.pages.append(self._take())
        s.length += n

    def append_many(self, seqs: list[int], n: int) -> None:
        """`append(seq, n)` for every sequence of a batch, or (CacheFullError) for none of them."""
        need = 0
        for seq in seqs:
            s = self._get(seq)
            pages = -(-(s.length + n) // PAGE)
            if pages > self.max_pages:
                raise CacheFullError(f"sequence {seq} would hold {s.length + n} tokens, over the "
                                     f"{self.max_pages * PAGE} of a sequence's page table")
            need += pages - len(s.pages)
        if need > len(self._free):
            raise CacheFullError(f"the batch needs {need} more KV pages and {len(self._free)} are free")
        for seq in seqs:
            self.append(seq, n)

    def row(self, seq: int, out: np.ndarray) -> None:
        """Write `seq`'s page table into `out` (int32 [max_pages]); unused entries point at the scratch page."""
        pages = self._get(seq).pages
        out[: len(pages)] = pages
        out[len(pages):] = self.scratch

    # ---- counts ------------------------------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return len(self._free)

    def _get(self, seq: int) -> _Seq:
        try:
            return self._seqs[seq]
        except KeyError:
            raise ValueError(f"sequence {seq} is not in the KV cache") from None

    def _take(self) -> int:
        p = self._free.pop()
        self._refs[p] = 1
        return p

    def _release(self, p: int) -> None:
        self._refs[p] -= 1
        if self._refs[p] == 0:
            self._free.append(p)
