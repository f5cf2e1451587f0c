"""Experiment configs parse, validate and say what the papers say; their data loaders read the real column
schemas (small local samples in tests/data); the cluster launchers build the right commands."""
import glob
import importlib.util
import os
import shlex
import subprocess

import ml_collections
import pytest
import transformers
from absl import flags
from ml_collections import config_flags
from tokenizers import Tokenizer, models, pre_tokenizers

from rlaif_jax import config as config_lib
from rlaif_jax import data as data_lib
from rlaif_jax import reward_model_stage, sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data")
TLDR_SAMPLE = os.path.join(DATA, "tldr_sample.jsonl")
HH_SAMPLE = os.path.join(DATA, "hh_rlhf_sample.jsonl")

# Arguments tried per experiment file; files not listed are tried with their default argument.
ARGS = {
    "rlaif_tldr": ["", "variant=canonical", "runlocal", "variant=canonical,runlocal",
                   "policy=/models/sft,judge=google/gemma-2-9b-it,fsdp=4,steps=10"],
    "rlaif_harmless": ["", "runlocal", "fsdp=2", "rm=/ckpt/rm,steps=10"],
    "ppo_tldr_details": ["", "runlocal", "policy=/ckpt/sft,rm=/ckpt/rm,fsdp=8,steps=5"],
    # judge=pairwise with the grpo estimator needs main's reward.pairwise_baseline (TODO(merge) in the file).
    "sft_tldr": ["", "runlocal", "fsdp=8,steps=5"],
    "rm_stage": ["", "runlocal", "rl=rlaif_tldr,label_judge=/judge,eval=held_out.jsonl",
                 "rl=rlaif_harmless,fsdp=8,steps=5", "rl=ppo_tldr_details,runlocal,references=refs.jsonl"],
    "testbed": ["", "small", "judge=relevance", "judge=pairwise", "judge=pairwise,estimator=online_dpo", "rule=0.5",
                "ensemble=2+3,agg=lcb,k=0.5", "ensemble=2,agg=min", "eval=validation"],
}
EXPERIMENTS = sorted(os.path.splitext(os.path.basename(p))[0]
                     for p in glob.glob(os.path.join(ROOT, "experiments", "*.py")) if not p.endswith("__init__.py"))


def load(name):
    """The experiment module, loaded by path as the training program's --config flag does."""
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", os.path.join(ROOT, "experiments",
                                                                                      f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get(name, arg=""):
    return load(name).get_config(arg)


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,arg", [(n, a) for n in EXPERIMENTS for a in ARGS.get(n, [None])])
def test_config_parses_locks_and_validates(name, arg):
    module = load(name)
    assert module.__doc__ and len(module.__doc__) > 200, f"{name}: the docstring says what the experiment targets"
    c = module.get_config() if arg is None else module.get_config(arg)
    assert c.is_locked
    devices = [8] if c.mesh.fsdp > 1 else [1, 8]
    # experiments/sft_*.py are configs of the SFT program (rlaif_jax.sft), rm_*.py of the reward-model stage
    # (rlaif_jax.reward_model_stage), the rest of the RL program.
    validate = (sft.validate if name.startswith("sft_") else reward_model_stage.validate if name.startswith("rm_")
                else config_lib.validate)
    for n in devices:
        validate(c, num_devices=n)
    with pytest.raises(AttributeError):
        c.not_a_field = 1  # locked: typos are errors


@pytest.mark.parametrize("rl,rl_arg", [("ppo_tldr_details", ""), ("rlaif_tldr", "variant=canonical"),
                                       ("rlaif_harmless", "")])
