"""The data pipeline: sources, splits, windows, mixtures, teacher-generated sequences and step batches."""

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_qad.data import ByteTokenizer, build_dataset, step_micro_batches, validate_sources
from megatron_qad.config import ConfigError
from megatron_qad.data.documents import CORPUS_DIR, corpus_documents, corpus_files
from megatron_qad.data.mixture import BLOCK

REPO = Path(__file__).resolve().parents[1]
VOCAB = 300
CORPUS = [{"type": "corpus", "max_files": 20}]


def same_samples(a, b) -> bool:
    return all(torch.equal(a[key], b[key]) for key in ("tokens", "labels", "loss_mask"))


def error_of(sources, vocab_size=VOCAB) -> str:
    with pytest.raises(ValueError) as info:
        validate_sources(sources, vocab_size)
    return str(info.value)


def sample_digest(sources, split, seq_length, vocab_size, seed, indices) -> str:
    dataset = build_dataset(sources, split, seq_length, vocab_size, seed)
    hashes = [torch.cat([dataset[i]["tokens"], dataset[i]["labels"]]).numpy().tobytes().hex() for i in indices]
    return ",".join(hashes)


def test_byte_tokenizer():
    tokenizer = ByteTokenizer()
    assert (tokenizer.vocab_size, tokenizer.eod_id, tokenizer.bos_id) == (258, 256, 257)
    ids = tokenizer.encode("naïve ∑")
    assert ids == list("naïve ∑".encode()) and all(0 <= i < 256 for i in ids)
    assert tokenizer.decode(ids) == "naïve ∑"
    assert tokenizer.decode([257, *ids, 256]) == "naïve ∑"
    assert tokenizer.decode([0x66, 0xFF, 0x6F]) == "f\ufffdo"
    with pytest.raises(ValueError, match="258"):
        tokenizer.decode([300])


def test_corpus_samples_are_deterministic_in_any_process():
    indices = [0, 1, 17, 123]
    here = sample_digest(CORPUS, "train", 64, VOCAB, 7, indices)
    assert here == sample_digest(CORPUS, "train", 64, VOCAB, 7, indices)
    assert here != sample_digest(CORPUS, "train", 64, VOCAB, 8, indices)
    code = ("from tests.test_data import CORPUS, VOCAB, sample_digest; "
            f"print(sample_digest(CORPUS, 'train', 64, VOCAB, 7, {indices}))")
    other = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert other.stdout.strip() == here


@pytest.mark.parametrize("split, documents, tokens, digest", [
    ("train", 106, 302636, "319960f4"), ("validation", 3, 9363, "3f0809f5")])
def test_corpus_tokens_are_the_same_on_every_machine(split, documents, tokens, digest):
    """The shipped corpus, not the interpreter, fixes the tokens: pinned counts (311,890 bytes + one
    end-of-document token per file) and stream digest."""
    dataset = build_dataset([{"type": "corpus"}], split, 64, VOCAB, 0)
    stream = dataset.stream.tokens
    assert (len(dataset.documents), len(stream)) == (documents, tokens)
    assert hashlib.sha256(stream.astype("<i4").tobytes()).hexdigest()[:8] == digest


def test_corpus_splits_are_disjoint_documents():
    files = corpus_files()
    assert len(files) == 109 and files == sorted(files) and all(f.endswith(".py.txt") for f in files)
    train = build_dataset([{"type": "corpus"}], "train", 256, VOCAB, 0)
    validation = build_dataset([{"type": "corpus"}], "validation", 256, VOCAB, 0)
    assert validation.documents == files[::50]
    assert sorted(train.documents + validation.documents) == files
    limited = build_dataset([{"type": "corpus", "max_files": 2}], "validation", 256, VOCAB, 0)
    assert limited.documents == validation.documents[:2]


def test_a_changed_or_missing_corpus_file_is_refused(tmp_path):
    copy = tmp_path / "corpus"
    shutil.copytree(CORPUS_DIR, copy)
    name = corpus_files()[1]
    text = (copy / name).read_bytes()
    (copy / name).write_bytes(text.replace(b"\n", b"\r\n"))  # what a line-ending conversion does
    with pytest.raises(ConfigError, match=rf"{name} differs from its SHA-256 in SHA256SUMS"):
        corpus_documents("train", None, copy)
    (copy / name).unlink()
    with pytest.raises(ConfigError, match=rf"the text corpus lacks {name}"):
        corpus_documents("train", None, copy)
    assert [doc for doc, _ in corpus_documents("validation", None, copy)] == corpus_files()[::50]


