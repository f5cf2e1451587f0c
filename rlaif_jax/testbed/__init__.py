"""The built-in tiny task: a synthetic instruction world where RLAIF can be run and measured on a CPU.

  world      vocabulary, instructions, prompts, the judge's templates
  grader     the programmatic ground truth (relevance, coherence, harmlessness); never seen during RL
  tokenizer  a `tokenizers` WordLevel tokenizer saved for transformers.AutoTokenizer
  data       noisy SFT demonstrations and noisily labelled judge examples
  build      trains and caches the SFT policy and the judge as HF checkpoints, with the prompt file
             (scripts/build_testbed.py); `ensure_built` is the training program's hook for experiments/testbed.py
"""