@pytest.mark.parametrize("runlocal", [False, True])
def test_rm_stage_trains_on_the_rows_its_rl_experiment_reads(rl, rl_arg, runlocal):
    """The reward model's rows are those of the RL run that reads it (its judge refuses other ones), runlocal too."""
    rm_config = get("rm_stage", f"rl={rl}" + (",runlocal" if runlocal else ""))
    rl_config = get(rl, ",".join(a for a in ("rm=/rm", rl_arg, "runlocal" if runlocal else "") if a))
    assert rl_config.judge.mode == rm_config.judge.mode == "reward_model"
    for name in reward_model_stage.ROW_SETTINGS:
        assert rm_config.judge[name] == rl_config.judge[name], name
    assert rm_config.judge.include_stop_token == (rl == "ppo_tldr_details")  # the reproduction reads it at the EOS


def parse_cli(argv):
    """The training program's --config flag (absl + ml_collections) on its own FlagValues."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_cli_flag_machinery_reads_argument_and_overrides():
    path = os.path.join(ROOT, "experiments", "rlaif_tldr.py")
    c = parse_cli(["prog", f"--config={path}:variant=canonical,rm=/rm", "--config.rollout.temperature=0.5",
                   "--config.train.steps=7"])
    assert (c.judge.mode, c.judge.path, c.rollout.temperature, c.train.steps) == ("reward_model", "/rm", 0.5, 7)
    with pytest.raises(Exception, match="temprature"):
        parse_cli(["prog", f"--config={path}", "--config.rollout.temprature=0.5"])


def test_rlaif_tldr_matches_the_paper_settings():
    for variant in ("direct", "canonical"):
        c = get("rlaif_tldr", f"variant={variant}")
        assert c.reward.kl_coef == 0.05 and c.reward.kl_in_reward and c.reward.kl_estimator == "k1"
        assert c.rollout.temperature == 0.9
        assert c.algo.estimator == "reinforce" and c.algo.epochs == 1 and c.critic.kind != "none"
        assert c.data.schema == c.data.path and data_lib.TLDR_PROMPT_FORMAT.endswith("TL;DR:")
    direct = get("rlaif_tldr", "variant=direct")
    assert (direct.judge.mode, direct.judge.num_scores) == ("pointwise", 10)
    assert "{num_scores}" in direct.judge.template  # the scale in the words follows num_scores
    canonical = get("rlaif_tldr", "variant=canonical,rm=/my/rm")
    assert (canonical.judge.mode, canonical.judge.path) == ("reward_model", "/my/rm")
    with pytest.raises(ValueError, match="variant="):
        get("rlaif_tldr", "variant=ppo")


def test_ppo_details_matches_the_reproduction():
    c = get("ppo_tldr_details", "rm=/rm")
    assert c.rollout.temperature == 0.7 and c.rollout.max_new_tokens == 53
    assert (c.reward.missing_stop_mode, c.reward.missing_stop_penalty) == ("replace", -1.0)
    assert (c.critic.kind, c.critic.init, c.critic.path, c.judge.path) == ("separate", "reward_model", "/rm", "/rm")
    assert c.judge.mode == "reward_model"
    assert (c.algo.estimator, c.algo.gamma, c.algo.lam, c.algo.epochs, c.algo.vf_coef) == ("gae", 1.0, 0.95, 4, 0.1)
    assert (c.reward.kl_coef, c.optim.learning_rate, c.train.batch_size) == (0.05, 3e-6, 512)
    assert c.train.steps == 1_000_000 // 512  # 1M episodes
    # the per-token rewards (score + KL) are whitened, scale only; the reward is read at the EOS token
    assert (c.reward.whiten_token_rewards, c.reward.token_whiten_shift_mean, c.reward.score_norm) == (True, False,
                                                                                                    "none")
    assert c.judge.include_stop_token


PAPER_RECIPES = [n for n in EXPERIMENTS if hasattr(load(n), "PAPER")]


@pytest.mark.parametrize("name", PAPER_RECIPES)
def test_paper_table_matches_the_config(name):
    """Every row of a recipe's paper table holds for its default config: a "same" row equals the paper's value, a
    row with a deviation differs from it and equals the `ours` it states; the docstring shows the table."""
    from rlaif_jax import recipes
    module = load(name)
    c = module.get_config()
    assert recipes.paper_table_problems(c, module.PAPER) == []
    for row in module.PAPER:
        assert row.source and f"  {row.setting} | " in module.__doc__, row.setting
    seeds = [row for row in module.PAPER if row.setting == "seeds"]
    assert len(seeds) == 1 and list(module.PAPER_SEEDS) == recipes.ours(c, seeds[0])


def test_paper_table_catches_drift():
    """The checker is not vacuous: a changed value, a stale deviation and a missing `ours` are each reported."""
    from rlaif_jax import recipes
    c = get("ppo_tldr_details")
    rows = [recipes.PaperValue("optim.learning_rate", 1e-5, "src"),
            recipes.PaperValue("optim.eps", 1e-5, "src", "we differ"),
            recipes.PaperValue("judge model", "GPT-4", "src", "not released")]
    problems = recipes.paper_table_problems(c, rows)
    assert len(problems) == 3
    assert "3e-06 is not the paper's 1e-05" in problems[0] and "explains a deviation" in problems[1]
    assert "needs `ours`" in problems[2]


def test_rlaif_harmless_is_canonical_rlaif_on_the_harmless_subset():
    """Lee et al.'s harmless task: RL against a reward model distilled from AI labels, on HH harmless-base, whose
    labelling template asks the pairwise question the reward-model stage's labeller reads."""
    module = load("rlaif_harmless")
    c = module.get_config("rm=/rm")
    assert (c.judge.mode, c.judge.path, c.eval.win_rate) == ("reward_model", "/rm", False)
    assert (c.data.path, c.data.data_dir, c.data.prompt_field) == ("Anthropic/hh-rlhf", "harmless-base", "chosen")
    assert c.data.prompt_parser == "hh_transcript" and c.data.use_chat_template
    from rlaif_jax import judging
    label = judging.default_config("pairwise")
    label.template, label.path = module.LABEL_TEMPLATE, "/judge"
    judging.validate_config(label)


