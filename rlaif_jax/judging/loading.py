"""Loading a judge: its model (sharded on the mesh, frozen), tokenizer and spec, as one `Judge`; or an ensemble's
judges (`load_ensemble`, config.judge.ensemble_paths), checked to share one tokenizer and spec."""
from __future__ import annotations

import logging
from typing import Any, NamedTuple, Sequence

import jax
import ml_collections

from rlaif_jax import reward_model
from rlaif_jax.judging import ensemble
from rlaif_jax.judging.spec import JudgeSpec, make_spec, tokenizers_match, validate_config
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
    """Loads the judge of `config.judge` (sharded on `mesh`), builds its spec, and logs the templating path. A
    config with an ensemble is refused: the programs that call this ask one judge (`load_ensemble` loads them all)."""
    validate_config(config)
    ensemble.check_one_judge(config)
    return _load(config, config.path, policy_tok, stop_token_ids, mesh, rules)


def load_ensemble(config: ml_collections.ConfigDict, policy_tok=None, stop_token_ids: Sequence[int] | None = None,
                  mesh: jax.sharding.Mesh | None = None, rules=None) -> tuple[Judge, ...]:
    """judge.path's judge, then each of `config.judge.ensemble_paths` (`ensemble.py`), loaded alike; each member's
    tokenizer and spec must be judge.path's (`check_member`). Without an ensemble: (load_judge's judge,)."""
    validate_config(config)
    first = _load(config, config.path, policy_tok, stop_token_ids, mesh, rules)
    members = [first]
    for i, path in enumerate(config.ensemble_paths):
        members.append(check_member(first, _load(config, path, policy_tok, stop_token_ids, mesh, rules), i, path))
    return tuple(members)


def check_member(first: Judge, member: Judge, index: int, path: str) -> Judge:
    """`member` (config.judge.ensemble_paths[index]) if it shares `first`'s tokenizer and spec, else one line."""
    if not tokenizers_match(first.tokenizer, member.tokenizer):
        raise ValueError(f"config.judge.ensemble_paths[{index}]={path!r} has another tokenizer than config.judge.path: "
                         "an ensemble's judges share one tokenizer (their rows are assembled once per member alike)")
    if member.spec != first.spec:  # e.g. other EOS ids, which end a chain-of-thought rationale
        raise ValueError(f"config.judge.ensemble_paths[{index}]={path!r} gives another judge spec than config.judge.path "
                         "(its config.json's EOS ids?): an ensemble's judges are asked the same question alike")
    return member


def _load(config: ml_collections.ConfigDict, path: str, policy_tok, stop_token_ids, mesh, rules) -> Judge:
    """The judge of folder `path` with the settings of `config.judge`."""
    judge_cfg, params = hf.load_model(path, mesh=mesh, dtype=config.dtype, param_dtype=config.param_dtype,
                                      rules=rules)
    tok = hf.load_tokenizer(path)
    spec = make_spec(config, tok, policy_tok, stop_token_ids, judge_cfg.eos_token_ids)
    if config.mode == "reward_model":
        params = reward_model.load_reward_model(hf.resolve_path(path), judge_cfg, params, spec, mesh)
    log.info("judge %s: mode=%s, templating path=%s, family=%s", path, spec.mode, spec.path, judge_cfg.family)
    return Judge(judge_cfg, params, spec, tok)
