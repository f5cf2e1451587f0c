"""Judge templates in token space, the host path, scoring arithmetic and sharding (rlaif_jax/judging/).

References are independent of the module: rows are rebuilt by rendering the template with str.replace and
tokenising the whole text with the tokenizer; truncation by a token-by-token loop; scores by hand.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlaif_jax import judging
from rlaif_jax.judging import assembly, scoring
from rlaif_jax import sharding as shd
from rlaif_jax.models import transformer as tfm
from rlaif_jax.models.config import ModelConfig

PAD, BOS, EOS, UNK = 0, 1, 2, 3
CONTENT = [f"w{i}" for i in range(24)]
PRINCIPLES = ("Be kind .", "Be brief and very honest .", "Answer the question .")
CRITERIA = (dict(name="relevant", question="Is it relevant ?", weight=0.5),
            dict(name="short", question="Is it short and to the point ?", weight=0.3),
            dict(name="safe", question="Is it safe ?", weight=0.2))


def _words(text):
    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def make_tokenizer(permute_seed=None):
    """WordLevel + Whitespace: tokenisation is compositional across whitespace. With `permute_seed`, the same
    words get shuffled ids (a different tokenizer of the same texts, for the host path)."""
    texts = [t for m in judging.MODES.values() for t in (m.template, m.cot_template, m.cot_answer_prompt)]
    texts += list(PRINCIPLES) + [c["question"] for c in CRITERIA]
    texts += ["1 2 3 4 5 A B Yes No"]
    words = []
    for t in texts:
        for w in _words(judging.spec._SLOT_RE.sub(" ", t)):
            if w not in words and w not in CONTENT:
                words.append(w)
    words += CONTENT
    words += [f"filler{i}" for i in range(-(len(words) + 4) % 8)]  # vocab a multiple of 8 (tensor sharding)
    if permute_seed is not None:
        words = list(np.random.RandomState(permute_seed).permutation(words))
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    vocab.update({w: i + 4 for i, w in enumerate(words)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


TOK = make_tokenizer()
V = len(TOK.get_vocab())
CONTENT_IDS = np.asarray(TOK.convert_tokens_to_ids(CONTENT))


def judge_config(**kw):
    c = judging.default_config()
    c.principles = PRINCIPLES
    c.criteria = CRITERIA
    c.neutral_threshold = 0.0
    c.max_len = 64
    c.update(kw)
    return c


def rollout_batch(rng, B, P=9, R=7, stop_rows=None):
    """Left-padded prompts starting with BOS; responses with mask 1 up to and including the first EOS
    (rows without EOS: all R tokens), junk after the stop token that must never reach the judge."""
    prompts = np.full((B, P), PAD, np.int32)
    pmask = np.zeros((B, P), np.int32)
    responses = rng.choice(CONTENT_IDS, (B, R)).astype(np.int32)
    rmask = np.zeros((B, R), np.int32)
    for b in range(B):
        n = rng.randint(1, P + 1)
        prompts[b, P - n:] = np.concatenate([[BOS], rng.choice(CONTENT_IDS, n - 1)])
        pmask[b, P - n:] = 1
        stopped = (b % 3 != 2) if stop_rows is None else stop_rows[b]
        if stopped:
            m = rng.randint(1, R + 1)
            responses[b, m - 1] = EOS
            rmask[b, :m] = 1
        else:
            rmask[b] = 1
    return prompts, pmask, responses, rmask


# ------------------------------------------------------------------------------------------ reference rows
def span_words(tokens, mask, drop):
    ids = [int(t) for t, m in zip(tokens, mask) if m]
    return [TOK.convert_ids_to_tokens(i) for i in ids if i not in drop]


def ref_truncate(prompt, resps, fixed, max_len, rule):
    """Token-by-token: drop the prompt's oldest token / the last token of the longest response (ties: the later
    slot) until the row fits."""
    p, rs = list(prompt), [list(r) for r in resps]
    total = lambda: fixed + len(p) + sum(len(r) for r in rs)

    def cut_response():
        g = max(range(len(rs)), key=lambda i: (len(rs[i]), i))
        rs[g].pop()

    if rule == "prompt_left":
        while total() > max_len and p:
            p.pop(0)
        while total() > max_len:
            cut_response()
    else:
        while total() > max_len and any(rs):
            cut_response()
        while total() > max_len:
            p.pop(0)
    return p, rs


def ref_rows(template, max_len, rule, slot_words_rows):
    """Render with str.replace, tokenise the whole text (BOS added by the tokenizer), left-pad."""
    tokens = np.full((len(slot_words_rows), max_len), PAD, np.int32)
    truncated = []
    for n, sw in enumerate(slot_words_rows):
        fixed_text = template
        for s in ("principle", "criterion"):
            fixed_text = fixed_text.replace("{" + s + "}", " ".join(sw.get(s, [])))
        for s in ("prompt", "response", "response_b"):
            fixed_text = fixed_text.replace("{" + s + "}", " ")
        fixed = len(TOK(fixed_text)["input_ids"])
        resp_names = [s for s in ("response", "response_b") if s in sw]
        p, rs = ref_truncate(sw.get("prompt", []), [sw[s] for s in resp_names], fixed, max_len, rule)
        truncated.append(len(p) < len(sw.get("prompt", [])) or any(len(r) < len(sw[s]) for r, s in zip(rs, resp_names)))
        text = template
        for s, words in [("prompt", p)] + list(zip(resp_names, rs)) + [(s, sw.get(s, [])) for s in ("principle", "criterion")]:
            text = text.replace("{" + s + "}", " ".join(words))
        ids = TOK(text)["input_ids"]
        assert len(ids) <= max_len
        tokens[n, max_len - len(ids):] = ids
    return tokens, np.asarray(truncated)


def reference_query_rows(spec, template, batch, batch_b=None, principle_index=None, include_stop=False):
    prompts, pmask, responses, rmask = batch
    B = prompts.shape[0]
    drop_p = {BOS}
    drop_r = set() if include_stop else {EOS}
    rows = []
    queries = spec.queries_per_example
    for q in range(queries):
        for b in range(B):
            sw = {"prompt": span_words(prompts[b], pmask[b], drop_p)}
            a = span_words(responses[b], rmask[b], drop_r)
            if spec.mode == "pairwise":
                bb = span_words(batch_b[2][b], batch_b[3][b], drop_r)
                sw["response"], sw["response_b"] = (a, bb) if q == 0 else (bb, a)
            else:
                sw["response"] = a
            if spec.mode == "rubric":
                sw["criterion"] = _words(CRITERIA[q]["question"])
            if principle_index is not None:
                sw["principle"] = _words(PRINCIPLES[int(principle_index[b])])
            rows.append(sw)
    return ref_rows(template, spec.max_len, spec.truncation, rows)


# ------------------------------------------------------------------------------------------ spec
def test_spec_pieces_and_token_errors():
    spec = judging.make_spec(judge_config(template="Prompt : {prompt}\nResponse : {response}\nScore :"), TOK)
    assert spec.slots == ("prompt", "response") and spec.path == "token_space"
    assert spec.special_prefix_ids == (BOS,)
    assert spec.literal_ids[0] == (BOS,) + tuple(TOK.convert_tokens_to_ids(["Prompt", ":"]))
    assert spec.literal_ids[2] == tuple(TOK.convert_tokens_to_ids(["Score", ":"]))
    assert spec.score_ids == tuple(TOK.convert_tokens_to_ids(["1", "2", "3", "4", "5"]))
    assert spec.stop_ids == (EOS,) and spec.prompt_bos_id == BOS and spec.boundary_exact
    with pytest.raises(ValueError, match="exactly one known token"):
        judging.make_spec(judge_config(score_tokens=("1", "2", "3", "4", "5 5")), TOK)
    with pytest.raises(ValueError, match="exactly one known token"):
        judging.make_spec(judge_config(mode="pairwise", option_tokens=("A", "notaword")), TOK)
    with pytest.raises(ValueError, match="no {response_b} slot"):
        judging.make_spec(judge_config(mode="pairwise", template="{prompt} {response} ?"), TOK)
    with pytest.raises(ValueError, match="max_len"):
        judging.make_spec(judge_config(max_len=8), TOK)
    with pytest.raises(ValueError, match="judge.path is empty"):
        judging.validate_config(judge_config())
    with pytest.raises(ValueError, match="{principle} but config.judge.principles is empty"):
        judging.validate_config(judge_config(mode="principles", principles=(), path="x"))
    judging.validate_config(judge_config(mode="rubric", path="x"))
    assert judging.choose_path("auto", TOK, make_tokenizer(permute_seed=0)) == "host"
    assert judging.tokenizers_match(TOK, make_tokenizer())
    with pytest.raises(ValueError, match="differs from the policy"):
        judging.make_spec(judge_config(templating="token_space"), make_tokenizer(permute_seed=0), TOK)


def test_every_mode_has_a_scorer_and_its_queries():
    # "remote" is scored by its endpoint (judging/remote.py), not in the graph.
    assert set(scoring.SCORERS) == set(judging.MODES) - {"remote"}
    pairwise = judging.make_spec(judge_config(mode="pairwise"), TOK)
    assert pairwise.slot_inputs("response") == ("response", "response_b")
    assert pairwise.slot_inputs("response_b") == ("response_b", "response")
    rubric = judging.make_spec(judge_config(mode="rubric"), TOK)
    assert [q.criterion for q in rubric.queries] == [0, 1, 2] and rubric.slot_inputs("prompt") == ("prompt",) * 3
    assert judging.make_spec(judge_config(mode="principles"), TOK).queries_per_example == 1


def test_chat_template_wraps_the_template():
    tok = make_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    spec = judging.make_spec(judge_config(chat_template=True, answer_prefix=" Score :",
                                          template="Prompt : {prompt} Response : {response}"), tok)
    assert spec.special_prefix_ids == ()  # the chat template brings its own <s>
    assert spec.slots == ("prompt", "response")
    assert spec.literal_texts == ("<s> user : Prompt : ", " Response : ", "\nassistant : Score :")
    assert spec.literal_ids[0][0] == BOS


# ------------------------------------------------------------------------------------------ assembly
ASSEMBLY_CASES = [
    # (mode, truncation, max_len, include_stop)
    ("pointwise", "prompt_left", 64, False),
    ("pointwise", "prompt_left", 38, True),
    ("pairwise", "prompt_left", 32, False),
    ("pairwise", "response_right", 34, False),
    ("rubric", "response_right", 22, False),
    ("principles", "prompt_left", 44, False),
]


@pytest.mark.parametrize("mode,rule,max_len,include_stop", ASSEMBLY_CASES)
def test_assembly_equals_tokenised_rendering(mode, rule, max_len, include_stop):
    spec = judging.make_spec(judge_config(mode=mode, truncation=rule, max_len=max_len,
                                          include_stop_token=include_stop), TOK)
    rng = np.random.RandomState(0)
    batch = rollout_batch(rng, 6)
    batch_b = rollout_batch(rng, 6, R=5) if mode == "pairwise" else None
    principle_index = rng.randint(0, len(PRINCIPLES), 6) if mode == "principles" else None
    sources = assembly.query_sources(
        spec, *map(jnp.asarray, batch), None if principle_index is None else jnp.asarray(principle_index),
        *(map(jnp.asarray, batch_b[2:]) if batch_b else (None, None)))
    tokens, mask, truncated = jax.jit(assembly.assemble, static_argnums=0)(spec, sources)
    template = judging.MODES[mode].template.replace("{num_scores}", "5")
    want_tokens, want_truncated = reference_query_rows(spec, template, batch, batch_b, principle_index, include_stop)
    np.testing.assert_array_equal(np.asarray(tokens), want_tokens)
    np.testing.assert_array_equal(np.asarray(mask), (want_tokens != PAD).astype(np.int32))
    np.testing.assert_array_equal(np.asarray(truncated), want_truncated)
    if max_len < 64:
        assert want_truncated.any() and not want_truncated.all(), "the case should truncate some rows, not all"


def test_fill_budget_against_loop():
    rng = np.random.RandomState(1)
    lengths = rng.randint(0, 12, (200, 3))
    budget = rng.randint(0, 40, 200)
    got = np.asarray(jax.jit(assembly.fill_budget)(jnp.asarray(lengths), jnp.asarray(budget)))
    for l, bgt, g in zip(lengths, budget, got):
        _, rs = ref_truncate([], [[0] * x for x in l], 0, bgt, "prompt_left")
        np.testing.assert_array_equal(g, [len(r) for r in rs])


# ------------------------------------------------------------------------------------------ scoring arithmetic
def _logits_from_probs(rows):
    return jnp.log(jnp.asarray(rows, jnp.float32))


def test_pointwise_arithmetic():
    # vocab of 8; score tokens 3, 4, 5 (K = 3). Row 0: P = .1 .15 .25 on them (mass .5), renormalised .2 .3 .5,
    # E = .2 + .6 + 1.5 = 2.3, score = 2 (2.3 - 1) / 2 - 1 = 0.3. Row 1: mass .05 -> neutral.
    logits = _logits_from_probs([[.1, .1, .1, .1, .15, .25, .1, .1],
                                 [.19, .19, .19, .01, .02, .02, .19, .19]])
    score, mass, neutral = scoring.pointwise_scores(logits, (3, 4, 5), 0.1, -0.25)
    np.testing.assert_allclose(score, [0.3, -0.25], atol=1e-6)
    np.testing.assert_allclose(mass, [0.5, 0.05], atol=1e-6)
    np.testing.assert_array_equal(neutral, [False, True])
    # Without the threshold, row 1: P = .2 .4 .4 -> E = 2.2 -> 0.2.
    score, _, _ = scoring.pointwise_scores(logits, (3, 4, 5), 0.0, -0.25)
    np.testing.assert_allclose(score, [0.3, 0.2], atol=1e-6)


def test_pairwise_arithmetic_and_swap():
    # option ids A = 0, B = 1 in a vocab of 4.
    ab = _logits_from_probs([[.6, .2, .1, .1], [.7, .1, .1, .1], [.01, .01, .49, .49], [.02, .01, .49, .48],
                             [.6, .2, .1, .1]])
    ba = _logits_from_probs([[.3, .3, .2, .2], [.1, .4, .25, .25], [.2, .6, .1, .1], [.01, .02, .48, .49],
                             [.6, .2, .1, .1]])
    p, mass, neutral, agree, p_orders = scoring.pairwise_preference(ab, ba, (0, 1), 0.05)
    # row 0: P_ab(A) = .75, P_ba(B) = .5 -> .625; row 1: .875 and .8 -> .8375;
    # row 2: order ab undecided (mass .02 < .05) -> .5, P_ba(B) = .75 -> .625;
    # row 3: both orders undecided (mass .03 each; leaning to opposite responses, but below threshold) -> .5;
    # row 4: both orders pick the first response shown, i.e. a in (a, b) and b in (b, a): .75 and .25 -> .5.
    np.testing.assert_allclose(p, [0.625, 0.8375, 0.625, 0.5, 0.5], atol=1e-6)
    np.testing.assert_allclose(p_orders, [[.75, .5], [.875, .8], [.5, .75], [.5, .5], [.75, .25]], atol=1e-6)
    np.testing.assert_allclose(mass, [[.8, .6], [.8, .5], [.02, .8], [.03, .03], [.8, .8]], atol=1e-6)
    np.testing.assert_array_equal(neutral, [[False, False], [False, False], [True, False], [True, True],
                                            [False, False]])
    # Agreement needs both orders decided and preferring the same response: only row 1. Row 0's second order is
    # a tie, rows 2 and 3 have neutral orders (two neutral orders are no agreement), row 4 follows the position.
    np.testing.assert_array_equal(agree, [False, True, False, False, False])
    metrics = scoring.JudgeMetrics(valid_mass_b=mass.mean(-1), neutral_count_b=neutral.sum(-1),
                                   truncated_b=jnp.zeros(5, bool), position_agree_b=agree)
    assert float(metrics.summary(None)["judge/position_agreement"]) == pytest.approx(1 / 5)
    p_swapped = scoring.pairwise_preference(ba, ab, (0, 1), 0.05)[0]
    np.testing.assert_allclose(np.asarray(p_swapped), 1.0 - np.asarray(p), rtol=0, atol=1e-7)


def test_rubric_arithmetic():
    # yes = 2, no = 3. Criterion P(yes): row 0: .3/.4 = .75, .1/.5 = .2, .4/.5 = .8; row 1: .5, .9, mass .01 -> .5.
    rows = [[.3, .3, .3, .1], [.4, .1, .1, .4], [.45, .05, .4, .1],
            [.3, .3, .2, .2], [.05, .05, .81, .09], [.5, .49, .005, .005]]
    p_yes, mass, neutral = scoring.yes_probability(_logits_from_probs(rows), (2, 3), 0.05)
    p_yes_bc = np.asarray(p_yes).reshape(2, 3)
    np.testing.assert_allclose(p_yes_bc, [[.75, .2, .8], [.5, .9, .5]], atol=1e-6)
    np.testing.assert_array_equal(neutral, [False] * 5 + [True])
    score = scoring.rubric_score(jnp.asarray(p_yes_bc), (0.5, 0.3, 0.2))
    np.testing.assert_allclose(score, [.5 * .75 + .3 * .2 + .2 * .8, .5 * .5 + .3 * .9 + .2 * .5], atol=1e-6)


def test_ensemble_aggregates_against_numpy():
    """mean, min and mean - k std (population std) over the members (axis 0) against NumPy, and by hand on one
    column: members (-1, 1, 0) -> mean 0, min -1, std sqrt(2/3)."""
    scores_kb = np.array([[0.2, -1.0, 0.5, 0.9], [0.6, 1.0, 0.5, -0.3], [0.1, 0.0, 0.5, 0.4]], np.float32)
    want = {"mean": scores_kb.mean(0), "min": scores_kb.min(0),
            "mean_minus_std": scores_kb.mean(0) - 2.0 * scores_kb.std(0, ddof=0)}
    for how, expected in want.items():
        got = np.asarray(judging.ensemble.aggregate(jnp.asarray(scores_kb), how, 2.0))
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=how)
    lcb = judging.ensemble.aggregate(jnp.asarray(scores_kb), "mean_minus_std", 2.0)
    assert float(lcb[1]) == pytest.approx(-2.0 * np.sqrt(2.0 / 3.0), rel=1e-6)
    assert float(lcb[2]) == pytest.approx(0.5)  # agreeing members: no penalty
    with pytest.raises(ValueError, match="ensemble aggregate 'median'"):
        judging.ensemble.aggregate(jnp.asarray(scores_kb), "median")


# ------------------------------------------------------------------------------------------ with a judge model
@pytest.fixture(scope="module")
def judge_model():
    cfg = ModelConfig(family="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8)
    # Weights 5x the 0.02 init, so the random judge has opinions that depend on the whole row.
    params = jax.jit(lambda p: jax.tree.map(lambda x: 5.0 * x, p))(tfm.init_params(cfg, jax.random.key(0)))
    return cfg, params


def test_last_position_logits_match_forward(judge_model):
    cfg, params = judge_model
    rng = np.random.RandomState(3)
    tokens = jnp.asarray(rng.randint(4, V, (3, 10)), jnp.int32)
    mask = jnp.asarray((np.arange(10)[None] >= np.array([[0], [4], [9]])).astype(np.int32))

    @jax.jit
    def both(params, tokens, mask):
        hidden = scoring.judge_last_hidden(params, cfg, tokens, mask)
        return scoring.lm_head_logits(params, cfg, hidden), tfm.forward(params, cfg, tokens, mask).logits[:, -1]

    got, want = both(params, tokens, mask)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _score_both_paths(cfg, params, spec, batch, batch_b, key, judge_tok=TOK, judge_params=None):
    kw = dict(responses_b_br=jnp.asarray(batch_b[2]), response_b_mask_br=jnp.asarray(batch_b[3])) if batch_b else {}
    token = judging.score_jit(params, cfg, spec, *map(jnp.asarray, batch), key, **kw)
    # With the same tokenizer the token-space spec serves the host path as is (and shares its compiled scoring).
    host_spec = judging.make_spec(SPEC_CONFIGS[spec.mode], judge_tok, TOK) if judge_tok is not TOK else spec
    kw = dict(responses_b_br=batch_b[2], response_b_mask_br=batch_b[3]) if batch_b else {}
    host = judging.score_host(params if judge_params is None else judge_params, cfg, host_spec, TOK, judge_tok,
                              *batch, key, **kw)
    return token, host


SPEC_CONFIGS = {
    "pairwise": judge_config(mode="pairwise", max_len=32, truncation="response_right"),
    "rubric": judge_config(mode="rubric", max_len=24),
    "principles": judge_config(mode="principles", max_len=40, include_stop_token=True, neutral_threshold=0.05,
                             neutral_score=-0.5),
}


@pytest.mark.parametrize("mode", list(SPEC_CONFIGS))
def test_host_path_equals_token_space(judge_model, mode):
    cfg, params = judge_model
    spec = judging.make_spec(SPEC_CONFIGS[mode], TOK)
    rng = np.random.RandomState(5)
    batch = rollout_batch(rng, 8)
    batch_b = rollout_batch(rng, 8) if mode == "pairwise" else None
    (s_tok, m_tok), (s_host, m_host) = _score_both_paths(cfg, params, spec, batch, batch_b, jax.random.key(7))
    assert np.ptp(np.asarray(s_tok)) > 1e-3, "scores should differ between examples"
    np.testing.assert_allclose(s_host, s_tok, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(m_host.truncated_b, m_tok.truncated_b)
    np.testing.assert_allclose(m_host.valid_mass_b, m_tok.valid_mass_b, atol=1e-6)
    assert np.asarray(m_tok.truncated_b).any()
    if mode == "principles":
        np.testing.assert_array_equal(m_host.principle_index_b, m_tok.principle_index_b)
        # Neutral fallback: rows whose mass on the score tokens is below 0.05 score -0.5 and are counted.
        low = np.asarray(m_tok.valid_mass_b) < 0.05
        assert low.any() and not low.all()
        np.testing.assert_array_equal(np.asarray(s_tok)[low], -0.5)
        assert (np.asarray(s_tok)[~low] != -0.5).all()
        assert int(m_tok.summary(spec)["judge/neutral_count"]) == low.sum()
    if mode == "rubric":
        np.testing.assert_allclose(
            scoring.rubric_score(m_tok.criterion_p_yes_bc, [c["weight"] for c in CRITERIA]), s_tok, atol=1e-6)


def test_host_path_with_a_different_tokenizer(judge_model):
    """A judge whose tokenizer numbers the same words differently (and whose embedding / head rows are permuted
    to match) is the same judge: the host path must give the token-space scores of the original."""
    cfg, params = judge_model
    other = make_tokenizer(permute_seed=3)
    perm = np.asarray([other.convert_tokens_to_ids(TOK.convert_ids_to_tokens(i)) for i in range(V)])  # ours -> theirs
    permuted = dict(params, embed=jnp.zeros_like(params["embed"]).at[perm].set(params["embed"]),
                    lm_head=jnp.zeros_like(params["lm_head"]).at[:, perm].set(params["lm_head"]))
    spec = judging.make_spec(SPEC_CONFIGS["pairwise"], TOK)
    other_spec = judging.make_spec(SPEC_CONFIGS["pairwise"], other, TOK)
    assert other_spec.path == "host" and other_spec.score_ids != spec.score_ids
    rng = np.random.RandomState(6)
    batch, batch_b = rollout_batch(rng, 8), rollout_batch(rng, 8)
    (s_tok, _), (s_host, _) = _score_both_paths(cfg, params, spec, batch, batch_b, jax.random.key(1),
                                                judge_tok=other, judge_params=permuted)
    np.testing.assert_allclose(s_host, s_tok, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="host path"):
        judging.score(permuted, cfg, other_spec, *map(jnp.asarray, batch), jax.random.key(0))
    # Callers outside jit take each spec's own path.
    kw = dict(responses_b_br=batch_b[2], response_b_mask_br=batch_b[3])
    for params_, spec_, judge_tok in ((params, spec, TOK), (permuted, other_spec, other)):
        s, _ = judging.score_outside_jit(params_, cfg, spec_, TOK, judge_tok, *batch, jax.random.key(1), **kw)
        np.testing.assert_allclose(s, s_tok, rtol=0, atol=1e-5)


def test_principles_drawn_per_prompt_on_both_paths(judge_model):
    """Rows are prompt-major with n = 4 samples per prompt: the 4 samples of a prompt are judged by one principle,
    prompts get different ones, and the host path (another tokenizer) draws the same."""
    cfg, params = judge_model
    other = make_tokenizer(permute_seed=1)
    specs = {TOK: judging.make_spec(SPEC_CONFIGS["principles"], TOK),
             other: judging.make_spec(SPEC_CONFIGS["principles"], other, TOK)}
    batch = rollout_batch(np.random.RandomState(12), 32)
    index = {}
    for judge_tok, spec in specs.items():
        _, metrics = judging.score_outside_jit(params, cfg, spec, TOK, judge_tok, *batch, jax.random.key(3),
                                               rows_per_prompt=4)
        index[spec.path] = np.asarray(metrics.principle_index_b)
    group_sample = index["token_space"].reshape(8, 4)
    np.testing.assert_array_equal(group_sample, np.repeat(group_sample[:, :1], 4, axis=1))
    assert len(set(group_sample[:, 0])) > 1
    np.testing.assert_array_equal(index["host"], index["token_space"])
    with pytest.raises(ValueError, match="not whole groups of rows_per_prompt=3"):
        judging.sample_principles(specs[TOK], jax.random.key(3), 32, 3)


def test_pairwise_swap_gives_one_minus_p(judge_model):
    cfg, params = judge_model
    spec = judging.make_spec(SPEC_CONFIGS["pairwise"], TOK)
    rng = np.random.RandomState(8)
    a, b = rollout_batch(rng, 8), rollout_batch(rng, 8)
    p_ab, m_ab = judging.score_jit(params, cfg, spec, *map(jnp.asarray, a), jax.random.key(0),
                                   responses_b_br=jnp.asarray(b[2]), response_b_mask_br=jnp.asarray(b[3]))
    p_ba, m_ba = judging.score_jit(params, cfg, spec, *map(jnp.asarray, a[:2]), jnp.asarray(b[2]),
                                   jnp.asarray(b[3]), jax.random.key(0), responses_b_br=jnp.asarray(a[2]),
                                   response_b_mask_br=jnp.asarray(a[3]))
    assert np.ptp(np.asarray(p_ab)) > 1e-3
    np.testing.assert_allclose(np.asarray(p_ba), 1.0 - np.asarray(p_ab), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(m_ab.position_agree_b, m_ba.position_agree_b)
    summary = m_ab.summary(spec)
    assert 0.0 <= float(summary["judge/position_agreement"]) <= 1.0


def test_sharded_equals_unsharded(judge_model):
    cfg, params = judge_model
    spec = judging.make_spec(SPEC_CONFIGS["rubric"], TOK)
    batch = rollout_batch(np.random.RandomState(9), 8)
    key = jax.random.key(2)
    want, want_m = judging.score_jit(params, cfg, spec, *map(jnp.asarray, batch), key)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_params = jax.device_put(
        params, shd.tree_shardings(mesh, tfm.param_logical_axes(cfg), params))
    sharded_batch = [jax.device_put(x, shd.batch_sharding(mesh, 2)) for x in batch]
    with jax.set_mesh(mesh):
        got, got_m = jax.jit(judging.score, static_argnums=(1, 2))(sharded_params, cfg, spec, *sharded_batch, key)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_m.criterion_p_yes_bc, want_m.criterion_p_yes_bc, rtol=0, atol=1e-5)
    summary = got_m.summary(spec)
    assert set(f"judge/criterion/{c['name']}" for c in CRITERIA) <= set(summary)


# ------------------------------------------------------------------------------------------ shared prompts
def grouped_batch(rng, prompts, n):
    """`rollout_batch` rows in groups of the n samples of one prompt (row prompt * n + sample), as a rollout's."""
    prompt_tokens, prompt_mask, _, _ = rollout_batch(rng, prompts)
    _, _, responses, response_mask = rollout_batch(rng, prompts * n)
    return np.repeat(prompt_tokens, n, 0), np.repeat(prompt_mask, n, 0), responses, response_mask