def test_testbed_pairwise_judge_and_online_dpo():
    """judge=pairwise asks the testbed judge's trained pairwise question; online_dpo turns reward shaping off and
    needs that judge; every setting reports the win rate with the same template and answer words."""
    from rlaif_jax.testbed import world
    c = get("testbed", "judge=pairwise,estimator=online_dpo")
    assert (c.judge.mode, c.judge.template, tuple(c.judge.option_tokens)) == (
        "pairwise", world.JUDGE_PAIRWISE_TEMPLATE, world.PAIRWISE_ANSWERS)
    assert c.algo.estimator == "online_dpo" and c.reward.kl_coef == 0.0 and c.reward.missing_stop_mode == "none"
    for arg in ("", "judge=pairwise,estimator=online_dpo"):
        c = get("testbed", arg)
        assert c.eval.win_rate and c.eval.pairwise_template == world.JUDGE_PAIRWISE_TEMPLATE
        assert tuple(c.judge.option_tokens) == world.PAIRWISE_ANSWERS
    with pytest.raises(ValueError, match="judge=pairwise"):
        get("testbed", "estimator=online_dpo")
    with pytest.raises(ValueError, match="estimator"):
        get("testbed", "estimator=ppo")


def test_testbed_trains_on_the_train_split_and_evaluates_on_a_held_out_one():
    """RL prompts are the train split's file, evaluations read every instruction of the test (default) or the
    validation split; no other split name is accepted."""
    from rlaif_jax.testbed import build
    art = build.locate(build.seeded_config(1))
    c = get("testbed", "")
    assert (c.data.path, c.data.eval_path, c.data.eval_fraction) == (art.prompts_file, art.test_prompts_file, 0.0)
    assert c.eval.max_prompts == 8
    assert get("testbed", "eval=validation").data.eval_path == art.validation_prompts_file
    with pytest.raises(ValueError, match="eval split 'train'"):
        get("testbed", "eval=train")


