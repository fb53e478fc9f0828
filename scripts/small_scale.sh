#!/usr/bin/env bash
# Small-scale CPU comparison with the tiny model: GRPO vs OPID (step_priority) vs the episode_only and
# step_only routing ablations vs Skill-SD, SEEDS seeds each, the same iterations (so about the same
# environment steps) for every method; then one table and the learning curves.
#
#   bash scripts/small_scale.sh                        # ALFWorld (small worlds), 3 seeds, 6 iterations of 4 × 4
#   EXTRA="--alfworld-world full" bash scripts/small_scale.sh   # the full-size worlds of the earlier results
#   ENV=search bash scripts/small_scale.sh             # search QA, 3 seeds, 20 iterations of 8 × 8
#   METHODS="grpo opid" SEEDS="0 1 2" bash scripts/small_scale.sh   # a subset (runs already done are skipped)
#   PREFIX=alfworld-g16 METHODS="grpo opid" ITERS=12 EVAL_EVERY=6 EVAL_EPISODES=160 \
#     BATCH="--tasks-per-batch 4 --group-size 8" OUT=results/alfworld-g16 \
#     EXTRA="--alfworld-games 16 --eval-split train --temperature 0.4 --invalid-penalty 0" bash scripts/small_scale.sh
#                                                      # 16 games, evaluated on those games (docs/experiments.md)
#
# Two runs at a time (one torch thread each) on a 2-core machine. Results: results/<env>/.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=${ENV:-alfworld}
SEEDS=${SEEDS:-"0 1 2"}
METHODS=${METHODS:-"grpo opid episode_only step_only skill_sd"}
EXTRA=${EXTRA:-""}   # more train.py flags for every run, e.g. "--w-step 0.1 --w-episode 0.1"
if [ "$ENV" = alfworld ]; then   # ~40 s per iteration and ~90 s per 60-game evaluation on one core
  ITERS=${ITERS:-6}; EVAL_EVERY=${EVAL_EVERY:-3}; EVAL_EPISODES=${EVAL_EPISODES:-60}
  BATCH=${BATCH:-"--tasks-per-batch 4 --group-size 4"}
else
  ITERS=${ITERS:-20}; EVAL_EVERY=${EVAL_EVERY:-5}; EVAL_EPISODES=${EVAL_EPISODES:-200}
  BATCH=${BATCH:-"--tasks-per-batch 8 --group-size 8"}
fi
OUT=${OUT:-results/$ENV}
PREFIX=${PREFIX:-$ENV}   # run names are <PREFIX>-<method>-s<seed>
mkdir -p "$OUT" runs

declare -A FLAGS=(
  [grpo]="--algo grpo"
  [opid]="--algo opid --routing step_priority"
  [episode_only]="--algo opid --routing episode_only"
  [step_only]="--algo opid --routing step_only"
  [skill_sd]="--algo skill_sd"
)

jobs_list=()
for seed in $SEEDS; do
  for method in $METHODS; do
    jobs_list+=("$method $seed")
  done
done

start=$(date +%s)
run_one() {
  local method=$1 seed=$2 name="$PREFIX-$1-s$2"
  if [ -f "runs/$name/checkpoint/state.json" ] && grep -q "\"updates\": $ITERS" "runs/$name/checkpoint/state.json"; then
    echo "skip $name (done)"; return
  fi
  # a run cut short is redone from scratch (--overwrite); train.py refuses an existing run folder otherwise
  OMP_NUM_THREADS=1 python train.py --env "$ENV" ${FLAGS[$method]} --seed "$seed" --iters "$ITERS" $BATCH --overwrite \
    --eval-every "$EVAL_EVERY" --eval-episodes "$EVAL_EPISODES" --save-every "$ITERS" --name "$name" $EXTRA \
    > "$OUT/$name.log" 2>&1
  echo "finished $name"
}
for ((i = 0; i < ${#jobs_list[@]}; i += 2)); do
  run_one ${jobs_list[$i]} &
  if [ $((i + 1)) -lt ${#jobs_list[@]} ]; then run_one ${jobs_list[$((i + 1))]} & fi
  wait
done

runs=(); labels=()
for method in $METHODS; do
  for seed in $SEEDS; do runs+=("runs/$PREFIX-$method-s$seed"); labels+=("$method"); done
done
python eval.py --compare "${runs[@]}" --labels "${labels[@]}" --plot "$OUT/curves.png" --md "$OUT/table.md" --out "$OUT/table.json"
echo "wall time: $(( $(date +%s) - start )) s"