def baseline_inputs(rng, prompts, n):
    """A pairwise reward's baseline: one response per prompt, compared with each of its n samples."""
    _, _, responses, response_mask = rollout_batch(rng, prompts, R=5)
    return dict(responses_b_br=jnp.asarray(np.repeat(responses, n, 0)),
                response_b_mask_br=jnp.asarray(np.repeat(response_mask, n, 0)))


def groups_sharing(shared, n):
    """(groups,) bool: every row of the group holds the same prompt part (the shared forward is exact there)."""
    parts = np.concatenate([np.asarray(shared.prefix_tokens_np), np.asarray(shared.prefix_mask_np)], axis=1)
    parts = parts.reshape(-1, n, parts.shape[1])
    return (parts == parts[:, :1]).all(axis=(1, 2))


SHARE_CASES = [
    # (mode, truncation, max_len, n, forward_microbatches, which groups share their prompt part)
    # (Nothing cut is the "all" cases' situation too: their rows cut only responses, never the shared part.)
    # Some groups' prompts cut by their own rows' responses, by different amounts: the micro-batches (one group
    # each) of groups 0 and 3 share, those of groups 1 and 2 run whole rows; with one micro-batch, all of it does.
    ("pointwise", "prompt_left", 38, 2, 4, "some"),
    ("principles", "prompt_left", 44, 4, 1, "some"),
    ("pointwise", "response_right", 36, 4, 1, "all"),  # responses cut, prompts never by a row's responses
    ("rubric", "response_right", 22, 2, 3, "all"),
    ("pairwise", "response_right", 34, 2, 1, "all"),
    ("reward_model", "prompt_left", 64, 2, 2, "all"),
    ("pointwise", "prompt_left", 64, 1, 1, "none"),  # one sample per prompt: nothing to share
]


