#!/usr/bin/env bash
# Operational faults, tried the way an operator meets them (root: it mounts a tmpfs).
#
# Two `memnet worker` processes serve a private Redis with their snapshot directory on a
# 16 KB tmpfs (every snapshot fails: no space left). Mid-stream the consumer groups of two
# partitions are destroyed and memnet:meta is deleted. Then it checks: both workers alive,
# every query answered exactly as the library answers it one event at a time, how long meta
# took to come back, the snapshot-failure lines per minute per worker, and how long the
# workers take to exit after SIGTERM.
#
#   sudo bash scripts/operator_drill.sh          # from the repository root, after `make test`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MEMNET=.venv/bin/memnet
work=$(mktemp -d /tmp/memnet-drill-XXXX)
port=$($PY -c 'from worker.servers import free_port; print(free_port())')
export REDIS_URL="redis://127.0.0.1:$port/0" MEMNET_PREFIX=drill MEMNET_SNAPSHOT_DIR="$work/snap"
export MEMNET_MODEL="$work/model.safetensors" MEMNET_SNAPSHOT_EVERY_S=2 MEMNET_LEASE_MS=2000
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  umount -l "$work/snap" 2>/dev/null || true
}
trap cleanup EXIT

redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --save '' --appendonly no \
  --daemonize yes --logfile "$work/redis.log"
mkdir -p "$work/snap" && mount -t tmpfs -o size=16k tmpfs "$work/snap"
$MEMNET init "$MEMNET_MODEL" --input-dim 16 --memory-dim 16 --output-dim 4 --slots 256
$PY - "$work" <<'EOF'
import json, sys
import numpy as np
rng = np.random.default_rng(7)
for half in (1, 2):
    with open(f"{sys.argv[1]}/events{half}.jsonl", "w") as f:
        for j in range(3000):
            m = f"user-{rng.integers(0, 200)}"
            if rng.random() < 0.6:
                e = {"op": "write", "memory": m, "x": rng.standard_normal(16).tolist()}
            else:
                e = {"op": "query", "memory": m, "id": f"q{half}-{j}",
                     "x": rng.standard_normal(16).tolist()}
            f.write(json.dumps(e) + "\n")
EOF
for w in 1 2; do
  MEMNET_WORKER_ID="w$w" $MEMNET worker 2>"$work/w$w.log" &
  pids+=($!)
done
started=$(date +%s)
until [ "$(redis-cli -p "$port" exists drill:meta)" = 1 ] && \
      [ "$($MEMNET status --json | $PY -c 'import json,sys; print(all(r["owner"] for r in json.load(sys.stdin)["rows"]))')" = True ]; do
  sleep 0.5
done
$MEMNET produce "$work/events1.jsonl" 2>/dev/null
sleep 3
redis-cli -p "$port" XGROUP DESTROY 'drill:{1}:in' memnet
redis-cli -p "$port" XGROUP DESTROY 'drill:{5}:in' memnet
redis-cli -p "$port" DEL drill:meta >/dev/null
t0=$($PY -c 'import time; print(time.monotonic())')
until [ "$(redis-cli -p "$port" exists drill:meta)" = 1 ]; do sleep 0.05; done
echo "meta back after $($PY -c "import time; print(round(time.monotonic() - $t0, 2))") s"
$MEMNET produce "$work/events2.jsonl" 2>/dev/null
sleep 20
alive=0
for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
minutes=$($PY -c "import time; print(max(1/60, (time.time() - $started) / 60))")
# SIGTERM, as a supervisor stops them: how long until both have exited
t0=$($PY -c 'import time; print(time.monotonic())')
for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
codes=""
for p in "${pids[@]}"; do code=0; wait "$p" 2>/dev/null || code=$?; codes="$codes$code "; done
echo "both workers exited $($PY -c "import time; print(round(time.monotonic() - $t0, 2))") s after SIGTERM (exit codes: $codes)"
$PY - "$work" "$port" "$alive" "$minutes" "$codes" <<'EOF'
import json, sys
import msgpack, numpy as np, redis
from memnet import Engine, load_model
work, port, alive, minutes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
codes = sys.argv[5].split()
engine = Engine(load_model(f"{work}/model.safetensors"))
memories, expected = {}, {}
for half in (1, 2):
    for line in open(f"{work}/events{half}.jsonl"):
        e = json.loads(line)
        m = memories.setdefault(e["memory"], engine.new_memory())
        x = np.asarray(e["x"], np.float32)
        if e["op"] == "write":
            engine.apply(m, engine.write(x))
        else:
            expected[e["id"]] = engine.apply(m, engine.query(x=x))
r = redis.Redis(port=port)
got = {}
for p in range(8):
    for _, f in r.xrange(f"drill:{{{p}}}:out"):
        msg = msgpack.unpackb(f[b"msg"], raw=False)
        got.setdefault(msg["id"], []).append(msg)
def same(msg, a):  # every response of the query, bitwise: y, slots and weights
    return (np.array_equal(np.float32(msg["y"]), a.y) and msg["slots"] == list(a.slots)
            and np.array_equal(np.float32(msg["weights"]), a.weights))
differ = sum(1 for q, a in expected.items() if q in got and not all(same(m, a) for m in got[q]))
duplicated = sum(len(v) > 1 for v in got.values())
for w in (1, 2):
    lines = [json.loads(x) for x in open(f"{work}/w{w}.log") if x.startswith("{")]
    fails = sum("snapshot failed" in x["msg"] for x in lines)
    print(f"w{w}: {fails} snapshot-failure lines in {minutes:.1f} min "
          f"({fails / minutes:.1f}/min), {sum(x['level'] == 'error' for x in lines)} error lines")
print(f"workers alive: {alive}/2, exit codes after SIGTERM: {' '.join(codes)}")
print(f"queries: {len(expected)}, answered: {sum(q in got for q in expected)}, "
      f"duplicated: {duplicated}, different: {differ}")
ok = (alive == 2 and codes == ["0", "0"] and set(got) == set(expected) and duplicated == 0
      and differ == 0)
print("OK" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
