"""Paged KV block bookkeeping in pure Python: free lists, ref counts and the prefix cache.

Prefix caching keys every full block by a hash chained over all tokens up to its end (and the sequence's cache
salt), so equal keys mean equal KV. Freed cached blocks keep their content and are evicted least recently used,
only when no plain free block is left. When every layer has a sliding window (`kv_window`), a running sequence's
blocks wholly before the window of its next token are freed as it goes (their table entries become -1, which no
attention backend reads); they stay findable by the prefix cache like any freed computed block.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from model_handler.sequence import Sequence


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


DROPPED = -1
"""A block-table entry whose block was freed because no layer's window reaches it."""


class BlockManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, kv_window: int | None = None
    ) -> None:
        """`kv_window`: the largest sliding window when every layer has one (keys older than it are never read)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of one token, got {num_blocks} blocks of {block_size}")
        if kv_window is not None and kv_window < 1:
            raise ValueError(f"kv_window must be a positive number of tokens, got {kv_window}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.kv_window = kv_window
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        """Tokens of each cached block, compared on a hit so a hash collision can never share wrong KV."""
        self.hash_to_block: dict[int, int] = {}
        self.free_plain: deque[int] = deque(range(num_blocks))
        self.free_cached: OrderedDict[int, None] = OrderedDict()
        """Free blocks that still hold cached KV, least recently used first."""

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_plain) + len(self.free_cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self.hash_to_block)

    # ---- prefix cache ----------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[int]:
        """Chained hashes of the first `num_full_blocks` blocks of `seq`, computed once per sequence."""
        hashes, bs, tokens = seq.block_hashes, self.block_size, seq.token_ids
        parent = hashes[-1] if hashes else seq.cache_salt
        for i in range(len(hashes), num_full_blocks):
            if tokens[(i + 1) * bs - 1] < 0:
                break  # ends in a placeholder (async scheduling): hashed once its token is known
            parent = hash((parent, tuple(tokens[i * bs : (i + 1) * bs])))
            hashes.append(parent)
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the leading full blocks of a waiting sequence's tokens.

        The last token is never matched: it must be computed to produce logits, and its block would be
        written, so it must not be shared.
        """
        if not self.enable_prefix_caching:
            return []
        num_full = (seq.num_tokens - 1) // self.block_size
        hashes = self._hashes(seq, num_full)
        hits: list[int] = []
        bs, tokens = self.block_size, seq.token_ids
        for i in range(num_full):
            block_id = self.hash_to_block.get(hashes[i])
            if block_id is None or self.block_tokens[block_id] != tuple(tokens[i * bs : (i + 1) * bs]):
                break
            hits.append(block_id)
        return hits

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Make the blocks that are full once `num_tokens` tokens are computed findable by later requests."""
        if not self.enable_prefix_caching:
            return
        self._register_blocks(seq, seq.num_computed_tokens // self.block_size, num_tokens // self.block_size)

    def register_resolved_block(self, seq: Sequence, token_index: int) -> None:
        """Async scheduling: the token at `token_index` was a placeholder when the step computing it was
        scheduled, so its block, if that token fills it, could not be keyed then; key it now."""
        if not self.enable_prefix_caching or (token_index + 1) % self.block_size:
            return
        if seq.num_computed_tokens > token_index:  # its KV is written (or being written) by a launched step
            block = token_index // self.block_size
            self._register_blocks(seq, block, block + 1)

    def _register_blocks(self, seq: Sequence, first: int, num_full: int) -> None:
        if num_full <= first:
            return
        hashes = self._hashes(seq, num_full)
        bs, tokens = self.block_size, seq.token_ids
        for i in range(first, min(num_full, len(hashes))):
            block_id = seq.block_table[i]
            if block_id == DROPPED or self.block_hashes[block_id] is not None or hashes[i] in self.hash_to_block:
                continue  # already cached, or the same content lives in another block
            self.block_hashes[block_id] = hashes[i]
            self.block_tokens[block_id] = tuple(tokens[i * bs : (i + 1) * bs])
            self.hash_to_block[hashes[i]] = block_id

    # ---- allocation ------------------------------------------------------------------------------

    def _take_free_block(self) -> int:
        if self.free_plain:
            block_id = self.free_plain.popleft()
        else:
            block_id, _ = self.free_cached.popitem(last=False)  # evict the least recently used
            self._uncache(block_id)
        self.ref_counts[block_id] = 1
        return block_id

    def _grow(self, seq: Sequence, num_tokens: int) -> None:
        for _ in range(_cdiv(num_tokens, self.block_size) - len(seq.block_table)):
            seq.block_table.append(self._take_free_block())

    def can_allocate(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Whether a waiting sequence can take its cached blocks plus room for `num_new_tokens` more."""
        num_tokens = len(cached_blocks) * self.block_size + num_new_tokens
        num_needed = _cdiv(num_tokens, self.block_size) - len(cached_blocks)
        # A cached block nobody uses sits in the free pool: claiming it uses up a free block too.
        num_needed += sum(1 for b in cached_blocks if self.ref_counts[b] == 0)
        return num_needed <= self.num_free_blocks

    def allocate(self, seq: Sequence, cached_blocks: list[int], num_new_tokens: int) -> None:
        """Admit a waiting sequence: share its cached prefix blocks, then add blocks for the new tokens."""
        if seq.block_table:
            raise ValueError(f"{seq.request_id} already holds blocks")
        for block_id in cached_blocks:
            if self.ref_counts[block_id] == 0:
                del self.free_cached[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(cached_blocks) * self.block_size
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens = seq.num_computed_tokens
        num_tokens = seq.num_computed_tokens + num_new_tokens
        self._grow(seq, num_tokens)
        self._register_full_blocks(seq, num_tokens)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether a running sequence can get blocks for `num_new_tokens` more computed tokens."""
        num_needed = _cdiv(seq.num_computed_tokens + num_new_tokens, self.block_size) - len(seq.block_table)
        return num_needed <= self.num_free_blocks

    def may_append(self, seq: Sequence, num_new_tokens: int) -> None:
        """Add the blocks a running sequence needs for `num_new_tokens` more (none while its last has room)."""
        num_tokens = seq.num_computed_tokens + num_new_tokens
        self._grow(seq, num_tokens)
        self._register_full_blocks(seq, num_tokens)

    def drop_outside_window(self, seq: Sequence) -> None:
        """Free the sequence's blocks that lie wholly before the window of its next token to compute (which, and
        every later token, sees keys from num_computed_tokens - kv_window + 1 on); nothing without a kv_window."""
        if self.kv_window is None:
            return
        num_dead = min(max(0, seq.num_computed_tokens - self.kv_window + 1) // self.block_size, len(seq.block_table))
        for i in range(seq.num_dropped_blocks, num_dead):
            self._release(seq.block_table[i], is_computed=True)
            seq.block_table[i] = DROPPED
        seq.num_dropped_blocks = max(seq.num_dropped_blocks, num_dead)

    def deallocate(self, seq: Sequence) -> None:
        """Drop the sequence's references; its computed cached blocks stay findable until evicted."""
        num_computed_blocks = seq.num_computed_tokens // self.block_size
        # Last block first, so the tail of a sequence is evicted before the prefix others may share.
        for i in range(len(seq.block_table) - 1, -1, -1):
            if seq.block_table[i] != DROPPED:
                self._release(seq.block_table[i], is_computed=i < num_computed_blocks)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_dropped_blocks = 0

    def _release(self, block_id: int, is_computed: bool) -> None:
        """One reference fewer; a block nobody holds goes back to the free pool (to the cached one if its KV is
        registered and was computed)."""
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] != 0:
            return
        if self.block_hashes[block_id] is not None and not is_computed:
            # Registered when scheduled, but preempted before the step computed it: no KV to share.
            self._uncache(block_id)
        if self.block_hashes[block_id] is None:
            self.free_plain.append(block_id)
        else:
            self.free_cached[block_id] = None

    def _uncache(self, block_id: int) -> None:
        block_hash = self.block_hashes[block_id]
        if block_hash is not None and self.hash_to_block.get(block_hash) == block_id:
            del self.hash_to_block[block_hash]
        self.block_hashes[block_id] = None
        self.block_tokens[block_id] = None
