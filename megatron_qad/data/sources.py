"""The recipe's ``data.sources``: the keys of each source type, their defaults, and their validation.

Every error names the key path (``data.sources[1].paths``) and how to fix it. Relative paths and
globs are relative to the working directory; ``~`` is expanded.
"""

import glob
import math
import os

from ..config import ConfigError
from .splits import split_positions
from .tasks import FORMATS, TRAP_SHARE
from .tokenizers import ByteTokenizer, load_tokenizer, require_chat_template

REQUIRED = "required"
"""Marks a key without a default in :data:`SOURCE_KEYS`."""

COMMON_KEYS = {"type": REQUIRED, "weight": 1.0}
SOURCE_KEYS = {
    "random": {},
    "corpus": {"max_files": None},
    "arithmetic": {"num_problems": 100_000, "digits": 3, "seed": 0, "format": "plain", "wrong_labels": 0.0,
                   "prompt_context": 0},
    "text": {"paths": REQUIRED, "tokenizer": "byte"},
    "jsonl": {"paths": REQUIRED, "field": "text", "tokenizer": "byte"},
    "chat": {"paths": REQUIRED, "tokenizer": REQUIRED, "prompt_field": "prompt", "response_field": "response",
             "ended_field": "ended", "loss_on": "response"},
    "indexed": {"path_prefix": REQUIRED},
    "teacher_generated": {"num_sequences": REQUIRED, "cache": None, "prompts": None, "field": "text",
                          "tokenizer": "byte", "batch_size": 8},
    "teacher_answers": {"task": REQUIRED, "num_prompts": REQUIRED, "keep": "all", "cache": None, "batch_size": 64},
}
"""Per source type, its own keys and their defaults (besides :data:`COMMON_KEYS`)."""

KEY_HELP = {
    "paths": "a list of file globs",
    "tokenizer": "the directory of a Hugging Face tokenizer with a chat template",
    "path_prefix": "the prefix of a Megatron indexed dataset's PREFIX.bin / PREFIX.idx",
    "num_sequences": "the number of sequences to sample from the teacher",
    "task": "the arithmetic source whose training problems are the prompts, e.g. {type: arithmetic}",
    "num_prompts": "the number of the task's training problems the teacher answers",
}


def with_defaults(spec: dict) -> dict:
    """``spec`` with every key its type allows, unset keys at their defaults (``spec`` must be valid)."""
    defaults = {**COMMON_KEYS, **SOURCE_KEYS[spec["type"]]}
    return {**{key: value for key, value in defaults.items() if value is not REQUIRED}, **spec}


def expand_globs(patterns, key: str) -> list[str]:
    """The files matched by ``patterns`` (one glob or a list; ``**`` recurses), sorted, without repeats.

    Raises ConfigError naming ``key`` when ``patterns`` is not a glob or list of globs, or when one
    of them matches no file.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not patterns or not all(
            isinstance(pattern, str) and pattern for pattern in patterns):
        raise ConfigError(f"'{key}': must be a file glob or a non-empty list of file globs, got {patterns!r}")
    files = set()
    for pattern in patterns:
        matched = [path for path in glob.glob(os.path.expanduser(pattern), recursive=True)
                   if os.path.isfile(path)]
        if not matched:
            raise ConfigError(f"'{key}': no file matches {pattern!r}; fix the glob (relative globs start in "
                              f"the working directory {os.getcwd()}) or remove it")
        files.update(matched)
    return sorted(files)


def validate_sources(sources: list[dict], vocab_size: int) -> None:
    """Check the recipe's ``data.sources`` against model vocabulary ``vocab_size`` (``model.vocab_size``).

    Checks each source's type, keys and values, that its globs match files, that an indexed
    dataset's ``.bin`` and ``.idx`` exist and that its tokenizer fits in the vocabulary. Raises
    ConfigError naming the offending key path and the fix; returns None.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"'model.vocab_size': must be a positive integer, got {vocab_size!r}")
    if not isinstance(sources, (list, tuple)) or not sources:
        raise ConfigError(f"'data.sources': must be a non-empty list of sources (mappings with a 'type'), "
                          f"got {sources!r}")
    for index, spec in enumerate(sources):
        _check_source(spec, f"data.sources[{index}]", vocab_size)