@pytest.mark.parametrize("mode,rule,max_len,n,microbatches,sharing", SHARE_CASES)
def test_shared_prompt_judge_equals_per_row(judge_model, mode, rule, max_len, n, microbatches, sharing):
    """share_prompt=True (config.compute.share_prompt_forward) with rows_per_prompt = n: the forward that runs the
    prompt part of each group's judge rows once (in `microbatches` micro-batches of whole groups; where a group's
    prompt parts were cut differently, its micro-batch runs whole rows) gives the scores and metrics of the forward
    over whole rows."""
    from rlaif_jax import reward_model
    cfg, params = judge_model
    cfg = cfg.replace(forward_microbatches=microbatches)
    if mode == "reward_model":
        params = reward_model.RewardModelParams(params, tfm.init_value_head(cfg, jax.random.key(1)))
    spec = judging.make_spec(judge_config(mode=mode, truncation=rule, max_len=max_len), TOK)
    rng = np.random.RandomState(11)
    prompts = 4
    batch = [jnp.asarray(x) for x in grouped_batch(rng, prompts, n)]
    kw = baseline_inputs(rng, prompts, n) if mode == "pairwise" else {}
    (shared, m_shared), (per_row, m_per_row) = (
        judging.score_jit(params, cfg, spec, *batch, jax.random.key(2), rows_per_prompt=n, share_prompt=share, **kw)
        for share in (True, False))
    assert np.ptp(np.asarray(per_row)) > 1e-3, "scores should differ between examples"
    np.testing.assert_allclose(shared, per_row, rtol=1e-5, atol=1e-5)  # reward_model: values of ~10
    for field in ("valid_mass_b", "neutral_count_b", "truncated_b", "position_agree_b", "p_orders_b2",
                  "criterion_p_yes_bc", "principle_index_b"):
        if getattr(m_per_row, field) is not None:
            np.testing.assert_allclose(getattr(m_shared, field), getattr(m_per_row, field), rtol=0, atol=1e-5,
                                       err_msg=field)
    if sharing == "none":
        return
    sources = assembly.query_sources(spec, *batch, m_per_row.principle_index_b, kw.get("responses_b_br"),
                                     kw.get("response_b_mask_br"))
    exact = groups_sharing(assembly.split_rows(spec, sources, n), n)
    assert exact.all() if sharing == "all" else exact.any() and not exact.all(), exact
    assert np.asarray(m_per_row.truncated_b).any() == (max_len < 64)


