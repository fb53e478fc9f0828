#!/usr/bin/env bash
# GPU check of the real-model path: ONE command, one GPU, no network, no model weights.
#
#   bash scripts/gpu_check.sh            # writes results/gpu/{search,alfworld}-{lora,full}.json
#
# What it runs (bench.py gpu): a randomly initialised model of Qwen2.5-1.5B-Instruct's exact shapes
# (configs/qwen2.5-1.5b-instruct.json, 1.54 B parameters), one full OPID iteration through train.py's
# own functions (rollout -> recomputed old pass -> reference pass + rule analyzer -> teacher passes
# -> PPO update) on search QA and on ALFWorld, with LoRA (rank 64) and with full fine-tuning (fp32
# master weights, bf16 autocast), at the README recipes' shapes: group of 8, 512-token responses
# (EOS masked so every response has exactly that length), the recipes' history lengths and
# micro-batch sizes, gradient checkpointing; 2 tasks x 2 steps per episode so one iteration is short.
# Each JSON holds peak GPU memory, rollout tokens/s, update tokens/s, MFU against the chip's dense
# bf16 peak (H200/H100: 989 TFLOPS), seconds per phase. Budget: at most 8 minutes on one H200.
#
# Needs: torch, transformers, accelerate, peft (preinstalled on the GPU image) and their numpy, tqdm.
# Search QA needs nothing more: a word-overlap retriever behind the Search-R1-style HTTP server
# stands in for bm25s. ALFWorld needs alfworld 0.4.2 and textworld 1.7.0 with TatSu 5.8.3,
# fast_downward_textworld 20.6.4 (built locally: it is an sdist) and textworld's small pure-Python
# requirements (hashids, mementos, more_itertools, networkx, prompt_toolkit, termcolor). Without
# network, put those wheels in wheels/ at the repository root, e.g. on a machine with the index:
#   pip wheel --no-deps -w wheels alfworld==0.4.2 textworld==1.7.0 TatSu==5.8.3 \
#       fast_downward_textworld==20.6.4 hashids mementos more_itertools networkx prompt_toolkit termcolor
# This script installs them from wheels/ when alfworld is missing; if that is impossible the
# ALFWorld files say "skipped" and the search QA files are still written.
# Extra arguments go to bench.py gpu (e.g. --envs search --modes full, or --toy for a CPU dry run).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import alfworld, textworld" 2>/dev/null; then
  if [ -d wheels ]; then
    pip install --quiet --no-index --find-links wheels --no-deps alfworld textworld TatSu fast_downward_textworld \
      hashids mementos more_itertools networkx prompt_toolkit termcolor \
      || echo "gpu_check: the ALFWorld wheels in wheels/ did not install; ALFWorld is skipped" >&2
  else
    echo "gpu_check: alfworld is not installed and there is no wheels/ folder; ALFWorld is skipped" >&2
  fi
fi
export OPID_CACHE="${OPID_CACHE:-$PWD/.cache/gpu-check}"   # generated games and QA data
export TOKENIZERS_PARALLELISM=false
exec python bench.py gpu --out results/gpu "$@"
