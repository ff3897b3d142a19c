#!/usr/bin/env bash
# Quickstart wall time and CPU time, end to end (data, init, compile, 240 steps, 2 evals, 2 checkpoints, loss.png).
#   bash bench/quickstart_time.sh                       # the README command, in a fresh temporary workdir
#   bash bench/quickstart_time.sh --config.train.steps=20   # extra flags are passed to train.main
# Prints one JSON line: wall_s, user_s, sys_s, cpu_s (= user + sys, less sensitive to other load than wall),
# max_rss_kb, the load average before/after, and the final train/eval loss. Needs GNU time at /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
load0="$(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -v -o "$work/time.txt" python -m train.main --config=train/configs/quickstart.py \
  --workdir="$work/run" "$@" > "$work/out.txt" 2> "$work/err.txt" || { tail -20 "$work/err.txt" >&2; exit 1; }
load1="$(cut -d' ' -f1-3 /proc/loadavg)"
python - "$work" "$load0" "$load1" <<'PY'
import json, re, sys
work, load0, load1 = sys.argv[1:4]
t = open(f"{work}/time.txt").read()
get = lambda pat: re.search(pat, t).group(1)
wall = get(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)")
parts = [float(x) for x in wall.split(":")]
wall_s = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
user, sys_ = float(get(r"User time \(seconds\): (\S+)")), float(get(r"System time \(seconds\): (\S+)"))
last = json.loads(open(f"{work}/out.txt").read().strip().splitlines()[-1])
print(json.dumps({"wall_s": round(wall_s, 1), "user_s": user, "sys_s": sys_, "cpu_s": round(user + sys_, 1),
                  "max_rss_kb": int(get(r"Maximum resident set size \(kbytes\): (\d+)")),
                  "loadavg_before": load0, "loadavg_after": load1,
                  "final_step": last.get("final_step"), "train_loss": last.get("train_loss"),
                  "eval_loss": last.get("eval_loss"), "eval_bpb": last.get("eval_bpb")}))
PY
