"""The invariants of the block manager and scheduler, checked from outside against a shadow of the KV cache.

`KvShadow` records, for every KV slot, which token prefix the model last wrote there (the KV of position p
depends on tokens 0..p), so a block shared through the prefix cache can be checked to hold exactly the KV its
key promises. The other checks read only the public state: block tables, ref counts, free lists, cache keys.
"""

from __future__ import annotations

from model_handler.block_manager import BlockManager
from model_handler.engine_protocol import FinishReason
from model_handler.scheduler import Scheduler
from model_handler.sequence import PLACEHOLDER_TOKEN, Sequence, SequenceStatus

Prefix = tuple[int, ...]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KvShadow:
    """What the model would have written in each KV slot: the whole token prefix ending at that position."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.slots: list[list[Prefix | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.prefix_of_hash: dict[int, Prefix] = {}
        self.hash_of_prefix: dict[Prefix, int] = {}

    def write(self, seq: Sequence, true_tokens: list[int], start: int, num_new: int) -> None:
        """The step computes positions start..start+num_new-1 of `seq` into its blocks."""
        bs = self.block_size
        for p in range(start, start + num_new):
            self.slots[seq.block_table[p // bs]][p % bs] = tuple(true_tokens[: p + 1])

    def check_sequence(self, seq: Sequence, true_tokens: list[int]) -> None:
        """Every computed position of a running sequence is backed by the KV of its own prefix."""
        bs = self.block_size
        for p in range(seq.num_computed_tokens):
            held = self.slots[seq.block_table[p // bs]][p % bs]
            if held != tuple(true_tokens[: p + 1]):
                raise AssertionError(f"{seq}: slot of position {p} holds the KV of {held}, not of its own prefix")

    def check_cached_blocks(self, manager: BlockManager) -> None:
        """A block findable in the prefix cache is full, its key maps to one token prefix and back (over the
        whole run), and its recorded tokens are the end of that prefix."""
        bs = self.block_size
        for block_hash, block_id in manager.hash_to_block.items():
            slots = self.slots[block_id]
            prefix = slots[-1]
            if prefix is None or len(prefix) % bs:
                raise AssertionError(f"cached block {block_id} was never filled to its end: {slots}")
            for j, held in enumerate(slots):
                if held != prefix[: len(prefix) - bs + j + 1]:
                    raise AssertionError(f"cached block {block_id} mixes the KV of different prefixes: {slots}")
            if manager.block_tokens[block_id] != prefix[-bs:]:
                raise AssertionError(
                    f"cached block {block_id} records {manager.block_tokens[block_id]}, holds {prefix}"
                )
            if self.prefix_of_hash.setdefault(block_hash, prefix) != prefix:
                raise AssertionError(f"key {block_hash} named {self.prefix_of_hash[block_hash]}, now {prefix}")
            if self.hash_of_prefix.setdefault(prefix, block_hash) != block_hash:
                raise AssertionError(f"prefix {prefix} was cached under two keys")


def check_block_manager(manager: BlockManager, running: list[Sequence]) -> None:
    """No block owned twice, free + used = total, ref counts = owners, the cache index consistent."""
    owners = [0] * manager.num_blocks
    for seq in running:
        if len(set(seq.block_table)) != len(seq.block_table):
            raise AssertionError(f"{seq} holds a block twice: {seq.block_table}")
        for block_id in seq.block_table:
            owners[block_id] += 1
    if manager.ref_counts != owners:
        raise AssertionError(f"ref counts {manager.ref_counts} != owners {owners}")
    free = list(manager.free_plain) + list(manager.free_cached)
    used = [b for b in range(manager.num_blocks) if owners[b]]
    if len(set(free)) != len(free) or set(free) & set(used) or len(free) + len(used) != manager.num_blocks:
        raise AssertionError(f"free {free} and used {used} are not a partition of {manager.num_blocks} blocks")
    if manager.num_free_blocks != len(free):
        raise AssertionError("num_free_blocks disagrees with the free lists")
    for block_id in range(manager.num_blocks):
        block_hash, tokens = manager.block_hashes[block_id], manager.block_tokens[block_id]
        if (block_hash is None) != (tokens is None):
            raise AssertionError(f"block {block_id}: key {block_hash} but tokens {tokens}")
        if block_hash is not None and manager.hash_to_block.get(block_hash) != block_id:
            raise AssertionError(f"block {block_id} has key {block_hash}, which names another block")
        if tokens is not None and (len(tokens) != manager.block_size or PLACEHOLDER_TOKEN in tokens):
            raise AssertionError(f"block {block_id} is cached with tokens {tokens}")
        if owners[block_id] > 1 and block_hash is None:
            raise AssertionError(f"block {block_id} is shared by {owners[block_id]} sequences but is not cached")
    for block_id in manager.free_plain:
        if manager.block_hashes[block_id] is not None:
            raise AssertionError(f"block {block_id} is cached but on the plain free list")
    for block_id in manager.free_cached:
        if manager.block_hashes[block_id] is None:
            raise AssertionError(f"block {block_id} is on the cached free list without a key")
    if any(manager.block_hashes[b] != h for h, b in manager.hash_to_block.items()):
        raise AssertionError("hash_to_block and block_hashes disagree")


def check_scheduler(scheduler: Scheduler, everyone: list[Sequence]) -> None:
    """Queues and statuses agree; waiting sequences hold nothing; running ones hold exactly the blocks their
    computed tokens need; finished ones are gone from the scheduler with a reason."""
    bs = scheduler.block_manager.block_size
    waiting, running = list(scheduler.waiting), scheduler.running
    unfinished = {seq.request_id: seq for seq in waiting + running}
    if len(unfinished) != len(waiting) + len(running) or unfinished != scheduler.requests:
        raise AssertionError("waiting + running is not the set of unfinished requests")
    if len(running) > scheduler.max_num_seqs:
        raise AssertionError(f"{len(running)} running > max_num_seqs {scheduler.max_num_seqs}")
    for seq in waiting:
        if seq.status is not SequenceStatus.WAITING or seq.block_table or seq.num_computed_tokens:
            raise AssertionError(f"waiting {seq} holds blocks or computed tokens")
    for seq in running:
        if seq.status is not SequenceStatus.RUNNING or seq.num_computed_tokens > seq.num_tokens:
            raise AssertionError(f"running {seq} is in a bad state")
        if len(seq.block_table) != cdiv(seq.num_computed_tokens, bs):
            raise AssertionError(f"{seq} holds {len(seq.block_table)} blocks for {seq.num_computed_tokens} tokens")
    for seq in everyone:
        if seq.request_id not in unfinished and (not seq.is_finished or seq.finish_reason is None or seq.block_table):
            raise AssertionError(f"{seq} left the scheduler without finishing cleanly")
        num_known = seq.num_tokens - seq.num_pending_tokens
        if any(t == PLACEHOLDER_TOKEN for t in seq.token_ids[:num_known]) or any(
            t != PLACEHOLDER_TOKEN for t in seq.token_ids[num_known:]
        ):
            raise AssertionError(f"{seq} has placeholders other than its trailing pending ones: {seq.token_ids}")


def expected_finish(seq: Sequence, emitted: list[int], max_model_len: int, eos_ids: frozenset[int]) -> int | None:
    """The index of the emitted token that must end the request (stop or EOS token once min_tokens are out,
    max_tokens, the model length), or None while none does. Written from SamplingParams' documentation."""
    params = seq.sampling_params
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))
    for i, token_id in enumerate(emitted):
        num_output = i + 1
        if token_id in stops and num_output >= params.min_tokens:
            return i
        if num_output >= params.max_tokens or seq.num_prompt_tokens + num_output >= max_model_len:
            return i
    return None


