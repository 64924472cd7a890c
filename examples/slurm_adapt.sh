#!/bin/bash
# An adapt grid as a SLURM job array: task I of N makes the I-th part of the ingredient grid
# (adaptsoup adapt --shard I/N), each under torchrun on the GPUs of its node, all into one run
# directory on the shared filesystem.  The task that finds every ingredient made writes the soups and
# the evaluation; a task that is killed (preemption, time limit) resumes its claimed ingredient when
# SLURM requeues it or when you resubmit the same task:  sbatch --array=3 examples/slurm_adapt.sh
#
#   sbatch examples/slurm_adapt.sh                 # 4 tasks (the --array line below)
#   sbatch --array=1-8 examples/slurm_adapt.sh     # 8 shards: N follows the array's size
#
# Afterwards, or if the last task died while writing the soups:
#   adaptsoup adapt --resume "$RUN"                # writes the soups and the evaluation, trains nothing made
#
# Models come from timm's sources with the network off: a save_for_hf folder (local-dir:PATH) or the
# Hugging Face cache (hf-hub:ORG/NAME, fetched beforehand on a login node: `hf download ORG/NAME`).
#
#SBATCH --job-name=adaptsoup-adapt
#SBATCH --array=1-4
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail

RUN=${RUN:?give RUN=/shared/runs/NAME when submitting: the one run directory of every task}
MODEL=${MODEL:-local-dir:/shared/models/deployed_vit_b16}   # the deployed classifier
STOCK=${STOCK:-/shared/models/mae_pretrain_vit_base.pth}    # its MAE pre-training checkpoint with the decoder
TARGET=${TARGET:-/shared/data/field}                        # unlabeled images from the deployment
SOURCE=${SOURCE:-/shared/data/imagenet/train}               # the labeled source, class_name/<image>
RECIPE=${RECIPE:-recipes/paper.toml}                        # the grid (learning rates, steps, ...)

SHARDS=${SLURM_ARRAY_TASK_COUNT:-$(( SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1 ))}
SHARD=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-1} + 1 ))
GPUS=${SLURM_GPUS_ON_NODE:-4}

export HF_HUB_OFFLINE=1                                      # nothing is downloaded at run time
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS ))
mkdir -p logs

# --standalone: a rendezvous of this task's own (one node, a free port), so tasks on one node do not meet.
srun torchrun --standalone --nproc-per-node "$GPUS" "$(which adaptsoup)" adapt \
    --config "$RECIPE" --model "$MODEL" --stock "$STOCK" --target "$TARGET" --source "$SOURCE" \
    --out "$RUN" --shard "$SHARD/$SHARDS" --device cuda --bf16 --no-progress