def _check_source(spec, where: str, vocab_size: int) -> None:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"'{where}': must be a mapping with a 'type' key, one of "
                          f"{', '.join(SOURCE_KEYS)}; got {spec!r}")
    kind = spec["type"]
    if not isinstance(kind, str) or kind not in SOURCE_KEYS:
        raise ConfigError(f"'{where}.type': unknown source type {kind!r}; expected one of "
                          f"{', '.join(SOURCE_KEYS)}")
    allowed = {**COMMON_KEYS, **SOURCE_KEYS[kind]}
    for key in spec:
        if key not in allowed:
            raise ConfigError(f"'{where}.{key}': unknown key for a {kind!r} source; its keys are "
                              f"{', '.join(sorted(allowed))}")
    for key, default in allowed.items():
        if default is REQUIRED and key not in spec:
            raise ConfigError(f"'{where}.{key}': missing; a {kind!r} source needs {key} ({KEY_HELP[key]})")
    for key, value in with_defaults(spec).items():
        if key in _CHECKS:
            _CHECKS[key](value, f"{where}.{key}", vocab_size)
    if kind in ("corpus", "arithmetic"):
        check_tokenizer_fits(ByteTokenizer(), f"{where}.type", vocab_size)
    if kind == "arithmetic":
        _check_problem_count(spec, where)
    if kind == "teacher_answers":
        _check_answers_task(spec, where, vocab_size)
    if kind == "chat":
        require_chat_template(load_tokenizer(spec["tokenizer"], f"{where}.tokenizer"), f"{where}.tokenizer")


def check_tokenizer_fits(tokenizer, key: str, vocab_size: int) -> None:
    """Raise ConfigError unless ``tokenizer`` has an end-of-document token and fits in ``vocab_size``."""
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"'model.vocab_size' is {vocab_size} but the tokenizer {tokenizer.name!r} of '{key}' "
                          f"has {tokenizer.vocab_size} tokens; set model.vocab_size >= {tokenizer.vocab_size}")
    if tokenizer.eod_id is None:
        raise ConfigError(f"'{key}': the tokenizer {tokenizer.name!r} has no EOS token to end documents with; "
                          f"use a tokenizer that defines eos_token")


def check_loss_on(value, key: str, vocab_size: int) -> None:
    if value not in ("response", "all"):
        raise ConfigError(f"'{key}': must be 'response' (loss on the assistant's tokens only) or 'all', got {value!r}")


def _check_weight(value, key: str, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"'{key}': must be a number > 0 (a source's share of the samples is its weight "
                          f"over the sum of weights), got {value!r}")


