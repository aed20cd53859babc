"""Packed documents from a prepared folder: windows, cu_seqlens, labels, positions, the model's packed
loss against running every document alone, and the trainer path.

The expected stream is built independently: every document encoded on its own with the tokenizer,
the end-of-document token appended, concatenated.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from spindle import kernels
from spindle.parallel.layout import ParallelContext
from spindle.runtime.config import ConfigError, DataConfig, ModelConfig
from spindle.runtime.data import (
    IGNORE_INDEX,
    PackedBatch,
    batch_cu_seqlens,
    build_dataset,
    document_positions,
    permuted_index,
)
from spindle.runtime.model import HybridModel
from spindle.runtime.prepare import PrepareOptions, prepare
from spindle.runtime.trainer import BatchProvider, train_step
from text_corpus import make_documents, reference_ids, train_tokenizer, write_jsonl

SEQ_LEN = 24
VOCAB = 128


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("packing")
    documents = make_documents(120, seed=3, max_words=30)
    tokenizer = train_tokenizer(folder / "tokenizer.json", documents)
    source = write_jsonl(folder / "corpus.jsonl", documents)
    options = dict(inputs=[str(source)], tokenizer=str(tokenizer), progress=False)
    prepare(PrepareOptions(out=str(folder / "one-shard"), **options))
    prepare(PrepareOptions(out=str(folder / "many-shards"), shard_tokens=37, **options))
    ids = reference_ids(tokenizer, documents)
    starts = np.cumsum([0] + [len(document) for document in ids])  # document starts, then the end
    return {"folder": folder, "stream": np.concatenate([np.asarray(d) for d in ids]), "starts": starts}


def dataset(corpus: dict, packing: str = "documents", name: str = "one-shard", seed: int = 7):
    config = DataConfig(source=str(corpus["folder"] / name), seq_len=SEQ_LEN, packing=packing)
    return build_dataset(config, VOCAB, seed)


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1000])
def test_permuted_index_is_a_seeded_bijection(size: int) -> None:
    orders = [[permuted_index(index, size, key) for index in range(size)] for key in (1, 2)]
    for order in orders:
        assert sorted(order) == list(range(size))
    if size >= 7:
        assert orders[0] != orders[1] and orders[0] != list(range(size))
    with pytest.raises(IndexError):
        permuted_index(size, size, 1)


def test_document_positions_restart_at_every_start() -> None:
    cu_seqlens = torch.tensor([0, 3, 4, 8, 10, 16, 20], dtype=torch.int32)  # B = 2 rows of T = 10
    expected = []
    for flat in range(20):
        start = max(offset for offset in cu_seqlens.tolist() if offset <= flat)
        expected.append(flat - start)
    assert document_positions(cu_seqlens, 2, 10).tolist() == torch.tensor(expected).view(2, 10).tolist()


def test_batch_cu_seqlens_holds_row_starts_and_documents() -> None:
    offsets = batch_cu_seqlens([np.array([3, 7]), np.array([], dtype=np.int64), np.array([1])], 10)
    assert offsets.dtype == torch.int32
    assert offsets.tolist() == [0, 3, 7, 10, 20, 21, 30]


# ---------------------------------------------------------------------------------------------
# the dataset of a prepared folder
# ---------------------------------------------------------------------------------------------
def test_every_window_once_per_epoch_with_documents_kept(corpus: dict) -> None:
    data = dataset(corpus)
    stream, starts = corpus["stream"], set(corpus["starts"].tolist())
    windows = (len(stream) - 1) // SEQ_LEN
    assert data.windows == windows
    seen = [data.window(index) for index in range(windows)]
    assert sorted(seen) == list(range(windows))
    assert [data.window(windows + index) for index in range(windows)] != seen  # a new order next epoch
    for index in range(windows):
        tokens, labels = data.sample(index)
        begin = seen[index] * SEQ_LEN
        assert tokens.tolist() == stream[begin : begin + SEQ_LEN].tolist()
        for position in range(SEQ_LEN):
            crosses = begin + position + 1 in starts
            assert labels[position] == (IGNORE_INDEX if crosses else stream[begin + position + 1])
        inner = [start - begin for start in sorted(starts) if begin < start < begin + SEQ_LEN]
        assert data.document_starts(index).tolist() == inner


def test_packed_batch_and_concat(corpus: dict) -> None:
    packed, plain = dataset(corpus), dataset(corpus, packing="concat")
    indices = [5, 0, 11]
    batch = packed.batch(indices)
    assert isinstance(batch, PackedBatch)
    rows = [packed.document_starts(index) for index in indices]
    assert batch.cu_seqlens.tolist() == batch_cu_seqlens(rows, SEQ_LEN).tolist()
    assert any(len(row) for row in rows), "the test corpus should put document starts inside windows"
    tokens, labels = plain.batch(indices)  # concat: a plain pair, next-token labels everywhere
    assert torch.equal(tokens, batch.tokens)
    stream = torch.from_numpy(corpus["stream"])
    for row, index in enumerate(indices):
        begin = plain.window(index) * SEQ_LEN
        assert torch.equal(labels[row], stream[begin + 1 : begin + SEQ_LEN + 1])
    masked = batch.labels != labels
    assert torch.all(batch.labels[masked] == IGNORE_INDEX) and masked.any()


def test_shard_files_do_not_change_samples(corpus: dict) -> None:
    one, many = dataset(corpus), dataset(corpus, name="many-shards")
    assert len(many.stream.tokens) > 10
    for index in range(0, 3 * one.windows, 5):
        left, right = one.batch([index]), many.batch([index])
        for a, b in zip(left, right):
            assert torch.equal(a, b), index


def test_global_batch_is_the_same_on_every_layout(corpus: dict) -> None:
    """The data cursor is a global sample index: any dp x micro-batch split (and a resume at any
    step) reads the same sequences with the same document boundaries."""
    data = dataset(corpus)
    whole = BatchProvider(data, global_batch=8, micro_batch=8)
    for dp_size, micro_batch in [(2, 2), (4, 1), (8, 1)]:
        providers = [BatchProvider(data, 8, micro_batch, rank, dp_size) for rank in range(dp_size)]
        for step in (0, 3):
            expected = whole.micro_batches(step)[0]
            pieces = [batch for provider in providers for batch in provider.micro_batches(step)]
            assert torch.equal(torch.cat([piece.tokens for piece in pieces]), expected.tokens)
            assert torch.equal(torch.cat([piece.labels for piece in pieces]), expected.labels)
            # each piece's boundaries are the whole batch's, restricted to its rows
            rows = [starts for piece in pieces for starts in _row_starts(piece.cu_seqlens, SEQ_LEN)]
            assert rows == _row_starts(expected.cu_seqlens, SEQ_LEN)


def _row_starts(cu_seqlens: torch.Tensor, length: int) -> list[list[int]]:
    offsets = cu_seqlens.tolist()
    rows = offsets[-1] // length
    return [[offset - row * length for offset in offsets if row * length < offset < (row + 1) * length]
            for row in range(rows)]


def test_vocabulary_and_length_checked_against_the_config(corpus: dict) -> None:
    folder = str(corpus["folder"] / "one-shard")
    with pytest.raises(ConfigError, match="model.vocab_size to at least"):
        build_dataset(DataConfig(source=folder, seq_len=SEQ_LEN), 16, seed=0)
    with pytest.raises(ConfigError, match="fewer than data.seq_len"):
        build_dataset(DataConfig(source=folder, seq_len=10**6), VOCAB, seed=0)


# ---------------------------------------------------------------------------------------------
# the model on packed documents
# ---------------------------------------------------------------------------------------------
def tiny_model(layers: str, decay: str = "constant") -> HybridModel:
    torch.manual_seed(0)
    config = ModelConfig(layers=layers, n_layers=len(layers), dim=32, heads=4, kv_heads=2, vocab_size=VOCAB,
                         ffn_dim=64, decay=decay)
    return HybridModel(config).double()


def per_document_loss(model: HybridModel, batch: PackedBatch) -> torch.Tensor:
    """The reference: every document of every row through the model alone (batch 1, positions from 0)."""
    total = torch.zeros((), dtype=torch.float64)
    offsets = batch.cu_seqlens.tolist()
    flat_tokens, flat_labels = batch.tokens.reshape(-1), batch.labels.reshape(-1)
    for start, end in zip(offsets[:-1], offsets[1:]):
        loss_sum, _ = model.loss(flat_tokens[None, start:end], flat_labels[None, start:end])
        total = total + loss_sum
    return total


@pytest.mark.parametrize("layers, decay", [("LA", "constant"), ("AL", "data"), ("LL", "none")],
                         ids=["LA-constant", "AL-data", "LL-none"])
def test_packed_loss_equals_documents_run_alone(corpus: dict, layers: str, decay: str) -> None:
    model = tiny_model(layers, decay)
    batch = dataset(corpus).batch([1, 4, 9])
    assert len(batch.cu_seqlens) > 4  # several documents, some inside rows
    packed, count = model.loss(batch.tokens, batch.labels, cu_seqlens=batch.cu_seqlens)
    packed_grads = torch.autograd.grad(packed, list(model.parameters()))
    reference = per_document_loss(model, batch)
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))
    assert count == (batch.labels != IGNORE_INDEX).sum()
    torch.testing.assert_close(packed, reference.float(), rtol=1e-6, atol=0)
    for (name, _), actual, expected in zip(model.named_parameters(), packed_grads, reference_grads):
        torch.testing.assert_close(actual, expected, rtol=1e-7, atol=1e-10, msg=name)
    # ... and without cu_seqlens the documents do see each other: the check above can fail.
    unpacked, _ = model.loss(batch.tokens, batch.labels)
    assert abs(float(unpacked.detach()) - float(reference.detach())) > 1e-6


def test_positions_restart_per_document_in_the_model() -> None:
    """RoPE is relative, so a restart does not change the loss above; check the positions themselves."""
    model = tiny_model("A")
    cu_seqlens = torch.tensor([0, 5, 8, 9, 16], dtype=torch.int32)  # rows of 8: documents 5+3, 1+7
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    seen = []
    model.rotary.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0]))
    model(tokens, cu_seqlens=cu_seqlens)
    assert seen[0].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 0, 1, 2, 3, 4, 5, 6]]


def test_an_op_without_document_support_is_refused() -> None:
    model = tiny_model("LA")
    softmax = model.layers[1].mixer

    def attention_without_documents(q, k, v, *, causal: bool, scale: float) -> torch.Tensor:
        return kernels.attention(q, k, v, causal=causal, scale=scale)

    softmax.attention_op = attention_without_documents
    tokens = torch.zeros(1, 8, dtype=torch.long)
    model.loss(tokens, tokens)  # unpacked batches still run
    with pytest.raises(NotImplementedError, match="data.packing = 'concat'"):
        model.loss(tokens, tokens, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))


def test_train_step_on_packed_batches(corpus: dict) -> None:
    """The trainer's path (ParallelContext.prepare -> positions from cu_seqlens -> model.loss) gives
    the per-document loss of the global batch, split into micro-batches or not."""
    data = dataset(corpus)
    whole = BatchProvider(data, global_batch=4, micro_batch=4).micro_batches(2)
    split = BatchProvider(data, global_batch=4, micro_batch=1).micro_batches(2)
    losses = []
    for micro_batches in (whole, split):
        model = tiny_model("LA")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        result = train_step(model, optimizer, micro_batches, ParallelContext.single_process(), lr=0.0,
                            grad_clip=0.0, precision=None)
        losses.append(float(result.loss))
    with torch.no_grad():
        reference = per_document_loss(tiny_model("LA"), whole[0]) / (whole[0].labels != IGNORE_INDEX).sum()
    assert losses[0] == pytest.approx(float(reference), rel=1e-6)
    assert losses[1] == pytest.approx(float(reference), rel=1e-6)


def test_prepare_derives_positions_from_documents() -> None:
    context = ParallelContext.single_process()
    tokens = torch.arange(12).view(2, 6)
    cu_seqlens = torch.tensor([0, 2, 6, 9, 12], dtype=torch.int32)
    _, _, positions, documents = context.prepare(tokens, tokens, cu_seqlens)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 0, 1, 2]]
    assert torch.equal(documents, cu_seqlens)
    assert context.prepare(tokens, tokens)[2] is None


@pytest.mark.parametrize("linear, softmax", [("lasp2", "allgather"), ("lasp1", "ring"), ("lasp2", "ulysses")],
                         ids=["lasp2-allgather", "lasp1-ring", "lasp2-ulysses"])
def test_context_parallel_documents_checked_at_config_time(corpus: dict, linear: str, softmax: str) -> None:
    """cp > 1 with packed documents runs only where both schemes take cu_seqlens; otherwise the config is
    refused up front, naming the scheme (never a run that silently mixes documents)."""
    from spindle.parallel import cp as context_parallel
    from spindle.parallel.parallelize import LINEAR_SCHEMES, SOFTMAX_SCHEMES
    from spindle.runtime.config import Config, ParallelConfig, validate
    from spindle.runtime.layers import accepts_cu_seqlens

    config = Config(model=ModelConfig(layers="LA", n_layers=2, dim=32, heads=4, kv_heads=2, vocab_size=VOCAB),
                    data=DataConfig(source=str(corpus["folder"] / "one-shard"), seq_len=SEQ_LEN),
                    parallel=ParallelConfig(cp=2, cp_linear=linear, cp_softmax=softmax))
    unsupported = [name for name, key in ((LINEAR_SCHEMES[linear], "cp_linear"), (SOFTMAX_SCHEMES[softmax], "cp_softmax"))
                   if not accepts_cu_seqlens(getattr(context_parallel, name))]
    if unsupported:
        with pytest.raises(ConfigError, match=f"spindle.parallel.cp.({'|'.join(unsupported)}).*data.packing = 'concat'"):
            validate(config)
    else:
        validate(config)
    config.data.packing = "concat"
    validate(config)  # the plain stream runs on every scheme


def test_activation_checkpointing_passes_documents_on() -> None:
    """apply_ac wraps block.forward in a positional-only function; cu_seqlens must still arrive."""
    from spindle.parallel.parallelize import apply_ac

    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    cu_seqlens = torch.tensor([0, 5, 16, 20, 32], dtype=torch.int32)
    plain = tiny_model("LA").loss(tokens, tokens, cu_seqlens=cu_seqlens)[0]
    model = tiny_model("LA")
    apply_ac(model, "full")
    checkpointed = model.loss(tokens, tokens, cu_seqlens=cu_seqlens)[0]
    checkpointed.backward()
    assert torch.equal(plain, checkpointed)
    unpacked = tiny_model("LA").loss(tokens, tokens)[0]
    assert float(plain.detach()) != float(unpacked.detach())  # the documents mattered