def test_windows_are_shifted_by_one_and_cover_the_stream():
    seq_length = 32
    dataset = build_dataset(CORPUS, "train", seq_length, VOCAB, 3)
    stream = dataset.stream.tokens
    assert len(dataset) == -(-(len(stream) - 1) // seq_length)
    assert sorted(dataset.order.tolist()) == list(range(len(dataset)))
    for index in (0, 5, len(dataset) - 1):
        sample = dataset[index]
        assert {key: (value.dtype, tuple(value.shape)) for key, value in sample.items()} == {
            "tokens": (torch.int64, (seq_length,)), "labels": (torch.int64, (seq_length,)),
            "loss_mask": (torch.float32, (seq_length,))}
        start = int(dataset.order[index]) * seq_length
        real = min(seq_length + 1, len(stream) - start)
        window = torch.from_numpy(stream[start:start + real].astype(np.int64))
        assert torch.equal(sample["tokens"][:real - 1], window[:-1])
        assert torch.equal(sample["labels"][:real - 1], window[1:])
        assert sample["loss_mask"].sum() == real - 1
    assert same_samples(dataset[len(dataset) + 4], dataset[4])
    assert ByteTokenizer.eod_id in stream


def test_short_last_window_is_padded_and_masked(tmp_path):
    (tmp_path / "a.txt").write_text("held out")
    (tmp_path / "b.txt").write_text("0123456789")
    dataset = build_dataset([{"type": "text", "paths": [str(tmp_path / "*.txt")]}], "train", 4, VOCAB, 0)
    assert dataset.documents == [str(tmp_path / "b.txt")]
    assert len(dataset) == 3
    short = [dataset[i] for i in range(3) if dataset[i]["loss_mask"].sum() < 4]
    assert len(short) == 1 and short[0]["loss_mask"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert short[0]["tokens"].tolist() == [ord("8"), ord("9"), 256, 0]
    assert short[0]["labels"].tolist() == [ord("9"), 256, 0, 0]


def test_random_tokens():
    sources = [{"type": "random"}]
    dataset = build_dataset(sources, "train", 64, 50, 11)
    sample = dataset[3]
    assert sample["tokens"].dtype == torch.int64 and sample["loss_mask"].tolist() == [1.0] * 64
    assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
    tokens = torch.stack([dataset[i]["tokens"] for i in range(200)])
    assert tokens.min() >= 0 and tokens.max() < 50 and len(tokens.unique()) == 50
    assert same_samples(build_dataset(sources, "train", 64, 50, 11)[3], sample)
    assert not same_samples(build_dataset(sources, "validation", 64, 50, 11)[3], sample)
    assert not same_samples(build_dataset(sources, "train", 64, 50, 12)[3], sample)
    assert not same_samples(dataset[4], sample)


def test_mixture_proportions_and_reproducibility():
    sources = [{"type": "random", "weight": 1.0}, {"type": "corpus", "max_files": 20, "weight": 3}]
    mixture = build_dataset(sources, "train", 32, VOCAB, 5)
    picks = [mixture.source_of(i) for i in range(2000)]
    share = sum(source == 1 for source, _ in picks) / len(picks)
    assert abs(share - 0.75) < 0.005
    for source in (0, 1):
        assert [j for k, j in picks if k == source] == list(range(sum(k == source for k, _ in picks)))
    for index in (0, 1, 2, 3, 999, 1999, BLOCK + 7):
        source, sample = mixture.source_of(index)
        assert same_samples(mixture[index], mixture.datasets[source][sample])
    again = build_dataset(sources, "train", 32, VOCAB, 5)
    assert all(same_samples(mixture[i], again[i]) for i in range(0, 2000, 37))
    corpus_windows = len(mixture.datasets[1])
    assert abs(len(mixture) - corpus_windows / 0.75) <= 4
    assert mixture.source_of(len(mixture))[1] == corpus_windows


def test_step_micro_batches_do_not_depend_on_the_data_parallel_size():
    dataset = build_dataset([{"type": "random"}, {"type": "corpus", "max_files": 10}], "train", 16,
                            VOCAB, 0)
    step, global_batch, micro = 3, 16, 2
    expected = torch.stack([dataset[step * global_batch + row]["tokens"] for row in range(global_batch)])
    for dp_size in (1, 2, 4):
        rows = {}
        for rank in range(dp_size):
            batches = step_micro_batches(dataset, step, global_batch, micro, rank, dp_size)
            assert len(batches) == global_batch // (micro * dp_size)
            for m, batch in enumerate(batches):
                assert batch["tokens"].shape == (micro, 16) and batch["loss_mask"].dtype == torch.float32
                for offset in range(micro):
                    rows[m * micro * dp_size + rank * micro + offset] = batch["tokens"][offset]
        assert sorted(rows) == list(range(global_batch))
        assert torch.equal(torch.stack([rows[row] for row in range(global_batch)]), expected)


def test_step_micro_batches_rejects_indivisible_sizes():
    dataset = build_dataset([{"type": "random"}], "train", 8, VOCAB, 0)
    with pytest.raises(ValueError) as info:
        step_micro_batches(dataset, 0, 12, 2, 0, 4)
    message = str(info.value)
    assert "global_batch_size (12)" in message and "micro_batch_size (2)" in message
    assert "data-parallel size (4)" in message


def test_text_and_jsonl_sources(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / f"{name}.txt").write_text(f"document {name} " * 10)
    text = build_dataset([{"type": "text", "paths": [str(tmp_path / "*.txt")]}], "train", 16, VOCAB, 0)
    assert text.documents == [str(tmp_path / "b.txt"), str(tmp_path / "c.txt")]
    expected = "document b " * 10 + "\x00" + "document c " * 10 + "\x00"
    stream = text.stream.tokens.tolist()
    assert stream == [256 if c == "\x00" else ord(c) for c in expected]

    lines = [json.dumps({"body": f"line {i}", "id": i}) for i in range(120)]
    lines.insert(7, "")
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n")
    sources = [{"type": "jsonl", "paths": str(tmp_path / "*.jsonl"), "field": "body", "tokenizer": "byte"}]
    train = build_dataset(sources, "train", 16, VOCAB, 0)
    validation = build_dataset(sources, "validation", 16, VOCAB, 0)
    assert [name.rsplit(":", 1)[1] for name in validation.documents] == ["1", "52", "102"]
    assert len(train.documents) == 117 and not set(train.documents) & set(validation.documents)
    tokenizer = ByteTokenizer()
    assert tokenizer.decode(validation.stream.tokens.tolist()) == "line 0line 50line 100"

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"other": 1}\n')
    with pytest.raises(ValueError, match=r"'data.sources\[0\].field'.*bad.jsonl:2"):
        build_dataset([{"type": "jsonl", "paths": [str(tmp_path / "bad.jsonl")]}], "train", 4, VOCAB, 0)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"'data.sources\[0\].paths'.*latin1.jsonl.*UTF-8"):
        build_dataset([{"type": "jsonl", "paths": [str(tmp_path / "latin1.jsonl")]}], "train", 4, VOCAB, 0)


