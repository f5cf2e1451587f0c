"""rlaif_jax: reinforcement learning from AI feedback in JAX."""
from setuptools import find_packages, setup

setup(
    name="rlaif_jax",
    version="0.1.0",
    description="RLAIF in JAX: one compiled step for rollout, LLM-judge scoring and PPO-family updates.",
    packages=find_packages(include=["rlaif_jax", "rlaif_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10,<0.11",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.12,<0.13",
        "transformers>=5.0,<6",
        "tokenizers>=0.22,<1",
        "safetensors>=0.5,<1",
        "datasets>=4.0,<6",
        "ml-collections>=1.0,<2",
        "wandb>=0.20,<1",
        "absl-py>=2.0",
        "numpy>=1.26",
        "tqdm>=4.60",
        "matplotlib>=3.8",
    ],
    extras_require={
        # torch is pinned exactly: 2.13.0 is the CPU build this project's machines carry;
        # any other version pulls a multi-GB CUDA build.
        # pytest-xdist: scripts/test.sh runs the suite in 2 worker processes (most tests are bound by one core's
        # XLA compile, so two workers use a 2-core machine fully).
        "test": ["pytest>=8", "pytest-xdist>=3.5", "torch==2.13.0", "trl>=0.20,<2"],
    },
)
