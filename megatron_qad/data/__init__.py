"""Training data for QAD: token samples from a weighted mixture of sources, split and batched deterministically.

The recipe's ``data.sources`` is a list of sources, each a mapping with a ``type`` and an optional
``weight`` (> 0, default 1.0; a source's share of the samples is its weight over the sum):

=================== ==================================================================================
type                keys
=================== ==================================================================================
random              (none): uniform random token ids in ``[0, model.vocab_size)``
corpus              ``max_files`` (optional: read at most that many files of the split): the text
                    corpus shipped with the package (109 source files of CPython 3.12.1's standard
                    library, ``data/corpus/``), byte-tokenized; the same bytes on every machine
arithmetic          ``num_problems`` (default 100000), ``digits`` (default 3), ``seed`` (default 0),
                    ``format`` ("plain" or "reversed"), ``wrong_labels`` (default 0): distinct
                    addition problems ``"A+B=C\\n"``, one document each, byte-tokenized; a task whose
                    answers can be checked, optionally with a share of wrong labels (:mod:`.tasks`)
text                ``paths`` (globs), ``tokenizer`` ("byte" or a Hugging Face tokenizer directory):
                    one document per file
jsonl               ``paths``, ``field`` (default "text"), ``tokenizer``: one document per line
chat                ``paths`` (JSON-lines globs), ``tokenizer`` (a Hugging Face directory with a chat
                    template), ``prompt_field``, ``response_field``, ``ended_field``, ``loss_on``
                    ("response" or "all"): prompt / response pairs through the chat template, one
                    conversation each (:mod:`.chat`)
indexed             ``path_prefix``: a Megatron indexed dataset ``PREFIX.bin`` / ``PREFIX.idx``
teacher_generated   ``num_sequences``, ``cache`` (optional .pt path), ``prompts`` (optional JSON-lines
                    globs) with ``field``, ``tokenizer``, ``batch_size``: sequences sampled from the
                    teacher at temperature 1
teacher_answers     ``task`` (an arithmetic source), ``num_prompts``, ``keep`` ("all" or "correct"),
                    ``cache``, ``batch_size``: the teacher's sampled answers to the task's training
                    prompts, all or only the correct ones (:mod:`.teacher_answers`)
=================== ==================================================================================

Text documents are tokenized, each followed by the tokenizer's end-of-document token, concatenated
and cut into windows of ``seq_length + 1`` tokens (:mod:`.windows`). Every 50th document (positions
0, 50, 100, ...) forms the validation split (:mod:`.splits`); random tokens draw validation samples
from other random streams.

- :func:`validate_sources` checks ``data.sources`` with errors naming the key path and the fix.
- :func:`build_dataset` builds a split: ``ds[i]`` is a dict of ``tokens`` / ``labels`` int64
  ``[seq_length]`` and ``loss_mask`` float32 ``[seq_length]``, identical in every process.
- :func:`step_micro_batches` gives a data-parallel rank its micro-batches of one optimizer step;
  the global batch does not depend on the data-parallel size.
"""

from .batches import step_micro_batches
from .build import build_dataset
from .sources import validate_sources
from .tokenizers import ByteTokenizer

__all__ = ["ByteTokenizer", "build_dataset", "step_micro_batches", "validate_sources"]