def _positive_int(minimum: int, meaning: str):
    def check(value, key: str, vocab_size: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(f"'{key}': must be an integer >= {minimum} ({meaning}), got {value!r}")
    return check


def _check_max_files(value, key: str, vocab_size: int) -> None:
    if value is not None:
        _positive_int(1, "the number of files of the split to read; leave it out for all")(value, key, vocab_size)


def _check_seed(value, key: str, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"'{key}': must be an integer (it fixes which problems are drawn), got {value!r}")


def _check_digits(value, key: str, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 9:
        raise ValueError(f"'{key}': must be an integer from 1 to 9 (the most decimal digits of an operand), "
                         f"got {value!r}")


def _check_problem_count(spec: dict, where: str) -> None:
    settings = with_defaults(spec)
    pairs = 10 ** (2 * settings["digits"])
    if 2 * settings["num_problems"] > pairs:
        raise ValueError(f"'{where}.num_problems': {settings['num_problems']} distinct problems need at least twice "
                         f"as many operand pairs, and {settings['digits']}-digit operands give {pairs}; lower it "
                         f"to <= {pairs // 2} or raise {where}.digits")
    train_problems = len(split_positions(settings["num_problems"], "train"))
    if settings["prompt_context"] >= train_problems:
        raise ConfigError(f"'{where}.prompt_context': {settings['prompt_context']} solved problems before each prompt, "
                          f"but the source has {train_problems} training problems; lower it or raise num_problems")


def _check_format(value, key: str, vocab_size: int) -> None:
    if value not in FORMATS:
        raise ConfigError(f"'{key}': must be one of {', '.join(FORMATS)}, got {value!r}")


def _check_wrong_labels(value, key: str, vocab_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= TRAP_SHARE:
        raise ConfigError(f"'{key}': must be a number from 0 to {TRAP_SHARE} (the share of problems whose "
                          f"training text gives a wrong answer, all among the {TRAP_SHARE:.0%} of trap "
                          f"problems), got {value!r}")


def _check_keep(value, key: str, vocab_size: int) -> None:
    if value not in ("all", "correct"):
        raise ConfigError(f"'{key}': must be 'all' (every answer the teacher samples) or 'correct' (only the "
                          f"correct ones, rejection sampling), got {value!r}")


def _check_answers_task(spec: dict, where: str, vocab_size: int) -> None:
    task = spec["task"]
    if not isinstance(task, dict) or task.get("type") != "arithmetic":
        raise ConfigError(f"'{where}.task': must be an arithmetic source, e.g. {{type: arithmetic, digits: 3}}; "
                          f"got {task!r}")
    _check_source(task, f"{where}.task", vocab_size)
    check_tokenizer_fits(ByteTokenizer(), f"{where}.type", vocab_size)
    settings = with_defaults(task)
    train_problems = len(split_positions(settings["num_problems"], "train")) - settings["prompt_context"]
    if spec["num_prompts"] > train_problems:
        raise ConfigError(f"'{where}.num_prompts': {spec['num_prompts']} prompts, but '{where}.task' has "
                          f"{train_problems} training problems to ask (besides its prompt_context ones); lower "
                          f"num_prompts or raise the task's num_problems")


def _check_text(value, key: str, vocab_size: int) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"'{key}': must be a non-empty string, got {value!r}")


def _check_optional_text(value, key: str, vocab_size: int) -> None:
    if value is not None:
        _check_text(value, key, vocab_size)


def _check_paths(value, key: str, vocab_size: int) -> None:
    expand_globs(value, key)


def _check_prompts(value, key: str, vocab_size: int) -> None:
    if value is not None:
        expand_globs(value, key)


def _check_tokenizer(value, key: str, vocab_size: int) -> None:
    check_tokenizer_fits(load_tokenizer(value, key), key, vocab_size)


def _check_path_prefix(value, key: str, vocab_size: int) -> None:
    _check_text(value, key, vocab_size)
    prefix = os.path.expanduser(value)
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise ConfigError(f"'{key}': {prefix + suffix!r} does not exist; give the prefix of an indexed "
                              f"dataset written by Megatron's preprocess_data.py (PREFIX.bin and PREFIX.idx)")


_CHECKS = {
    "weight": _check_weight,
    "max_files": _check_max_files,
    "paths": _check_paths,
    "tokenizer": _check_tokenizer,
    "field": _check_text,
    "prompt_field": _check_text,
    "response_field": _check_text,
    "ended_field": _check_text,
    "loss_on": check_loss_on,
    "path_prefix": _check_path_prefix,
    "num_sequences": _positive_int(2, "every 50th sequence, starting with the first, is held out for "
                                      "validation, so both splits need one"),
    "cache": _check_optional_text,
    "prompts": _check_prompts,
    "batch_size": _positive_int(1, "sequences generated per teacher call"),
    "num_problems": _positive_int(2, "every 50th problem, starting with the first, is held out for "
                                     "validation, so both splits need one"),
    "digits": _check_digits,
    "seed": _check_seed,
    "format": _check_format,
    "wrong_labels": _check_wrong_labels,
    "prompt_context": _positive_int(0, "the solved training problems written before each prompt a model answers"),
    "keep": _check_keep,
    "num_prompts": _positive_int(2, "every 50th answered prompt is held out for validation, so both splits need one"),
}