@pytest.mark.parametrize("name", ["rlaif_tldr", "rlaif_harmless", "ppo_tldr_details"])
def test_runlocal_changes_only_the_size(name):
    """runlocal is the same experiment, smaller: every field outside the size knobs is identical."""
    size_keys = {"train.batch_size", "train.steps", "optim.grad_accum", "algo.minibatches", "data.max_prompt_len",
                 "data.eval_max_prompts", "rollout.max_new_tokens", "judge.max_len", "eval.every",
                 "eval.max_prompts", "checkpoint.every_steps", "logging.progress_bar"}

    def flat(c, prefix=""):
        out = {}
        for k, v in c.items():
            if isinstance(v, ml_collections.ConfigDict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    full, small = flat(get(name)), flat(get(name, "runlocal"))
    assert full.keys() == small.keys()
    differing = {k for k in full if full[k] != small[k]}
    assert differing <= size_keys and "train.steps" in differing
    assert small["train.steps"] < full["train.steps"]


def test_parse_arg_types_and_errors():
    from rlaif_jax.recipes import parse_arg
    a = parse_arg("n=3,lr=0.5,name=x/y,flag", n=1, lr=1.0, name="a", flag=False, other=True)
    assert (a.n, a.lr, a.name, a.flag, a.other) == (3, 0.5, "x/y", True, True)
    assert parse_arg("other=false", other=True).other is False
    assert parse_arg("", n=1).n == 1 and parse_arg(None, n=1).n == 1
    with pytest.raises(ValueError, match="unknown config argument 'nn'.*known: \\['n'\\]"):
        parse_arg("nn=2", n=1)
    with pytest.raises(ValueError, match="needs a value"):
        parse_arg("n", n=1)
    with pytest.raises(ValueError):
        parse_arg("n=two", n=1)


# ---------------------------------------------------------------------------------------------- data schemas
def word_tokenizer(texts, chat_template=None):
    """A whitespace word-level tokenizer over the words of `texts` (+ <unk>, <bos>): one id per word."""
    words = sorted({w for t in texts for w in t.split()})
    vocab = {"<unk>": 0, "<bos>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<unk>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def local_data_section(name, path, **changes):
    """The experiment's `config.data`, pointed at a local sample file (train and held-out)."""
    d = ml_collections.ConfigDict(get(name).data.to_dict())
    d.path, d.eval_path, d.eval_split = path, path, ""
    for k, v in changes.items():
        d[k] = v
    return d


# Hand-written renderings of the sample rows: OpenAI's TL;DR query format.
TLDR_EXPECTED_FIRST = (
    "SUBREDDIT: r/relationships\n\nTITLE: My [24F] roommate [25F] keeps eating my food\n\nPOST: We have lived "
    "together for a year. Every week some of my groceries disappear and she says it was not her. I labelled "
    "everything but it keeps happening. How do I bring it up without ruining the friendship?\n\nTL;DR:")


@pytest.mark.parametrize("name", ["rlaif_tldr", "ppo_tldr_details"])
def test_tldr_loader_reads_the_real_columns(name):
    import json
    rows = [json.loads(line) for line in open(TLDR_SAMPLE)]
    assert {"id", "subreddit", "title", "post", "summary"} <= set(rows[0])  # the hub dataset's raw columns
    tok = word_tokenizer([TLDR_EXPECTED_FIRST] + [r["post"] + " " + r["title"] + " r/" + r["subreddit"]
                                                  for r in rows] + ["SUBREDDIT: TITLE: POST: TL;DR:"])
    splits = data_lib.load_prompt_splits(local_data_section(name, TLDR_SAMPLE), tok)
    train = splits.train
    assert (train.num_loaded, train.num_rejected, len(train)) == (4, 1, 3)  # the blank post is rejected
    texts = train.dataset[data_lib.PROMPT_TEXT]
    assert texts[0] == TLDR_EXPECTED_FIRST
    assert texts[1].startswith("SUBREDDIT: r/personalfinance\n\nTITLE: Should I pay off my car loan early?")
    assert all(t.endswith("\n\nTL;DR:") for t in texts)
    ids = train.dataset[data_lib.PROMPT_IDS][0]
    assert len(ids) == len(TLDR_EXPECTED_FIRST.split()) and 0 not in ids  # every word known, one id each
    assert len(splits.eval) == 3

    # Longer than max_prompt_len: cut from the left, "TL;DR:" stays last; a data set whose every prompt would be
    # cut is refused.
    cut, truncated = data_lib.left_truncate(ids, 8)
    assert truncated and cut == ids[-8:] and cut[-1] == tok.convert_tokens_to_ids("TL;DR:")
    with pytest.raises(data_lib.DataError, match="every one of the 3 prompts of .* is longer than config.data."
                                                 "max_prompt_len=8 tokens"):
        data_lib.load_prompt_splits(local_data_section(name, TLDR_SAMPLE, max_prompt_len=8), tok)


CHAT = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </{{ m['role'] }}>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
HH_EXPECTED_MESSAGES = [
    [{"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "user", "content": "My neighbour's dog barks all night."},
     {"role": "assistant", "content": "That sounds exhausting. Have you talked to them?"},
     {"role": "user", "content": "Yes, they ignored me. Can I poison it?"}],
    [{"role": "user", "content": "What's a good insult for my coworker?"},
     {"role": "assistant", "content": "Why do you want to insult them?"},
     {"role": "user", "content": "He took credit for my work."}],
]


def render_chat(messages):
    return "".join(f"<{m['role']}> {m['content']} </{m['role']}>\n" for m in messages) + "<assistant>"


needs_prompt_parser = pytest.mark.skipif(
    "prompt_parser" not in data_lib.default_config(),
    reason="rlaif_jax.data has no `prompt_parser` yet (the HH transcript parser)")


@needs_prompt_parser
def test_hh_loader_cuts_the_transcript_before_the_final_reply():
    import json
    rows = [json.loads(line) for line in open(HH_SAMPLE)]
    assert set(rows[0]) == {"chosen", "rejected"}  # Anthropic/hh-rlhf's columns
    expected = [render_chat(m) for m in HH_EXPECTED_MESSAGES]
    tok = word_tokenizer(expected, chat_template=CHAT)
    splits = data_lib.load_prompt_splits(local_data_section("rlaif_harmless", HH_SAMPLE, data_dir=""), tok)
    train = splits.train
    assert (train.num_loaded, train.num_rejected, len(train)) == (4, 1, 3)  # no assistant turn: rejected
    assert train.dataset[data_lib.PROMPT_TEXT] == expected
    for text in train.dataset[data_lib.PROMPT_TEXT]:  # the preferred reply never leaks into the prompt
        assert "locksmith" not in text and "council" not in text and "manager" not in text

    # The text form (a base model without a chat template) ends with the assistant cue.
    base = data_lib.load_prompt_splits(local_data_section("rlaif_harmless", HH_SAMPLE, data_dir="", use_chat_template=False,
                                                          prompt_parser="hh_transcript_text"), tok).train
    assert base.dataset[data_lib.PROMPT_TEXT][0] == "\n\nHuman: How do I pick a lock?\n\nAssistant:"
    assert base.dataset[data_lib.PROMPT_TEXT][1].endswith(
        "\n\nHuman: Yes, they ignored me. Can I poison it?\n\nAssistant:")


# ---------------------------------------------------------------------------------------------- launchers
LAUNCHERS = ["scripts/launch_tpu_pod.sh", "scripts/launch_gpu_node.sh", "scripts/launch_slurm.sbatch"]


@pytest.mark.parametrize("script", LAUNCHERS)
def test_launcher_syntax_and_usage(script):
    subprocess.run(["bash", "-n", os.path.join(ROOT, script)], check=True)
    out = subprocess.run(["bash", os.path.join(ROOT, script)], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]})
    assert out.returncode != 0 and "CONFIG" in out.stderr and "WORKDIR" in out.stderr


def dry_run(script, *args, **env):
    e = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "DRY_RUN": "1", **env}
    out = subprocess.run(["bash", os.path.join(ROOT, script), *args], capture_output=True, text=True, env=e)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def test_tpu_launcher_runs_the_same_command_on_every_worker():
    argv = dry_run("scripts/launch_tpu_pod.sh", "experiments/rlaif_harmless.py:fsdp=8", "/mnt/shared/run 1",
                   "--config.train.steps=5", TPU_NAME="pod", ZONE="us-central2-b", PROJECT="proj",
                   REMOTE_ENV="HF_TOKEN=x")
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
    assert argv[5] == "pod" and argv[argv.index("--zone") + 1] == "us-central2-b"
    assert argv[argv.index("--project") + 1] == "proj" and "--worker=all" in argv
    remote = argv[argv.index("--command") + 1]
    setup, _, train = remote.rpartition(" && ")
    assert setup.startswith("cd ~/rlaif_jax && export RLAIF_DISTRIBUTED=1 HF_TOKEN=x")
    assert shlex.split(train) == ["python3", "-m", "rlaif_jax.train", "--config=experiments/rlaif_harmless.py:fsdp=8",
                                  "--workdir=/mnt/shared/run 1", "--config.train.steps=5"]
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts/launch_tpu_pod.sh"), "c", "w"], capture_output=True,
                         text=True, env={"PATH": os.environ["PATH"], "DRY_RUN": "1"})
    assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_gpu_launcher_single_node_and_multi_node():
    argv = dry_run("scripts/launch_gpu_node.sh", "experiments/rlaif_tldr.py", "runs/a", "--config.seed=3")
    assert argv == ["python3", "-m", "rlaif_jax.train", "--config=experiments/rlaif_tldr.py", "--workdir=runs/a",
                    "--config.seed=3"]
    argv = dry_run("scripts/launch_gpu_node.sh", "c.py", "w", COORDINATOR="h0:1234", NUM_NODES="2", NODE_RANK="1",
                   PYTHON=".venv/bin/python")
    assert argv == [".venv/bin/python", "-m", "rlaif_jax.train", "--config=c.py", "--workdir=w",
                    "--coordinator_address=h0:1234", "--num_processes=2", "--process_id=1"]


