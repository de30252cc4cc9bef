"""Merkle trees over SHA-256 as in RFC 9162 §2.1 (Certificate Transparency v2), and the paths of
C2SP tlog-tiles (https://c2sp.org/tlog-tiles). Pure.

The event log's hash chain proves order, but checking one event against a signed head means
replaying the chain up to it. A Merkle tree over the same events gives logarithmic proofs: that an
event is in a signed tree (inclusion) and that a later tree extends an earlier one (consistency),
which is what witnesses and auditors of a transparency log check.

Leaves and nodes are domain-separated (0x00 / 0x01 prefixes) so a node hash can never pass for a
leaf hash. Sizes and indices are ints: the trees in checkpoints are at most 2**64 - 1 leaves.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Literal

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}) per RFC 9162 §2.1.1
TILE_HEIGHT = 8  # tlog-tiles: a tile is a subtree of height 8 ...
TILE_WIDTH = 1 << TILE_HEIGHT  # ... so a full tile holds 256 hashes
MAX_TILE_LEVEL = 63
_MAX_INDEX = 1 << 64  # tree sizes are uint64 in checkpoints, so no tile index reaches this

_sha256 = hashlib.sha256


class ProofError(ValueError):
    """A proof does not verify, or its inputs are malformed; the message says which."""


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1): where RFC 9162 splits a tree of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def _mth(hashes: Sequence[bytes], lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for hi > lo, by the recursive definition (ranges instead of slices: no copies)."""
    n = hi - lo
    if n == 1:
        return hashes[lo]
    k = _split(n)
    return node_hash(_mth(hashes, lo, lo + k), _mth(hashes, lo + k, hi))


