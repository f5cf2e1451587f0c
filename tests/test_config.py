"""config.validate: every section has a validator, and each setting that cannot work is refused with one line that
names it and says what to change (no file is read: the tiny config's paths need not exist)."""
import re

import ml_collections
import pytest

from rlaif_jax import config as config_lib
from tests import tiny_config

USER_RULE = "tests.test_reward_rules:user_rule_first_token"


def tiny():
    c = tiny_config.get_config()
    config_lib.validate(c, num_devices=1)  # the starting point is valid
    return c


def set_fields(c, changes):
    for key, value in changes.items():
        *sections, field = key.split(".")
        node = c
        for s in sections:
            node = node[s]
        node[field] = value
    return c


# (changes to the tiny config, the start of the message)
REJECTED = {
    # reward: KL
    "k1_as_loss": ({"reward.kl_in_reward": False, "reward.kl_estimator": "k1"},
                   "reward.kl_estimator='k1' as a loss term (reward.kl_in_reward=False) has zero expected gradient "
                   "(E_pi[grad log pi] = 0); use 'k2' (its gradient is that of KL(pi || pi_ref)) or 'k3' (its "
                   "gradient is that of KL(pi_ref || pi)), or set reward.kl_in_reward=True"),
    "adaptive_from_zero": ({"reward.adaptive_kl": True, "reward.kl_coef": 0.0},
                           "reward.adaptive_kl=True with reward.kl_coef=0: the controller multiplies the coefficient, "
                           "so it never leaves 0"),
    "negative_kl_coef": ({"reward.kl_coef": -0.1}, "reward.kl_coef=-0.1 must be >= 0"),
    # optimizer
    "unknown_optimizer": ({"optim.name": "lion"}, "config.optim.name='lion'"),
    "adafactor_with_adam_moments": ({"optim.name": "adafactor", "optim.b2": 0.999},
                                    "config.optim.b2=0.999 set AdamW's moments, which optim.name='adafactor' does not "
                                    "have"),
    "kl_estimator": ({"reward.kl_estimator": "k4"}, "reward.kl_estimator='k4'; choose one of"),
    # reward: rules
    "weight_without_rule": ({"reward.rule_weights": {"length": 1.0}},
                            "reward.rule_weights has 'length' but reward.rules has no rule 'length'"),
    "rule_without_weight": ({"reward.rules": {"length": {}}}, "reward.rules.length has no weight; set "
                            "reward.rule_weights['length'] (0 logs the rule without changing the reward)"),
    "unknown_rule_kind": ({"reward.rules": {"fmt": {}}, "reward.rule_weights": {"fmt": 1.0}},
                          "reward.rules.fmt: no rule kind 'fmt'; name the rule (or set its 'kind') one of"),
    "rule_parameter": ({"reward.rules": {"stop_token": {"n": 2}}, "reward.rule_weights": {"stop_token": 1.0}},
                       "reward.rules.stop_token: got an unexpected keyword argument 'n' (stop_token takes [])"),
    "ngram_n": ({"reward.rules": {"repeated_ngrams": {"n": 0}}, "reward.rule_weights": {"repeated_ngrams": -1.0}},
                "reward.rules.repeated_ngrams.n=0 must be an int >= 1"),
    "token_set_strings": ({"reward.rules": {"token_set": {"tokens": ["a"]}}, "reward.rule_weights": {"token_set": 1.0}},
                          "reward.rules.token_set.tokens=['a'] must be a non-empty list of token ids"),
    "token_set_mode": ({"reward.rules": {"token_set": {"tokens": [3], "mode": "some"}},
                        "reward.rule_weights": {"token_set": 1.0}},
                       "reward.rules.token_set.mode='some'; choose one of ('any', 'all', 'none')"),
    "user_rule_without_fn": ({"reward.rules": {"mine": {"kind": "user"}}, "reward.rule_weights": {"mine": 1.0}},
                             "reward.rules.mine is a user rule: set reward.rules.mine.fn = 'module:function'"),
    "user_rule_not_importable": ({"reward.rules": {"mine": {"kind": "user", "fn": "no_such_module:f"}},
                                  "reward.rule_weights": {"mine": 1.0}},
                                 "reward.rules.mine.fn='no_such_module:f': module 'no_such_module' does not import"),
    "user_rule_missing_function": ({"reward.rules": {"mine": {"kind": "user", "fn": "tests.test_config:nothing"}},
                                    "reward.rule_weights": {"mine": 1.0}},
                                   "reward.rules.mine.fn='tests.test_config:nothing': module 'tests.test_config' has "
                                   "no function 'nothing'"),
    "user_rule_not_a_path": ({"reward.rules": {"mine": {"kind": "user", "fn": "tests.test_config"}},
                              "reward.rule_weights": {"mine": 1.0}},
                             "reward.rules.mine.fn='tests.test_config' is not 'module:function'"),
    "user_rule_argument": ({"reward.rules": {"mine": {"kind": "user", "fn": USER_RULE}},
                            "reward.rule_weights": {"mine": 1.0}},
                           "reward.rules.mine: missing a required argument: 'token'"),
    # rollout
    "temperature": ({"rollout.temperature": 0.0}, "rollout.temperature=0.0 must be finite and > 0"),
    "top_p": ({"rollout.top_p": 0.0}, "rollout.top_p=0.0 must be in (0, 1]"),
    "top_k": ({"rollout.top_k": -1}, "rollout.top_k=-1 must be an int >= 0"),
    "n_samples": ({"rollout.n_samples": 0}, "rollout.n_samples=0 must be an int >= 1"),
    "max_new_tokens": ({"rollout.max_new_tokens": 0}, "rollout.max_new_tokens=0 must be an int >= 1"),
    "stop_strings": ({"rollout.stop_ids": ["</s>"]}, "rollout.stop_ids=['</s>'] must be token ids (ints >= 0)"),
    "cache_dtype": ({"rollout.cache_dtype": "int8"}, "rollout.cache_dtype='int8'; use one of"),
    "decode_weights": ({"rollout.decode_weights": "replicated"}, "rollout.decode_weights='replicated'; use one of"),
    # data
    "data_path": ({"data.path": ""}, "config.data.path is empty"),
    "prompt_parser": ({"data.prompt_parser": "nope"}, "config.data.prompt_parser='nope'; use one of"),
    "prompt_format_without_slots": ({"data.prompt_format": "Summarise:"}, "config.data.prompt_format='Summarise:' "
                                    "names no column"),
    "system_prompt_without_chat": ({"data.system_prompt": "be nice"}, "config.data.system_prompt is only used "
                                   "with the chat template"),
    "max_prompt_len": ({"data.max_prompt_len": 0}, "config.data.max_prompt_len=0 must be >= 1"),
    "eval_fraction_range": ({"data.eval_fraction": 1.0}, "config.data.eval_fraction=1.0 must be in [0, 1)"),
    "eval_fraction_unused": ({"data.eval_split": "test"}, "config.data.eval_fraction=0.25 is unused when "
                             "config.data.eval_path or eval_split names the held-out prompts"),
    # logging, checkpoint, eval
    "wandb_mode": ({"logging.wandb_mode": "on"}, "config.logging.wandb_mode='on'; use one of"),
    "checkpoint_every": ({"checkpoint.every_steps": 0}, "config.checkpoint.every_steps=0 must be >= 1"),
    "checkpoint_keep": ({"checkpoint.max_to_keep": -1}, "config.checkpoint.max_to_keep=-1 must be >= 0"),
    "eval_every": ({"eval.every": -1}, "config.eval.every=-1 must be >= 0"),
    "eval_samples": ({"eval.samples_per_prompt": 0}, "config.eval.max_prompts=8 and "
                     "config.eval.samples_per_prompt=0 must be >= 1"),
    "ground_truth": ({"eval.ground_truth": "no_such_module:grade"},
                     "config.eval.ground_truth='no_such_module:grade': module 'no_such_module' does not import"),
    "win_rate_reward_model": ({"judge.mode": "reward_model"}, "config.eval.win_rate=True asks the judge to compare "
                              "two responses, which a reward model (judge.mode='reward_model') cannot"),
    "pairwise_template_unused": ({"eval.win_rate": False}, "config.eval.pairwise_template is only used for the "
                                 "win rate"),
    # judge ensembles
    "ensemble_aggregate": ({"judge.ensemble_paths": ("/j2",), "judge.ensemble_aggregate": "median"},
                           "config.judge.ensemble_aggregate='median'; use one of ('mean', 'min', 'mean_minus_std')"),
    "ensemble_aggregate_without_judges": ({"judge.ensemble_aggregate": "min"}, "config.judge.ensemble_aggregate='min' "
                                          "aggregates an ensemble, but config.judge.ensemble_paths is empty"),
    "ensemble_empty_path": ({"judge.ensemble_paths": ("/j2", "")}, "config.judge.ensemble_paths=('/j2', '') must be "
                            "a tuple of judge folders"),
    "ensemble_std_coef_unread": ({"judge.ensemble_paths": ("/j2",), "judge.ensemble_aggregate": "min",
                                  "judge.ensemble_std_coef": 2.0},
                                 "config.judge.ensemble_std_coef=2.0 is read by ensemble_aggregate='mean_minus_std' "
                                 "only, not 'min'"),
    "ensemble_std_coef_negative": ({"judge.ensemble_paths": ("/j2",), "judge.ensemble_aggregate": "mean_minus_std",
                                    "judge.ensemble_std_coef": -1.0},
                                   "config.judge.ensemble_std_coef=-1.0 must be > 0"),
    "ensemble_remote": ({"judge.mode": "remote", "judge.path": "", "judge.remote_url": "http://judge",
                         "judge.remote_model": "m", "judge.ensemble_paths": ("/j2",)},
                        "config.judge.ensemble_paths: a remote judge (mode 'remote') cannot be ensembled"),
    "ensemble_min_online_dpo": ({"judge.ensemble_paths": ("/j2",), "judge.ensemble_aggregate": "min",
                                 "algo.estimator": "online_dpo", "critic.kind": "none", "rollout.n_samples": 2,
                                 "judge.mode": "pairwise", "reward.kl_coef": 0.0,
                                 "judge.template": "Q : {prompt} R : {response} R : {response_b} S :"},
                                "config.judge.ensemble_aggregate='min' with algo.estimator='online_dpo': its win "
                                "rates need P(b better) = 1 - P(a better)"),
    # policy, critic, compute
    "policy_path": ({"policy.path": ""}, "config.policy.path is empty"),
    "policy_dtype": ({"policy.dtype": "fp8"}, "config.policy.dtype='fp8'; choose one of"),
    "critic_path_unused": ({"critic.path": "/rm"}, "config.critic.path='/rm' is only read by a separate critic"),
    "scan_unroll": ({"compute.scan_unroll": 0}, "config.compute.scan_unroll=0 must be >= 1"),
    "remat": ({"compute.remat": "offload"}, "config.compute.remat='offload'; choose one of"),
    "attention": ({"compute.attention": "flash"}, "config.compute.attention='flash'; choose one of"),
    "attention_chunk": ({"compute.attention_chunk": 0}, "config.compute.attention_chunk=0 must be >= 1"),
    "logprob_chunk": ({"compute.logprob_chunk": -1}, "config.compute.logprob_chunk=-1 must be >= 0"),
    "forward_microbatches": ({"compute.forward_microbatches": 0}, "config.compute.forward_microbatches=0 must be >= 1"),
    "forward_microbatches_batch": ({"compute.forward_microbatches": 3, "train.batch_size": 8},
                                   "config.compute.forward_microbatches=3 must divide config.train.batch_size=8"),
    # optim, train, mesh, seed
    "learning_rate_zero": ({"optim.learning_rate": 0.0}, "config.optim.learning_rate=0.0 must be finite and > 0"),
    "learning_rate_nan": ({"optim.learning_rate": float("nan")}, "config.optim.learning_rate=nan must be finite"),
    "schedule": ({"optim.schedule": "step"}, "config.optim.schedule='step'; choose one of"),
    "grad_accum": ({"optim.grad_accum": 0}, "config.optim.grad_accum=0 must be >= 1"),
    "adam_b2": ({"optim.b2": 1.0}, "config.optim.b1=0.9 and config.optim.b2=1.0 must lie in [0, 1)"),
    "warmup": ({"optim.warmup_steps": -1}, "config.optim.warmup_steps=-1 must be >= 0"),
    "batch_size": ({"train.batch_size": 0}, "config.train.batch_size=0 and config.train.steps=6 must be >= 1"),
    "mesh_size": ({"mesh.fsdp": 0}, "config.mesh data=-1, fsdp=0, tensor=1: each must be >= 1"),
    "mesh_rule_axis": ({"mesh.rules": [["batch", "model"]]}, "config.mesh.rules entry ['batch', 'model'] is not"),
    "mesh_rule_missing": ({"mesh.rules": [["batch", ["data", "fsdp"]]]}, "config.mesh.rules has no entry for the "
                          "logical axes ['length', "),
    "seed": ({"seed": None}, "config.seed=None must be an int"),
}


