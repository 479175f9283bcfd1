#!/usr/bin/env bash
# The main job: serve the bundled BasicMotions model and stream real test recordings to it.
source "$(dirname "$0")/_venv.sh" server
PORT=${SEQSERVE_DEMO_PORT:-50051}
.venv/bin/seqserve-server --host 127.0.0.1 --port "$PORT" --metrics-port 8081 \
  --snapshot-path "" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null' EXIT
for _ in $(seq 100); do
  .venv/bin/seqserve --target "127.0.0.1:$PORT" health >/dev/null 2>&1 && break
  kill -0 $server 2>/dev/null || { echo "server failed to start" >&2; exit 1; }
  sleep 0.2
done
.venv/bin/seqserve --target "127.0.0.1:$PORT" model
# One test recording of each activity (samples.npz is ordered by class), streamed concurrently as
# four sessions on one stream at twice the watch's 10 Hz.
.venv/bin/seqserve --target "127.0.0.1:$PORT" stream sample:0 sample:10 sample:20 sample:30 \
  --rate "${SEQSERVE_DEMO_RATE:-20}"