def root(leaf_hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash of a list of leaf hashes (RFC 9162 §2.1.1).

    Kept to the recursive definition on purpose: TreeBuilder computes the same root another way,
    and the tests compare the two.
    """
    return _mth(leaf_hashes, 0, len(leaf_hashes)) if leaf_hashes else EMPTY_ROOT


Subtree = Callable[[int, int], bytes]
"""MTH(D[lo:hi]) for a range of leaves: from the leaves themselves, or from stored tiles."""


def inclusion_proof(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) of RFC 9162 §2.1.3.1: the sibling hashes from the leaf up to the root.

    O(n) hashes, from the leaves: for tests and small trees; a log serves proofs from stored tiles
    (`inclusion_path` with a `Subtree` that reads them).
    """
    return inclusion_path(index, len(leaf_hashes), partial(_mth, leaf_hashes))


def inclusion_path(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """PATH(index, D[size]) with every subtree hash taken from `subtree`."""
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of {size} leaves")
    top_down: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:
        k = _split(hi - lo)
        if index < lo + k:
            top_down.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            top_down.append(subtree(lo, lo + k))
            lo += k
    return top_down[::-1]  # the proof lists the lowest sibling first


def consistency_proof(old_size: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 §2.1.4.1, for 0 < m <= n (empty when m == n). O(n) hashes."""
    return consistency_path(old_size, len(leaf_hashes), partial(_mth, leaf_hashes))


def consistency_path(old_size: int, size: int, subtree: Subtree) -> list[bytes]:
    """PROOF(old_size, D[size]) with every subtree hash taken from `subtree`."""
    if old_size == size:
        return []
    if not 0 < old_size < size:
        raise ValueError(f"no consistency proof from size {old_size} to size {size}")
    top_down: list[bytes] = []
    lo, hi, m = 0, size, old_size
    whole = True  # SUBPROOF's flag: is D[lo:lo+m] the complete old tree (whose root the verifier has)?
    while m != hi - lo:
        k = _split(hi - lo)
        if m <= k:
            top_down.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            top_down.append(subtree(lo, lo + k))
            lo, m, whole = lo + k, m - k, False
    if not whole:
        top_down.append(subtree(lo, hi))
    return top_down[::-1]


Node = Callable[[int, int], bytes]
"""The hash of the perfect subtree (level, index): MTH(D[index * 2**level : (index + 1) * 2**level])."""


def range_hash(lo: int, hi: int, node: Node) -> bytes:
    """MTH(D[lo:hi]) from the hashes of perfect subtrees: the RFC's split until each part is one.

    A log stores only complete subtrees (tiles); this is how the right edge of a tree whose size
    is not a power of two, and so every root and proof hash, comes out of them.
    """
    n = hi - lo
    if n <= 0:
        raise ValueError(f"no subtree over the empty range [{lo}, {hi})")
    if n & (n - 1) == 0 and lo % n == 0:
        level = n.bit_length() - 1
        return node(level, lo >> level)
    k = _split(n)
    return node_hash(range_hash(lo, lo + k, node), range_hash(lo + k, hi, node))


def nodes_needed(paths: Callable[[Subtree], object]) -> set[tuple[int, int]]:
    """The perfect subtrees (level, index) that `paths(subtree)` reads: run it once on placeholders.

    Lets a reader fetch everything a proof or root needs in one query before computing it.
    """
    needed: set[tuple[int, int]] = set()

    def record(level: int, index: int) -> bytes:
        needed.add((level, index))
        return EMPTY_ROOT

    paths(lambda lo, hi: range_hash(lo, hi, record))
    return needed


def tile_of(level: int, index: int) -> tuple[int, int, int, int]:
    """Where tiles keep node (level, index): (tile level, tile index, first hash, hash count).

    Tiles store the levels that are multiples of TILE_HEIGHT; a node between them is the hash
    of 2**r consecutive stored hashes of one tile (r = level mod 8), which `range_hash` folds.
    """
    tile_level, r = divmod(level, TILE_HEIGHT)
    first = index << r
    return tile_level, first >> TILE_HEIGHT, first % TILE_WIDTH, 1 << r


def entry_bundle(entries: Iterable[bytes]) -> bytes:
    """A tlog-tiles entry bundle: each entry's bytes after its big-endian uint16 length."""
    out = bytearray()
    for entry in entries:
        if len(entry) > 0xFFFF:
            raise ValueError(f"an entry of {len(entry)} bytes does not fit a bundle's 2-byte length")
        out += len(entry).to_bytes(2, "big")
        out += entry
    return bytes(out)


def parse_entry_bundle(bundle: bytes) -> list[bytes]:
    entries, i = [], 0
    while i < len(bundle):
        if i + 2 > len(bundle):
            raise ValueError("an entry bundle ends inside a length")
        n = int.from_bytes(bundle[i : i + 2], "big")
        if i + 2 + n > len(bundle):
            raise ValueError("an entry bundle ends inside an entry")
        entries.append(bundle[i + 2 : i + 2 + n])
        i += 2 + n
    return entries


def _check_hash(what: str, value: object) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        size = len(value) if isinstance(value, bytes) else type(value).__name__
        raise ProofError(f"{what} must be {HASH_SIZE} bytes, got {size}")


def verify_inclusion(index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Check that `leaf_hash` is leaf `index` of the tree of `size` leaves whose hash is `root`.

    The algorithm of RFC 9162 §2.1.3.2: walk up from the leaf, taking each proof hash as the
    left or right sibling by the bits of the index (fn) and of the last index (sn). Raises
    ProofError, never returns False.
    """
    _check_hash("leaf hash", leaf_hash)
    _check_hash("root hash", root)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is not in a tree of size {size}")
    fn, sn, r = index, size - 1, leaf_hash
    for p in proof:
        if sn == 0:
            raise ProofError(f"proof has {len(proof)} hashes, more than the path from leaf {index} to the root")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            # On the right edge, levels where the node has no right sibling add no proof hash.
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError(f"proof has {len(proof)} hashes, fewer than the path from leaf {index} to the root")
    if r != root:
        raise ProofError(f"leaf {index} with this proof leads to another root than the tree of size {size}")


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """Check that the tree (`new_size`, `new_root`) extends the tree (`old_size`, `old_root`).

    The algorithm of RFC 9162 §2.1.4.2 for 0 < old_size < new_size. Outside that range:
    equal sizes need an empty proof and equal roots (and the empty tree's root is EMPTY_ROOT);
    a proof from the empty tree to a larger one is refused, as in the transparency-dev vectors,
    because it would prove nothing (a caller that holds no tree yet has nothing to check).
    Equal non-zero sizes compare the roots as given, without judging their length: the vectors
    require it, and a checkpoint's root is checked for 32 bytes where it is parsed.
    """
    if not 0 <= old_size <= new_size:
        raise ProofError(f"old size {old_size} is not between 0 and the new size {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError(f"sizes are equal ({old_size}) but the proof is not empty")
        if old_size == 0 and (old_root != EMPTY_ROOT or new_root != EMPTY_ROOT):
            raise ProofError("a tree of size 0 has the root SHA-256(empty string)")
        if old_root != new_root:
            raise ProofError(f"sizes are equal ({old_size}) but the roots differ")
        return
    if old_size == 0:
        raise ProofError("a consistency proof from the empty tree proves nothing")
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    for i, p in enumerate(proof):
        _check_hash(f"proof[{i}]", p)
    if not proof:
        raise ProofError(f"empty proof from size {old_size} to size {new_size}")
    # When the old tree is a perfect subtree, its root is the starting node and the proof omits it.
    path = [old_root, *proof] if old_size & (old_size - 1) == 0 else list(proof)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:  # skip the levels where the old tree's last node is a right child of a complete pair
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError(f"proof has {len(proof)} hashes, more than a proof from {old_size} to {new_size} needs")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)  # a node only the new tree has
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError(f"proof has {len(proof)} hashes, fewer than a proof from {old_size} to {new_size} needs")
    if fr != old_root:
        raise ProofError(f"the proof does not lead to the old root (size {old_size})")
    if sr != new_root:
        raise ProofError(f"the proof does not lead to the new root (size {new_size})")


class TreeBuilder:
    """A compact range [0, size): the roots of the perfect subtrees along the tree's right edge.

    One hash per set bit of `size` (O(log n) memory), largest subtree first. Appending a leaf
    merges it with equal-height subtrees, as binary addition carries, so each append costs one
    node hash on average. A worker following the log keeps this in memory (or stores `size` and
    `edge` to resume) instead of re-reading every leaf to compute a root.
    """

    __slots__ = ("_size", "_edge")

    def __init__(self, size: int = 0, edge: Sequence[bytes] = ()) -> None:
        if size < 0 or len(edge) != size.bit_count():
            raise ValueError(f"a tree of size {size} has {max(size, 0).bit_count()} edge hashes, got {len(edge)}")
        for i, h in enumerate(edge):
            if not isinstance(h, bytes) or len(h) != HASH_SIZE:
                raise ValueError(f"edge[{i}] must be {HASH_SIZE} bytes")
        self._size = size
        self._edge = list(edge)

    @property
    def size(self) -> int:
        return self._size

    @property
    def edge(self) -> tuple[bytes, ...]:
        """The state to store to resume later: TreeBuilder(size, edge)."""
        return tuple(self._edge)

    def append(self, leaf_hash: bytes) -> list[tuple[int, int, bytes]]:
        """Add the next leaf; return the subtrees it completed as (level, index, hash).

        Level is the height in the tree (0 = the leaf itself) and index the node's position at
        that level, so node (level, i) is MTH(D[i * 2**level : (i + 1) * 2**level]). Tile writers
        keep the levels that are multiples of TILE_HEIGHT: hash j of tile (L, N) is node
        (8 * L, 256 * N + j), and the tile is full once node (8 * L, 256 * N + 255) is emitted.
        """
        if not isinstance(leaf_hash, bytes) or len(leaf_hash) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes")
        index = self._size
        completed = [(0, index, leaf_hash)]
        edge, h, level = self._edge, leaf_hash, 0
        while index & 1:  # a right child: its left sibling is the smallest subtree on the edge
            h = _sha256(b"\x01" + edge.pop() + h).digest()
            level += 1
            index >>= 1
            completed.append((level, index, h))
        edge.append(h)
        self._size += 1
        return completed

    def root(self) -> bytes:
        """MTH of the leaves so far: fold the edge from the smallest subtree up."""
        if not self._edge:
            return EMPTY_ROOT
        r = self._edge[-1]
        for h in reversed(self._edge[:-1]):
            r = node_hash(h, r)
        return r


def _index_elements(index: int) -> str:
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < _MAX_INDEX:
        raise ValueError(f"a tile index is an int in [0, 2**64), got {index!r}")
    groups = [f"{index % 1000:03d}"]
    index //= 1000
    while index:
        groups.append(f"x{index % 1000:03d}")
        index //= 1000
    return "/".join(reversed(groups))


def _width_suffix(width: int | None) -> str:
    if width is None:
        return ""
    if not isinstance(width, int) or isinstance(width, bool) or not 1 <= width < TILE_WIDTH:
        raise ValueError(f"a partial tile's width is 1..255 (None for a full tile), got {width!r}")
    return f".p/{width}"


def tile_path(level: int, index: int, width: int | None = None) -> str:
    """`tile/<L>/<N>[.p/<W>]`, e.g. tile_path(0, 1234067) == "tile/0/x001/x234/067"."""
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= MAX_TILE_LEVEL:
        raise ValueError(f"a tile level is 0..{MAX_TILE_LEVEL}, got {level!r}")
    return f"tile/{level}/{_index_elements(index)}{_width_suffix(width)}"


def entries_path(index: int, width: int | None = None) -> str:
    """`tile/entries/<N>[.p/<W>]`: the bundle of the entries under level-0 tile N."""
    return f"tile/entries/{_index_elements(index)}{_width_suffix(width)}"


# ASCII digits only ([0-9], not \d, which matches other scripts' digits too); `fullmatch` leaves no
# room for a trailing newline, slash or empty element. The repetition bounds keep hostile paths
# cheap: 7 elements of N already exceed 2**64, 2 digits of L exceed 63, 3 digits of W exceed 255.
_TILE_PATH = re.compile(r"tile/(entries|0|[1-9][0-9]?)/((?:x[0-9]{3}/){0,6})([0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?")


def parse_tile_path(path: str) -> tuple[int | Literal["entries"], int, int | None]:
    """Parse `tile/<L>/<N>[.p/<W>]` or `tile/entries/<N>[.p/<W>]` to (level or "entries", index, width).

    Rules from the spec: L and W are decimal with no leading zeroes, L in 0..63, W in 1..255;
    N is zero-padded 3-digit elements, all but the last prefixed with `x`. Assumed, since the spec
    only shows the encoding: N must be in its one canonical form, so a leading all-zero element
    (`x000/...`) is refused (two paths for one tile would defeat caching and storage by path),
    and N < 2**64 (tree sizes are uint64). The path is relative: no URL prefix, no leading slash.
    """
    if not isinstance(path, str) or (match := _TILE_PATH.fullmatch(path)) is None:
        raise ValueError(f"not a tile path: {path!r}")
    level_text, prefixes, last, width_text = match.groups()
    groups = [g[1:] for g in prefixes.split("/") if g] + [last]
    if len(groups) > 1 and groups[0] == "000":
        raise ValueError(f"tile index has a leading zero element: {path!r}")
    index = int("".join(groups))
    if index >= _MAX_INDEX:
        raise ValueError(f"tile index is 2**64 or more: {path!r}")
    level: int | Literal["entries"] = "entries" if level_text == "entries" else int(level_text)
    if level != "entries" and level > MAX_TILE_LEVEL:
        raise ValueError(f"tile level is above {MAX_TILE_LEVEL}: {path!r}")
    width = None if width_text is None else int(width_text)
    if width is not None and width >= TILE_WIDTH:
        raise ValueError(f"partial tile width is above 255: {path!r}")
    return level, index, width
