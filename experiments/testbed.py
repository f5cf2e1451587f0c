"""RLAIF on the built-in testbed: a tiny SFT policy trained against a tiny LLM judge, on a laptop CPU.

    python -m rlaif_jax.train --config experiments/testbed.py --workdir runs/testbed
    python -m rlaif_jax.train --config experiments/testbed.py:small --workdir /tmp/tb   # 40 steps: the tests

Arguments (comma-separated): small (fewer steps), seed=N (RL seed), build=N (the testbed's build seed, default 1:
each seed is another draw of the SFT policy and judge, built once and cached), judge=rubric|relevance|pairwise,
estimator=grpo|online_dpo, kl=COEF (grpo's KL-loss coefficient; default 0.3, chosen on tuning builds 1-2 on
the validation split), beta=B (online_dpo's algo.dpo_beta, default 0.3), steps=N, rule=W (W > 0: add the Python
rule reward `rlaif_jax.testbed.task:format_rule`, weight W, to the judge's score; grpo only), eval=test|validation (the
held-out split the evaluations read, default test: choose steps and settings with eval=validation, report test),
ensemble=N1+N2 (the judges of builds N1, N2, ... join build's judge in a judge ensemble; '+' separates them),
agg=mean|min|lcb (how the ensemble's scores become the reward: their mean, minimum, or lower confidence bound
mean - k std; default mean), k=K (lcb's k, default 1).

Splits (rlaif_jax.testbed.world.SPLITS): the RL prompts, the SFT demonstrations and the judge's training questions
all come from the 64 training instructions; the 8 validation and 8 test instructions are adjective-topic
compositions ("describe a big cat") that appear in none of them.

The world (rlaif_jax/testbed): instructions like "describe a red cat"; a noisy SFT policy (about 40% of its
sampled responses pass the ground truth); a judge trained with deliberate label noise to answer rubric questions
("Is the response relevant / coherent / harmless ? Answer :" -> Yes / No). The judge's score is the mean P(yes)
over the three criteria (`judge.mode = "rubric"`). The ground-truth grader is only used by the evaluation
(`eval.ground_truth`), never by the reward.

`judge=relevance` is the reward-hacking ablation: the judge asks only the relevance question, which it answers
with a bias towards responses that repeat topic words, so the policy can raise the judge score by stuffing
keywords while coherence (and the ground-truth pass rate) falls. `kl=0` removes the other guard-rail.

`rule=W` adds a rule reward written as a Python function on the text (`reward.functions`, run on the host between
the step's compiled programs): 1 when the response ended with the stop token and doubles no word, weighted W next
to the judge's score (in [0, 1]), aimed at the judge's known blind spot, the doubled word.

`judge=pairwise` asks the judge which of two responses to the instruction is better ("Instruction : ... Response
A : ... Response B : ... Better response :" -> A / B), in both presentation orders; with grpo the reward of a
sample is P(it beats a sample of the frozen reference policy drawn in the same step, reward.pairwise_baseline =
"reference_sample"). `estimator=online_dpo` (which needs judge=pairwise) learns from those preferences between every two of a
prompt's samples, with no reward shaping: its pull to the reference is algo.dpo_beta, not kl.

The judge is trained on the pairwise question too, so the evaluation reports the win rate against the initial
policy (`eval.win_rate`, the same judge asked the pairwise question) for every judge setting.

`ensemble=2+3` scores every response with the judges of builds 2 and 3 as well as build's (each build's judge is
another draw of the same recipe, so the members disagree where their training left them unsure) and aggregates
their scores (`config.judge.ensemble_*`, rlaif_jax/judging/ensemble.py; Coste et al. 2023, Eisenstein et al.
2023): `agg=min` and `agg=lcb` penalise responses the judges disagree on. The program builds the extra builds too
(`testbed.ensemble_seeds`).

The models and the prompt file are those of the testbed's default build (rlaif_jax/testbed/build.py). This
config only names their cache folders; `testbed.build` asks the training program to build them (deterministic,
about 2-3 minutes on a laptop CPU) or reuse the cached build before it loads anything.
"""
import ml_collections

