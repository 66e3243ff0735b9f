"""The files a served model needs beside its weights: the tokenizer, the chat template and the
generation settings (``generation_config.json``: the end-of-turn ``eos_token_id``, default
sampling), in the names Hugging Face's ``save_pretrained`` gives them (:data:`SERVING_FILES`).

``megatron-qad import HF_DIR --out DIR`` copies those HF_DIR holds into ``DIR/hf_tokenizer/``
(:data:`IMPORTED_DIR`). ``megatron-qad export`` copies them beside the exported weights from the
first of (:func:`find_source`): the teacher's ``hf_tokenizer/`` (``teacher.checkpoint`` written by
an import), the Hugging Face tokenizer directory a data source names (``tokenizer`` of
``data.sources``, ``data.validation_sources``, ``teacher.posttrain_sources``, in that order).
Either way ``generation_config.json`` ends up with the source's ``bos_token_id`` /
``eos_token_id`` / ``pad_token_id``: a file the source has is copied as it is (a chat model's
lists its end-of-turn token there), and ids it lacks are filled in, on import from ``config.json``
(as transformers does for a model without the file), on export from the tokenizer.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic_files import write_text
from ..config import QADConfig

IMPORTED_DIR = "hf_tokenizer"
"""The folder of an imported checkpoint ``DIR`` that holds the Hugging Face model's serving files."""
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
"""A tokenizer as transformers saves one: fast (tokenizer.json), SentencePiece (tokenizer.model),
BPE (vocab.json + merges.txt) or WordPiece (vocab.txt), with its settings and special tokens."""
SERVING_FILES = (*TOKENIZER_FILES, "chat_template.jinja", "chat_template.json", GENERATION_CONFIG)
SERVING_DIRS = ("additional_chat_templates",)
"""Folders transformers saves beside them (named chat templates, one ``.jinja`` file each)."""
TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")
"""The ``generation_config.json`` fields an inference engine stops (EOS) and pads with."""


@dataclass(frozen=True)
class ServingSource:
    """Where an export takes its serving files from: ``directory``, and the recipe key naming it."""

    directory: Path
    key: str


def find_source(config: QADConfig) -> ServingSource | None:
    """The serving files' directory for ``config``'s export (see the module docstring); None if
    the recipe names none."""
    if config.teacher.checkpoint:
        imported = Path(config.teacher.checkpoint).expanduser() / IMPORTED_DIR
        if imported.is_dir():
            return ServingSource(imported, "teacher.checkpoint")
    for key, sources in (("data.sources", config.data.sources), ("data.validation_sources",
                                                                 config.data.validation_sources),
                         ("teacher.posttrain_sources", config.teacher.posttrain_sources)):
        for index, spec in enumerate(sources or []):
            tokenizer = spec.get("tokenizer", "byte")
            if tokenizer != "byte" and os.path.isdir(os.path.expanduser(tokenizer)):
                return ServingSource(Path(os.path.realpath(os.path.expanduser(tokenizer))),
                                     f"{key}[{index}].tokenizer")
    return None


def copy_files(source: Path, target: Path) -> list[str]:
    """Copy the :data:`SERVING_FILES` and :data:`SERVING_DIRS` that ``source`` holds into the
    existing directory ``target``; return their names."""
    copied = []
    for name in SERVING_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    for name in SERVING_DIRS:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name)
            copied.append(name)
    return copied


def complete_generation_config(directory: Path, token_ids: dict) -> bool:
    """Give ``directory/generation_config.json`` the ``token_ids`` (``TOKEN_IDS`` -> int, list or
    None) it lacks, creating the file if there is anything to write; whether the file exists
    afterwards. Written to a temporary file and renamed."""
    path = directory / GENERATION_CONFIG
    config = json.loads(path.read_text()) if path.is_file() else {}
    missing = {name: value for name, value in token_ids.items() if value is not None and config.get(name) is None}
    if missing:
        write_text(path, json.dumps({**config, **missing}, indent=2) + "\n")
    return path.is_file()


def config_token_ids(hf_config: dict) -> dict:
    """The :data:`TOKEN_IDS` of a Hugging Face ``config.json`` (None where it has none)."""
    return {name: hf_config.get(name) for name in TOKEN_IDS}


def tokenizer_token_ids(directory: Path) -> dict:
    """The :data:`TOKEN_IDS` of the Hugging Face tokenizer saved in ``directory`` (transformers)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    return {name: getattr(tokenizer, name) for name in TOKEN_IDS}


def write_serving_files(source: Path, target: Path) -> list[str]:
    """An export's serving files: copy them from ``source`` into ``target`` and, where the copied
    ``generation_config.json`` is missing or has no ``eos_token_id``, give it the tokenizer's
    :data:`TOKEN_IDS` (the tokenizer is loaded only then); return the names of the files written."""
    copied = copy_files(source, target)
    generation = target / GENERATION_CONFIG
    has_eos = generation.is_file() and json.loads(generation.read_text()).get("eos_token_id") is not None
    if not has_eos and any(name in copied for name in TOKENIZER_FILES):
        if complete_generation_config(target, tokenizer_token_ids(source)) and GENERATION_CONFIG not in copied:
            copied.append(GENERATION_CONFIG)
    return copied


def import_serving_files(hf_dir: Path, hf_config: dict, out: Path) -> list[str]:
    """An import's serving files: copy them from ``hf_dir`` into ``out/hf_tokenizer`` (written as
    ``hf_tokenizer.tmp`` and renamed), ``generation_config.json`` completed from ``hf_config``
    (its config.json); return the names written (none: no folder)."""
    tmp = out / (IMPORTED_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copied = copy_files(hf_dir, tmp)
    if complete_generation_config(tmp, config_token_ids(hf_config)) and GENERATION_CONFIG not in copied:
        copied.append(GENERATION_CONFIG)
    if copied:
        os.replace(tmp, out / IMPORTED_DIR)
    else:
        shutil.rmtree(tmp)
    return copied