@pytest.mark.parametrize("mode,rule,max_len", [("pointwise", "prompt_left", 38), ("principles", "response_right", 44),
                                               ("rubric", "prompt_left", 22), ("pairwise", "prompt_left", 32)])
def test_split_rows_are_the_assembled_rows(mode, rule, max_len):
    """`split_rows`: each row's prompt part (left-padded, up to the first slot a sample fills) followed by the rest
    (right-padded) is the row `assemble` builds, truncation included."""
    spec = judging.make_spec(judge_config(mode=mode, truncation=rule, max_len=max_len), TOK)
    rng = np.random.RandomState(4)
    n = 2
    batch = [jnp.asarray(x) for x in grouped_batch(rng, 4, n)]
    kw = baseline_inputs(rng, 4, n) if mode == "pairwise" else {}
    principle_index = judging.sample_principles(spec, jax.random.key(0), 8, n)
    sources = assembly.query_sources(spec, *batch, principle_index, kw.get("responses_b_br"),
                                     kw.get("response_b_mask_br"))
    tokens, mask, truncated = map(np.asarray, assembly.assemble(spec, sources))
    shared = jax.tree.map(np.asarray, assembly.split_rows(spec, sources, n))
    assert np.asarray(truncated).any()
    assert (np.diff(shared.prefix_mask_np, axis=1) >= 0).all() and (np.diff(shared.mask_nt, axis=1) <= 0).all()
    assert shared.prefix_tokens_np.shape[1] + shared.tokens_nt.shape[1] < 2 * max_len
    for r in range(tokens.shape[0]):
        parts = [shared.prefix_tokens_np[r][shared.prefix_mask_np[r] == 1], shared.tokens_nt[r][shared.mask_nt[r] == 1]]
        np.testing.assert_array_equal(np.concatenate(parts), tokens[r][mask[r] == 1])
        before_sample = spec.literal_ids[assembly.prompt_slots(spec)]  # "Response :", pairwise "Response A :"
        assert parts[0][-len(before_sample):].tolist() == list(before_sample)