@pytest.mark.parametrize("case", sorted(REJECTED))
def test_each_rejection_is_one_line_saying_what_to_change(case):
    changes, message = REJECTED[case]
    c = tiny()
    with c.unlocked():  # a locked field may not change its type (e.g. seed to a float, rules to a dict)
        set_fields(c, changes)
    with pytest.raises(ValueError) as e:
        config_lib.validate(c, num_devices=1)
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_a_section_without_a_validator_is_refused():
    c = tiny()
    with c.unlocked():
        c.sampler = ml_collections.ConfigDict({"top_p": 0.5})
    with pytest.raises(ValueError, match=re.escape("config has sections without a validator: ['sampler']; add each "
                                                   "one's check to rlaif_jax.config.section_validators")):
        config_lib.validate(c, num_devices=1)


def test_the_testbed_section_holds_build_and_its_seed():
    c = tiny()
    with c.unlocked():
        c.testbed = ml_collections.ConfigDict({"build": True, "seed": 3})
    config_lib.validate(c, num_devices=1)
    with c.unlocked():
        c.testbed.ensemble_seeds = (2, 3)  # builds whose judges join a judge ensemble (experiments/testbed.py)
    config_lib.validate(c, num_devices=1)
    with c.unlocked():
        c.testbed.ensemble_seeds = ("2",)
    with pytest.raises(ValueError, match=re.escape("config.testbed={'build': True, 'ensemble_seeds': ('2',), 'seed': 3}; "
                                                   "it holds build")):
        config_lib.validate(c, num_devices=1)
    with c.unlocked():
        del c.testbed["ensemble_seeds"]
        c.testbed.folder = "/tmp/tb"
    with pytest.raises(ValueError, match=re.escape("config.testbed={'build': True, 'folder': '/tmp/tb', 'seed': 3}; "
                                                   "it holds build, a bool")):
        config_lib.validate(c, num_devices=1)


