#!/usr/bin/env bash
# The CPU testbed's comparisons: the default run (`python train.py`: small worlds, the kept tiny agent,
# 12 iterations of 4 × 4, 60 held-out games before and after) with a few flags changed per run.
# docs/experiments.md reports what these gave.
#
#   bash scripts/testbed_runs.sh before-after   # GRPO and OPID under the earlier rules (trajectory-wide penalty,
#                                               #   admissible-only validity), seeds 0-2; the current rules are
#                                               #   the default runs (`python train.py [--algo grpo] --seed N`)
#   bash scripts/testbed_runs.sh w-sweep        # OPID at w = 0.01, 0.1, 1 (w_ep = w_step), seeds 0-2
#   bash scripts/testbed_runs.sh normalised     # OPID at w = 0.1 with --delta-normalize, seeds 0-2
#   bash scripts/testbed_runs.sh paired         # OPID (w = $W, default 0.01) on seeds 1-4, GRPO on seeds 3 and 4 too
#   bash scripts/testbed_runs.sh t07            # GRPO and OPID (w = 0.001 and 0.01) with rollouts at T = 0.7, seeds 0-2
#   bash scripts/testbed_runs.sh t07-long       # GRPO and OPID (w = 0.01) at T = 0.7, 24 iterations, evaluated every 6
#   bash scripts/testbed_runs.sh default        # the default runs themselves (the kept loop-and-play agent, lr 1e-4),
#                                               #   GRPO and OPID, seeds 0-2
#   bash scripts/testbed_runs.sh lr             # GRPO and OPID (w = 0.01) at lr 3e-5 (the default), 1e-4, 3e-4, seed 0;
#                                               #   and at lr 1e-4 for 24 iterations, evaluated every 12
#   bash scripts/testbed_runs.sh updates        # GRPO and OPID (w = 0.01), seed 0, lr 1e-4 with 2 passes of 64-sample
#                                               #   mini-batches per iteration (8 optimizer steps instead of 1-2)
#   bash scripts/testbed_runs.sh groups         # GRPO and OPID (w = 0.01), seed 0, groups of 8 rollouts instead of 4
#   bash scripts/testbed_runs.sh t04            # OPID (w = 0.01), seed 0, rollouts at T = 0.4 (the evaluation's), 24
#                                               #   iterations evaluated every 12, at lr 3e-5 and 1e-4
#   bash scripts/testbed_runs.sh long48         # GRPO and OPID (w = 0.01), seed 0, 48 iterations evaluated every 12
#   bash scripts/testbed_runs.sh admissible     # GRPO and OPID (w = 0.01), seed 0, --validity admissible: the
#                                               #   per-step penalty also on well-formed actions the room cannot carry out
#   bash scripts/testbed_runs.sh fresh          # GRPO and OPID (w = 0.01), seed 0, lr 1e-4, 24 iterations evaluated every
#                                               #   12, rollouts on --train-split fresh (games the agent was not cloned on)
#   bash scripts/testbed_runs.sh habit          # the habit experiment: builds the agent cloned with habit_share 0.35
#                                               #   (runs/agents/habit0.35, 20-40 min), then GRPO and OPID (w = 0.1 and
#                                               #   1) at lr 3e-5 and 1e-4, seed 0; GRPO / OPID w = 0.1 at lr 1e-4, seeds 1-2, at 3e-5, seed 1
#   bash scripts/testbed_runs.sh unclosed       # the format-habit experiment: builds the agent whose demonstrator leaves
#                                               #   `</action>` off at a share $SHARE of its steps (default 0.35;
#                                               #   runs/agents/unclosed$SHARE, 20-40 min), then GRPO and OPID (w = 0.001,
#                                               #   the default), seeds 0-4, and OPID w = 0.1, seeds 0-2, default lr
#   bash scripts/testbed_runs.sh stall          # the loop experiment: builds the agent that, at a share $SHARE (default
#                                               #   0.5) of the steps where the expert takes something, checks its
#                                               #   inventory from then on (runs/agents/stall$SHARE), then GRPO and OPID
#                                               #   w = 0.1, seeds 0-2, OPID w = 0.001, seed 0 (default lr); GRPO at
#                                               #   lr 1e-4, seed 0; GRPO and OPID w = 0.1 for 24 iterations evaluated
#                                               #   every 6, seeds 0-1; GRPO (seeds 1-2) and OPID w = 0.1 (seeds 0-2) at lr 1e-4
#   bash scripts/testbed_runs.sh resume         # the same loop, then the expert's play again (habit stall_resume:
#                                               #   cloned on the play after a take as the kept agent is;
#                                               #   runs/agents/resume$SHARE), GRPO and OPID w = 0.1 at lr 1e-4, seeds
#                                               #   0-4; OPID at w = 0.001 (the default), 0.01 and 1, seeds 0-2
#                                               #   (the same flags and bits as `python train.py`: it is the kept agent);
#                                               #   GRPO and OPID (w = 0.001) for 24 iterations evaluated every 6, seeds 0-2
#
# Every set but default, habit, unclosed, stall and resume ran before the loop-and-play agent was kept,
# at the then-default lr 3e-5: they run on the earlier kept agent (the same recipe without the habit,
# built once into runs/agents/plain, 20-40 min; its kept copy had sha256 550fb64c...) at lr 3e-5 unless
# the job names another. The sets normalised, t07, t07-long and before-after were run with the older
# 240-episode agent, w-sweep with both (docs/experiments.md, "the w sweep with the stronger agent").
#
# DRY_RUN=1 prints the train.py commands instead of running them.
# Two runs at a time, one torch thread each (about 300-450 s per run on 2 cores). A run whose
# log ends with train.py's "done:" line is skipped. Runs: runs/<name>/; then
#   python eval.py --compare runs/<name>... --labels ... --md results/<folder>/table.md
set -euo pipefail
cd "$(dirname "$0")/.."
W=${W:-0.01}
case "${1:-}" in
  default) jobs="default-grpo-s0 --algo grpo --seed 0
