#!/usr/bin/env bash
# Submit a training run to the Ray cluster at $RAY_ADDRESS as a Ray job and return at once.
#
#   RAY_ADDRESS=http://127.0.0.1:8265 scripts/submit.sh --config configs/default.yaml --storage /mnt/shared/runs
#
# RAY_ADDRESS is the cluster's dashboard (`ray dashboard cluster/aws.yaml` forwards it to 127.0.0.1:8265).
# The working tree is uploaded (cluster/runtime_env.yaml keeps .venv/ and runs/ out of it) and
# `python scripts/train.py ARGS` runs as the job's driver on the head node, where ray.init() joins
# the job's cluster. Clusters run with token authentication: the token in ~/.ray/auth_token (or
# RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH) must be the cluster's. RAY_TRAIN_JOB_ID picks the job id.
set -euo pipefail
cd "$(dirname "$0")/.."

# `ray job submit` prefers RAY_API_SERVER_ADDRESS over RAY_ADDRESS when both are set
address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-}}"
if [[ -z "$address" ]]; then
    echo "submit.sh: error: RAY_ADDRESS is not set; point it at the cluster's dashboard, e.g." \
         "RAY_ADDRESS=http://127.0.0.1:8265 (see cluster/README.md)" >&2
    exit 2
fi
ray_cli=ray
if ! command -v ray >/dev/null 2>&1; then
    if [[ -x .venv/bin/ray ]]; then ray_cli=.venv/bin/ray; else
        echo "submit.sh: error: no 'ray' command; activate the virtual environment (make train creates .venv)" >&2
        exit 2
    fi
fi
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

# Where the run folder goes: --storage as given, or the folder of an absolute --resume path (the
# run continues there). Without either, the default, runs/, is relative to the job's working
# directory, a temporary copy of this tree on the head node.
storage=""
resume=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case "${args[i]}" in
        --storage) storage="${args[i + 1]:-}" ;;
        --storage=*) storage="${args[i]#--storage=}" ;;
        --resume) resume="${args[i + 1]:-}" ;;
        --resume=*) resume="${args[i]#--resume=}" ;;
    esac
done
if [[ -z "$storage" && "$resume" == /* ]]; then
    storage="$(dirname "$resume")"
fi
if [[ -z "$storage" ]]; then
    echo "submit.sh: warning: no --storage given; the run folder lands in the job's temporary working" \
         "directory on the head node. Pass --storage /a/shared/path (cluster/README.md)." >&2
fi

job_id="${RAY_TRAIN_JOB_ID:-ray-train-$(date +%Y%m%d-%H%M%S)-$$}"
# Ray's own lines (packaging, upload, its generic next steps) are shown only when the submission fails.
ray_out="$(mktemp)"
trap 'rm -f "$ray_out"' EXIT
if ! "$ray_cli" job submit --no-wait --submission-id "$job_id" \
    --working-dir . --runtime-env cluster/runtime_env.yaml -- python scripts/train.py "$@" >"$ray_out" 2>&1; then
    cat "$ray_out" >&2
    echo "submit.sh: error: ray job submit failed (its output above)" >&2
    exit 1
fi

# The hints are complete commands: a new shell has neither RAY_ADDRESS nor RAY_AUTH_MODE.
env_prefix="RAY_ADDRESS=$address RAY_AUTH_MODE=$RAY_AUTH_MODE"
echo "job id: $job_id"
echo "follow its logs:  $env_prefix $ray_cli job logs -f $job_id"
echo "status / stop:    $env_prefix $ray_cli job status $job_id / $env_prefix $ray_cli job stop $job_id"
echo "TensorBoard:      tensorboard --logdir ${storage:-<storage>} --port 6006   (on a machine that sees that path;"
echo "                  on a ray-up cluster: ray exec cluster/aws.yaml 'tensorboard --logdir ${storage:-<storage>} --port 6006' --port-forward 6006)"