def test_every_base_section_has_a_validator():
    assert set(config_lib.base_config().keys()) <= set(config_lib.section_validators())


def test_rules_and_their_weights_validate():
    c = tiny()
    set_fields(c, {"reward.rules": {"length": {}, "repeated_ngrams": {"n": 3}, "stop_token": {},
                                    "banned": {"kind": "token_set", "tokens": [3, 4], "mode": "none"},
                                    "mine": {"kind": "user", "fn": USER_RULE, "token": 3}},
                   "reward.rule_weights": {"length": -0.5, "repeated_ngrams": -1.0, "stop_token": 0.0, "banned": 1.0,
                                           "mine": 0.5}})
    config_lib.validate(c, num_devices=1)


PAIRWISE = {"judge.mode": "pairwise", "judge.template": "Q : {prompt} R : {response} R : {response_b} S :"}


@pytest.mark.parametrize("changes, message", [
    (PAIRWISE, "config.judge.mode='pairwise' scores each sample against a baseline: set "
               "reward.pairwise_baseline='reference_sample'"),
    ({"reward.pairwise_baseline": "reference_sample"}, "reward.pairwise_baseline='reference_sample' is only read by "
                                                        "a pairwise judge's reward"),
    ({**PAIRWISE, "reward.pairwise_baseline": "dataset_reference"}, "reward.pairwise_baseline='dataset_reference' "
                                                                     "needs config.data.reference_field"),
    ({**PAIRWISE, "reward.pairwise_baseline": "reference"}, "reward.pairwise_baseline='reference'; choose one of"),
    ({"data.reference_field": "answer"}, "config.data.reference_field='answer' is read by nothing"),
    ({"judge.template": "Q : {prompt} R : {response} Ref : {reference} S :"}, "config.judge.template has "
                                                                                "{reference}: set config.data."),
    ({"data.max_reference_len": 0}, "config.data.max_reference_len=0 must be >= 1"),
])
def test_pairwise_rewards_and_references_are_checked(changes, message):
    c = tiny()
    set_fields(c, changes)
    with pytest.raises(ValueError) as e:
        config_lib.validate(c, num_devices=1)
    assert "\n" not in str(e.value) and str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("changes", [
    {**PAIRWISE, "reward.pairwise_baseline": "reference_sample"},
    {**PAIRWISE, "reward.pairwise_baseline": "dataset_reference", "data.reference_field": "answer"},
    {"judge.template": "Q : {prompt} R : {response} Ref : {reference} S :", "data.reference_field": "answer"},
])
def test_pairwise_rewards_and_references_that_validate(changes):
    c = tiny()
    set_fields(c, changes)
    config_lib.validate(c, num_devices=1)
