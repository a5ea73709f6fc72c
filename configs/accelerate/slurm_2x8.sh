#!/bin/bash
# Slurm: vialign train on 2 nodes x 8 GPUs (16 processes), one `accelerate launch` per node.
#
#   sbatch configs/accelerate/slurm_2x8.sh configs/flow_grpo_sd35.yaml output_dir=/shared/runs/x
#   sbatch configs/accelerate/slurm_2x8.sh configs/refl_sd15.yaml finetune.method=full finetune.sharding=fsdp
#   sbatch configs/accelerate/slurm_2x8.sh configs/flow_grpo_sd35.yaml output_dir=/shared/runs/x --resume
#
# Submit from the repository root (the job runs there) with vialign installed in the active environment.
# The first node of the allocation is the rendezvous host; output_dir must be on a filesystem both nodes
# see. Sharding (finetune.sharding=fsdp) is a key of the run config, not of the launch:
# configs/accelerate/multinode_2x8.yaml is a plain multi-GPU launch (see its header).
#SBATCH --job-name=vialign-2x8
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: sbatch configs/accelerate/slurm_2x8.sh CONFIG.yaml [key=value ...] [--resume]" >&2
    exit 2
fi

MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
export MAIN_PROCESS_IP MAIN_PROCESS_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# one task per node; SLURM_NODEID (0 or 1) is each node's machine rank. A node that fails ends the job.
srun --kill-on-bad-exit=1 bash -c '
    exec accelerate launch \
        --config_file configs/accelerate/multinode_2x8.yaml \
        --num_machines "$SLURM_NNODES" \
        --num_processes $((SLURM_NNODES * 8)) \
        --machine_rank "$SLURM_NODEID" \
        --main_process_ip "$MAIN_PROCESS_IP" \
        --main_process_port "$MAIN_PROCESS_PORT" \
        -m vialign train "$@"
' vialign-train "$@"
