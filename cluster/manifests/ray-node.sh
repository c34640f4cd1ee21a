#!/usr/bin/env bash
# Run one Ray node in the foreground and turn SIGTERM into a graceful preemption.
#
#   ray-node.sh [ray start arguments...]        e.g. ray-node.sh --address=HEAD:6379 --num-gpus=8
#   ray-node.sh --drain-only                     steps 1-2 only, for a Kubernetes preStop hook (the node
#                                                is found by DIP_NODE_NAME, else by this pod's IP)
#
# Kubernetes (pod deletion, spot reclaim) and Slurm (preemption, `--signal=TERM@120` before the time
# limit) announce the end of a node with SIGTERM. A bare `ray start --block` would just die, and the
# training run would fall back to its last periodic checkpoint. Here SIGTERM instead:
#   1. drains this node in Ray with reason PREEMPTION and a deadline (`ray drain-node`): Ray Train
#      tells the workers (ray.train.get_preemption_info), and trainer/loop/worker.py writes a committed
#      just-in-time checkpoint at its next stop check, then keeps training until the deadline;
#   2. waits DIP_PREEMPT_GRACE_S seconds (keep it below the scheduler's kill timeout:
#      terminationGracePeriodSeconds on Kubernetes, the --signal lead time on Slurm);
#   3. stops this node only (SIGTERM to its own `ray start --block`; never `ray stop`, which would
#      stop every Ray node of the user on this machine).
# Ray Train then restarts the worker group on the nodes that remain or replace it, from that checkpoint.
#
# Environment: DIP_NODE_NAME (default: the host name; must be unique in the cluster),
# DIP_PREEMPT_GRACE_S (default 60), RAY_AUTH_MODE / RAY_AUTH_TOKEN as for every node.
set -euo pipefail

NODE_NAME="${DIP_NODE_NAME:-$(hostname)}"
GRACE_S="${DIP_PREEMPT_GRACE_S:-60}"
RAY="${RAY_BIN:-ray}"
PYTHON="${PYTHON_BIN:-python}"

log() { echo "ray-node.sh[$NODE_NAME]: $*" >&2; }

# The GCS address this node joined: --address=HOST:PORT, else $DIP_GCS_ADDRESS, else KubeRay's head service.
GCS_ADDRESS="${DIP_GCS_ADDRESS:-}"
for arg in "$@"; do
  case "$arg" in
    --address=*) GCS_ADDRESS="${arg#--address=}" ;;
  esac
done
if [ -z "$GCS_ADDRESS" ] && [ -n "${FQ_RAY_IP:-}" ]; then
  GCS_ADDRESS="$FQ_RAY_IP:6379"
fi

this_node_id() {
  local filter="node_name=$NODE_NAME"
  if [ -z "${DIP_NODE_NAME:-}" ] && [ "$DRAIN_ONLY" = 1 ]; then
    filter="node_ip=$(hostname -i | awk '{print $1}')"   # one Ray node per pod: its IP names it
  fi
  "$RAY" list nodes --address="$GCS_ADDRESS" --format=json --filter "$filter" --filter "state=ALIVE" \
    | "$PYTHON" -c 'import json, sys; nodes = json.load(sys.stdin); print(nodes[0]["node_id"] if nodes else "")'
}

drain_and_wait() {
  log "draining this node for preemption (deadline ${GRACE_S}s)"
  local node_id=""
  if [ -n "$GCS_ADDRESS" ]; then
    node_id="$(this_node_id || true)"
  fi
  if [ -z "$node_id" ]; then
    log "cannot find this node's id (head node, or not joined yet): no final checkpoint"
    return 0
  fi
  "$RAY" drain-node --address="$GCS_ADDRESS" --node-id="$node_id" --reason=DRAIN_NODE_REASON_PREEMPTION \
    --reason-message="SIGTERM to ray-node.sh on $NODE_NAME" --deadline-remaining-seconds="$GRACE_S" \
    || { log "drain request failed: no final checkpoint"; return 0; }
  sleep "$GRACE_S" &
  wait $! || true
}

DRAIN_ONLY=0
if [ "${1:-}" = "--drain-only" ]; then
  DRAIN_ONLY=1
  drain_and_wait
  exit 0
fi

"$RAY" start --block --node-name="$NODE_NAME" "$@" &
RAY_PID=$!

on_term() {
  trap - TERM INT
  log "SIGTERM"
  drain_and_wait
  log "stopping this node"
  kill -TERM "$RAY_PID" 2>/dev/null || true
  wait "$RAY_PID" || true
  exit 0
}
trap on_term TERM INT

wait "$RAY_PID"
