"""Host memory and time of ``megatron-qad import`` on a Qwen2-1.5B-shaped checkpoint.

Writes a random BF16 Hugging Face checkpoint with Qwen2-1.5B's config.json and tensor names and
shapes (from transformers' own ``Qwen2ForCausalLM``, built on the meta device), in safetensors shards
of ``--shard-gib`` GiB, one tensor drawn at a time; then imports it in a fresh process and prints
that process's peak resident memory (``ru_maxrss``) and wall time, against the checkpoint's size.

    python benchmarks/bench_import_memory.py /tmp/import_bench [--shard-gib 1.0]
"""

import argparse
import datetime
import json
import multiprocessing
import platform
import resource
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

QWEN2_1P5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
              "hidden_size": 1536, "intermediate_size": 8960, "max_position_embeddings": 131072,
              "num_attention_heads": 12, "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
              "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
              "use_sliding_window": False, "vocab_size": 151936}


def write_random_checkpoint(directory: Path, shard_bytes: int) -> int:
    """Write the random checkpoint (one shard in memory at a time) and its index; return its tensor bytes."""
    import transformers

    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2_1P5B))
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(QWEN2_1P5B))
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, total = {}, {}, 0, 0

    def flush():
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, directory / file)
        weight_map.update({name: file for name in shard})

    for name, shape in shapes.items():
        tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        if shard and size + tensor.nbytes > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def _import(hf_dir: str, out_dir: str, queue) -> None:
    from megatron_qad.hf_import import import_checkpoint

    start = time.perf_counter()
    import_checkpoint(hf_dir, out_dir)
    queue.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--shard-gib", type=float, default=1.0)
    args = parser.parse_args()
    hf_dir, out_dir = args.workdir / "hf", args.workdir / "imported"
    total = write_random_checkpoint(hf_dir, int(args.shard_gib * 2**30))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_import, args=(str(hf_dir), str(out_dir), queue))
    process.start()
    seconds, peak = queue.get()
    process.join()
    largest = max(path.stat().st_size for path in hf_dir.glob("model-*.safetensors"))
    gib = 2**30
    print(f"import of a Qwen2-1.5B-shaped BF16 checkpoint, {platform.node()}, {datetime.date.today()}, "
          f"torch {torch.__version__}")
    print("| checkpoint tensors | largest shard | peak RSS of the import process | wall time |")
    print("|---|---|---|---|")
    print(f"| {total / gib:.2f} GiB | {largest / gib:.2f} GiB | {peak / gib:.2f} GiB | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
