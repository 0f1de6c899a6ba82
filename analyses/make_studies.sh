#!/usr/bin/env bash
# Make the stores the study notebooks read, on the embedded digits, into studies/ (or $GRADLAB_STUDIES).
# Each step is resumable: rerun the script after an interruption and finished stores are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
S=${GRADLAB_STUDIES:-studies}
C=analyses/configs
resume_if() { [ -e "$1" ] && echo --resume || true; }
train() { gradlab train --config "$C/$1.toml" --out "$S/$1" --no-progress $(resume_if "$S/$1"); }

for cfg in weights_grid sgd_vs_adam base_lr_grid bn_batch_4 bn_batch_16 bn_batch_full \
           remedy_baseline remedy_ghostbn_linear remedy_ghostbn_linear_warmup remedy_ghostbn_cyclic \
           remedy_ghostbn_cyclic_sqrt; do
  train "$cfg"
done

# a: gradient competition on the early (epoch 2) and late (epoch 30) checkpoints of the batch-256 run
R="$S/weights_grid/runs/bs256_lr0.05_seed0_sgd"
P=(--checkpoint "early=$R/epoch002.pt" --checkpoint "late=$R/epoch030.pt" --init "$R/epoch000.pt" --data digits
   --batch-sizes 1,2,4,8,16,32,64,128,256,512,1024 --budget 1024 --lr 0.05 --no-progress)
gradlab probe "${P[@]}" --protocol frozen --trials 400 --out "$S/competition/frozen.zarr" \
  $(resume_if "$S/competition/frozen.zarr")
gradlab probe "${P[@]}" --protocol step --trials 100 --params '^layers\.4\.' --keep vectors \
  --out "$S/competition/step.zarr" $(resume_if "$S/competition/step.zarr")

# e: sharpness of the late checkpoints of every batch size and lr of the grid, and the interpolation plot
CK=()
for m in 16 64 256; do for lr in 0.01 0.05 0.2; do CK+=(--checkpoint "$S/weights_grid/runs/bs${m}_lr${lr}_seed0_sgd/epoch030.pt"); done; done
gradlab sharpness "${CK[@]}" --data digits --samples 1024 --top-k 3 --hutchinson-probes 30 --eps 1e-3,5e-4 \
  --minibatch-sizes 16,64,256 --minibatch-trials 4 --dtype float32 --no-progress \
  --interpolate "$S/weights_grid/runs/bs16_lr0.05_seed0_sgd/epoch030.pt" "$S/weights_grid/runs/bs256_lr0.05_seed0_sgd/epoch030.pt" \
  --out "$S/keskar/sharpness.zarr" $(resume_if "$S/keskar/sharpness.zarr")
# f: the zoo gpt (2 layers, 4 heads, width 64) on the embedded shakespeare-char corpus (loss lm), 4 epochs of SGD at
# batch size 64 (about a minute per epoch on one free CPU thread); frozen probe and sharpness at epochs 1 and 4
gradlab train --model gpt --data shakespeare-char --batch-sizes 64 --lr 0.5 --epochs 4 --checkpoint-epochs 1,4 \
  --out "$S/char_gpt" --no-progress $(resume_if "$S/char_gpt")
R="$S/char_gpt/runs/bs64_lr0.5_seed0_sgd"
gradlab probe --checkpoint "early=$R/epoch001.pt" --checkpoint "late=$R/epoch004.pt" --data shakespeare-char \
  --batch-sizes 1,2,4,8,16,32,64,128,256 --budget 256 --trials 64 --protocol frozen --keep histograms --no-progress \
  --out "$S/char_gpt/frozen.zarr" $(resume_if "$S/char_gpt/frozen.zarr")
gradlab sharpness --checkpoint "$R/epoch001.pt" --checkpoint "$R/epoch004.pt" --data shakespeare-char --samples 256 \
  --top-k 3 --hutchinson-probes 30 --eps 1e-3 --no-progress \
  --out "$S/char_gpt/sharpness.zarr" $(resume_if "$S/char_gpt/sharpness.zarr")
# g: critical batch size -- branches from the early and late checkpoints of a 64-256-10 MLP run at batch 32
train cbs_run
R="$S/cbs_run/runs/bs32_lr0.05_seed0_sgd"
gradlab cbs --checkpoint "early=$R/epoch002.pt" --checkpoint "late=$R/epoch030.pt" --data digits \
  --batch-sizes 8,16,32,64,128,256,512 --budget 8192 --seeds 8 --lr-scaling linear --lr-factors 0.25,0.5,1,2 \
  --evals 64 --no-progress --out "$S/cbs/cbs.zarr" $(resume_if "$S/cbs/cbs.zarr")
gradlab probe --checkpoint "early=$R/epoch002.pt" --checkpoint "late=$R/epoch030.pt" --data digits \
  --batch-sizes 1,2,4,8,16,32,64,128,256,512,1024 --budget 1024 --trials 100 --protocol frozen --no-progress \
  --out "$S/cbs/frozen.zarr" $(resume_if "$S/cbs/frozen.zarr")
R="$S/char_gpt/runs/bs64_lr0.5_seed0_sgd"
gradlab cbs --checkpoint "early=$R/epoch001.pt" --checkpoint "late=$R/epoch004.pt" --data shakespeare-char \
  --batch-sizes 8,16,32,64,128,256 --budget 2048 --seeds 6 --lr-scaling linear --lr-factors 0.5,1 --evals 16 \
  --eval-examples 512 --no-progress --out "$S/char_gpt/cbs.zarr" $(resume_if "$S/char_gpt/cbs.zarr")
echo "studies written to $S; open the notebooks in analyses/ (jupytext py:percent)"