def test_slurm_launcher_exports_the_coordinator_and_one_task_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # stands in for SLURM's: expands the node list
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"\n')
    scontrol.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": ROOT, "PORT": "5555"}
    argv = dry_run("scripts/launch_slurm.sbatch", "experiments/ppo_tldr_details.py:rm=/rm", "/shared/run",
                   "--config.train.steps=3", **env)
    assert argv[:6] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash"]
    task = argv[7]
    assert task.startswith("export JAX_PROCESS_ID=$SLURM_PROCID && exec ")
    assert shlex.split(task.split("exec ", 1)[1]) == [
        "python3", "-m", "rlaif_jax.train", "--config=experiments/ppo_tldr_details.py:rm=/rm",
        "--workdir=/shared/run", "--config.train.steps=3"]
    # What each task's process sees: run the task line with a stub python that prints the JAX_* environment.
    stub = bin_dir / "python3"
    stub.write_text("#!/bin/sh\necho $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID\n")
    stub.chmod(0o755)
    e = {**env, "DRY_RUN": "0"}
    srun = bin_dir / "srun"  # stands in for srun: runs the task twice, as SLURM_PROCID 0 and 1
    srun.write_text('#!/bin/bash\nwhile [ "$1" != bash ]; do shift; done\nshift\n'
                    'for i in 0 1; do SLURM_PROCID=$i bash "$@"; done\n')
    srun.chmod(0o755)
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts/launch_slurm.sbatch"), "c.py", "w"],
                         capture_output=True, text=True, env=e)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["gpu07:5555 2 0", "gpu07:5555 2 1"]
