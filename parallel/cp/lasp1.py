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

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from .comm import RingComm
from .layout import chunk_order
from .linear import ChunkStateExchange, lasp_op
from .merge import apply_transition


class ChainedStateExchange(ChunkStateExchange):
    """The LASP-1 scheme: point-to-point hand-over of the running state between chunk owners."""

    transitions: torch.Tensor | None = None  # this rank's Γ per slot: [S, B, H] or [S, 1, H]
    states: torch.Tensor | None = None  # from start_forward to finish_forward
    state_grads: torch.Tensor | None = None  # from start_backward to finish_backward

    def open_comm(self, group: dist.ProcessGroup) -> RingComm | None:
        return RingComm(group) if self.setup.world_size > 1 else None

    @functools.cached_property
    def owners(self) -> list[tuple[int, int]]:
        """(rank, slot) of every chunk, in global order."""
        return chunk_order(self.setup.world_size, self.setup.layout)

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
        states = self.states
        self.states = None
        # S_in(c+1) = Γ_c·S_in(c) + M_c, up the chunks
        return self._relay(range(len(self.owners)), states,
                           lambda slot, incoming: apply_transition(incoming, self.transitions, slot) + states[slot])

    def start_backward(self, state_grads: torch.Tensor) -> None:
        self.state_grads = state_grads

    def finish_backward(self) -> torch.Tensor:
        grads = self.state_grads
        self.state_grads = None
        # T_(c-1) = dM_c + Γ_c·T_c, down the chunks (the gradient of S_in(c) is the previous chunk's T)
        return self._relay(range(len(self.owners) - 1, -1, -1), grads,
                           lambda slot, final: grads[slot] + apply_transition(final, self.transitions, slot))

    def _relay(self, walk: range, values: torch.Tensor,
               step: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Pass a running value along the chunks in `walk` order; what this rank's chunks receive, by slot.

        Each chunk of this rank receives the value of the chunk before it in the walk (from that chunk's
        owner, or carried here when this rank owns both) and hands `step(slot, received)` to the next
        one's owner. `values` gives the shape of the received tensors ([S, B, H, Dk, Dv]).
        """
        rank = self.setup.rank
        received = torch.zeros_like(values)
        carried = None
        for position, chunk in enumerate(walk):
            owner, slot = self.owners[chunk]
            if owner != rank:
                continue
            if position > 0:
                sender = self.owners[walk[position - 1]][0]
                received[slot] = carried if sender == rank else self._exchange(None, sender, values[slot])
            if position + 1 < len(walk):
                outgoing, receiver = step(slot, received[slot]), self.owners[walk[position + 1]][0]
                if receiver == rank:
                    carried = outgoing
                else:
                    self._exchange(outgoing, receiver, outgoing)
        return received


lasp1 = lasp_op(
    "lasp1", ChainedStateExchange, "contiguous",
    "Causal linear attention with decay over a CP group, passing the state rank to rank (LASP-1).\n\n"
    "Same semantics and result as `lasp2`; the default layout is \"contiguous\" (one pass up the ranks).\n"
    "\"zigzag\" works too, at twice the serial hops.")
