"""Context parallelism: sequence layouts, communication objects, LASP-2 / LASP-1 for linear attention,
all-gather / ring / Ulysses softmax attention,
sliding-window attention and delayed linear attention over a halo exchange (RAttention).

Every op takes this rank's shard of the sequence (in the given layout) and the CP process group,
derives rank and world size from that group, is differentiable, and equals the single-device op on
the unsharded tensors. See docs/design.md ("Public API") and docs/algorithms.md §2-§3.
"""

from .allgather import allgather_attention
from .comm import AllGatherComm, CommStats, RingComm, comm_stats, record_comm, reset_comm_stats
from .halo import halo_exchange, halo_exchange_many
from .lasp1 import lasp1
from .lasp2 import lasp2
from .layout import LAYOUTS, layout_positions, local_positions, shard, unshard
from .merge import decayed_prefix_chain, decayed_suffix_chain, merge_attention_block
from .ring import ring_attention
from .ulysses import ulysses_attention
from .window import delayed_lasp, rattention_branches, window_attention

__all__ = [
    "LAYOUTS",
    "AllGatherComm",
    "CommStats",
    "RingComm",
    "allgather_attention",
    "comm_stats",
    "decayed_prefix_chain",
    "decayed_suffix_chain",
    "delayed_lasp",
    "halo_exchange",
    "halo_exchange_many",
    "lasp1",
    "lasp2",
    "layout_positions",
    "local_positions",
    "merge_attention_block",
    "rattention_branches",
    "record_comm",
    "reset_comm_stats",
    "ring_attention",
    "shard",
    "ulysses_attention",
    "unshard",
    "window_attention",
]