from rlaif_jax import config as config_lib
from rlaif_jax.recipes import parse_arg
from rlaif_jax.testbed import build, world

CRITERIA = {"relevance": "relevant", "coherence": "coherent", "harmlessness": "harmless"}


# agg= -> config.judge.ensemble_aggregate (lcb: the lower confidence bound mean - k std).
AGGREGATES = {"mean": "mean", "min": "min", "lcb": "mean_minus_std"}


def _ensemble_seeds(a) -> tuple[int, ...]:
    """The builds of ensemble=N1+N2 (none without it), checked with agg= and k=."""
    try:
        seeds = tuple(int(n) for n in a.ensemble.split("+")) if a.ensemble else ()
    except ValueError:
        raise ValueError(f"testbed ensemble={a.ensemble!r}; use build seeds joined by '+', e.g. ensemble=2+3") from None
    if a.build in seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"testbed ensemble={a.ensemble!r} repeats a build (build={a.build}): each judge once")
    if a.agg not in AGGREGATES:
        raise ValueError(f"testbed agg={a.agg!r}; use one of {tuple(AGGREGATES)}")
    if a.agg != "mean" and not seeds:
        raise ValueError(f"testbed agg={a.agg} aggregates a judge ensemble: name its builds with ensemble=N1+N2")
    if a.k != -1.0 and a.agg != "lcb":
        raise ValueError(f"testbed k={a.k} is agg=lcb's (mean - k std), not agg={a.agg}'s")
    return seeds


