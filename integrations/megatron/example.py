"""Train a small Megatron-core GPTModel whose layers come from spindle's ``hybrid_block_spec``, dp × cp.

    # CPU, gloo, 4 processes: cp=2 × dp=2
    torchrun --nproc-per-node 4 -m spindle.integrations.megatron.example --cp 2 --device cpu
    # GPUs, NCCL: cp=4 × dp=2 on 8 GPUs
    torchrun --nproc-per-node 8 -m spindle.integrations.megatron.example --cp 4 --device cuda

Each step: a global batch of synthetic sequences is split over the data-parallel ranks, every
sequence over the context-parallel ranks with Megatron's ``get_batch_on_this_cp_rank``; the GPTModel
returns per-token losses of this rank's tokens; the gradient of the global mean loss is summed over
the data × context group. ``--run-dir DIR`` saves model and optimizer at the end through spindle's
checkpointer (torch DCP shards keyed by parameter name, a signed manifest, an atomic commit) and
resumes from there (``--resume auto``), also onto a different cp × dp split.
"""

from __future__ import annotations

import argparse
import datetime
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import get_batch_on_this_cp_rank

from spindle.integrations.megatron import hybrid_block_spec, use_host_rotary
from spindle.parallel.layout import ParallelDegrees
from spindle.runtime.checkpoint import Checkpointer


@dataclass
class Settings:
    """What the example trains (small enough for CPU processes)."""

    pattern: str = "LLLA"
    layers: int = 4
    hidden: int = 32
    heads: int = 4
    query_groups: int = 2
    ffn: int = 64
    vocab: int = 64
    seq_len: int = 32
    global_batch: int = 4
    steps: int = 4
    lr: float = 3e-3
    cp_linear: str = "lasp2"
    cp_softmax: str = "allgather"
    linear_decay: str = "constant"
    window: int = 8
    """Sliding window of R (RAttention) and S (sliding-window attention) layers, in tokens."""
    seed: int = 0
    device: str = "cpu"