@pytest.mark.filterwarnings("ignore:Could not determine rank:UserWarning")
def test_indexed_source(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus")
    documents = [list(range(d, d + 5 + d % 7)) for d in range(60)]
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for document in documents:
        builder.add_document(torch.tensor(document), [len(document)])
    builder.finalize(prefix + ".idx")

    sources = [{"type": "indexed", "path_prefix": prefix}]
    train = build_dataset(sources, "train", 8, 100, 0)
    validation = build_dataset(sources, "validation", 8, 100, 0)
    assert validation.documents.tolist() == [0, 50]
    assert len(train.documents) == 58
    train_tokens = [t for d, document in enumerate(documents) if d % 50 for t in document]
    assert len(train.stream) == len(train_tokens)
    assert train.stream.read(0, len(train_tokens)).tolist() == train_tokens
    for index in range(len(train)):
        sample = train[index]
        start = int(train.order[index]) * 8
        real = int(sample["loss_mask"].sum())
        assert sample["tokens"][:real].tolist() == train_tokens[start:start + real]
        assert sample["labels"][:real].tolist() == train_tokens[start + 1:start + 1 + real]

    too_small = build_dataset(sources, "train", 8, 40, 0)
    with pytest.raises(ValueError, match=r"'data.sources\[0\].path_prefix'.*model.vocab_size"):
        for index in range(len(too_small)):
            too_small[index]
    assert "corpus_missing.bin" in error_of([{"type": "indexed", "path_prefix": prefix + "_missing"}])


class NextTokenTeacher:
    """Logits ``[b, t, vocab]`` that put almost all probability on ``(token + 1) % vocab``; counts calls."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.calls = 0

    def __call__(self, prefix: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 40.0 * torch.nn.functional.one_hot((prefix + 1) % self.vocab_size, self.vocab_size).float()


def test_teacher_generated_sequences_follow_the_teacher_and_are_cached(tmp_path, capsys):
    vocab, seq_length = 260, 12
    teacher = NextTokenTeacher(vocab)
    sources = [{"type": "teacher_generated", "num_sequences": 6, "batch_size": 4}]
    train = build_dataset(sources, "train", seq_length, vocab, 0, cache_dir=str(tmp_path), teacher_sampler=teacher)
    assert teacher.calls == 2 * seq_length and len(train) == 5
    # The progress in sampled tokens (6 sequences x 12 after BOS): a line per tenth, the last at 100 %.
    progress = capsys.readouterr().out.splitlines()
    assert 2 <= len(progress) <= 10 and all(line.startswith("'data.sources[0]': teacher generation: ") for line in progress)
    assert "(72 tokens) in " in progress[-1] and "tokens/s" in progress[-1]
    expected = [(257 + t) % vocab for t in range(seq_length + 1)]
    for index in range(len(train)):
        sample = train[index]
        assert sample["tokens"].tolist() == expected[:-1] and sample["labels"].tolist() == expected[1:]
        assert sample["loss_mask"].tolist() == [1.0] * seq_length
    assert (tmp_path / "teacher_generated_0.pt").is_file()

    validation = build_dataset(sources, "validation", seq_length, vocab, 0, cache_dir=str(tmp_path),
                               teacher_sampler=teacher)
    cached = build_dataset(sources, "train", seq_length, vocab, 0, cache_dir=str(tmp_path))
    assert teacher.calls == 2 * seq_length and len(validation) == 1
    assert torch.equal(cached.sequences, train.sequences)

    more = [{**sources[0], "num_sequences": 8}]
    with pytest.raises(ValueError, match=r"'data.sources\[0\]'.*teacher_sampler"):
        build_dataset(more, "train", seq_length, vocab, 0, cache_dir=str(tmp_path))
    regenerated = build_dataset(more, "train", seq_length, vocab, 0, cache_dir=str(tmp_path),
                                teacher_sampler=teacher)
    assert teacher.calls == 4 * seq_length and len(regenerated) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher_generated_0.pt"]


def test_teacher_generated_sampling_is_seeded_per_sequence_and_prompted(tmp_path):
    vocab, seq_length = 258, 10

    def flat_teacher(prefix):
        return torch.zeros(*prefix.shape, vocab)

    def sequences(batch_size, seed):
        spec = {"type": "teacher_generated", "num_sequences": 5, "batch_size": batch_size}
        return build_dataset([spec], "train", seq_length, vocab, seed, teacher_sampler=flat_teacher).sequences

    assert torch.equal(sequences(1, 0), sequences(3, 0))
    assert not torch.equal(sequences(3, 0), sequences(3, 1))

    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"q": q}) for q in ("ab", "a much longer prompt")))
    spec = {"type": "teacher_generated", "num_sequences": 4, "prompts": str(tmp_path / "*.jsonl"), "field": "q",
            "cache": str(tmp_path / "cache" / "prompted.pt")}
    prompted = build_dataset([spec], "train", seq_length, vocab, 0, teacher_sampler=NextTokenTeacher(vocab))
    long_prompt, short_prompt, long_again = prompted.sequences.tolist()
    assert long_prompt[:seq_length] == [257] + list(b"a much lo") and long_prompt[-1] == ord("o") + 1
    assert short_prompt == [257, ord("a"), ord("b")] + [ord("b") + k for k in range(1, seq_length - 1)]
    assert long_again == long_prompt
    assert (tmp_path / "cache" / "prompted.pt").is_file()


def test_teacher_sampler_with_the_wrong_vocabulary_is_rejected():
    spec = {"type": "teacher_generated", "num_sequences": 2}
    with pytest.raises(ValueError, match=r"\[batch, tokens, vocab_size\] = \(2, 1, 300\)"):
        build_dataset([spec], "train", 4, 300, 0, teacher_sampler=lambda prefix: torch.zeros(*prefix.shape, 258))


def test_validate_sources_names_the_key_and_the_fix(tmp_path):
    message = error_of([{"type": "random"}, {"type": "parquet"}])
    assert "'data.sources[1].type'" in message and "corpus" in message
    message = error_of([{"type": "jsonl", "paths": ["corpus/*.jsonl"]}])
    assert "'data.sources[0].paths'" in message and "no file matches 'corpus/*.jsonl'" in message
    assert "'data.sources[0].paths': missing" in error_of([{"type": "text"}])
    message = error_of([{"type": "corpus"}], vocab_size=256)
    assert "'model.vocab_size' is 256" in message and "'byte'" in message and ">= 258" in message
    (tmp_path / "a.txt").write_text("x")
    message = error_of([{"type": "text", "paths": [str(tmp_path / "a.txt")]}], vocab_size=100)
    assert "'data.sources[0].tokenizer'" in message and "model.vocab_size >= 258" in message
    for weight in (0, -1.0, float("nan"), True, "1"):
        assert "'data.sources[0].weight': must be a number > 0" in error_of([{"type": "random", "weight": weight}])
    assert "'data.sources[0].pathz': unknown key" in error_of([{"type": "text", "pathz": "x"}])
    assert "'data.sources[0].tokenizer'" in error_of([{"type": "text", "paths": [str(tmp_path / "a.txt")],
                                                       "tokenizer": str(tmp_path / "no_such_dir")}])
    assert "'data.sources[0].num_sequences'" in error_of([{"type": "teacher_generated", "num_sequences": 1}])
    assert "'data.sources'" in error_of([])
    validate_sources([{"type": "random", "weight": 2}, {"type": "corpus", "max_files": 3}], VOCAB)


def test_too_small_split_is_a_clear_error(tmp_path):
    (tmp_path / "only.txt").write_text("one document")
    with pytest.raises(ValueError, match=r"'data.sources\[0\]': the 'train' split has 0 documents"):
        build_dataset([{"type": "text", "paths": [str(tmp_path / "only.txt")]}], "train", 8, VOCAB, 0)


def test_tiny_mixture_weight_is_rejected():
    with pytest.raises(ValueError, match=r"'data.sources\[1\].weight'"):
        build_dataset([{"type": "random"}, {"type": "random", "weight": 1e-6}], "train", 8, VOCAB, 0)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_hf_tokenizer_without_transformers_says_how_to_install(tmp_path):
    with pytest.raises(ImportError, match="pip install transformers"):
        validate_sources([{"type": "jsonl", "paths": [__file__], "tokenizer": str(tmp_path)}], VOCAB)


def test_repeated_and_copied_data_is_said_and_refused(tmp_path):
    """Two 10-byte text files: document 0 is held out, document 1 trains, one window each of 11
    tokens (the text and its end-of-document token). The line says how often each split is read;
    a train split read more than data.max_repeats times over is refused, and so is a validation
    split whose tokens all occur in the train split (the files hold the same text), each naming
    the setting that allows it."""
    from megatron_qad.data.repeats import check_data_use, repeat_line

    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("0123456789")
    sources = [{"type": "text", "paths": [str(tmp_path / "*.txt")]}]
    train, validation = (build_dataset(sources, split, 16, VOCAB, 0) for split in ("train", "validation"))
    assert (len(train), len(validation)) == (1, 1)
    assert repeat_line(train, validation, 800, 8) == (
        "data: the train split reads its 1 distinct samples 800 times each (800 samples); the validation split "
        "reads its 1 distinct samples 8 times each (8 samples)")
    with pytest.raises(ConfigError, match=r"^'data.sources': the train split has 1 distinct samples and the run "
                                          r"reads 800 \(training.train_iters x training.global_batch_size\): each "
                                          r"800 times, more than data.max_repeats=100; add data, lower "
                                          r"training.train_iters, or raise data.max_repeats \(null: no bound\)$"):
        check_data_use(train, validation, 800, 100, False, "data.sources")
    with pytest.raises(ConfigError, match=r"^'data.sources': the validation split is a copy of training data .* "
                                          r"give held-out data, or set data.allow_validation_copy=true$"):
        check_data_use(train, validation, 800, None, False, "data.sources")
    check_data_use(train, validation, 800, None, True, "data.sources")  # both allowed

    (tmp_path / "a.txt").write_text("9876543210")  # held-out text of its own
    validation = build_dataset(sources, "validation", 16, VOCAB, 0)
    check_data_use(train, validation, 100, 100, False, "data.sources")
    corpus = build_dataset(CORPUS, "train", 16, VOCAB, 0)
    assert repeat_line(corpus, build_dataset([{"type": "random"}], "validation", 16, VOCAB, 0), 800, 8) == (
        f"data: the train split reads 800 of its {len(corpus)} distinct samples (no repeats); the validation "
        f"split draws 8 samples that never repeat")
    check_data_use(corpus, build_dataset(CORPUS, "validation", 16, VOCAB, 0), 800, 100, False, "data.sources")
