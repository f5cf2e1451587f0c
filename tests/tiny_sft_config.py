"""An SFT config over the tiny world of tests/test_sft.py (tests/tiny.py's policy and an SFT JSONL); the argument is
the world's folder."""
from rlaif_jax import sft


def get_config(arg: str = ""):
    root = arg or "/tmp/rlaif_tiny_sft_world"
    c = sft.base_config()
    c.policy.path = f"{root}/policy"
    c.data.path = f"{root}/sft.jsonl"
    c.data.max_prompt_len = 6
    c.data.max_reference_len = 6
    c.train.batch_size = 8
    c.train.steps = 16
    c.checkpoint.every_steps = 4
    c.checkpoint.max_to_keep = 2
    c.optim.learning_rate = 3e-2
    c.optim.warmup_steps = 2
    c.optim.schedule = "cosine"
    c.logging.progress_bar = False
    c.lock()
    return c
