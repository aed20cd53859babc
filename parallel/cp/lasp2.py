"""LASP-2: context parallelism for linear attention with ONE all-gather of d×d states per direction.

Implemented from the math in docs/algorithms.md §2, not from the released Linear-MoE code (which drops
the intra term, leaks future tokens, ignores decay and assumes the contiguous layout).

Forward, per rank: local chunk states M_c (and, for per-token decay, transitions Γ_c) -> start an
asynchronous all-gather -> run the local kernel with a zero state while it is in flight -> wait ->
fp32 prefix chain over all chunks in global order -> add the inter term scale·(q ⊙ e^G) S_in.
Backward: state gradients dM_c -> one asynchronous all-gather -> local gradients of the outputs
while it is in flight -> wait -> fp32 suffix chain -> gradients through this rank's final states.
Bytes per rank and direction: (P-1)·slots·B·H·Dk·Dv·4 (+ (P-1)·slots·B·H·4 forward for per-token
decay), independent of the sequence length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import AllGatherComm
from .layout import chunk_index, local_chunk_index
from .linear import ChunkStateExchange, lasp_op
from .merge import decayed_prefix_chain, decayed_suffix_chain


class GatheredStateExchange(ChunkStateExchange):
    """The LASP-2 scheme: every rank gathers every chunk's state and runs the chain itself."""

    chain_transitions: torch.Tensor | None = None  # Γ of every chunk in global order, from the forward's finish
    state_shape: torch.Size | None = None  # [S, B, H, Dk, Dv]

    def open_comm(self, group: dist.ProcessGroup) -> AllGatherComm:
        return AllGatherComm(group)

    def _global_order(self, gathered: torch.Tensor) -> torch.Tensor:
        """[P, S, ...] -> [N, ...] in global chunk order."""
        flat = gathered.reshape(-1, *gathered.shape[2:])
        return flat[chunk_index(self.setup.world_size, self.setup.layout, flat.device)]

    def _mine(self, chunks: torch.Tensor) -> torch.Tensor:
        """[N, ...] in global chunk order -> this rank's chunks [S, ...] (cached index, no copy per call)."""
        return chunks[local_chunk_index(self.setup.rank, self.setup.world_size, self.setup.layout, chunks.device)]

    def start_forward(self, states: torch.Tensor, transitions: torch.Tensor | None) -> None:
        self.state_shape = states.shape  # [S, B, H, Dk, Dv]
        buffer = states.flatten(-2)  # [S, B, H, Dk·Dv]
        if transitions is not None:  # per-token decay: Γ rides in the same gather, one extra element
            buffer = torch.cat([buffer, transitions.to(buffer.dtype)[..., None]], dim=-1)
        self.comm.start(buffer)

    def finish_forward(self) -> torch.Tensor:
        ordered = self._global_order(self.comm.wait())  # [N, B, H, Dk·Dv (+1)]
        _, batch, heads, key_dim, value_dim = self.state_shape
        states = ordered[..., : key_dim * value_dim].reshape(-1, batch, heads, key_dim, value_dim)
        if self.setup.decay_kind == "token":
            self.chain_transitions = ordered[..., -1].clone()  # [N, B, H], without keeping the gathered states
        elif self.setup.decay_kind == "constant":
            # every chunk has the same length m, so Γ = exp(m·g) for all of them: [1, 1, H] -> [N, 1, H]
            gamma = torch.exp(self.chunk_length * self.constant_log_decay.to(states.dtype))
            self.chain_transitions = gamma[None, None, :].expand(states.shape[0], 1, heads)
        if self.documents is not None:  # every rank knows where documents start: a start cuts the chain
            keep = self.documents.keep.to(states.dtype)[..., None]  # [N, B, 1]
            self.chain_transitions = keep if self.chain_transitions is None else self.chain_transitions * keep
        incoming = decayed_prefix_chain(states, self.chain_transitions)
        return self._mine(incoming)

    def start_backward(self, state_grads: torch.Tensor) -> None:
        self.comm.start(state_grads.contiguous())

    def finish_backward(self) -> torch.Tensor:
        ordered = self._global_order(self.comm.wait())  # [N, B, H, Dk, Dv]
        return self._mine(decayed_suffix_chain(ordered, self.chain_transitions))


lasp2 = lasp_op("lasp2", GatheredStateExchange, "zigzag",
               "Causal linear attention with decay over a context-parallel group (LASP-2).")