def build_model(settings: Settings) -> GPTModel:
    """A GPTModel with spindle's hybrid block spec; identical weights on every rank (seeded CPU init)."""
    config = TransformerConfig(
        num_layers=settings.layers, hidden_size=settings.hidden, num_attention_heads=settings.heads,
        num_query_groups=settings.query_groups, ffn_hidden_size=settings.ffn,
        context_parallel_size=parallel_state.get_context_parallel_world_size(),
        normalization="RMSNorm", gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True)
    spec = hybrid_block_spec(settings.pattern, config=config, cp_linear=settings.cp_linear,
                             cp_softmax=settings.cp_softmax, linear_decay=settings.linear_decay,
                             window=settings.window)
    torch.manual_seed(settings.seed)
    model = GPTModel(config, spec, vocab_size=settings.vocab, max_sequence_length=settings.seq_len,
                     position_embedding_type="rope", pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    if settings.device == "cpu":
        use_host_rotary(model)  # Megatron's RoPE table calls torch.cuda otherwise
    return model.to(settings.device)


def global_batch(settings: Settings, step: int) -> dict[str, torch.Tensor]:
    """Synthetic sequences of step `step` (the same on every rank): a repeated random motif, learnable."""
    generator = torch.Generator().manual_seed(settings.seed * 100_003 + step)
    motif = torch.randint(0, settings.vocab, (settings.global_batch, 8), generator=generator)
    tokens = motif.repeat(1, settings.seq_len // 8 + 2)[:, : settings.seq_len + 1]
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
            "position_ids": torch.arange(settings.seq_len).expand(settings.global_batch, -1)}


def local_batch(batch: dict[str, torch.Tensor], settings: Settings) -> dict[str, torch.Tensor]:
    """This rank's rows (data-parallel split) and tokens (Megatron's context-parallel split)."""
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    if settings.global_batch % dp_size:
        raise ValueError(f"global batch {settings.global_batch} is not divisible by the data-parallel size {dp_size}")
    rows = settings.global_batch // dp_size
    mine = {key: value[dp_rank * rows:(dp_rank + 1) * rows].contiguous() for key, value in batch.items()}
    mine = get_batch_on_this_cp_rank(mine, parallel_state.get_context_parallel_group())
    return {key: value.to(settings.device) for key, value in mine.items()}


def train_step(model: GPTModel, optimizer: torch.optim.Optimizer, settings: Settings, step: int) -> torch.Tensor:
    """One step on the global batch; returns the global mean loss (a tensor: no host sync here)."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    batch = local_batch(global_batch(settings, step), settings)
    per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])  # [b, s_local]
    # Every rank holds the same number of tokens: the global mean is the sum of local sums / N.
    loss = per_token.sum() / (settings.global_batch * settings.seq_len)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for parameter in model.parameters():
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, group=group)
    optimizer.step()
    reported = loss.detach().clone()
    dist.all_reduce(reported, group=group)
    return reported


def make_optimizer(model: GPTModel, settings: Settings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)


def make_checkpointer(run_dir: str, settings: Settings, model: GPTModel,
                      optimizer: torch.optim.Optimizer) -> Checkpointer:
    """spindle's checkpointer over the Megatron model: DCP shards keyed by parameter name, so a run
    resumes onto another cp × dp split; a signed manifest; an atomic commit."""
    degrees = ParallelDegrees(dp=parallel_state.get_data_parallel_world_size(),
                              cp=parallel_state.get_context_parallel_world_size(), tp=1)
    sections = {
        "model": {key: value for key, value in asdict(settings).items() if key not in ("steps", "device")},
        "train": {"global_batch": settings.global_batch, "seed": settings.seed},
        "checkpoint": {"every": 0, "keep": 2, "async_save": False},
    }
    return Checkpointer(run_dir, sections, model, optimizer, degrees=degrees)


def train(settings: Settings, *, run_dir: str | None = None, resume: str = "never") -> list[float]:
    """Build, resume from `run_dir` (resume="auto" or a checkpoint path), train `settings.steps` steps,
    save to `run_dir`; returns the per-step global losses."""
    model = build_model(settings)
    optimizer = make_optimizer(model, settings)
    checkpointer = make_checkpointer(run_dir, settings, model, optimizer) if run_dir else None
    first_step = 0
    if checkpointer is not None:
        resumed = checkpointer.restore(resume)
        first_step = 0 if resumed is None else resumed.step
    losses = [train_step(model, optimizer, settings, step) for step in range(first_step, first_step + settings.steps)]
    if checkpointer is not None:
        last = first_step + settings.steps
        checkpointer.save(last, data_cursor=last * settings.global_batch)
        checkpointer.close()
    return [float(loss) for loss in losses]  # host sync once, after the loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cp", type=int, default=2, help="context-parallel size (must divide the world size)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pattern", default=Settings.pattern, help="layer pattern, e.g. LLLA or LRLA")
    parser.add_argument("--layers", type=int, default=Settings.layers, help="number of layers (pattern repeats)")
    parser.add_argument("--window", type=int, default=64, help="sliding window of R and S layers (tokens)")
    parser.add_argument("--cp-linear", default=Settings.cp_linear, choices=("lasp2", "lasp1"))
    parser.add_argument("--cp-softmax", default=Settings.cp_softmax, choices=("allgather", "ring", "ulysses"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--run-dir", default=None, help="checkpoint directory: resumed from (--resume) and saved to")
    parser.add_argument("--resume", default="auto", help="'auto' (latest checkpoint of --run-dir), 'never' or a path")
    args = parser.parse_args()
    settings = Settings(pattern=args.pattern, layers=args.layers, window=args.window, cp_linear=args.cp_linear,
                        cp_softmax=args.cp_softmax, steps=args.steps, seq_len=args.seq_len, device=args.device)
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=datetime.timedelta(minutes=10))
    parallel_state.initialize_model_parallel(context_parallel_size=args.cp)
    losses = train(settings, run_dir=args.run_dir, resume=args.resume)
    if dist.get_rank() == 0:
        for number, loss in enumerate(losses):
            print(f"step {number:4d} of this run  loss {loss:.5f}")
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