def get_config(arg: str = ""):
    a = parse_arg(arg, small=False, seed=0, build=1, judge="rubric", estimator="grpo", kl=-1.0, beta=0.3, steps=0,
                  rule=0.0, eval="test", ensemble="", agg="mean", k=-1.0)
    if a.judge not in ("rubric", "relevance", "pairwise"):
        raise ValueError(f"testbed judge={a.judge!r}; use rubric, relevance or pairwise")
    if a.estimator not in ("grpo", "online_dpo"):
        raise ValueError(f"testbed estimator={a.estimator!r}; use grpo or online_dpo")
    if a.rule and a.estimator == "online_dpo":
        raise ValueError("testbed rule=W weights a rule into a scalar reward, which estimator=online_dpo does not use")
    if a.estimator == "online_dpo" and a.judge != "pairwise":
        raise ValueError(f"testbed estimator=online_dpo learns from preferences: it needs judge=pairwise, not "
                         f"judge={a.judge}")
    ensemble_seeds = _ensemble_seeds(a)
    # The small variant uses the same models (a faster-built judge does not learn relevance well enough to train
    # against).
    art = build.locate(build.seeded_config(a.build))

    c = config_lib.base_config()
    # The program builds or reuses `art` (build.ensure_built).
    c.testbed = ml_collections.ConfigDict({"build": True, "seed": a.build, "ensemble_seeds": ensemble_seeds})
    c.seed = a.seed
    c.policy.path = art.policy_dir
    c.judge.path = art.judge_dir
    if a.judge == "pairwise":
        c.judge.mode = "pairwise"
        c.judge.template = world.JUDGE_PAIRWISE_TEMPLATE
    else:
        c.judge.mode = "rubric"
        c.judge.template = world.JUDGE_RUBRIC_TEMPLATE
        c.judge.yes_no_tokens = world.JUDGE_ANSWERS
        names = list(CRITERIA) if a.judge == "rubric" else ["relevance"]
        c.judge.criteria = tuple(dict(name=n, question=CRITERIA[n], weight=1.0 / len(names)) for n in names)
    c.judge.option_tokens = world.PAIRWISE_ANSWERS  # the pairwise judge's, and the win rate's
    # Every judge row, the win rate's pairwise ones included: <bos> + 11 template words + 4 instruction words +
    # 2 responses of up to rollout.max_new_tokens = 20 (the stop token is not shown).
    c.judge.max_len = 56
    c.judge.ensemble_paths = tuple(build.locate(build.seeded_config(n)).judge_dir for n in ensemble_seeds)
    if ensemble_seeds:
        c.judge.ensemble_aggregate = AGGREGATES[a.agg]
        if a.agg == "lcb":
            c.judge.ensemble_std_coef = a.k if a.k != -1.0 else 1.0

    c.data.path = art.prompts_file  # the train split
    c.data.eval_path = art.eval_prompts_file(a.eval)  # raises on a split other than validation / test
    c.data.max_prompt_len = 5
    c.data.seed = 0

    c.rollout.max_new_tokens = 20
    c.rollout.temperature = 1.0
    c.rollout.n_samples = 4

    c.critic.kind = "none"
    c.algo.estimator = a.estimator
    c.algo.epochs = 1
    c.algo.minibatches = 2
    c.reward.kl_estimator = "k3"
    c.reward.kl_in_reward = False  # GRPO-style: KL as a loss term
    if a.estimator == "online_dpo":  # no scalar reward to shape (config._check_online_dpo)
        if a.kl != -1.0:
            raise ValueError("testbed estimator=online_dpo has no KL coefficient: its pull to the reference is beta")
        c.algo.dpo_beta = a.beta
        # Chosen on RL seed 0 (README): at the RL learning rate, 1e-3, online DPO drifted within 50 steps to one
        # off-topic answer the pairwise judge prefers (ground truth 0.487 -> 0.04-0.19 for beta 0.1, 0.3, 1.0);
        # 3e-4 peaked at step 25 and fell to 0.34; 1e-4 rose steadily to 0.856.
        learning_rate = 1e-4
        c.reward.kl_coef = 0.0
        c.reward.missing_stop_mode = "none"
    else:
        if a.beta != 0.3:
            raise ValueError("testbed beta= is online_dpo's; grpo's pull to the reference is kl=")
        learning_rate = 1e-3
        # KL coefficient 0.3 for every judge. Rubric: chosen by `scripts/study.py --builds 1,2 --seeds 1,2,3
        # --split validation` over 0.1 / 0.3 / 1.0 (tuning builds 1-2, validation split; README): mean pass-rate
        # gain -0.051 [-0.129, +0.026] at 0.1 (the judge's blind spots found), +0.301 [+0.214, +0.380] at 0.3,
        # +0.163 [+0.117, +0.228] at 1.0. Pairwise: chosen earlier on RL seed 0 of build 1 (at 0.1 the policy found
        # the pairwise judge's blind spot for wrong adjectives). Reported on builds 3-7, test split.
        c.reward.kl_coef = a.kl if a.kl != -1.0 else 0.3
        # A response that never emits <eos> gets the lowest score: the judge reads text, not termination.
        c.reward.missing_stop_mode = "replace"
        c.reward.missing_stop_penalty = 0.0
        if a.judge == "pairwise":  # the reward: P(the response beats a sample of the reference policy)
            c.reward.pairwise_baseline = "reference_sample"
        if a.rule:  # a Python rule reward on the text, next to the judge's score
            c.reward.functions = {"format": "rlaif_jax.testbed.task:format_rule"}
            c.reward.function_weights = {"format": float(a.rule)}

    c.optim.learning_rate = learning_rate
    c.optim.max_grad_norm = 1.0
    c.train.batch_size = 16
    # 100 steps: the ground truth peaks around here. Longer runs find the judge's blind spots (a stuttered
    # word it calls coherent, repeated "."): the judge score keeps rising while the ground truth falls, the
    # over-optimisation of Gao et al. 2022 (try steps=400).
    c.train.steps = a.steps or (40 if a.small else 100)

    c.eval.every = 20 if a.small else 25
    c.eval.max_prompts = 8  # every instruction of the held-out split
    c.eval.samples_per_prompt = 16  # 8 instructions x 16 = 128 samples per evaluation
    c.eval.win_rate = True
    c.eval.pairwise_template = world.JUDGE_PAIRWISE_TEMPLATE
    c.eval.ground_truth = "rlaif_jax.testbed.task:ground_truth"
    c.checkpoint.every_steps = 50
    c.logging.progress_bar = True
    c.lock()
    return c
