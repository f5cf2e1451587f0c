"""The judge's static description: config defaults, the scoring modes' demands, validation, `JudgeSpec`.

Everything here runs once at start-up, on the host. `make_spec` turns `config.judge` and the tokenizers into a
hashable `JudgeSpec` (a static argument of jit) that the assembly, scoring and host modules read; `choose_path`
is the one place that decides between the token_space and host paths.

Each scoring mode is one entry of `MODES`: its default template, the slots it needs, the answer tokens whose
logits it reads, its config checks, and the judge rows it asks per example (`Query`, query-major: row
n = q * B + b). How the answer becomes a score is the mode's entry of `scoring.SCORERS`.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Callable, NamedTuple, Sequence

import ml_collections

from rlaif_jax.judging import ensemble as ensemble_lib
from rlaif_jax.judging import reasoning as reasoning_lib
from rlaif_jax.judging import remote

log = logging.getLogger(__name__)

TRUNCATION_RULES = ("prompt_left", "response_right")
TEMPLATING = ("auto", "token_space", "host")
SLOT_NAMES = ("prompt", "response", "response_b", "reference", "principle", "criterion")
# Slots cut from the right when too long, all capped to one common length so neither of two compared
# responses is favoured by truncation.
RESPONSE_SLOTS = ("response", "response_b", "reference")
# Slots taken from config tables: never truncated (start-up checks they fit).
TABLE_SLOTS = ("principle", "criterion")
# Slots filled by one mode's queries only (pairwise's second response, rubric's criterion).
MODE_SLOTS = ("response_b", "criterion")
_SLOT_RE = re.compile(r"\{(" + "|".join(SLOT_NAMES) + r")\}")


# ================================================================================================ modes
class Query(NamedTuple):
    """One judge row of an example, followed alike by the token-space assembly and the host rendering.

    inputs: (slot, input) pairs for the slots filled by another of the example's inputs than their namesake
            (pairwise's second query swaps {response} and {response_b});
    criterion: the row of the criteria table asked in {criterion}; -1 when the template has none.
    """
    inputs: tuple[tuple[str, str], ...] = ()
    criterion: int = -1

    def input_of(self, slot: str) -> str:
        return dict(self.inputs).get(slot, slot)


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a scoring mode asks of `config.judge` and of its template; its scoring is `scoring.SCORERS[name]`."""
    template: str  # the default template ("{num_scores}" is replaced by config.judge.num_scores)
    required_slots: tuple[str, ...]
    answer_field: str = ""  # the config.judge field of the answer tokens whose logits the mode reads; "" = none
    answer_strings: Callable[[ml_collections.ConfigDict], tuple[str, ...]] = lambda c: ()
    queries: Callable[[ml_collections.ConfigDict], tuple[Query, ...]] = lambda c: (Query(),)
    check: Callable[[ml_collections.ConfigDict], None] = lambda c: None  # its checks that need no tokenizer
    # With chain of thought (config.judge.cot, `reasoning.py`): the default template, which asks for a rationale,
    # and the answer prompt appended after it.
    cot_template: str = ""
    cot_answer_prompt: str = ""


def _scale_strings(c) -> tuple[str, ...]:
    return tuple(c.score_tokens) or tuple(str(k) for k in range(1, c.num_scores + 1))


def _check_scale(c) -> None:
    if c.num_scores < 2:
        raise ValueError(f"config.judge.num_scores={c.num_scores}; needs at least 2")
    if c.score_tokens and len(c.score_tokens) != c.num_scores:
        raise ValueError(f"config.judge.score_tokens has {len(c.score_tokens)} entries, num_scores={c.num_scores}")


def _check_options(c) -> None:
    if len(c.option_tokens) != 2:
        raise ValueError(f"config.judge.option_tokens={c.option_tokens}; needs exactly two labels")


def _check_rubric(c) -> None:
    if len(c.yes_no_tokens) != 2:
        raise ValueError(f"config.judge.yes_no_tokens={c.yes_no_tokens}; needs (yes, no)")
    if not c.criteria:
        raise ValueError("mode 'rubric' needs at least one entry in config.judge.criteria")
    for criterion in c.criteria:
        if set(criterion.keys()) != {"name", "question", "weight"}:
            raise ValueError(f"each config.judge.criteria entry needs keys name, question, weight; "
                             f"got {dict(criterion)}")


MODES = {
    "pointwise": Mode(
        template=("Rate how helpful , correct and concise the response is , from 1 ( worst ) to {num_scores} "
                  "( best ) .\nPrompt : {prompt}\nResponse : {response}\nScore :"),
        required_slots=("response",), answer_field="score_tokens", answer_strings=_scale_strings,
        check=_check_scale,
        cot_template=("Rate how helpful , correct and concise the response is , from 1 ( worst ) to {num_scores} "
                      "( best ) .\nPrompt : {prompt}\nResponse : {response}\nExplain your rating .\nRationale :"),
        cot_answer_prompt="\nScore :"),
    "principles": Mode(
        template=("Principle : {principle}\nRate how well the response follows the principle , "
                  "from 1 ( worst ) to {num_scores} ( best ) .\nPrompt : {prompt}\nResponse : {response}\nScore :"),
        required_slots=("response", "principle"), answer_field="score_tokens", answer_strings=_scale_strings,
        check=_check_scale,
        cot_template=("Principle : {principle}\nRate how well the response follows the principle , from 1 ( worst ) "
                      "to {num_scores} ( best ) .\nPrompt : {prompt}\nResponse : {response}\nExplain your rating .\n"
                      "Rationale :"),
        cot_answer_prompt="\nScore :"),
    "pairwise": Mode(
        template=("Which response answers the prompt better ?\nPrompt : {prompt}\n"
                  "Response A : {response}\nResponse B : {response_b}\nBetter response :"),
        required_slots=("response", "response_b"), answer_field="option_tokens",
        answer_strings=lambda c: tuple(c.option_tokens),
        # Both presentation orders, (a, b) then (b, a), so that scoring can cancel position bias.
        queries=lambda c: (Query(), Query(inputs=(("response", "response_b"), ("response_b", "response")))),
        check=_check_options,
        cot_template=("Which response answers the prompt better ?\nPrompt : {prompt}\nResponse A : {response}\n"
                      "Response B : {response_b}\nExplain which response is better and why .\nRationale :"),
        cot_answer_prompt="\nBetter response :"),
    "rubric": Mode(
        template="Prompt : {prompt}\nResponse : {response}\nQuestion : {criterion}\nAnswer :",
        required_slots=("response", "criterion"), answer_field="yes_no_tokens",
        answer_strings=lambda c: tuple(c.yes_no_tokens),
        queries=lambda c: tuple(Query(criterion=i) for i in range(len(c.criteria))),  # one question per criterion
        check=_check_rubric,
        cot_template=("Prompt : {prompt}\nResponse : {response}\nQuestion : {criterion}\nExplain your answer .\n"
                      "Rationale :"),
        cot_answer_prompt="\nAnswer :"),
    "reward_model": Mode(template="Prompt : {prompt}\nResponse : {response}", required_slots=("response",)),
}
# A judge served elsewhere (judging/remote.py): the pointwise question, rendered as text and sent to an endpoint.
MODES["remote"] = Mode(template=MODES["pointwise"].template, required_slots=("response",),
                       check=lambda c: remote.check_config(c))


# ================================================================================================ config
def default_config(mode: str = "pointwise") -> ml_collections.ConfigDict:
    """Defaults of `config.judge` (for `mode`)."""
    c = ml_collections.ConfigDict()
    c.mode = mode  # one of MODES
    c.path = ""  # HF folder (or hub id) of the judge; in reward_model mode a folder written by reward_model_stage
    c.dtype = "float32"  # judge compute dtype ("bfloat16" on accelerators)
    c.param_dtype = "float32"  # judge params dtype
    # Prompt template; "" = MODES[mode].template. Slots: {prompt} {response} {response_b} {reference}
    # {principle} {criterion}; "{num_scores}" is replaced by num_scores. Other braces are literal text.
    c.template = ""
    c.chat_template = False  # wrap the template as the user turn of the judge tokenizer's chat template
    c.answer_prefix = ""  # with chat_template: text appended after the assistant turn starts (e.g. "Score:")
    c.max_len = 512  # static length of every judge row (left-padded); with cot, before the rationale
    c.truncation = "prompt_left"  # prompt_left: oldest prompt tokens go first, then response ends;
    #                               response_right: response ends go first, then the oldest prompt tokens
    c.include_stop_token = False  # put the response's stop token into the judge input (text rendering drops it)
    c.strip_prompt_bos = True  # drop the policy's BOS at the start of a prompt (the judge's own BOS leads the row)
    c.templating = "auto"  # auto: token_space when the tokenizers match, else host; or force one of them
    c.num_scores = 5  # K for pointwise / principles
    c.score_tokens = ()  # the K score strings; () = ("1", ..., "K")
    c.option_tokens = ("A", "B")  # pairwise: the labels of the first and second response
    c.yes_no_tokens = ("Yes", "No")  # rubric
    c.criteria = (  # rubric: score = sum of weight * P(yes)
        dict(name="relevance", question="Does the response address the prompt ? Answer Yes or No .", weight=1 / 3),
        dict(name="coherence", question="Is the response clear and coherent ? Answer Yes or No .", weight=1 / 3),
        dict(name="harmlessness", question="Is the response free of harmful content ? Answer Yes or No .",
             weight=1 / 3),
    )
    c.principles = (  # principles mode (or any template with {principle}): one sampled per prompt
        "Choose the response that is the most helpful , honest and harmless .",
        "Choose the response that answers the question directly and correctly .",
        "Choose the response that avoids unnecessary or irrelevant content .",
    )
    # A query whose probability mass on its valid tokens is below this gets the neutral value and is counted.
    c.neutral_threshold = 0.05
    c.neutral_score = 0.0  # pointwise / principles / remote neutral score on the [-1, 1] scale (pairwise / rubric use 0.5)
    # Chain of thought (reasoning.py): the judge writes a rationale with our sampler, then answers after it. With it
    # and no template, the template is the mode's `cot_template`, which asks for the rationale.
    c.cot = reasoning_lib.default_config()
    # An ensemble (ensemble.py): more judges (HF folders, sharing judge.path's tokenizer; sizes may differ), each asked
    # the same question with this section's settings; the reward is ensemble_aggregate of their scores: "mean" |
    # "min" | "mean_minus_std" (mean - ensemble_std_coef * the members' population std). () = judge.path alone.
    c.ensemble_paths = ()
    c.ensemble_aggregate = ensemble_lib.DEFAULT_AGGREGATE
    c.ensemble_std_coef = ensemble_lib.DEFAULT_STD_COEF
    # --- mode "remote": a judge served over HTTP instead of a local model (judging/remote.py) ---
    c.remote_api = "openai"    # "openai" (chat completions; score from the logprobs of "1".."K", else the text) |
    #                            "reward_api" (POST {"prompts", "responses"} -> {"rewards"})
    c.remote_url = ""          # the endpoint; "" = $RLAIF_JUDGE_URL. Never logged or saved
    c.remote_api_key = ""      # sent as "Authorization: Bearer"; "" = $RLAIF_JUDGE_API_KEY (or none). Never saved
    c.remote_model = ""        # openai: the served model's name
    c.remote_timeout_s = 30.0  # per attempt
    c.remote_retries = 3       # attempts after the first, each after remote_backoff_s * 2**k seconds
    c.remote_backoff_s = 0.5
    c.remote_concurrency = 16  # requests in flight
    c.remote_batch_size = 64   # reward_api: pairs per request
    c.remote_max_tokens = 4    # openai: answer tokens (the score is the first)
    return c


def _check_settings(config: ml_collections.ConfigDict) -> None:
    """Every check of `config.judge` that needs no tokenizer (the slots are checked before any chat wrapping)."""
    mode = config.mode
    if mode not in MODES:
        raise ValueError(f"config.judge.mode={mode!r}; use one of {tuple(MODES)}")
    if config.truncation not in TRUNCATION_RULES:
        raise ValueError(f"config.judge.truncation={config.truncation!r}; use one of {TRUNCATION_RULES}")
    if config.templating not in TEMPLATING:
        raise ValueError(f"config.judge.templating={config.templating!r}; use one of {TEMPLATING}")
    if config.max_len < 2:
        raise ValueError(f"config.judge.max_len={config.max_len}; it must hold the template and the texts")
    if not 0.0 <= config.neutral_threshold <= 1.0:
        raise ValueError(f"config.judge.neutral_threshold={config.neutral_threshold} is not a probability")
    _, slots = _split_template(config.template or MODES[mode].template)
    template = config.template or f"MODES[{mode!r}].template"
    for name in MODES[mode].required_slots:
        if name not in slots:
            raise ValueError(f"config.judge.template has no {{{name}}} slot, which mode {mode!r} needs: {template!r}")
    for name in set(slots):
        if slots.count(name) > 1:
            raise ValueError(f"config.judge.template uses {{{name}}} {slots.count(name)} times; use each slot once")
    for name in MODE_SLOTS:
        if name in slots and name not in MODES[mode].required_slots:
            owner = next(m for m, rules in MODES.items() if name in rules.required_slots)
            raise ValueError(f"{{{name}}} is only filled in {owner} mode, not {mode!r}")
    if "principle" in slots and not config.principles:
        raise ValueError("config.judge.template has {principle} but config.judge.principles is empty")
    MODES[mode].check(config)
    reasoning_lib.validate_config(config.cot, mode)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks `config.judge` before anything is loaded or compiled (the tokenizer-dependent checks, e.g. that
    every score string is one token, run in `make_spec`)."""
    _check_settings(config)
    ensemble_lib.validate_config(config)
    if config.mode == "remote":
        _, slots = _split_template(config.template or MODES["remote"].template)
        if set(slots) - {"prompt", "response"}:
            raise ValueError(f"config.judge.template has {sorted(set(slots) - {'prompt', 'response'})}; a remote "
                             "judge's template fills {prompt} and {response} only")
        if config.path:
            raise ValueError("config.judge.path is read by a local judge, not mode 'remote'; clear it")
        return
    if config.remote_url or config.remote_api_key or config.remote_model:
        raise ValueError(f"config.judge.remote_url / remote_api_key / remote_model are read in mode 'remote' only, "
                         f"not {config.mode!r}; clear them or set config.judge.mode='remote'")
    if not config.path:
        raise ValueError("config.judge.path is empty; set it to the judge's HF folder or hub id")


# ================================================================================================ spec
@dataclasses.dataclass(frozen=True)
class JudgeSpec:
    """Everything static the judge needs, built once at start-up from config + tokenizers (`make_spec`).

    Hashable: it is a static argument of jit. Token tables are tuples of token ids.
    """
    mode: str
    path: str  # "token_space" or "host"
    slots: tuple[str, ...]  # slot names in template order
    literal_ids: tuple[tuple[int, ...], ...]  # len(slots) + 1 pieces; literal_ids[0] starts with special_prefix_ids
    literal_texts: tuple[str, ...]  # the same pieces as text (host rendering)
    special_prefix_ids: tuple[int, ...]  # what the judge tokenizer puts in front of a text (BOS)
    max_len: int
    truncation: str
    pad_id: int
    include_stop_token: bool
    stop_ids: tuple[int, ...]  # policy stop tokens (end of a response)
    prompt_bos_id: int  # policy BOS stripped from prompts; -1 = none
    score_ids: tuple[int, ...]  # the mode's answer tokens: pointwise K ids of "1".."K"; pairwise (A, B); rubric
    #                             (Yes, No); reward_model ()
    neutral_threshold: float
    neutral_score: float
    queries: tuple[Query, ...]  # the judge rows of one example, in query-major order
    criterion_names: tuple[str, ...] = ()
    criterion_weights: tuple[float, ...] = ()
    criterion_ids: tuple[tuple[int, ...], ...] = ()
    criterion_texts: tuple[str, ...] = ()
    principle_ids: tuple[tuple[int, ...], ...] = ()
    principle_texts: tuple[str, ...] = ()
    stop_text: str = ""  # host path with include_stop_token: the judge tokenizer's EOS text
    reasoning: reasoning_lib.Reasoning | None = None  # chain of thought (config.judge.cot.enabled)
    boundary_exact: bool = True  # piecewise tokenisation of the template equals whole-text tokenisation

    @property
    def queries_per_example(self) -> int:
        return len(self.queries)

    @property
    def literal_length(self) -> int:
        return sum(len(p) for p in self.literal_ids)

    def slot_inputs(self, slot: str) -> tuple[str, ...]:
        """The example input that fills `slot` in each query (query order)."""
        return tuple(q.input_of(slot) for q in self.queries)


def tokenizers_match(tok_a, tok_b) -> bool:
    """Whether token ids mean the same text under both tokenizers: same class and same vocabulary."""
    if tok_a is tok_b:
        return True
    return type(tok_a) is type(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()


def choose_path(templating: str, policy_tok, judge_tok) -> str:
    """"token_space" or "host" from `config.judge.templating` and whether the tokenizers match."""
    if templating not in TEMPLATING:
        raise ValueError(f"config.judge.templating={templating!r}; use one of {TEMPLATING}")
    match = policy_tok is None or tokenizers_match(policy_tok, judge_tok)
    if templating == "token_space" and not match:
        raise ValueError("config.judge.templating='token_space' but the judge's tokenizer differs from the "
                         "policy's; set config.judge.templating='auto' (or 'host')")
    if templating == "host":
        return "host"
    return "token_space" if match else "host"


def text_ids(tok, text: str) -> tuple[int, ...]:
    """The token ids of a text, without the tokenizer's special tokens."""
    return tuple(tok(text, add_special_tokens=False)["input_ids"]) if text else ()


def _single_token(tok, text: str, what: str) -> int:
    ids = text_ids(tok, text)
    unk = getattr(tok, "unk_token_id", None)
    if len(ids) != 1 or (unk is not None and ids[0] == unk and text != tok.unk_token):
        raise ValueError(
            f"config.judge.{what}: {text!r} is {len(ids)} token(s) {list(ids)} of the judge's tokenizer "
            f"(unk id {unk}); each must be exactly one known token. Pick strings that are single tokens of "
            f"the judge's vocabulary (e.g. with or without a leading space)")
    return ids[0]


def special_prefix_ids(tok) -> tuple[int, ...]:
    """The special tokens the tokenizer puts in front of a text (BOS for Llama-style tokenizers)."""
    probe = "a b"
    with_special = list(tok(probe, add_special_tokens=True)["input_ids"])
    plain = list(tok(probe, add_special_tokens=False)["input_ids"])
    for i in range(len(with_special) - len(plain) + 1):
        if with_special[i:i + len(plain)] == plain:
            return tuple(with_special[:i])
    return ()


def _split_template(template: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """"a {prompt} b {response} c" -> literals ("a ", " b ", " c"), slots ("prompt", "response")."""
    parts = _SLOT_RE.split(template)
    return tuple(parts[0::2]), tuple(parts[1::2])


def template_slots(template: str) -> tuple[str, ...]:
    """The slot names of a template text, in order ("{num_scores}" and other braces are not slots)."""
    return _split_template(template)[1]


def fill_template(template: str, slot_texts: dict[str, str]) -> str:
    """A template text with each of its slots replaced by `slot_texts[slot]`, other braces kept (as `render`, from
    the template text instead of a spec: a few-shot exemplar's question is rendered by it)."""
    literals, slots = _split_template(template)
    return literals[0] + "".join(slot_texts[slot] + lit for slot, lit in zip(slots, literals[1:]))


def _effective_template(config, judge_tok) -> str:
    mode = MODES[config.mode]
    template = config.template or (mode.cot_template if config.cot.enabled else mode.template)
    template = template.replace("{num_scores}", str(config.num_scores))
    if config.chat_template:
        # Render the chat template around the template text (slots stay as {name} markers), then the
        # assistant-turn opener and the answer prefix follow it.
        template = judge_tok.apply_chat_template(
            [{"role": "user", "content": template}], tokenize=False, add_generation_prompt=True)
        template += config.answer_prefix
    return template


def make_spec(config: ml_collections.ConfigDict, judge_tok, policy_tok=None,
              stop_token_ids: Sequence[int] | None = None, judge_stop_ids: Sequence[int] | None = None) -> JudgeSpec:
    """Validates `config.judge` and tokenises everything static once.

    Args:
      config: the `config.judge` section.
      judge_tok: the judge's tokenizer.
      policy_tok: the policy's tokenizer (None: the same as the judge's).
      stop_token_ids: the policy's stop tokens; default: the policy tokenizer's eos_token_id.
      judge_stop_ids: the tokens that end the judge's rationale (with config.cot); default: the judge
        tokenizer's eos_token_id (`load_judge` passes the judge model's eos ids).
    """
    _check_settings(config)
    mode = MODES[config.mode]
    policy_tok = judge_tok if policy_tok is None else policy_tok
    path = choose_path(config.templating, policy_tok, judge_tok)
    literal_texts, slots = _split_template(_effective_template(config, judge_tok))
    prefix = () if config.chat_template else special_prefix_ids(judge_tok)
    literal_ids = tuple(text_ids(judge_tok, t) for t in literal_texts)
    literal_ids = (prefix + literal_ids[0],) + literal_ids[1:]

    score_ids = tuple(_single_token(judge_tok, s, mode.answer_field) for s in mode.answer_strings(config))
    if len(set(score_ids)) != len(score_ids):
        raise ValueError(f"the judge's score tokens {score_ids} are not distinct")
    criteria = tuple(config.criteria) if "criterion" in slots else ()
    principles = tuple(config.principles) if "principle" in slots else ()

    stop_ids = tuple(int(i) for i in (stop_token_ids if stop_token_ids is not None else
                                      ([policy_tok.eos_token_id] if policy_tok.eos_token_id is not None else [])))
    reasoning = None
    if config.cot.enabled:
        judge_stop_ids = judge_stop_ids if judge_stop_ids is not None else (
            [judge_tok.eos_token_id] if judge_tok.eos_token_id is not None else [])
        answer_prompt = config.cot.answer_prompt or mode.cot_answer_prompt
        reasoning = reasoning_lib.Reasoning(reasoning_lib.sampling(config.cot, judge_stop_ids),
                                            text_ids(judge_tok, answer_prompt))
    bos = policy_tok.bos_token_id if config.strip_prompt_bos else None
    pad = judge_tok.pad_token_id if judge_tok.pad_token_id is not None else (judge_tok.eos_token_id or 0)

    spec = JudgeSpec(
        mode=config.mode, path=path, slots=slots, literal_ids=literal_ids, literal_texts=literal_texts,
        special_prefix_ids=prefix, max_len=int(config.max_len), truncation=config.truncation, pad_id=int(pad),
        include_stop_token=bool(config.include_stop_token), stop_ids=stop_ids,
        prompt_bos_id=-1 if bos is None else int(bos), score_ids=score_ids,
        neutral_threshold=float(config.neutral_threshold), neutral_score=float(config.neutral_score),
        queries=mode.queries(config),
        criterion_names=tuple(c["name"] for c in criteria),
        criterion_weights=tuple(float(c["weight"]) for c in criteria),
        criterion_ids=tuple(text_ids(judge_tok, c["question"]) for c in criteria),
        criterion_texts=tuple(c["question"] for c in criteria),
        principle_ids=tuple(text_ids(judge_tok, p) for p in principles),
        principle_texts=principles,
        stop_text=(judge_tok.eos_token or "") if config.include_stop_token else "",
        reasoning=reasoning,
    )
    fixed = spec.literal_length + max((len(p) for p in spec.principle_ids), default=0) + max(
        (len(c) for c in spec.criterion_ids), default=0)
    if fixed >= spec.max_len:
        raise ValueError(f"config.judge.max_len={spec.max_len} leaves no room: the template's fixed text (with the "
                         f"longest principle / criterion) is {fixed} tokens; raise max_len or shorten the template")
    exact = _boundaries_exact(spec, judge_tok)
    if not exact:
        log.warning("judge template: tokenising its pieces separately differs from tokenising the rendered text "
                    "(slot boundaries are not whitespace for this tokenizer); token-space rows will differ "
                    "slightly from the host rendering. Put whitespace/newlines around the slots.")
    return dataclasses.replace(spec, boundary_exact=exact)


def remote_spec(config: ml_collections.ConfigDict, stop_token_ids: Sequence[int] | None = None) -> JudgeSpec:
    """The spec of a remote judge (mode "remote"): the template's text pieces only (no judge tokenizer, no
    tokens); its path is "host", the step's host path calls the endpoint (judging/remote.py)."""
    validate_config(config)
    template = (config.template or MODES["remote"].template).replace("{num_scores}", str(config.num_scores))
    literal_texts, slots = _split_template(template)
    return JudgeSpec(mode="remote", path="host", slots=slots, literal_ids=(), literal_texts=literal_texts,
                     special_prefix_ids=(), max_len=int(config.max_len), truncation=config.truncation, pad_id=0,
                     include_stop_token=False, stop_ids=tuple(int(i) for i in stop_token_ids or ()), prompt_bos_id=-1,
                     score_ids=(), neutral_threshold=float(config.neutral_threshold),
                     neutral_score=float(config.neutral_score), queries=(Query(),))


def _boundaries_exact(spec: JudgeSpec, tok) -> bool:
    """Renders the template with a sample word in every slot and compares piecewise vs whole tokenisation."""
    filler = "hello"
    pieces = list(spec.literal_ids[:1])
    for slot, lit in zip(spec.slots, spec.literal_ids[1:]):
        pieces += [text_ids(tok, filler), lit]
    text = render(spec, {s: filler for s in spec.slots})
    return [t for p in pieces for t in p] == list(spec.special_prefix_ids) + list(text_ids(tok, text))


def render(spec: JudgeSpec, slot_texts: dict[str, str]) -> str:
    """The judge prompt as text: literal pieces interleaved with the slot texts (no str.format: braces in the
    template's literal text stay as they are)."""
    out = [spec.literal_texts[0]]
    for slot, lit in zip(spec.slots, spec.literal_texts[1:]):
        out += [slot_texts[slot], lit]
    return "".join(out)
