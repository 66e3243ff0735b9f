"""A saved teacher or student evaluated as the published QAD results are: task accuracy and KL.

    data = evaluation_data(config, task_spec, num_problems=500, num_windows=32)
    metrics = evaluate_model(config, checkpoint, quantized=True, data=data)

The task is an ``arithmetic`` data source (:mod:`megatron_qad.data.tasks`); its held-out problems
are the prompts (each answered after the source's prompt context, scored against its correct
answer), its held-out token windows the task text.
When the source mislabels problems (``wrong_labels``), the held-out problems whose label would be
wrong are scored separately: there a model that follows the labels fails and one that knows the
task succeeds. General text is the validation split of
the recipe's ``data.validation_sources`` (else ``data.sources``). Every model is compared with the
recipe's teacher (``teacher.checkpoint``) on the same samples.

Models run at tensor and pipeline parallel size 1 in one process; a quantized student runs the
emulated NVFP4 backend (the values Transformer Engine's NVFP4 GEMMs compute, without them).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import parallel, quantize
from ..config import ConfigError, QADConfig
from ..data import build_dataset
from ..data.sources import with_defaults
from ..data.tasks import Problem, answer_prompts, asked_and_context, problems_in_split, source_problems
from ..data.tokenizers import ByteTokenizer
from ..models import build_model_chunks, causal_attention_mask
from ..train import checkpointing
from .agreement import averages, token_sums
from .generate import exact_match, greedy_generate

TOKENIZER = ByteTokenizer()
"""The arithmetic task's tokenizer."""


@dataclass
class EvaluationData:
    """What every model is evaluated on: task ``problems`` (held out from training), the held-out
    problems the task's labels get wrong (``mislabelled``, empty when it has no wrong labels), and
    sample dicts (``tokens`` / ``labels`` int64 ``[seq_length]``, ``loss_mask`` float32
    ``[seq_length]``) of held-out task text (``task_samples``) and general text (``general_samples``);
    ``problem_prompts`` / ``mislabelled_prompts``: per problem, the token ids it is answered after
    (:func:`~megatron_qad.data.tasks.answer_prompts`: the task's prompt context, then its prompt)."""

    problems: list[Problem]
    mislabelled: list[Problem]
    task_samples: list[dict]
    general_samples: list[dict]
    problem_prompts: list[list[int]]
    mislabelled_prompts: list[list[int]]


def evaluation_data(config: QADConfig, task_spec: dict, num_problems: int, num_windows: int) -> EvaluationData:
    """The first ``num_problems`` held-out problems of the ``arithmetic`` source ``task_spec`` (and
    the first ``num_problems`` of those it mislabels) and at most ``num_windows`` held-out windows
    of task and of general text (see the module docstring)."""
    task = with_defaults(task_spec)
    every = source_problems(task)
    held_out = problems_in_split(every, "validation")
    general = config.data.validation_sources or config.data.sources
    seq_length, vocab_size, seed = config.model.seq_length, config.model.vocab_size, config.data.seed
    problems = held_out[:num_problems]
    mislabelled = [problem for problem in held_out if problem.mislabelled][:num_problems]
    _, context = asked_and_context(every, task["prompt_context"])
    return EvaluationData(problems, mislabelled,
                          _windows([task_spec], seq_length, vocab_size, seed, num_windows),
                          _windows(general, seq_length, vocab_size, seed, num_windows),
                          answer_prompts(context, problems, TOKENIZER), answer_prompts(context, mislabelled, TOKENIZER))


def _windows(sources: list[dict], seq_length: int, vocab_size: int, seed: int, count: int) -> list[dict]:
    dataset = build_dataset(sources, "validation", seq_length, vocab_size, seed)
    return [dataset[index] for index in range(min(count, len(dataset)))]


