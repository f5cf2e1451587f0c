"""A training-program config over the tiny world of tests/tiny.py; the argument is the world's folder."""
from rlaif_jax import config as config_lib


def get_config(arg: str = ""):
    root = arg or "/tmp/rlaif_tiny_world"
    c = config_lib.base_config()
    c.policy.path = f"{root}/policy"
    c.judge.path = f"{root}/judge"
    c.judge.template = "Q : {prompt} R : {response} S :"
    c.judge.max_len = 24
    c.judge.option_tokens = ("1", "2")
    c.eval.pairwise_template = "Q : {prompt} R : {response} R : {response_b} S :"
    c.data.path = f"{root}/prompts.jsonl"
    c.data.max_prompt_len = 6
    c.data.eval_fraction = 0.25
    c.rollout.max_new_tokens = 6
    c.train.batch_size = 8
    c.train.steps = 6
    c.eval.every = 3
    c.eval.max_prompts = 8
    c.checkpoint.every_steps = 2
    c.optim.learning_rate = 3e-3
    c.reward.kl_coef = 0.01
    c.logging.progress_bar = False
    c.lock()
    return c