def test_shared_prompt_judge_sharded(judge_model):
    """On a (data=2, fsdp=2, tensor=2) mesh the shared-prompt judge forward gives the unsharded per-row scores;
    it shares only where the groups split over the 4 devices that split the batch (`tfm.prompt_sharing`)."""
    cfg, params = judge_model
    # Responses cut first: no group's prompt part is cut by its rows' responses, so all of them share.
    spec = judging.make_spec(judge_config(mode="rubric", max_len=24, truncation="response_right"), TOK)
    n = 2
    batch = grouped_batch(np.random.RandomState(13), 8, n)
    key = jax.random.key(5)
    want, want_m = judging.score_jit(params, cfg, spec, *map(jnp.asarray, batch), key, rows_per_prompt=n)
    mesh = shd.make_mesh(data=2, fsdp=2, tensor=2)
    sharded_params = jax.device_put(params, shd.tree_shardings(mesh, tfm.param_logical_axes(cfg), params))
    sharded_batch = [jax.device_put(x, shd.batch_sharding(mesh, 2)) for x in batch]
    with jax.set_mesh(mesh):
        assert tfm.prompt_sharing(n, 48) == n and tfm.prompt_sharing(n, 12) == 1  # 24 and 6 groups over 4
        got, got_m = jax.jit(judging.score, static_argnums=(1, 2), static_argnames=("rows_per_prompt", "share_prompt"))(
            sharded_params, cfg, spec, *sharded_batch, key, rows_per_prompt=n, share_prompt=True)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_m.criterion_p_yes_bc, want_m.criterion_p_yes_bc, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ chain of thought