default-grpo-s1 --algo grpo --seed 1
default-grpo-s2 --algo grpo --seed 2
default-opid-s0 --seed 0
default-opid-s1 --seed 1
default-opid-s2 --seed 2" ;;
  before-after) jobs=$(for s in 0 1 2; do for a in grpo opid; do
      echo "oldrules-$a-s$s --algo $a --seed $s --penalty-scope trajectory --validity admissible"; done; done) ;;
  w-sweep) jobs=$(for s in 0 1 2; do for w in 0.01 0.1 1; do
      echo "wsweep-w$w-s$s --seed $s --w-episode $w --w-step $w"; done; done) ;;
  normalised) jobs=$(for s in 0 1 2; do echo "dn-w0.1-s$s --seed $s --w-episode 0.1 --w-step 0.1 --delta-normalize"; done) ;;
  paired) jobs=$(for s in 1 2 3 4; do [ $s -ge 3 ] && echo "default-grpo-s$s --algo grpo --seed $s"
      echo "paired-w$W-s$s --seed $s --w-episode $W --w-step $W"; done) ;;
  t07) jobs=$(for s in 0 1 2; do echo "t07-grpo-s$s --algo grpo --seed $s --temperature 0.7"
      echo "t07-opid-s$s --seed $s --temperature 0.7"
      echo "t07-w0.01-s$s --seed $s --temperature 0.7 --w-episode 0.01 --w-step 0.01"; done) ;;
  t07-long) jobs=$(for s in 0 1 2; do echo "t07long-grpo-s$s --algo grpo --seed $s --temperature 0.7 --iters 24 --eval-every 6"
      echo "t07long-w0.01-s$s --seed $s --temperature 0.7 --iters 24 --eval-every 6 --w-episode 0.01 --w-step 0.01"; done) ;;
  lr) jobs=$(for lr in 3e-5 1e-4 3e-4; do echo "lr$lr-grpo-s0 --algo grpo --seed 0 --lr $lr"
      echo "lr$lr-w0.01-s0 --seed 0 --lr $lr --w-episode 0.01 --w-step 0.01"; done
      echo "long-lr1e-4-grpo-s0 --algo grpo --seed 0 --lr 1e-4 --iters 24 --eval-every 12"
      echo "long-lr1e-4-w0.01-s0 --seed 0 --lr 1e-4 --iters 24 --eval-every 12 --w-episode 0.01 --w-step 0.01") ;;
  updates) jobs="p-mb64-grpo-s0 --algo grpo --seed 0 --lr 1e-4 --mini-batch-size 64 --ppo-epochs 2
