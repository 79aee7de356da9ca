#!/usr/bin/env bash
# Two single-thread jobs at once against the same two jobs one after the other with two threads each.
# Run from an activated environment with METAKD_DATA_ROOT set (omniglot/ inside):
#   scripts/study_parallel.sh [folder]
D=${1:-$(mktemp -d)}; mkdir -p "$D"; cd "$D"
common="experiment=omniglot_5w1s_cpu meta=protonet train.stages=[teacher] train.iterations=150 train.val_every=1000 train.val_tasks=20 eval.tasks=20 train.progress=false"
for round in 1 2; do
  t0=$(date +%s.%N)
  metakd-run $common seed=0 threads=1 hydra.run.dir=$D/p$round-0 >/dev/null 2>&1 &
  metakd-run $common seed=1 threads=1 hydra.run.dir=$D/p$round-1 >/dev/null 2>&1 &
  wait; t1=$(date +%s.%N)
  metakd-run $common seed=0 threads=2 hydra.run.dir=$D/s$round-0 >/dev/null 2>&1
  metakd-run $common seed=1 threads=2 hydra.run.dir=$D/s$round-1 >/dev/null 2>&1
  t2=$(date +%s.%N)
  python - "$D" "$round" "$t0" "$t1" "$t2" <<'PY'
import json, sys
d, r, t0, t1, t2 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
tps = lambda k: [json.load(open(f"{d}/{k}{r}-{s}/timings.json"))["teacher"]["tasks_per_second"] for s in (0, 1)]
p, s = tps("p"), tps("s")
print(f"round {r}: parallel 2x1 thread: wall {t1-t0:.0f} s, tasks/s per job {p[0]:.1f} {p[1]:.1f} (sum {sum(p):.1f}); "
      f"sequential 2 threads: wall {t2-t1:.0f} s, tasks/s {s[0]:.1f} {s[1]:.1f}; parallel/sequential throughput {sum(p)/(sum(s)/2):.2f}x")
PY
done