COT_CONFIG = judge_config(mode="pointwise", max_len=40, cot=dict(judging.reasoning.default_config(), enabled=True,
                                                                  max_new_tokens=5))


def _last_logits(params, cfg, seqs, width=56):
    """Each sequence's last-position logits: one jitted forward of right-padded rows (causal, so the padding after
    a sequence does not reach it), the same shape at every call."""
    tokens = np.full((len(seqs), width), PAD, np.int32)
    mask = np.zeros((len(seqs), width), np.int32)
    for n, seq in enumerate(seqs):
        tokens[n, :len(seq)], mask[n, :len(seq)] = seq, 1
    logits = _forward_jit(params, cfg, jnp.asarray(tokens), jnp.asarray(mask))
    return np.asarray(logits)[np.arange(len(seqs)), [len(q) - 1 for q in seqs]]


_forward_jit = jax.jit(lambda p, cfg, t, m: tfm.forward(p, cfg, t, m).logits, static_argnums=1)


def _greedy_rationales(params, cfg, rows, max_new):
    """Greedy decoding by full forwards of the growing rows (no KV cache, not our sampler), each up to its EOS
    (dropped)."""
    seqs, done = [list(r) for r in rows], [False] * len(rows)
    for _ in range(max_new):
        nxt = _last_logits(params, cfg, seqs).argmax(-1)
        for n in range(len(seqs)):
            done[n] = done[n] or int(nxt[n]) == EOS
            if not done[n]:
                seqs[n].append(int(nxt[n]))
    return [s[len(r):] for s, r in zip(seqs, rows)]


