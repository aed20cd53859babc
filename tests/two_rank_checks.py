"""One 2-rank gloo run shared by several test files (starting ranks dominates small tests on 2 cores).

`results()` spawns once per pytest process and returns, from rank 0:
- "syncs": host-reading Tensor calls from our code per CP op and per cp=2 training step (sync_guard.py);
- "validate_calls": signature gathers of one CP op with SPINDLE_DEBUG_CHECKS=1 on a fresh group, then
  on new shapes, the same shapes again, and with the switch;
- "checkpointing": losses, step-1 gradients and mixer forward counts of cp=2 training per
  activation-checkpointing policy;
- "block_bytes": live bytes one L block keeps from forward to backward, with and without
  checkpointing, with LASP-2 over the group and with the single-device kernel on the same local tokens;
- "bench": the rows of `spindle bench cp` for a small case (benchmarks/cp.py's rank worker).
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

import torch

from distributed_utils import run_distributed

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
CP_OPS = ("lasp2", "lasp1", "ring", "allgather", "ulysses", "window", "rattention")
POLICIES = ("none", "full", "linear", "softmax")
STEPS = 2
BENCH_ARGS = argparse.Namespace(lengths=[64], methods=["lasp2", "lasp1", "ring", "allgather"], layout="zigzag",
                                batch=1, heads=2, kv_heads=2, dim=8, warmup=0, repeats=2)


def tiny_setup(cp: int, context, overrides: list[str]):
    """(config, model, optimizer, batches) of configs/tiny.yaml in fp32 with 2 micro-batches of 1."""
    from spindle.runtime.config import load_config, resolve
    from spindle.runtime.data import build_dataset
    from spindle.runtime.main import build_model
    from spindle.runtime.optim import build_optimizer
    from spindle.runtime.trainer import BatchProvider

    settings = ["train.precision=fp32", "train.global_batch=2", "train.micro_batch=1", f"parallel.cp={cp}", *overrides]
    config = resolve(load_config(TINY, settings, world_size=cp), cp)
    torch.manual_seed(0)
    model = build_model(config, context)
    optimizer = build_optimizer(model, config.train)
    batches = BatchProvider(build_dataset(config.data, config.model.vocab_size, config.train.seed),
                            config.train.global_batch, config.train.micro_batch, context.dp_rank, context.dp_size)
    return config, model, optimizer, batches


def train_with_policy(policy: str, cp: int, context) -> dict:
    """STEPS steps with activation-checkpointing `policy`: losses, step-1 gradients, mixer forward counts and
    linear-attention kernel forwards (kernels.linear_attn.api.kernel_forwards, every backend)."""
    from spindle.kernels.linear_attn import api as linear_kernels
    from spindle.runtime.trainer import train_step

    config, model, optimizer, batches = tiny_setup(cp, context, [f"parallel.activation_checkpointing={policy}"])
    forwards = {"L": 0, "A": 0}
    for block in model.layers:
        block.mixer.register_forward_hook(lambda module, inputs, output, kind=block.kind: forwards.update(
            {kind: forwards[kind] + 1}))
    losses, gradients = [], {}
    kernel_forwards = sum(linear_kernels.kernel_forwards.values())
    for step in range(STEPS):
        result = train_step(model, optimizer, batches.micro_batches(step), context, lr=1e-3,
                            grad_clip=config.train.grad_clip, precision=None)
        losses.append(float(result.loss))
        if step == 0:  # by value (numpy): shared-memory tensors die with a rank's process
            gradients = {name: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).numpy().copy()
                         for name, p in model.named_parameters()}
    recomputing = {block.kind for block in model.layers if block.recompute}
    kernel_forwards = sum(linear_kernels.kernel_forwards.values()) - kernel_forwards
    return {"losses": losses, "gradients": gradients, "forwards": forwards, "recomputing": recomputing,
            "kernel_forwards": kernel_forwards}


def block_bytes(group) -> dict:
    """{"lasp2" | "single": {recompute: bytes}}: CPU storages made by one L block's forward that are still
    alive when its backward starts (benchmarks/harness.py PeakLiveBytes), its output excluded."""
    from spindle.benchmarks.harness import PeakLiveBytes
    from spindle.parallel import cp
    from spindle.runtime.layers import DecoderBlock, LinearAttention

    kept: dict = {}
    for op in ("lasp2", "single"):
        for recompute in (False, True):
            torch.manual_seed(0)
            mixer = LinearAttention(64, 4, decay="data", feature_map="identity", output_gate="sigmoid",
                                    layer_index=0, n_layers=2, norm_eps=1e-6)
            if op == "lasp2":
                mixer.sequence_op = functools.partial(cp.lasp2, group=group)
            block = DecoderBlock("L", mixer, 64, 128, 1e-6)
            block.recompute = recompute
            x = torch.randn(1, 256, 64, requires_grad=True)
            with PeakLiveBytes() as tracker:
                output = block(x, None)
                torch.zeros(1)  # the tracker drops storages that died since its last op
                kept.setdefault(op, {})[recompute] = tracker.current - output.untyped_storage().nbytes()
                output.sum().backward()
    return kept


def run_op(name: str, group, generator: torch.Generator) -> None:
    from spindle.parallel import cp

    q, k, v = (torch.randn(1, 16, 2, 8, generator=generator, requires_grad=True) for _ in range(3))
    if name in ("lasp2", "lasp1"):
        decay = torch.nn.functional.logsigmoid(torch.randn(1, 16, 2, generator=generator) + 3).requires_grad_()
        output = getattr(cp, name)(q, k, v, group, log_decay=decay)
    elif name == "window":
        output = cp.window_attention(q, k, v, group, window=5)
    elif name == "rattention":
        local, residual = cp.rattention_branches(q, k, q * 0.5, k * 0.5, v, group, window=5)
        output = local + residual
    else:
        output = {"ring": cp.ring_attention, "allgather": cp.allgather_attention,
                  "ulysses": cp.ulysses_attention}[name](q, k, v, group)
    output.sum().backward()


def _validate_calls(group, generator: torch.Generator) -> list[int]:
    from spindle.parallel import cp

    fresh = torch.distributed.new_group([0, 1])  # a group whose first call runs under the debug switch
    calls = []
    for debug, on in (("1", fresh), ("0", group), ("0", group), ("1", group)):
        os.environ["SPINDLE_DEBUG_CHECKS"] = debug
        with cp.record_comm() as stats:
            q, k, v = (torch.randn(1, 12, 2, 4, generator=generator) for _ in range(3))
            cp.ring_attention(q, k, v, on)
        calls.append(stats.calls.get("validate", 0))
    os.environ.pop("SPINDLE_DEBUG_CHECKS")
    return calls


def _sync_counts(group, generator: torch.Generator, world_size: int) -> dict:
    from sync_guard import count_host_syncs

    from spindle.parallel.layout import ParallelContext, ParallelDegrees
    from spindle.runtime.trainer import train_step

    counts = {}
    for name in CP_OPS:
        run_op(name, group, generator)  # first call of these shapes: ranks checked once
        with count_host_syncs() as counted:
            run_op(name, group, generator)
        counts[name] = dict(counted)
    context = ParallelContext.build(ParallelDegrees.resolve(1, 2, 1, world_size), torch.device("cpu"))
    config, model, optimizer, batches = tiny_setup(2, context, [])

    def step(index: int):
        return train_step(model, optimizer, batches.micro_batches(index), context, lr=1e-3,
                          grad_clip=config.train.grad_clip, precision=None)

    step(0)
    with count_host_syncs() as counted:
        step(1)
    counts["train_step"] = dict(counted)
    return counts


def _worker(rank: int, world_size: int, group) -> dict:
    from spindle.benchmarks import cp as bench_cp
    from spindle.parallel.layout import ParallelContext, ParallelDegrees

    generator = torch.Generator().manual_seed(rank)
    results = {"syncs": _sync_counts(group, generator, world_size),
               "validate_calls": _validate_calls(group, generator)}
    context = ParallelContext.build(ParallelDegrees.resolve(1, 2, 1, world_size), torch.device("cpu"))
    results["checkpointing"] = {policy: train_with_policy(policy, 2, context) for policy in POLICIES}
    results["block_bytes"] = block_bytes(group)
    results["bench"] = bench_cp._rank_worker(rank, world_size, group, BENCH_ARGS)
    return results


@functools.lru_cache(maxsize=1)
def results() -> dict:
    return run_distributed(_worker, 2, timeout=600)[0]
