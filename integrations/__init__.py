"""Adapters that bring spindle's kernels and context parallelism into other training stacks.

- ``spindle.integrations.megatron``: Megatron-core layer specs (LASP-2 linear attention, all-gather /
  ring / Ulysses softmax attention over Megatron's context-parallel group). Needs megatron-core.

Nothing here is imported by the rest of spindle: each integration imports its framework itself.
"""
