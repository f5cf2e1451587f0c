"""Python reward functions on text: terms of the composite reward computed on the host, between the step's
compiled programs (the host path of `train_step.make_host_judge_step`).

A reward function has TRL's signature

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

and is named "module:function" in `reward.functions` (found by import, `hooks.load_function`, at validation):

    c.reward.functions = {"exact": "my_pkg.rewards:exact_match", "format": "my_pkg.rewards:has_answer_tag"}
    c.reward.function_weights = {"exact": 1.0, "format": 0.2}

`prompts` and `completions` are the rollout's prompt and response texts (the policy tokenizer's decode, special
tokens skipped), one entry per response (the n samples of a prompt repeat its prompt). `columns` are the dataset's
other fields of each row's prompt (a reference answer, a test case), plus `stopped` (list[bool]: the response
emitted a stop token); a function without `**kwargs` receives only the columns it names. A function may return
None for a row ("no opinion"): that row gets `reward.function_neutral`. Anything else that is not one finite number
per row, or an exception, stops the run with one line naming the function: a bug in user code must not be averaged
away.

`rewards.composite_score` adds each term to the judge's score, s = judge_weight * judge + sum_k rule_weights[k] *
rule_k + sum_k function_weights[k] * function_k, in the step; each term is logged as `reward/function/<name>` (its
batch mean) with `reward/function/<name>/none_frac`.

Multi-host: each process computes the terms of its own rows (the rows of the rollout its devices hold) from its own
rows' columns, and the terms are assembled into global arrays (`local_rows`, `to_global_rows`).
"""
from __future__ import annotations

import inspect
import math
import time
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np

from rlaif_jax import data as data_lib
from rlaif_jax import hooks

# Columns the data pipeline adds to each row (token ids): not handed to reward functions.
INTERNAL_COLUMNS = (data_lib.PROMPT_IDS, data_lib.REFERENCE_IDS, data_lib.PROMPT_TEXT)


class RewardFunctionError(RuntimeError):
    """A user reward function raised or returned something other than one number (or None) per row."""


class RewardFunction(NamedTuple):
    name: str
    path: str                        # "module:function"
    fn: Callable[..., Sequence[Any]]
    keywords: frozenset[str] | None  # the keyword arguments it accepts besides prompts, completions; None: **kwargs


def load(cfg: ml_collections.ConfigDict) -> tuple[RewardFunction, ...]:
    """The functions of the `reward` section `cfg`, sorted by name, imported and their signatures checked.
    Raises ValueError naming the field to change."""
    functions = []
    for name in sorted(cfg.functions):
        where, path = f"reward.functions.{name}", cfg.functions[name]
        if not isinstance(path, str):
            raise ValueError(f"{where}={path!r}; name the function as 'module:function'")
        fn = hooks.load_function(path, where)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):  # a builtin without a signature: trust it with **kwargs
            functions.append(RewardFunction(name, path, fn, None))
            continue
        positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) < 2 and not any(p.kind == p.VAR_POSITIONAL for p in params.values()):
            raise ValueError(f"{where}={path!r} takes {list(params)}; a reward function takes (prompts, completions, "
                             "**columns) and returns one float (or None) per completion")
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        keywords = None if var_kw else frozenset(
            n for p_i, (n, p) in enumerate(params.items()) if p_i >= 2 and p.kind != p.VAR_POSITIONAL)
        functions.append(RewardFunction(name, path, fn, keywords))
    return tuple(functions)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """The reward section's function settings beyond what `rewards.validate_config` checks of every term (each
    function imports, `load`, and has a finite weight, `rewards.check_term_weights`): the neutral value is a
    finite number."""
    neutral = cfg.function_neutral
    if isinstance(neutral, bool) or not isinstance(neutral, (int, float)) or not math.isfinite(neutral):
        raise ValueError(f"reward.function_neutral={neutral!r} must be a finite number (the value of a None)")


# ---------------------------------------------------------------------------------------------- calling them
def call(function: RewardFunction, prompts: list[str], completions: list[str], columns: Mapping[str, list],
         neutral: float) -> tuple[np.ndarray, np.ndarray]:
    """One function over one batch of rows: (values (b,) float32 with None -> `neutral`, none (b,) bool).
    Raises RewardFunctionError, one line naming the function, when it raises or returns anything but one finite
    number or None per row."""
    kwargs = dict(columns) if function.keywords is None else {
        k: v for k, v in columns.items() if k in function.keywords}
    where = f"reward.functions.{function.name} ({function.path})"
    try:
        out = function.fn(prompts, completions, **kwargs)
    except Exception as e:  # noqa: BLE001  any bug in user code stops the run, named
        first = str(e).splitlines()[0] if str(e) else ""
        raise RewardFunctionError(f"{where} raised {type(e).__name__}: {first}") from e
    try:
        out = list(out)
    except TypeError:
        raise RewardFunctionError(f"{where} returned {type(out).__name__}; return a list of one float (or None) "
                                  f"per completion ({len(completions)})") from None
    if len(out) != len(completions):
        raise RewardFunctionError(f"{where} returned {len(out)} values for {len(completions)} completions")
    none = np.array([v is None for v in out], bool)
    values = np.full(len(out), neutral, np.float32)
    for i, v in enumerate(out):
        if v is None:
            continue
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(v)):
            raise RewardFunctionError(f"{where} returned {v!r} for completion {i}; return a finite number or None")
        values[i] = float(v)
    return values, none