def test_chain_of_thought_judge_reads_its_answer_after_its_own_greedy_rationale(judge_model):
    """Reference: the judge row rendered by hand from the mode's cot_template, a greedy rationale decoded by full
    forwards, then a forward over [row, rationale, answer prompt] and the expected score computed by hand. Both
    paths (token space inside jit, host) give it; the answer after a rationale is not the answer without one."""
    cfg, params = judge_model
    spec = judging.make_spec(COT_CONFIG, TOK)
    mode = judging.MODES["pointwise"]
    assert spec.reasoning is not None and spec.reasoning.sampling.stop_ids == (EOS,)
    assert spec.reasoning.answer_ids == tuple(TOK(mode.cot_answer_prompt, add_special_tokens=False)["input_ids"])
    batch = rollout_batch(np.random.RandomState(21), 4)
    template = mode.cot_template.replace("{num_scores}", "5")
    rows, _ = reference_query_rows(spec, template, batch)
    score_ids = [TOK.convert_tokens_to_ids(str(k)) for k in range(1, 6)]
    rows = [[int(t) for t in row if t != PAD] for row in rows]
    rationales = _greedy_rationales(params, cfg, rows, 5)
    logits = _last_logits(params, cfg, [r + q + list(spec.reasoning.answer_ids) for r, q in zip(rows, rationales)])
    p = np.exp(logits[:, score_ids] - logits[:, score_ids].max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = 2 * (p @ np.arange(1, 6) - 1) / 4 - 1
    assert sum(map(len, rationales)) > 0
    key = jax.random.key(4)
    (s_tok, m_tok), (s_host, m_host) = _score_both_paths(cfg, params, spec, batch, None, key)
    np.testing.assert_allclose(s_tok, want, rtol=0, atol=2e-5)
    np.testing.assert_allclose(s_host, want, rtol=0, atol=2e-5)
    for n, rationale in enumerate(rationales):
        got = np.asarray(m_tok.rationale_nr)[n][np.asarray(m_tok.rationale_mask_nr)[n] > 0]
        assert got.tolist() == rationale
    np.testing.assert_allclose(m_tok.summary(spec)["judge/rationale_length"], np.mean([len(r) for r in rationales]))
    plain = judging.make_spec(judge_config(mode="pointwise", max_len=40, template=template), TOK)
    s_plain, _ = judging.score_jit(params, cfg, plain, *map(jnp.asarray, batch), key)
    assert np.abs(np.asarray(s_plain) - np.asarray(want)).max() > 1e-3


@pytest.mark.parametrize("kw, message", [
    (dict(mode="reward_model", cot=dict(enabled=True)), "config.judge.cot.enabled: a rationale is read before answer "
     "tokens, which mode 'reward_model' has none of"),
    (dict(cot=dict(max_new_tokens=8)), "config.judge.cot.max_new_tokens is set but config.judge.cot.enabled is False"),
    (dict(cot=dict(enabled=True, top_k=5)), "config.judge.cot.top_k is set but config.judge.cot.greedy is True"),
    (dict(cot=dict(enabled=True, max_new_tokens=0)), "config.judge.cot.max_new_tokens=0 must be an int >= 1"),
])
def test_chain_of_thought_settings_are_checked(kw, message):
    c = judge_config(path="/some/judge")
    c.update({k: v for k, v in kw.items() if k != "cot"})
    c.cot.update(kw["cot"])
    with pytest.raises(ValueError) as err:
        judging.validate_config(c)
    assert str(err.value) == message or str(err.value).startswith(message)


# ------------------------------------------------------------------------------------------ scripts/judge_eval.py
def _load_judge_eval():
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "judge_eval.py")
    spec = importlib.util.spec_from_file_location("judge_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_agreement_statistics():
    """rlaif_jax.stats against scipy and a brute-force Mann-Whitney count."""
    stats = pytest.importorskip("scipy.stats")
    from rlaif_jax import stats as ours
    rng = np.random.RandomState(0)
    x, y = rng.randint(0, 5, 40).astype(float), rng.randn(40)
    np.testing.assert_allclose(ours.spearman(x, y), stats.spearmanr(x, y).statistic, rtol=1e-10)
    np.testing.assert_allclose(ours.pearson(x, y), stats.pearsonr(x, y).statistic, rtol=1e-10)
    pos = rng.rand(40) < 0.4
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in x[pos] for b in x[~pos]])
    np.testing.assert_allclose(ours.roc_auc(x, pos), brute, rtol=1e-12)
    assert np.isnan(ours.roc_auc(x, np.ones(40, bool)))  # one class only