def logits_function(model: torch.nn.Module, device: torch.device):
    """``logits_of(tokens int64 [b, t]) -> logits [b, t, V]`` of a megatron.core model (TP = 1)."""

    def logits_of(tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        with torch.no_grad():
            return model(tokens, positions, causal_attention_mask(tokens.shape[1], device))

    return logits_of


def task_accuracy(logits_of, problems: list[Problem], prompts: list[list[int]], batch_size: int) -> float:
    """The fraction of ``problems`` whose greedy continuation of its ``prompts`` entry (token ids:
    :func:`~megatron_qad.data.tasks.answer_prompts`) is the answer followed by a newline (or the end
    of the document)."""
    stop_ids = {TOKENIZER.encode("\n")[0], TOKENIZER.eod_id}
    longest = max(len(problem.answer) for problem in problems)
    # Two tokens beyond the longest answer: an answer that runs on never equals a reference.
    outputs = greedy_generate(logits_of, prompts, longest + 2, stop_ids, batch_size)
    return exact_match([completion_text(tokens) for tokens in outputs], [problem.answer for problem in problems])


def completion_text(tokens: list[int]) -> str:
    """The text of generated byte ``tokens``; "\ufffd" (never an answer) when one of them is no byte
    (a special token, or an unused id of a vocabulary padded beyond the tokenizer's)."""
    if any(not 0 <= token < 256 for token in tokens):
        return "\ufffd"
    return bytes(tokens).decode("utf-8", errors="replace")


def agreement(teacher_logits_of, student_logits_of, samples: list[dict], batch_size: int) -> dict[str, float]:
    """Per-token KL(teacher || student), both CEs and top-1 agreement over ``samples``."""
    sums = []
    for first in range(0, len(samples), batch_size):
        batch = {key: torch.stack([sample[key] for sample in samples[first:first + batch_size]])
                 for key in ("tokens", "labels", "loss_mask")}
        sums.append(token_sums(teacher_logits_of(batch["tokens"]), student_logits_of(batch["tokens"]),
                               batch["labels"], batch["loss_mask"]))
    return averages(sums)


def check_single_process_layout(config: QADConfig) -> None:
    """ConfigError unless the recipe's layout is TP = PP = 1 (what evaluation runs at)."""
    p = config.parallel
    if p.tensor_model_parallel_size != 1 or p.pipeline_model_parallel_size != 1:
        raise ConfigError(f"evaluating generations needs 'parallel.tensor_model_parallel_size' and "
                          f"'parallel.pipeline_model_parallel_size' of 1 (got {p.tensor_model_parallel_size} and "
                          f"{p.pipeline_model_parallel_size}); the checkpoints load at any layout, so set both to 1")


def evaluate_model(config: QADConfig, checkpoint: str | Path | None, quantized: bool, data: EvaluationData,
                   batch_size: int = 16) -> dict:
    """Metrics of the model saved at ``checkpoint`` (None: the teacher itself) against the teacher.

    ``quantized``: the checkpoint is a student quantized by ``config.quantization`` (its static
    scales load from the checkpoint). Returns ``{"accuracy": exact-match fraction, "mislabelled
    accuracy": the same on ``data.mislabelled`` (None when empty), "task": {...}, "general": {...}}``,
    the last two with :data:`~megatron_qad.evaluate.agreement.METRICS`.
    """
    check_single_process_layout(config)
    context = parallel.initialize(config.parallel, seed=config.model.seed)
    try:
        teacher = load_model(config, config.teacher.checkpoint, context.device, quantized=False)
        student = teacher if checkpoint is None else load_model(config, checkpoint, context.device, quantized)
        teacher_logits_of = logits_function(teacher, context.device)
        student_logits_of = logits_function(student, context.device)
        return {"accuracy": task_accuracy(student_logits_of, data.problems, data.problem_prompts, batch_size),
                "mislabelled accuracy": (task_accuracy(student_logits_of, data.mislabelled, data.mislabelled_prompts,
                                                       batch_size)
                                         if data.mislabelled else None),
                "task": agreement(teacher_logits_of, student_logits_of, data.task_samples, batch_size),
                "general": agreement(teacher_logits_of, student_logits_of, data.general_samples, batch_size)}
    finally:
        parallel.destroy()


def load_model(config: QADConfig, checkpoint: str | Path, device: torch.device, quantized: bool) -> torch.nn.Module:
    """The recipe's model (quantized by its policy, emulated NVFP4 backend, when ``quantized``) with
    the weights and static scales saved at ``checkpoint``, in eval mode on ``device``."""
    (model,) = build_model_chunks(config.model, config.parallel, device)
    if quantized:
        quantize.apply([model], config.quantization.to_policy(), backend="emulated")
    checkpointing.load_model([model], checkpoint)
    return model.eval()
