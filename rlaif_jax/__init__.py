"""rlaif_jax: RL of a policy LM from AI feedback, in JAX (see README.md and ../shared/DESIGN.md)."""
from rlaif_jax import host_memory

# Before jax starts XLA's threads: keep freed heap memory mapped, so each compiled call's temporaries are not
# faulted in afresh (host_memory's docstring has the measurement).
host_memory.keep_freed_memory()
