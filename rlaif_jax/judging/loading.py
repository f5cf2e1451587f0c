"""Loading a judge: its model (sharded on the mesh, frozen), tokenizer and spec, as one `Judge`."""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, Sequence

import jax
import ml_collections

from rlaif_jax import reward_model
from rlaif_jax.judging.spec import JudgeSpec, make_spec, validate_config
from rlaif_jax.models import hf
from rlaif_jax.models.config import ModelConfig

log = logging.getLogger(__name__)


class Judge(NamedTuple):
    """A loaded judge: its model config (static), params (frozen), spec (static) and tokenizer."""
    cfg: ModelConfig
    params: Any  # model params, or reward_model.RewardModelParams in reward_model mode
    spec: JudgeSpec
    tokenizer: Any


def load_judge(config: ml_collections.ConfigDict, policy_tok=None, stop_token_ids: Sequence[int] | None = None,
               mesh: jax.sharding.Mesh | None = None, rules=None) -> Judge:
    """Loads the judge of `config.judge` (sharded on `mesh`), builds its spec, and logs the templating path."""
    validate_config(config)
    judge_cfg, params = hf.load_model(config.path, mesh=mesh, dtype=config.dtype, param_dtype=config.param_dtype,
                                      rules=rules)
    tok = hf.load_tokenizer(config.path)
    spec = make_spec(config, tok, policy_tok, stop_token_ids, judge_cfg.eos_token_ids)
    if config.mode == "reward_model":
        params = reward_model.load_reward_model(hf.resolve_path(config.path), judge_cfg, params, spec, mesh)
    log.info("judge: mode=%s, templating path=%s, family=%s", spec.mode, spec.path, judge_cfg.family)
    return Judge(judge_cfg, params, spec, tok)