def check_outputs(seq: Sequence, emitted: list[int], max_model_len: int, eos_ids: frozenset[int]) -> None:
    """The tokens handed out are the sequence's outputs, and it finished exactly when the rules say."""
    scored = [logprob.token_id for logprob in seq.prompt_logprobs]
    if scored != seq.prompt_token_ids[1 : 1 + len(scored)]:
        raise AssertionError(f"{seq}: prompt logprobs for {scored}, prompt {seq.prompt_token_ids}")
    if emitted and seq.sampling_params.prompt_logprobs is not None and len(scored) != seq.num_prompt_tokens - 1:
        raise AssertionError(f"{seq} sampled before every prompt token had its logprob: {scored}")
    known = seq.output_token_ids[: seq.num_output_tokens - seq.num_pending_tokens]
    if known != emitted:
        raise AssertionError(f"{seq}: outputs {known} but the tokens handed out were {emitted}")
    end = expected_finish(seq, emitted, max_model_len, eos_ids)
    if seq.finish_reason is FinishReason.ABORTED or not seq.is_finished:
        if end is not None:
            raise AssertionError(f"{seq} should have finished at output {end}: {emitted}")
        return
    if seq.num_pending_tokens or seq.output_token_ids != emitted:
        raise AssertionError(f"{seq} finished with outputs {seq.output_token_ids}, handed out {emitted}")
    if end != len(emitted) - 1:
        raise AssertionError(f"{seq} finished ({seq.finish_reason}) after {emitted}, the rules say at {end}")
    params, last = seq.sampling_params, emitted[-1]
    if last in params.stop_token_ids or (last in eos_ids and not params.ignore_eos):
        if len(emitted) >= params.min_tokens:
            want = FinishReason.EOS if last in eos_ids and not params.ignore_eos else FinishReason.STOP_TOKEN
            if seq.finish_reason is not want:
                raise AssertionError(f"{seq} finished with {seq.finish_reason}, expected {want}")
            return
    if seq.finish_reason is not FinishReason.LENGTH:
        raise AssertionError(f"{seq} finished with {seq.finish_reason}, expected LENGTH")
