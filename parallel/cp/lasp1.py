"""LASP-1: the ring baseline for linear attention (docs/algorithms.md §2).

The state walks the chunks in global order: the owner of chunk c receives S_in(c) from the owner of
chunk c-1, computes S_out(c) = Γ_c·S_in(c) + M_c and hands it to the owner of chunk c+1. Backward
walks the other way with the state gradient: T_{c-1} = dM_c + Γ_c·T_c. Same bytes per hop as
LASP-2's gather, but the hops are dependent, so a layer pays P-1 (contiguous) or 2(P-1) (zigzag:
up the ranks for the first half of the chunks, back down for the second) serial latencies.

It shares everything but the exchange with LASP-2 (linear.py): the local states, the overlapped
local kernel call and the gradient assembly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import RingComm
from .layout import chunk_order
from .linear import ChunkStateExchange, DocumentChunks, LinearSetup, linear_context_parallel
from .merge import apply_transition


class ChainedStateExchange(ChunkStateExchange):
    """The LASP-1 scheme: point-to-point hand-over of the running state between chunk owners."""

    def __init__(
        self, group: dist.ProcessGroup, setup: LinearSetup, log_decay: torch.Tensor | None, chunk_length: int,
        documents: DocumentChunks | None = None,
    ) -> None:
        super().__init__(setup, log_decay, chunk_length, documents)
        self.comm = RingComm(group) if setup.world_size > 1 else None
        self.owners = chunk_order(setup.world_size, setup.layout)  # (rank, slot) per global chunk
        self.transitions: torch.Tensor | None = None  # this rank's Γ per slot: [S, B, H] or [S, 1, H]
        self.states: torch.Tensor | None = None
        self.state_grads: torch.Tensor | None = None

    def _exchange(self, tensor: torch.Tensor | None, peer: int, like: torch.Tensor) -> torch.Tensor | None:
        """Send `tensor` to `peer` (if given) or receive one shaped like `like` from it."""
        offset = peer - self.setup.rank
        if tensor is not None:
            self.comm.send(tensor, offset)
            received = None
        else:
            received = self.comm.recv(like, offset)
        self.comm.commit()
        self.comm.wait()
        return received

    def _slot_transitions(self, states: torch.Tensor, transitions: torch.Tensor | None) -> torch.Tensor | None:
        if transitions is None and self.constant_log_decay is not None:
            gamma = torch.exp(self.chunk_length * self.constant_log_decay.to(states.dtype))  # [H]
            transitions = gamma[None, None, :].expand(states.shape[0], 1, -1)
        if self.documents is not None:  # a document start inside a chunk cuts the chain there
            keep = self.documents.keep[self.documents.mine].to(states.dtype)[..., None]  # [S, B, 1]
            transitions = keep if transitions is None else transitions * keep
        return transitions

    def start_forward(self, states: torch.Tensor, transitions: torch.Tensor | None) -> None:
        # nothing can be sent before the incoming state arrives; the chain runs in finish_forward
        self.states = states
        self.transitions = self._slot_transitions(states, transitions)

    def finish_forward(self) -> torch.Tensor:
        states, rank = self.states, self.setup.rank
        incoming = torch.zeros_like(states)
        carried = None
        for chunk, (owner, slot) in enumerate(self.owners):
            if owner != rank:
                continue
            if chunk > 0:
                previous_owner = self.owners[chunk - 1][0]
                incoming[slot] = carried if previous_owner == rank else self._exchange(None, previous_owner, states[slot])
            outgoing = apply_transition(incoming[slot], self.transitions, slot) + states[slot]
            if chunk + 1 < len(self.owners):
                next_owner = self.owners[chunk + 1][0]
                if next_owner == rank:
                    carried = outgoing
                else:
                    self._exchange(outgoing, next_owner, outgoing)
        self.states = None
        return incoming

    def start_backward(self, state_grads: torch.Tensor) -> None:
        self.state_grads = state_grads

    def finish_backward(self) -> torch.Tensor:
        grads, rank = self.state_grads, self.setup.rank
        final_grads = torch.zeros_like(grads)
        carried = None
        last = len(self.owners) - 1
        for chunk in range(last, -1, -1):
            owner, slot = self.owners[chunk]
            if owner != rank:
                continue
            if chunk < last:
                next_owner = self.owners[chunk + 1][0]
                final_grads[slot] = carried if next_owner == rank else self._exchange(None, next_owner, grads[slot])
            if chunk > 0:
                # gradient of the incoming state = the previous chunk's final-state gradient
                outgoing = grads[slot] + apply_transition(final_grads[slot], self.transitions, slot)
                previous_owner = self.owners[chunk - 1][0]
                if previous_owner == rank:
                    carried = outgoing
                else:
                    self._exchange(outgoing, previous_owner, outgoing)
        self.state_grads = None
        return final_grads


def lasp1(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    layout: str = "contiguous",
    log_decay: torch.Tensor | None = None,
    scale: float | None = None,
    delay: int = 0,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal linear attention with decay over a CP group, passing the state rank to rank (LASP-1).

    Same arguments, semantics and result as `lasp2` (see there); the default layout is "contiguous"
    (one pass up the ranks). "zigzag" works too, at twice the serial hops. cu_seqlens (packed
    documents of the GLOBAL batch): as in `lasp2`.
    """
    return linear_context_parallel(lasp1, ChainedStateExchange, q, k, v, group, layout=layout, log_decay=log_decay,
                                   scale=scale, delay=delay, cu_seqlens=cu_seqlens)
