"""rlaif_jax: RL of a policy LM from AI feedback, in JAX (see README.md and ../shared/DESIGN.md)."""
from rlaif_jax import host_memory

# Before jax starts XLA's threads: with RLAIF_JAX_KEEP_FREED_MEMORY=1, keep freed heap memory mapped, so each
# compiled call's temporaries are not faulted in afresh (host_memory's docstring: when it pays, when it does not).
host_memory.keep_freed_memory()
