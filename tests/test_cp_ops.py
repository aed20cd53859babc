"""The public CP ops made per scheme from one family definition (parallel/cp/ops.py): each keeps the
documented signature (docs/design.md, "Public API"), its name, module and docs, rejects an unknown keyword
naming itself, and pickles by reference (spawned ranks and Ray workers receive ops bound with partial)."""

from __future__ import annotations

import functools
import inspect
import pickle

import pytest
import torch

from spindle.parallel import cp
from spindle.runtime.layers import accepts_cu_seqlens

SHARED = {"layout": "zigzag", "scale": None, "cu_seqlens": None}
SIGNATURES = {  # op -> its keyword-only parameters and defaults, after (q, k, v, group)
    "lasp2": {**SHARED, "log_decay": None, "delay": 0},
    "lasp1": {**SHARED, "layout": "contiguous", "log_decay": None, "delay": 0},
    "ring_attention": {**SHARED, "causal": True},
    "allgather_attention": {**SHARED, "causal": True, "head_groups": 1},
    "ulysses_attention": {**SHARED, "causal": True, "all_to_all": "auto"},
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_signature_name_and_docs(name: str) -> None:
    op = getattr(cp, name)
    parameters = inspect.signature(op).parameters
    assert list(parameters)[:4] == ["q", "k", "v", "group"]
    keywords = {key: p.default for key, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keywords == SIGNATURES[name]
    assert op.__name__ == op.__qualname__ == name
    assert op.__module__ == f"spindle.parallel.cp.{name.removesuffix('_attention')}"
    for keyword in keywords:
        assert f"\n    {keyword}: " in op.__doc__, f"{name} documents {keyword}"
    assert pickle.loads(pickle.dumps(op)) is op
    assert accepts_cu_seqlens(functools.partial(op, group=None))


@pytest.mark.parametrize("name, keyword", [("ring_attention", "head_groups"), ("ulysses_attention", "window"),
                                           ("allgather_attention", "all_to_all")])
def test_unknown_keyword_names_the_op(name: str, keyword: str) -> None:
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(TypeError, match=rf"{name}\(\) got unexpected keyword argument\(s\) {keyword}"):
        getattr(cp, name)(q, q, q, None, **{keyword: 1})


def test_lasp_ops_reject_keywords_of_the_softmax_family() -> None:
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(TypeError, match="causal"):
        cp.lasp2(q, q, q, None, causal=True)
