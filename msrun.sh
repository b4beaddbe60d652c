#!/bin/bash
# Launches a training script on every worker with MindSpore's `msrun` (MindFormers' msrun_launcher.sh convention).
#
# One node:
#   bash msrun.sh "<script and args>" [WORKER_NUM] [MASTER_PORT] [LOG_DIR] [JOIN] [CLUSTER_TIME_OUT]
# Several nodes (run once per node, NODE_RANK 0 on the MASTER_ADDR machine):
#   bash msrun.sh "<script and args>" WORKER_NUM LOCAL_WORKER MASTER_ADDR MASTER_PORT NODE_RANK \
#                 [LOG_DIR] [JOIN] [CLUSTER_TIME_OUT]
# The form is chosen by the argument count: up to 4 arguments after the script is one node, 6 or more is several
# nodes; with exactly 5 it is one node when the 4th of them (JOIN) is True/False, else several nodes.
#
# Defaults: WORKER_NUM 8 on an Ascend node, 2 elsewhere (CPU); MASTER_PORT 8118; LOG_DIR output/msrun_log;
# CLUSTER_TIME_OUT 7200 s. The script path is taken relative to the current directory, e.g.
#   cd example && bash msrun.sh "finetune.py --train_dataset /path/belle_512.mindrecord"
# The launcher always waits for the workers (msrun --join=True), so its exit status is non-zero if any worker fails.
set -u

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
is_bool() { [[ "$1" == "True" || "$1" == "False" ]]; }

[ $# -ge 1 ] || usage
EXECUTE_ORDER=$1

if [ -d /usr/local/Ascend ] || command -v npu-smi >/dev/null 2>&1; then
    DEFAULT_WORKERS=8
else
    DEFAULT_WORKERS=2
fi
LOG_DIR=output/msrun_log
JOIN=True
CLUSTER_TIME_OUT=7200
MASTER_ADDR=127.0.0.1
NODE_RANK=0

if [ $# -le 5 ] || { [ $# -eq 6 ] && is_bool "$5"; }; then
    WORKER_NUM=${2:-$DEFAULT_WORKERS}
    LOCAL_WORKER=$WORKER_NUM
    MASTER_PORT=${3:-8118}
    LOG_DIR=${4:-$LOG_DIR}
    JOIN=${5:-$JOIN}
    CLUSTER_TIME_OUT=${6:-$CLUSTER_TIME_OUT}
    MULTI_NODE=0
elif [ $# -le 9 ]; then
    WORKER_NUM=$2; LOCAL_WORKER=$3; MASTER_ADDR=$4; MASTER_PORT=$5; NODE_RANK=$6
    LOG_DIR=${7:-$LOG_DIR}
    JOIN=${8:-$JOIN}
    CLUSTER_TIME_OUT=${9:-$CLUSTER_TIME_OUT}
    MULTI_NODE=1
else
    echo "msrun.sh: too many arguments ($#)" >&2
    usage
fi

for pair in "WORKER_NUM=$WORKER_NUM" "LOCAL_WORKER=$LOCAL_WORKER" "MASTER_PORT=$MASTER_PORT" \
            "NODE_RANK=$NODE_RANK" "CLUSTER_TIME_OUT=$CLUSTER_TIME_OUT"; do
    is_int "${pair#*=}" || { echo "msrun.sh: ${pair%%=*} must be a whole number, got '${pair#*=}'" >&2; usage; }
done
is_bool "$JOIN" || { echo "msrun.sh: JOIN must be True or False, got '$JOIN'" >&2; usage; }
if [ "$JOIN" == "False" ]; then
    echo "msrun.sh: note: JOIN=False ignored; this launcher always waits for the workers so failures are reported" >&2
fi

# The script (first word of the order) is resolved against the current directory, as the user typed it.
read -r -a ORDER <<< "$EXECUTE_ORDER"
SCRIPT=${ORDER[0]}
if [ ! -f "$SCRIPT" ]; then
    echo "msrun.sh: script '$SCRIPT' not found (relative to $(pwd)); run from the directory that holds it" >&2
    exit 2
fi
SCRIPT=$(cd "$(dirname "$SCRIPT")" && pwd)/$(basename "$SCRIPT")

# msrun starts each worker as a bare `python`: put the project's venv first on PATH (found next to the real script,
# so the example/msrun.sh symlink works too).
HERE=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
if [ -x "$HERE/.venv/bin/python" ]; then
    export PATH="$HERE/.venv/bin:$PATH"
fi
if ! command -v msrun >/dev/null 2>&1; then
    echo "msrun.sh: 'msrun' not found; create the venv first (make setup) or install mindspore" >&2
    exit 2
fi

mkdir -p "$LOG_DIR"
echo "msrun.sh: $WORKER_NUM worker(s) in all, $LOCAL_WORKER on this node (node rank $NODE_RANK," \
     "master $MASTER_ADDR:$MASTER_PORT)"
echo "msrun.sh: running $SCRIPT ${ORDER[*]:1}"
# msrun starts the scheduler on every node whose address list holds MASTER_ADDR. Only node 0 may host it (MindFormers'
# convention), so a second node on the same machine (e.g. NODE_RANK 1 with MASTER_ADDR 127.0.0.1, a loopback
# rehearsal of a multi-node job) must not start a duplicate one: for NODE_RANK > 0 msrun runs with that check off.
MSRUN=(msrun)
if [ "$MULTI_NODE" == "1" ] && [ "$NODE_RANK" != "0" ]; then
    MSRUN=(python -c "import sys; import mindspore.parallel.cluster.process_entity._api as api; \
api._is_local_ip = lambda ip: False; from mindspore.parallel.cluster.run import main; sys.argv[0] = 'msrun'; main()")
fi
"${MSRUN[@]}" --worker_num="$WORKER_NUM" --local_worker_num="$LOCAL_WORKER" --master_addr="$MASTER_ADDR" \
      --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join=True \
      --cluster_time_out="$CLUSTER_TIME_OUT" "$SCRIPT" "${ORDER[@]:1}"
STATUS=$?

# msrun names worker logs worker_<rank>.log (rank = global rank) in LOG_DIR.
ABS_LOG_DIR=$(cd "$LOG_DIR" && pwd)
for log in "$ABS_LOG_DIR"/worker_*.log; do
    [ -e "$log" ] && echo "msrun.sh: worker log: $log"
done
[ -e "$ABS_LOG_DIR/scheduler.log" ] && echo "msrun.sh: scheduler log: $ABS_LOG_DIR/scheduler.log"
if [ $STATUS -ne 0 ]; then
    echo "msrun.sh: training failed (exit status $STATUS); see the worker logs above" >&2
fi
exit $STATUS