def test_judge_eval_pairwise_report(judge_model):
    je = _load_judge_eval()
    cfg, params = judge_model
    spec = judging.make_spec(SPEC_CONFIGS["pairwise"], TOK)
    judge = judging.Judge(cfg, params, spec, TOK)
    rng = np.random.RandomState(11)
    sent = lambda n: " ".join(rng.choice(CONTENT, n))
    records = [dict(prompt=sent(3), response_a=sent(rng.randint(1, 6)), response_b=sent(rng.randint(1, 6)),
                    label=float(rng.rand() < 0.5)) for _ in range(12)]
    report = je.evaluate(judge, records, batch_size=8)  # a full batch, then 4 records padded to 8
    # Reference: two direct calls of the same compiled shape (rows 0-7 and 4-11).
    p, agree, p_first = np.zeros(12), np.zeros(12, bool), np.zeros((12, 2))
    for lo in (0, 4):
        rs = records[lo:lo + 8]
        s, m = judging.score_texts(params, cfg, spec, TOK, [r["prompt"] for r in rs], [r["response_a"] for r in rs],
                                   jax.random.key(0), responses_b=[r["response_b"] for r in rs])
        p[lo:lo + 8], agree[lo:lo + 8], p_first[lo:lo + 8] = s, m.position_agree_b, m.p_orders_b2
    label = np.asarray([r["label"] for r in records])
    np.testing.assert_allclose(report["agreement_accuracy"], np.mean((p > 0.5) == (label > 0.5)))
    np.testing.assert_allclose(report["position_consistency"], agree.mean())
    np.testing.assert_allclose(report["first_position_rate"],
                               np.mean(np.concatenate([p_first[:, 0] > 0.5, p_first[:, 1] < 0.5])))
    len_diff = [len(r["response_a"].split()) - len(r["response_b"].split()) for r in records]
    np.testing.assert_allclose(report["length_bias_corr"], np.corrcoef(p - 0.5, len_diff)[0, 1], rtol=1e-5)
