"""Runs every benchmark (`make bench`) and collects their JSON lines in one file.

Each benchmark runs in its own process (a fresh JAX runtime, no compile cache shared between them) and prints JSON
lines; this script echoes them and appends them, tagged with the time of the run, to `--out`.

  python -m benchmarks.run --out benchmarks/results.jsonl [--only sample,train,inception] [--quick]
"""

import argparse
import datetime
import json
import subprocess
import sys

# name -> (module, quick arguments)
BENCHMARKS = {
    "train": ("benchmarks.bench_train", ["--models=tiny", "--steps=1"]),
    "sample": ("benchmarks.bench_sample", ["--quick"]),
    "inception": ("benchmarks.bench_inception", ["--iters", "1", "--batch_sizes", "50"]),
    "techniques": ("benchmarks.bench_techniques", ["--quick", "--setting", "speed"]),
    "breakdown": ("benchmarks.bench_breakdown", ["--quick"]),
    "kernels": ("benchmarks.bench_kernels", ["--quick"]),
}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="benchmarks/results.jsonl", help="JSON-lines file the results are appended to")
  p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {sorted(BENCHMARKS)}")
  p.add_argument("--quick", action="store_true", help="smaller configurations (a smoke run, not for reporting)")
  args = p.parse_args(argv)
  names = [n for n in args.only.split(",") if n]
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    p.error(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
  stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
  failed = []
  with open(args.out, "a") as out:
    for name in names:
      module, quick_args = BENCHMARKS[name]
      cmd = [sys.executable, "-m", module] + (quick_args if args.quick else [])
      print(f"# {' '.join(cmd)}", file=sys.stderr, flush=True)
      proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
      for line in proc.stdout:
        print(line, end="", flush=True)
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # progress or log output, not a result
        out.write(json.dumps({"run": stamp, "suite": name, **record}) + "\n")
        out.flush()
      if proc.wait() != 0:
        failed.append(name)
  if failed:
    sys.exit(f"benchmark(s) failed: {failed}")


if __name__ == "__main__":
  main()
