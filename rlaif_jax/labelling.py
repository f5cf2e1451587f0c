"""AI preference labelling (the RLAIF stage before a reward model): the pairwise judge's soft label of each
(prompt, response A, response B), asked in both presentation orders, optionally after few-shot exemplars and a
chain-of-thought rationale, written to a JSONL file that a restarted run completes.

    python -m rlaif_jax.labelling --judge.path=JUDGE --data=pairs.jsonl --out=labels.jsonl \\
        [--judge.template=... --judge.option_tokens="('1', '2')"] [--labelling.batch_size=16] \\
        [--few_shot=exemplars.jsonl] [--judge.cot.enabled --judge.cot.max_new_tokens=128] [--mesh.fsdp=8]

Input: JSONL, one pair per line, {"prompt", "response_a", "response_b"} (what `scripts/export_dataset.py --kind
pairs` writes); other keys are carried over. Output: the input record plus

    pair_index           the pair's 0-based record number in --data (what a restarted run skips by)
    p_a_better           the soft label: the mean of the two orders' P(A better) (`scoring.pairwise_preference`)
    p_a_better_ab        P(A better) asked with A shown first: P(first option)
    p_a_better_ba        P(A better) asked with B shown first: P(second option)
    position_consistent  both orders decided and prefer the same response (the judge's `position_agree_b`)
    neutral_orders       orders whose mass on the option tokens fell below judge.neutral_threshold (their
                         P = 1/2)
    truncated            a judge row of the pair was cut to judge.max_len
    rationale_ab/_ba     with chain of thought: the judge's rationale in each order
P(first option) = p_1 / (p_1 + p_2) over the two option tokens (judge.option_tokens, "A"/"B" or "1"/"2") at the
answer position. The judge is the pairwise judge of `rlaif_jax.judging` (its template, truncation and scoring);
the labeller adds:

Few-shot exemplars (`labelling.few_shot`, or --few_shot=FILE.jsonl with one exemplar per line): worked examples
    {"prompt", "response_a", "response_b", "better": "a" | "b"[, "rationale"]}
rendered before the question, each as the judge's template filled with its texts, then (with chain of thought)
" " + its rationale + the answer prompt (judge.cot.answer_prompt, or the pairwise mode's), then " " + the option token of its better response; exemplars are joined,
and followed by the question, with `few_shot_separator`. They become the head of the judge's template (inside the
user turn with judge.chat_template), so they are tokenised once with the template's literal text and count
towards judge.max_len. Their texts may not contain a {slot} marker.

Chain of thought (`judge.cot`, Lee et al. 2023's two steps, "RLAIF vs. RLHF", arXiv:2309.00267, section 3.1): the
judge's own reasoning (`rlaif_jax.judging.reasoning`, the same code the train step's reasoning judge runs): with no
judge.template, the question is the pairwise mode's `cot_template` ("... Rationale :"); the judge samples a
rationale after it in each order (greedy by default, at most judge.cot.max_new_tokens tokens), then the option
probabilities are read after [question, rationale, answer prompt]. Both steps of a batch are one compiled program
(`judging.score_queries_jit`); the rationale of batch k is sampled with fold_in(key(labelling.seed), k).

Batches, mesh, resume. Batch k holds pairs [k B, (k + 1) B) (the last one padded with copies of its first pair, so
every batch has one shape and compiles once) and its sampling key is fold_in(seed, k): a pair's label does not
depend on where a run started. Every process renders the whole batch on the host (`judging.encode_queries`) and
its devices take their slice of the 2B judge rows (`sharding.host_to_global`); the compiled program runs sharded
on the mesh (judge params as loaded, rows over the batch axes) and the labels are gathered to every process.
Process 0 appends each batch's lines in one write, then flushes and fsyncs. A restarted run drops a partial last
line (the mark of a kill during a write), skips the pairs already in the file and labels the rest, so it ends with
exactly one record per pair, equal to an uninterrupted run's. OUT.settings.json records the judge and labelling
settings and a digest of the pairs; a restart with other settings or other pairs is refused (a file would
otherwise mix two judges' labels). --out must be on a filesystem every process sees.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlaif_jax import data as data_lib
from rlaif_jax import errors, judging
from rlaif_jax import sharding as shd
from rlaif_jax.judging import spec as spec_lib

log = logging.getLogger("rlaif_jax")

PAIR_KEYS = ("prompt", "response_a", "response_b")
EXEMPLAR_KEYS = PAIR_KEYS + ("better",)  # and "rationale" with chain of thought
LABEL_FIELDS = ("pair_index", "p_a_better", "p_a_better_ab", "p_a_better_ba", "position_consistent",
                "neutral_orders", "truncated", "rationale_ab", "rationale_ba")
# The slots a labelling template may have: the pair's texts (a pair has no reference; principles are not sampled).
TEMPLATE_SLOTS = ("prompt", "response", "response_b")
SETTINGS_SUFFIX = ".settings.json"


# ================================================================================================ config
def default_config() -> ml_collections.ConfigDict:
    """Defaults of the labelling settings (the CLI's --labelling.*); the judge is a `judging` config."""
    c = ml_collections.ConfigDict()
    c.batch_size = 16  # pairs per batch (2x judge rows: both orders); a multiple of the mesh's batch shards
    c.seed = 0  # rationale sampling: batch k uses fold_in(key(seed), k)
    # Worked examples shown before each question: dicts {prompt, response_a, response_b, better: "a" | "b"} (and
    # rationale, with cot.enabled); see the module docstring.
    c.few_shot = ()
    c.few_shot_separator = "\n\n"  # between exemplars, and between the last one and the question
    c.progress_bar = True
    return c


def validate_config(c: ml_collections.ConfigDict, judge_cfg: ml_collections.ConfigDict) -> None:
    """Checks the labelling settings against the judge's config (no file is read); ValueError says what to
    change. The judge config's own checks run when it loads (`judging.load_judge`)."""
    if isinstance(c.batch_size, bool) or not isinstance(c.batch_size, int) or c.batch_size < 1:
        raise ValueError(f"config.labelling.batch_size={c.batch_size!r} must be an int >= 1")
    if judge_cfg.mode != "pairwise":
        raise ValueError(f"config.judge.mode={judge_cfg.mode!r}: the labeller asks the pairwise question; set "
                         "config.judge.mode='pairwise'")
    slots = spec_lib.template_slots(judge_cfg.template)
    extra = sorted(set(slots) - set(TEMPLATE_SLOTS))
    if extra:
        raise ValueError(f"config.judge.template has {['{' + s + '}' for s in extra]}; a labelling template fills "
                         "{prompt} {response} {response_b} only (a pair has no reference, and no principle is "
                         "sampled)")
    for i, exemplar in enumerate(c.few_shot):
        _check_exemplar(i, exemplar, judge_cfg.cot.enabled)


def _check_exemplar(i: int, exemplar: Any, cot: bool) -> None:
    where = f"config.labelling.few_shot[{i}]"
    if not isinstance(exemplar, (dict, ml_collections.ConfigDict)):
        raise ValueError(f"{where} is {type(exemplar).__name__}; each exemplar is a dict with keys "
                         f"{list(EXEMPLAR_KEYS)} (and 'rationale' with chain of thought)")
    keys = set(exemplar.keys())
    wanted = set(EXEMPLAR_KEYS) | ({"rationale"} if cot else set())
    if keys != wanted:
        if "rationale" in keys and not cot:
            raise ValueError(f"{where} has a rationale but config.judge.cot.enabled is False: enable chain of "
                             "thought or drop the exemplars' rationales")
        raise ValueError(f"{where} has keys {sorted(keys)}; an exemplar has exactly {sorted(wanted)}")
    if exemplar["better"] not in ("a", "b"):
        raise ValueError(f"{where}.better={exemplar['better']!r}; use 'a' or 'b' (the better response)")
    for key in wanted - {"better"}:
        text = exemplar[key]
        if not isinstance(text, str):
            raise ValueError(f"{where}.{key} is {type(text).__name__}, not text")
        if spec_lib.template_slots(text):
            raise ValueError(f"{where}.{key} contains {{{spec_lib.template_slots(text)[0]}}}, which the judge "
                             "template would read as a slot; reword it")


def render_exemplars(c: ml_collections.ConfigDict, judge_cfg: ml_collections.ConfigDict) -> str:
    """The few-shot block: each exemplar's question (the judge's template filled with its texts), its rationale
    and answer prompt with chain of thought, and " " + the option token of its better response; joined and ended
    by few_shot_separator. "" without exemplars."""
    template = question_template(c, judge_cfg)
    options = tuple(judge_cfg.option_tokens)
    blocks = []
    for e in c.few_shot:
        text = spec_lib.fill_template(template, {"prompt": e["prompt"], "response": e["response_a"],
                                                 "response_b": e["response_b"]})
        if judge_cfg.cot.enabled:
            text += " " + e["rationale"] + (judge_cfg.cot.answer_prompt or judging.MODES["pairwise"].cot_answer_prompt)
        blocks.append(text + " " + options[0 if e["better"] == "a" else 1].strip())
    return "".join(block + c.few_shot_separator for block in blocks)


def question_template(c: ml_collections.ConfigDict, judge_cfg: ml_collections.ConfigDict) -> str:
    """The judge's template, or the default question: the pairwise mode's (its `cot_template` with chain of
    thought)."""
    mode = judging.MODES["pairwise"]
    return judge_cfg.template or (mode.cot_template if judge_cfg.cot.enabled else mode.template)


def judge_config(c: ml_collections.ConfigDict, judge_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The judging config the labeller loads: `judge_cfg` with the few-shot block in front of its question."""
    j = ml_collections.ConfigDict(judge_cfg.to_dict())
    j.template = render_exemplars(c, judge_cfg) + question_template(c, judge_cfg)
    return j


# ================================================================================================ the labeller
class Labeller:
    """A loaded pairwise judge with the labelling settings: `label_batch` labels batch k of a list of pairs.

    mesh None: the judge runs unsharded on the default device (the judge's params as they are)."""

    def __init__(self, judge: judging.Judge, c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                 rules=None):
        if judge.spec.mode != "pairwise" or set(judge.spec.slots) - set(TEMPLATE_SLOTS):
            raise errors.ConfigError(f"the labeller needs a pairwise judge whose template fills {TEMPLATE_SLOTS} "
                                     f"only; this one is {judge.spec.mode!r} with slots {judge.spec.slots}")
        self.judge, self.c, self.mesh = judge, c, mesh
        self.rules = list(rules if rules is not None else shd.DEFAULT_RULES)
        if mesh is not None:
            shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
            if c.batch_size % shards:
                raise errors.ConfigError(f"config.labelling.batch_size={c.batch_size} is not divisible by the mesh's "
                                         f"batch shards (data x fsdp = {shards}); use a multiple of {shards}")

    def label_batch(self, pairs: Sequence[dict[str, Any]], batch_index: int) -> list[dict[str, Any]]:
        """The label fields (LABEL_FIELDS less pair_index) of up to batch_size pairs; `batch_index` picks the
        sampling key. Every process passes the same pairs and gets the same labels."""
        B, n = self.c.batch_size, len(pairs)
        if not 1 <= n <= B:
            raise ValueError(f"label_batch takes 1 to {B} pairs, got {n}")
        judge, spec = self.judge, self.judge.spec
        padded = list(pairs) + [pairs[0]] * (B - n)  # one shape for every batch: one compilation
        tokens, mask, truncated = judging.encode_queries(
            spec, judge.tokenizer, [p["prompt"] for p in padded], [p["response_a"] + spec.stop_text for p in padded],
            responses_b=[p["response_b"] + spec.stop_text for p in padded])
        key = jax.random.fold_in(jax.random.key(self.c.seed), batch_index)
        # The judge's forward and pairwise scoring (after its rationale, with chain of thought): one program.
        args = (judge.params, judge.cfg, spec)
        if self.mesh is None:
            scored = judging.score_queries_jit(*args, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(truncated),
                                               None, key)
        else:
            with shd.use_rules(self.rules), jax.set_mesh(self.mesh):
                rows = [shd.host_to_global(x, shd.batch_sharding(self.mesh, x.ndim, self.rules))
                        for x in (tokens, mask, truncated)]
                scored = judging.score_queries_jit(*args, *rows, None, key)
        p_a_better_b, m = jax.tree.map(_to_host, scored)
        out = []
        for b in range(n):
            record = {"p_a_better": float(p_a_better_b[b]), "p_a_better_ab": float(m.p_orders_b2[b, 0]),
                      "p_a_better_ba": float(m.p_orders_b2[b, 1]), "position_consistent": bool(m.position_agree_b[b]),
                      "neutral_orders": int(m.neutral_count_b[b]), "truncated": bool(m.truncated_b[b])}
            if spec.reasoning is not None:  # rows b and B + b: the pair asked in order (a, b) and (b, a)
                for name, row in (("rationale_ab", b), ("rationale_ba", B + b)):
                    ids = m.rationale_nr[row][m.rationale_mask_nr[row] > 0]
                    record[name] = judge.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            out.append(record)
        return out


def _to_host(x) -> np.ndarray:
    """A global array spanning processes gathered, or an addressable one read."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return shd.gather_to_host(x)
    return np.asarray(x)


def load_labeller(c: ml_collections.ConfigDict, judge_cfg: ml_collections.ConfigDict,
                  mesh: jax.sharding.Mesh | None = None, rules=None) -> Labeller:
    """Validates the settings, loads the judge (sharded on `mesh`) with the few-shot block in its template."""
    validate_config(c, judge_cfg)
    judge = judging.load_judge(judge_config(c, judge_cfg), mesh=mesh, rules=rules)
    log.info("labeller: judge %s, %d few-shot exemplars, chain of thought %s", judge_cfg.path, len(c.few_shot),
             f"on ({'greedy' if judge_cfg.cot.greedy else 'sampled'}, <= {judge_cfg.cot.max_new_tokens} tokens)"
             if judge_cfg.cot.enabled else "off")
    return Labeller(judge, c, mesh, rules)


def label_preferences(records: list[dict[str, Any]], judge: judging.Judge | Labeller, batch_size: int, seed: int
                      ) -> list[dict[str, Any]]:
    """Fills the label fields of the preference pairs ({prompt, response_a, response_b}) that lack p_a_better, in
    memory: `judge` is a loaded pairwise judge (no exemplars; with chain of thought when its config.judge.cot has
    it) or a `Labeller`."""
    if isinstance(judge, judging.Judge):
        c = default_config()
        c.batch_size, c.seed = batch_size, seed
        judge = Labeller(judge, c)
    todo = [i for i, r in enumerate(records) if r.get("p_a_better") is None]
    B = judge.c.batch_size
    for k, start in enumerate(range(0, len(todo), B)):
        idx = todo[start:start + B]
        for i, labels in zip(idx, judge.label_batch([records[i] for i in idx], k)):
            records[i] = {**records[i], **labels}
    return records


# ================================================================================================ pairs to label
def sample_pairs(c: ml_collections.ConfigDict, num_prompts: int, seed: int, batch_size: int | None = None,
                 progress: bool = True) -> list[dict[str, Any]]:
    """`num_prompts` pairs {prompt, response_a, response_b} to label: two samples of RL config `c`'s policy per
    prompt of its training split, with its sampler (c.rollout, n_samples = 2 sharing one prefill), the prompts in
    the training loader's shuffled order, `batch_size` prompts at a time (default c.train.batch_size), batch k
    sampled with fold_in(key(seed), k)."""
    import dataclasses

    from tqdm.auto import tqdm

    from rlaif_jax import rollout as rollout_lib
    from rlaif_jax.models import hf
    batch_size = batch_size or c.train.batch_size
    mesh, rules = shd.mesh_from_config(c.mesh)
    records: list[dict[str, Any]] = []
    with shd.use_rules(rules), jax.set_mesh(mesh), tqdm(total=num_prompts, unit="prompt", disable=not progress) as bar:
        tok = hf.load_tokenizer(c.policy.path)
        cfg, params = hf.load_model(c.policy.path, mesh, c.policy.dtype, c.policy.param_dtype, rules)
        sampling = dataclasses.replace(rollout_lib.SamplingConfig.from_config(c.rollout, cfg), n_samples=2)
        loader, _ = data_lib.load_prompts(c.data, tok, batch_size)
        generate = jax.jit(rollout_lib.rollout, static_argnums=(1, 5))
        for k in range(-(-num_prompts // batch_size)):
            batch = data_lib.to_global(next(loader), shd.batch_sharding(mesh, 1))
            roll = generate(params, cfg, batch.tokens_bp, batch.mask_bp, jax.random.fold_in(jax.random.key(seed), k),
                            sampling)
            tokens, mask = np.asarray(roll.response_tokens_br), np.asarray(roll.response_mask_br)
            texts = [tok.decode(t[m > 0], skip_special_tokens=True) for t, m in zip(tokens, mask)]
            prompts = tok.batch_decode(np.asarray(batch.tokens_bp), skip_special_tokens=True)
            records += [{"prompt": p, "response_a": texts[2 * i], "response_b": texts[2 * i + 1]}
                        for i, p in enumerate(prompts)]
            bar.update(min(len(prompts), num_prompts - bar.n))
    return records[:num_prompts]


# ================================================================================================ files
def read_pairs(path: str) -> list[dict[str, Any]]:
    """The pairs of a JSONL file: text fields PAIR_KEYS, no label field (the labeller writes those)."""
    pairs = []
    for line, record in data_lib.read_jsonl(path, set(PAIR_KEYS), "pairs"):
        for key in PAIR_KEYS:
            if not isinstance(record[key], str):
                raise errors.DataError(f"{path}:{line}: {key} is {type(record[key]).__name__}, not text")
        taken = sorted(set(record) & set(LABEL_FIELDS))
        if taken:
            raise errors.DataError(f"{path}:{line} already has {taken}, which the labeller writes: rename them "
                                   "(e.g. a human label as human_p_a_better) or drop them")
        pairs.append(record)
    return pairs


def read_exemplars(path: str) -> tuple[dict[str, Any], ...]:
    """Few-shot exemplars from a JSONL file, one per line (checked with the settings, `validate_config`)."""
    return tuple(record for _, record in data_lib.read_jsonl(path, set(EXEMPLAR_KEYS), "few-shot exemplars"))


def completed_labels(out_path: str, num_pairs: int, truncate: bool) -> dict[int, dict[str, Any]]:
    """The records of an output file by pair_index. A last line without its newline is what a kill during a
    write leaves: it is ignored (and cut from the file when `truncate`: process 0 appends next)."""
    if not os.path.exists(out_path):
        return {}
    with open(out_path, "rb") as f:
        content = f.read()
    end = content.rfind(b"\n") + 1
    if end < len(content) and truncate:
        log.warning("%s ends with a partial line (%d bytes, a kill during a write): dropped", out_path,
                    len(content) - end)
        with open(out_path, "r+b") as f:
            f.truncate(end)
    done = {}
    for number, line in enumerate(content[:end].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            index = int(record["pair_index"])
        except (ValueError, KeyError, TypeError):
            raise errors.DataError(f"{out_path}:{number} is not a label record (a complete JSON line with "
                                   "pair_index); the file is damaged: delete it to label from scratch") from None
        if not 0 <= index < num_pairs or index in done:
            raise errors.DataError(f"{out_path}:{number}: pair_index {index} is out of range or repeated (the data "
                                   f"has {num_pairs} pairs); the file is not this data's labels")
        done[index] = record
    return done


def _settings(c: ml_collections.ConfigDict, judge_cfg: ml_collections.ConfigDict,
              pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What a label depends on (judge and labelling settings, the pairs), as saved in OUT.settings.json. The batch
    size and progress bar are left out: a restart may change them."""
    labelling = {k: v for k, v in c.to_dict().items() if k not in ("batch_size", "progress_bar")}
    digest = hashlib.sha256("\n".join(json.dumps(p, sort_keys=True) for p in pairs).encode()).hexdigest()
    return json.loads(json.dumps({"judge": judge_cfg.to_dict(), "labelling": labelling, "pairs": len(pairs),
                                  "pairs_sha256": digest}))


def _check_settings(out_path: str, settings: dict[str, Any], has_labels: bool) -> None:
    path = out_path + SETTINGS_SUFFIX
    if not os.path.exists(path):
        if has_labels:
            raise errors.DataError(f"{out_path} holds labels but {path} is missing, so they cannot be told to come "
                                   "from these settings: use another --out, or delete the file")
        return
    with open(path) as f:
        saved = json.load(f)
    if saved != settings:
        flat = lambda d, p="": {k2: v2 for k, v in d.items() for k2, v2 in (  # noqa: E731
            flat(v, f"{p}{k}.").items() if isinstance(v, dict) else [(f"{p}{k}", v)])}
        a, b = flat(saved), flat(settings)
        key = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[0]
        raise errors.ConfigError(f"{out_path} was labelled with other settings ({key}: {a.get(key)!r} there, "
                                 f"{b.get(key)!r} now); use another --out, or delete {out_path} and {path} to "
                                 "label from scratch")


def label_file(labeller: Labeller, judge_cfg: ml_collections.ConfigDict, data_path: str,
               out_path: str) -> dict[str, float]:
    """Labels every pair of `data_path` into `out_path`, completing what an earlier run wrote (module docstring).
    `judge_cfg`: the judge's config as given (before the few-shot block), recorded in the settings file.
    Returns a summary: pairs, labelled (by this run), position_consistency, mean p_a_better, neutral_orders."""
    c = labeller.c
    pairs = read_pairs(data_path)
    writer = jax.process_index() == 0
    settings = _settings(c, judge_cfg, pairs)
    done = completed_labels(out_path, len(pairs), truncate=writer)
    _check_settings(out_path, settings, bool(done))
    if writer and not os.path.exists(out_path + SETTINGS_SUFFIX):
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        with open(out_path + SETTINGS_SUFFIX + ".tmp", "w") as f:
            json.dump(settings, f, indent=1)
        os.replace(out_path + SETTINGS_SUFFIX + ".tmp", out_path + SETTINGS_SUFFIX)
    B = c.batch_size
    from tqdm.auto import tqdm
    bar = tqdm(total=len(pairs), initial=len(done), unit="pair", dynamic_ncols=True,
               disable=not (c.progress_bar and writer), desc="labelling")
    labelled = 0
    out = open(out_path, "a", encoding="utf-8") if writer else None
    try:
        for k, start in enumerate(range(0, len(pairs), B)):
            indices = range(start, min(start + B, len(pairs)))
            todo = [i for i in indices if i not in done]
            if not todo:
                continue
            labels = labeller.label_batch([pairs[i] for i in indices], k)  # the whole batch: its key, its rows
            lines = []
            for i in todo:
                done[i] = {**pairs[i], "pair_index": i, **labels[i - start]}
                lines.append(json.dumps(done[i], ensure_ascii=False) + "\n")
            if out is not None:
                out.write("".join(lines))  # one write per batch: a kill mid-write leaves a partial last line
                out.flush()
                os.fsync(out.fileno())
            labelled += len(todo)
            bar.update(len(todo))
    finally:
        bar.close()
        if out is not None:
            out.close()
    records = [done[i] for i in range(len(pairs))]
    summary = {"pairs": float(len(pairs)), "labelled": float(labelled),
               "position_consistency": float(np.mean([r["position_consistent"] for r in records])),
               "p_a_better": float(np.mean([r["p_a_better"] for r in records])),
               "neutral_orders": float(np.sum([r["neutral_orders"] for r in records]))}
    log.info("%s: %d pairs labelled (%d by this run); position consistency %.3f, mean p_a_better %.3f, %d neutral "
             "orders", out_path, len(pairs), labelled, summary["position_consistency"], summary["p_a_better"],
             summary["neutral_orders"])
    return summary


# ================================================================================================ the CLI
def mesh_config() -> ml_collections.ConfigDict:
    """The mesh section (the training config's: data, fsdp, tensor, logical-axis rules)."""
    from rlaif_jax import config as config_lib
    return config_lib.base_config().mesh


def run_cli(judge_cfg: ml_collections.ConfigDict, c: ml_collections.ConfigDict, mesh_cfg: ml_collections.ConfigDict,
            data_path: str, out_path: str, few_shot_path: str = "") -> dict[str, float]:
    """The CLI after flag parsing (tests call it in-process): settings checked (one line per mistake, named by
    their flags), the judge loaded on the mesh, `data_path` labelled into `out_path`."""
    from rlaif_jax import config as config_lib
    from rlaif_jax.models import hf

    def named_as_flags(message: str) -> str:
        return (message.replace("config.labelling.", "--labelling.").replace("config.judge.", "--judge.")
                .replace("config.mesh", "--mesh"))

    c = ml_collections.ConfigDict(c.to_dict())
    try:
        if few_shot_path:
            if c.few_shot:
                raise ValueError("--few_shot and --labelling.few_shot are both set; give the exemplars once")
            c.few_shot = read_exemplars(few_shot_path)
        validate_config(c, judge_cfg)
        judging.validate_config(judge_cfg)
        judging.ensemble.check_one_judge(judge_cfg)
        config_lib.section_validators()["mesh"](mesh_cfg)
        mesh, rules = shd.mesh_from_config(mesh_cfg)
    except errors.UserError:
        raise
    except ValueError as e:
        raise errors.ConfigError(named_as_flags(str(e))) from None
    if not os.path.exists(data_path):
        raise errors.DataError(f"--data={data_path}: no such file")
    hf.check_folder(judge_cfg.path, "--judge.path")
    try:
        labeller = load_labeller(c, judge_cfg, mesh, rules)
    except errors.UserError:
        raise
    except ValueError as e:
        raise errors.ConfigError(named_as_flags(str(e))) from None
    return label_file(labeller, judge_cfg, data_path, out_path)


def main(argv) -> int:
    del argv
    from absl import flags

    from rlaif_jax import program

    F = flags.FLAGS
    program.configure_logging()
    try:
        program.maybe_initialize_distributed(None, None, None)
        run_cli(F.judge, F.labelling, F.mesh, F.data, F.out, F.few_shot)
    except errors.UserError as e:
        errors.report(e)
    return 0


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    from rlaif_jax import program

    flags.DEFINE_string("data", None, "pairs JSONL: {prompt, response_a, response_b} per line", required=True)
    flags.DEFINE_string("out", None, "labels JSONL (completed when it exists; OUT.settings.json beside it)",
                        required=True)
    flags.DEFINE_string("few_shot", "", "few-shot exemplars JSONL: {prompt, response_a, response_b, better[, "
                        "rationale]} per line (or --labelling.few_shot)")
    try:  # a config_dict flag reads its overrides as it is defined: a typo in one fails here, not in parsing
        config_flags.DEFINE_config_dict("judge", judging.default_config("pairwise"), "the pairwise judge")
        config_flags.DEFINE_config_dict("labelling", default_config(), "batching, few-shot exemplars, chain of "
                                        "thought")
        config_flags.DEFINE_config_dict("mesh", mesh_config(), "the device mesh (the training config's mesh)")
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        errors.report(errors.ConfigError(f"a --judge.* / --labelling.* / --mesh.* flag names no setting or has a "
                                         f"value of the wrong type ({str(e).strip(chr(34))}); --helpfull lists them"))
    app.run(main, flags_parser=program.parse_flags)