p-mb64-w0.01-s0 --seed 0 --lr 1e-4 --mini-batch-size 64 --ppo-epochs 2 --w-episode 0.01 --w-step 0.01" ;;
  groups) jobs="g8-grpo-s0 --algo grpo --seed 0 --group-size 8
g8-w0.01-s0 --seed 0 --group-size 8 --w-episode 0.01 --w-step 0.01" ;;
  t04) jobs="t04-w0.01-s0 --seed 0 --temperature 0.4 --iters 24 --eval-every 12 --w-episode 0.01 --w-step 0.01
t04-lr1e-4-w0.01-s0 --seed 0 --temperature 0.4 --iters 24 --eval-every 12 --lr 1e-4 --w-episode 0.01 --w-step 0.01" ;;
  long48) jobs="long48-grpo-s0 --algo grpo --seed 0 --iters 48 --eval-every 12
long48-w0.01-s0 --seed 0 --iters 48 --eval-every 12 --w-episode 0.01 --w-step 0.01" ;;
  admissible) jobs="adm-grpo-s0 --algo grpo --seed 0 --validity admissible
adm-w0.01-s0 --seed 0 --validity admissible --w-episode 0.01 --w-step 0.01" ;;
  fresh) jobs="fresh-lr1e-4-grpo-s0 --algo grpo --seed 0 --train-split fresh --lr 1e-4 --iters 24 --eval-every 12