def columns_of(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """Dataset rows (`PromptDataset.rows`) -> {column: list}, without the pipeline's own token columns."""
    names = [k for k in (rows[0] if rows else {}) if k not in INTERNAL_COLUMNS]
    return {k: [r[k] for r in rows] for k in names}


# ---------------------------------------------------------------------------------------------- rows of a process
def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global array (its devices' shards along axis 0, each once, in row order). A
    replicated array gives all rows. The rows must be contiguous (a mesh from `sharding.make_mesh` groups devices
    by process)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    shards = {}
    for s in x.addressable_shards:
        shards.setdefault(s.index[0].start or 0, s)
    starts = sorted(shards)
    out = np.concatenate([np.asarray(shards[k].data) for k in starts])
    if starts[0] + out.shape[0] != (shards[starts[-1]].index[0].stop or x.shape[0]):
        raise ValueError("this process's rows of the rollout are not contiguous; use a mesh from "
                         "sharding.make_mesh, which groups devices by process")
    return out


def to_global_rows(values: np.ndarray, like: jax.Array) -> jax.Array:
    """Per-row host values of this process's rows -> a global (B,) array laid out along `like`'s rows."""
    if not isinstance(like, jax.Array) or like.is_fully_addressable:
        return jax.numpy.asarray(values)
    spec = like.sharding.spec[0] if hasattr(like.sharding, "spec") and len(like.sharding.spec) else None
    sharding = jax.sharding.NamedSharding(like.sharding.mesh, jax.sharding.PartitionSpec(spec))
    return jax.make_array_from_process_local_data(sharding, values, (like.shape[0],))


def local_texts(tokenizer, roll) -> tuple[list[str], list[str], np.ndarray]:
    """This process's rollout rows as text (prompt, completion; special tokens skipped) and their stopped flags."""
    prompt, pmask = local_rows(roll.prompt_tokens_bp), local_rows(roll.prompt_mask_bp)
    resp, rmask = local_rows(roll.response_tokens_br), local_rows(roll.response_mask_br)
    prompts = [tokenizer.decode(t[m > 0].tolist(), skip_special_tokens=True) for t, m in zip(prompt, pmask)]
    completions = [tokenizer.decode(t[m > 0].tolist(), skip_special_tokens=True) for t, m in zip(resp, rmask)]
    return prompts, completions, local_rows(roll.stopped_b)


class HostTerms(NamedTuple):
    """The function terms of one step, for the learn program: name -> (B,) value and (B,) 1.0 where None."""
    values: dict[str, jax.Array]
    none: dict[str, jax.Array]


def compute_terms(functions: Sequence[RewardFunction], neutral: float, tokenizer, roll,
                  columns: Mapping[str, list] | None, n_samples: int) -> tuple[HostTerms, float]:
    """Every function's term of this process's rollout rows, as global (B,) arrays, and the seconds spent on the
    host (decoding + the functions). `columns`: this process's prompts' dataset columns (one entry per prompt;
    repeated here for its n samples), or None."""
    if not functions:
        return HostTerms({}, {}), 0.0
    jax.block_until_ready(roll)  # the time below is the host's work, not the wait for the rollout program
    t0 = time.perf_counter()
    prompts, completions, stopped = local_texts(tokenizer, roll)
    rows = {}
    for k, v in (columns or {}).items():
        if len(v) * n_samples != len(completions):
            raise ValueError(f"column {k!r} has {len(v)} prompts for {len(completions)} rollout rows of this process "
                             f"({n_samples} samples per prompt)")
        rows[k] = [x for x in v for _ in range(n_samples)]
    rows["stopped"] = [bool(s) for s in stopped]
    values, none = {}, {}
    for f in functions:
        v, is_none = call(f, prompts, completions, rows, neutral)
        values[f.name] = to_global_rows(v, roll.stopped_b)
        none[f.name] = to_global_rows(is_none.astype(np.float32), roll.stopped_b)
    return HostTerms(values, none), time.perf_counter() - t0
