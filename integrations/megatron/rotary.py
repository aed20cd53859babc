"""RoPE tables of Megatron-core's GPTModel on a CPU-only machine.

Megatron-core's RotaryEmbedding moves its frequencies to ``torch.cuda.current_device()`` on first
use and slices them per CP rank through a CUDA tensor, so a GPTModel with
``position_embedding_type="rope"`` cannot run its forward without a GPU. ``use_host_rotary(model)``
swaps the model's rotary module for one that computes the same table on the device its frequencies
live on and takes this rank's CP slice with spindle's ``shard`` (Megatron's load-balanced split is
spindle's "zigzag" layout). Not needed, and best not used, on GPUs.
"""

from __future__ import annotations

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from spindle.parallel.cp import shard

from .core_attention import MEGATRON_LAYOUT


class HostRotaryEmbedding(RotaryEmbedding):
    """Megatron's RotaryEmbedding, computed where ``inv_freq`` lives (CPU included)."""

    def forward(  # type: ignore[override]
        self,
        max_seq_len: int,
        offset: int = 0,
        packed_seq: bool = False,
        cp_group: torch.distributed.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """[max_seq_len / cp, 1, 1, rotary_dim]: this rank's rows of the angle table, in CP order."""
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, rotary_dim / 2]
        if self.rotary_interleaved:
            table = torch.stack((freqs, freqs), dim=-1).reshape(freqs.shape[0], -1)
        else:
            table = torch.cat((freqs, freqs), dim=-1)
        table = table[:, None, None, :]
        group = cp_group if cp_group is not None else self.cp_group
        if group is not None and group.size() > 1 and not packed_seq:
            table = shard(table, group, layout=MEGATRON_LAYOUT, dim=0)
        return table


def use_host_rotary(model: torch.nn.Module) -> int:
    """Make every Megatron RotaryEmbedding inside `model` a HostRotaryEmbedding; returns how many.

    Call it once after building a GPTModel that will run on CPU (the module keeps its state; only
    its class changes). Raises ValueError if the model has no rotary embedding.
    """
    swapped = 0
    for module in model.modules():
        if type(module) is RotaryEmbedding:
            module.__class__ = HostRotaryEmbedding
            swapped += 1
        elif isinstance(module, HostRotaryEmbedding):
            swapped += 1
    if swapped == 0:
        raise ValueError(
            "use_host_rotary: the model has no Megatron RotaryEmbedding; it is only needed for "
            "GPTModel(..., position_embedding_type='rope') running on CPU"
        )
    return swapped