fresh-lr1e-4-w0.01-s0 --seed 0 --train-split fresh --lr 1e-4 --iters 24 --eval-every 12 --w-episode 0.01 --w-step 0.01" ;;
  habit) agent=runs/agents/habit0.35
      [ -n "${DRY_RUN:-}" ] || [ -f $agent/warmstart.json ] || python warmstart.py alfworld --habit-share 0.35 --out $agent
      tiny="--model $agent --no-think --history-length 2 --max-new-tokens 24"
      jobs=$(for lr in 3e-5 1e-4; do tag=$([ $lr = 1e-4 ] && echo -lr$lr)
        echo "H0.35-grpo$tag-s0 $tiny --lr $lr --algo grpo --seed 0"
        for w in 0.1 1; do echo "H0.35-w$w$tag-s0 $tiny --lr $lr --w-episode $w --w-step $w --seed 0"; done; done
        for s in 1 2; do echo "H0.35-grpo-lr1e-4-s$s $tiny --lr 1e-4 --algo grpo --seed $s"
          echo "H0.35-w0.1-lr1e-4-s$s $tiny --lr 1e-4 --w-episode 0.1 --w-step 0.1 --seed $s"; done
        echo "H0.35-grpo-s1 $tiny --lr 3e-5 --algo grpo --seed 1"
        echo "H0.35-w0.1-s1 $tiny --lr 3e-5 --w-episode 0.1 --w-step 0.1 --seed 1") ;;
  unclosed) share=${SHARE:-0.35}; agent=runs/agents/unclosed$share
      [ -n "${DRY_RUN:-}" ] || [ -f $agent/warmstart.json ] || python warmstart.py alfworld --habit-share $share --habit unclosed --out $agent
      # --lr: a --model folder would otherwise get full fine-tuning's 1e-6
      tiny="--model $agent --no-think --history-length 2 --max-new-tokens 24 --lr 3e-5"
      jobs=$(for s in 0 1 2 3 4; do echo "U$share-grpo-s$s $tiny --algo grpo --seed $s"
        echo "U$share-opid-s$s $tiny --seed $s"; done
        for s in 0 1 2; do echo "U$share-w0.1-s$s $tiny --w-episode 0.1 --w-step 0.1 --seed $s"; done) ;;
  stall) share=${SHARE:-0.5}; agent=runs/agents/stall$share
      [ -n "${DRY_RUN:-}" ] || [ -f $agent/warmstart.json ] || python warmstart.py alfworld --habit-share $share --habit stall --out $agent
      tiny="--model $agent --no-think --history-length 2 --max-new-tokens 24 --lr 3e-5"
      w01="--w-episode 0.1 --w-step 0.1"
      jobs=$(echo "S$share-grpo-s0 $tiny --algo grpo --seed 0"; echo "S$share-opid-s0 $tiny --seed 0"
        for s in 0 1 2; do [ $s = 0 ] || echo "S$share-grpo-s$s $tiny --algo grpo --seed $s"
          echo "S$share-w0.1-s$s $tiny $w01 --seed $s"; done
        echo "S${share}long-grpo-s0 $tiny --algo grpo --seed 0 --iters 24 --eval-every 6"
        echo "S${share}long-w0.1-s0 $tiny $w01 --seed 0 --iters 24 --eval-every 6"
        echo "S$share-lr1e-4-grpo-s0 ${tiny/3e-5/1e-4} --algo grpo --seed 0"
        echo "S${share}long-grpo-s1 $tiny --algo grpo --seed 1 --iters 24 --eval-every 6"
        echo "S${share}long-w0.1-s1 $tiny $w01 --seed 1 --iters 24 --eval-every 6"
        for s in 0 1 2; do echo "S$share-lr1e-4-w0.1-s$s ${tiny/3e-5/1e-4} $w01 --seed $s"
          [ $s = 0 ] || echo "S$share-lr1e-4-grpo-s$s ${tiny/3e-5/1e-4} --algo grpo --seed $s"; done) ;;
  resume) share=${SHARE:-0.5}; agent=runs/agents/resume$share
      [ -n "${DRY_RUN:-}" ] || [ -f $agent/warmstart.json ] || python warmstart.py alfworld --habit-share $share --habit stall_resume --out $agent
      tiny="--model $agent --no-think --history-length 2 --max-new-tokens 24 --lr 1e-4"
      w01="--w-episode 0.1 --w-step 0.1"
      jobs=$(for s in 0 1 2 3 4; do echo "R$share-lr1e-4-grpo-s$s $tiny --algo grpo --seed $s"
        echo "R$share-lr1e-4-w0.1-s$s $tiny $w01 --seed $s"; done
        for s in 0 1 2; do echo "R$share-lr1e-4-opid-s$s $tiny --seed $s"
          for w in 0.01 1; do echo "R$share-lr1e-4-w$w-s$s $tiny --w-episode $w --w-step $w --seed $s"; done; done
        for s in 0 1 2; do echo "R${share}long-grpo-s$s $tiny --algo grpo --seed $s --iters 24 --eval-every 6"
          echo "R${share}long-opid-s$s $tiny --seed $s --iters 24 --eval-every 6"; done) ;;
  *) echo "usage: bash scripts/testbed_runs.sh default|before-after|w-sweep|normalised|paired|t07|t07-long|lr|updates|groups|t04|long48|admissible|fresh|habit|unclosed|stall|resume" >&2; exit 2 ;;
esac
case "$1" in
  default|habit|unclosed|stall|resume) ;;
  *) agent=runs/agents/plain   # the earlier kept agent (see above); a job's own --lr comes later and wins
     [ -n "${DRY_RUN:-}" ] || [ -f $agent/warmstart.json ] || python warmstart.py alfworld --habit-share 0 --out $agent
     jobs=$(echo "$jobs" | sed "s|^\([^ ]*\) |\1 --model $agent --no-think --history-length 2 --max-new-tokens 24 --lr 3e-5 |") ;;
esac
mkdir -p runs
run_one() {
  local name=$1; shift
  if [ -n "${DRY_RUN:-}" ]; then echo "python train.py --name $name $*"; return; fi
  if [ -f "runs/$name.log" ] && grep -q "^done: " "runs/$name.log"; then
    echo "skip $name (done)"; return
  fi
  local start; start=$(date +%s)
  OMP_NUM_THREADS=1 python train.py --name "$name" --overwrite "$@" > "runs/$name.log" 2>&1
  echo "finished $name in $(( $(date +%s) - start )) s"
}
export -f run_one
echo "$jobs" | xargs -P 2 -L 1 bash -c 'run_one "$@"' _
