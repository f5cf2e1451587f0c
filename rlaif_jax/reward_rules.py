"""Rule terms of the composite reward: scores computed from the tokens alone, inside the compiled step (phase 4).

A rule gives each response one number from its tokens and masks: the length, how much it repeats itself,
whether it stopped, whether it holds some tokens, or a task's own rule. `rewards.composite_score` adds the
terms to the judge's score, s = judge_weight * judge + sum_k rule_weights[k] * rule_k, and each term is logged
as `reward/rule/<name>` (its batch mean). Ablating reward shaping therefore needs no host round trip.

Config: `reward.rules` maps a rule's name to its parameters and `reward.rule_weights` the name to its weight.
Every rule needs a weight and every weight a rule (weight 0 logs a rule without changing the reward). A rule's
kind is its name, or its `kind` field, so that one kind can be used twice:

    c.reward.rules = {"length": {}, "repeated_ngrams": {"n": 3}, "stop_token": {},
                      "banned": {"kind": "token_set", "tokens": [13, 27], "mode": "none"},
                      "brevity": {"kind": "user", "fn": "my_pkg.rules:brevity", "limit": 20}}
    c.reward.rule_weights = {"length": -0.5, "repeated_ngrams": -1.0, "stop_token": 0.2, "banned": 1.0,
                             "brevity": 0.3}

Every rule is `fn(x: RuleInputs, **params) -> (B,)`: pure, jittable, its parameters static Python values.
A user rule is any such function, named "module:function" in its `fn` field (imported at validation, before
anything loads, and again when the step is traced); its other fields are its keyword arguments. Tokens are
named by id (the policy tokenizer's); the builder checks each id against the policy's vocabulary.

Shapes: B responses (the rollout's rows), R response tokens, P prompt tokens. `response_mask_br` is > 0 up to
and including the first stop token; prompts are left-padded (`prompt_mask_bp` > 0 on real tokens).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from rlaif_jax import hooks

TOKEN_SET_MODES = ("any", "all", "none")
USER = "user"  # the kind of a rule loaded from "module:function"


class RuleInputs(NamedTuple):
    """What a rule sees of a batch of responses."""
    prompt_tokens_bp: jax.Array    # (B, P) int32, left-padded
    prompt_mask_bp: jax.Array      # (B, P) > 0 on real prompt tokens
    response_tokens_br: jax.Array  # (B, R) int32
    response_mask_br: jax.Array    # (B, R) > 0 up to and including the first stop token
    stopped_b: jax.Array           # (B,) bool: the response emitted a stop token within R tokens


# ---------------------------------------------------------------------------------------------- the rules
def length(x: RuleInputs) -> jax.Array:
    """L / R: the fraction of the response budget used (L = response tokens, the stop token included)."""
    valid_br = x.response_mask_br > 0
    return jnp.sum(valid_br, axis=-1).astype(jnp.float32) / valid_br.shape[-1]


def repeated_ngrams(x: RuleInputs, n: int = 2) -> jax.Array:
    """The fraction of the response's n-grams that repeat an earlier n-gram of the same response:

      (G - D) / max(G, 1),   G = n-grams inside the mask, D = distinct ones among them

    (0 for a response shorter than n). The n-grams are sorted lexicographically per row (one `lax.sort` over n
    keys, O(R log R)), so that equal ones are neighbours: D = G - (valid neighbours that are equal).
    """
    tokens_br, valid_br = x.response_tokens_br, x.response_mask_br > 0
    B, R = tokens_br.shape
    W = R - n + 1  # n-gram start positions
    if W < 1:
        return jnp.zeros((B,), jnp.float32)
    grams = tuple(tokens_br[:, k:k + W] for k in range(n))  # n arrays (B, W): the k-th token of each n-gram
    valid_bw = jnp.all(jnp.stack([valid_br[:, k:k + W] for k in range(n)]), axis=0)
    # Invalid n-grams get key 1 and sort after every valid one; equal valid n-grams become adjacent.
    invalid_bw, *sorted_grams = jax.lax.sort(((~valid_bw).astype(jnp.int32), *grams), dimension=1,
                                             num_keys=n + 1)
    equal_bw = jnp.all(jnp.stack([g[:, 1:] == g[:, :-1] for g in sorted_grams]), axis=0)
    repeats_b = jnp.sum(equal_bw & (invalid_bw[:, 1:] == 0), axis=-1)
    count_b = jnp.sum(valid_bw, axis=-1)
    return repeats_b.astype(jnp.float32) / jnp.maximum(count_b, 1).astype(jnp.float32)


def stop_token(x: RuleInputs) -> jax.Array:
    """1 if the response emitted a stop token within the budget, else 0."""
    return x.stopped_b.astype(jnp.float32)


def token_set(x: RuleInputs, tokens: tuple[int, ...], mode: str = "any") -> jax.Array:
    """Whether the response holds the token ids `tokens` (positions inside the mask only):

      any: 1 if at least one of them occurs;  all: 1 if every one occurs;  none: 1 if none occurs; else 0.
    """
    ids_k = jnp.asarray(tuple(tokens), jnp.int32)
    hits_brk = (x.response_tokens_br[:, :, None] == ids_k) & (x.response_mask_br > 0)[:, :, None]
    present_bk = jnp.any(hits_brk, axis=1)
    if mode == "any":
        return jnp.any(present_bk, axis=-1).astype(jnp.float32)
    if mode == "all":
        return jnp.all(present_bk, axis=-1).astype(jnp.float32)
    if mode == "none":
        return (~jnp.any(present_bk, axis=-1)).astype(jnp.float32)
    raise ValueError(f"token_set mode {mode!r}; choose one of {TOKEN_SET_MODES}")


KINDS: dict[str, Callable[..., jax.Array]] = {
    "length": length, "repeated_ngrams": repeated_ngrams, "stop_token": stop_token, "token_set": token_set}


# ---------------------------------------------------------------------------------------------- from config
class Rule(NamedTuple):
    name: str
    fn: Callable[..., jax.Array]
    params: dict[str, Any]  # keyword arguments of fn (static Python values)


def _check_values(where: str, kind: str, params: Mapping[str, Any]) -> None:
    """Parameter values of the built-in kinds (a user rule checks its own)."""
    if kind == "repeated_ngrams":
        n = params.get("n", 2)
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"{where}.n={n!r} must be an int >= 1 (the n-gram length)")
    if kind == "token_set":
        tokens = params.get("tokens")
        if not (isinstance(tokens, (list, tuple)) and tokens
                and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)):
            raise ValueError(f"{where}.tokens={tokens!r} must be a non-empty list of token ids (ints >= 0) of the "
                             "policy's tokenizer")
        if params.get("mode", "any") not in TOKEN_SET_MODES:
            raise ValueError(f"{where}.mode={params['mode']!r}; choose one of {TOKEN_SET_MODES}")


def load(cfg: ml_collections.ConfigDict) -> tuple[Rule, ...]:
    """The rules of the `reward` section `cfg`, sorted by name, user functions imported, parameters checked.

    Raises ValueError naming the field to change."""
    rules = []
    for name in sorted(cfg.rules):
        where = f"reward.rules.{name}"
        entry = cfg.rules[name]
        if not isinstance(entry, (ml_collections.ConfigDict, Mapping)):
            raise ValueError(f"{where}={entry!r}; a rule is a dict of its parameters ({{}} when it has none)")
        params = entry.to_dict() if isinstance(entry, ml_collections.ConfigDict) else dict(entry)
        kind = params.pop("kind", name)
        if kind == USER:
            if "fn" not in params:
                raise ValueError(f"{where} is a user rule: set {where}.fn = 'module:function'")
            fn = hooks.load_function(params.pop("fn"), f"{where}.fn")
        elif kind in KINDS:
            fn = KINDS[kind]
        else:
            raise ValueError(f"{where}: no rule kind {kind!r}; name the rule (or set its 'kind') one of "
                             f"{(*KINDS, USER)}")
        signature = inspect.signature(fn)
        try:
            signature.bind(None, **params)
        except TypeError as e:
            raise ValueError(f"{where}: {e} ({kind} takes {list(signature.parameters)[1:]})") from None
        _check_values(where, kind, params)
        rules.append(Rule(name, fn, params))
    return tuple(rules)


def check_token_ids(cfg: ml_collections.ConfigDict, vocab_size: int) -> None:
    """Every token id a rule names lies in the policy's vocabulary (checked by the builder, which knows it)."""
    for rule in load(cfg):
        bad = [t for t in rule.params.get("tokens", ()) if t >= vocab_size] if rule.fn is token_set else []
        if bad:
            raise ValueError(f"reward.rules.{rule.name}.tokens has ids {bad} outside the policy's vocabulary "
                             f"(size {vocab_size}); use ids of the policy's tokenizer")


def compute_terms(cfg: ml_collections.ConfigDict, x: RuleInputs) -> dict[str, jax.Array]:
    """name -> (B,) float32 term of every rule of the `reward` section `cfg` (jittable; called while tracing)."""
    terms = {}
    for rule in load(cfg):
        term_b = jnp.asarray(rule.fn(x, **rule.params), jnp.float32)
        if term_b.shape != x.stopped_b.shape:
            raise ValueError(f"reward.rules.{rule.name} returned shape {term_b.shape}; a rule gives one number "
                             f"per response, shape {x.stopped_b.shape}")
        terms[rule.name] = term_b
    return terms
