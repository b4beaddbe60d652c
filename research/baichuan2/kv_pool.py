"""The key/value cache as a pool of fixed-size blocks (paged, as vLLM's PagedAttention): the host-side bookkeeping.

A sequence's cache is a list of block ids (its block table): position p lives in block table[p // block_size],
row p % block_size. Blocks are taken from the pool as a sequence grows and given back when it ends. The tensors
themselves (one pool of [blocks, heads, block_size, head_dim] per layer, or one [layers, ...] tensor) belong to the
model's paged step; this module only decides which block holds what.

Prefix reuse (vLLM's automatic prefix caching): a block whose block_size tokens are all in the cache is registered
under a hash of those tokens chained with the hash of every block before it, so equal hashes mean equal prefixes.
A new sequence whose prompt starts with registered blocks takes them as they are (reference counted) and computes
only the rest. Only full blocks are shared and a sequence writes only at positions past its shared blocks, so a
shared block is never written (no copy-on-write needed); at least the prompt's last token is always computed (its
logits choose the first new token). A block nobody references any more keeps its contents and its hash, and goes
to the back of an eviction queue: it is reused by the next sequence with that prefix, or overwritten (least
recently freed first) when the pool runs out of empty blocks.

Block 0 is never handed out: the paged step writes padding tokens there.

Pure Python (no MindSpore): the engine and its tests use it.
"""
from collections import OrderedDict

NULL_BLOCK = 0


def blocks_for(tokens, block_size):
    """Blocks that hold `tokens` positions."""
    return -(-int(tokens) // block_size)


def prefix_hashes(tokens, block_size):
    """The chained hash of each FULL block of `tokens` (a shorter list than the blocks when the last is partial)."""
    hashes, parent = [], None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        hashes.append(parent)
    return hashes


class PoolExhausted(RuntimeError):
    """No empty or evictable block left: the scheduler's reservations should make this impossible."""


class BlockPool:
    """Block ids 1 .. num_blocks - 1, reference counted, with the prefix cache (see the module docstring)."""

    def __init__(self, num_blocks, block_size, prefix_cache=True):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is reserved for padding), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.prefix_cache = prefix_cache
        self.refs = [0] * self.num_blocks
        self.empty = list(range(self.num_blocks - 1, NULL_BLOCK, -1))  # popped from the end: low ids first
        self.evictable = OrderedDict()  # unreferenced blocks that still hold a registered prefix, oldest first
        self.block_of_hash = {}
        self.hash_of_block = {}

    # ------------------------------------------------------------------ counts
    @property
    def capacity(self):
        """Blocks a sequence can ever hold (all but the padding block)."""
        return self.num_blocks - 1

    def available(self):
        """Blocks that can be handed out now (empty, or holding an unreferenced prefix)."""
        return len(self.empty) + len(self.evictable)

    def in_use(self):
        return self.capacity - self.available()

    # ------------------------------------------------------------------ allocation
    def allocate(self):
        """An unreferenced block for new contents (reference count 1)."""
        if self.empty:
            block = self.empty.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.block_of_hash[self.hash_of_block.pop(block)]
        else:
            raise PoolExhausted("the key/value block pool is exhausted")
        self.refs[block] = 1
        return block

    def release(self, blocks):
        """Drops one reference of each block (a sequence's table, when it ends)."""
        for block in blocks:
            if self.refs[block] <= 0:
                raise RuntimeError(f"block {block} released more often than it was taken")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.hash_of_block:
                    self.evictable[block] = None
                else:
                    self.empty.append(block)

    # ------------------------------------------------------------------ prefix cache
    def lookup(self, hashes):
        """The blocks holding the longest registered run of `hashes` (a prompt's full blocks), each taken (reference
        count + 1). Empty with the prefix cache off."""
        found = []
        if not self.prefix_cache:
            return found
        for h in hashes:
            block = self.block_of_hash.get(h)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            found.append(block)
        return found

    def active_hits(self, hashes):
        """How many leading `hashes` are held by blocks someone references now (taking them costs no empty block)."""
        count = 0
        if not self.prefix_cache:
            return count
        for h in hashes:
            block = self.block_of_hash.get(h)
            if block is None or self.refs[block] == 0:
                break
            count += 1
        return count

    def register(self, block, block_hash):
        """Records that `block` (full, written) holds the prefix `block_hash`; a prefix already held elsewhere keeps
        its first block (this one then stays private)."""
        if self.prefix_cache and block_hash not in self.block_of_hash and block not in self.hash_of_block:
            self.block_of_hash[block_hash] = block
            self.hash_of_block[block] = block_hash

    def check_empty(self):
        """Raises unless every block is back (no sequence holds any): the leak check of the tests."""
        held = [b for b in range(1, self.num_blocks) if self.refs[b]]
        if held or self.available() != self.capacity:
            raise AssertionError(f"blocks still referenced: {held[:10]} ({len(held)} in all); "
                                 f"available {self.available()} of {self.capacity}")
