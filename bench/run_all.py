"""Run every benchmark in bench/ and print their results (`make bench`)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script, args in (
    ("bench_prefilter.py", ["--rows", "10000000"]),
    ("bench_download.py", ["--urls", "2000"]),
    ("bench_encode.py", ["--images", "64"]),
    ("bench_score.py", ["--images", "256"]),
    ("bench_loader.py", ["--images", "512"]),
    ("bench_draft.py", []),
    ("bench_dedup.py", ["--rows", "1000000", "--subset", "50000"]),
    ("bench_lora.py", ["--steps", "12"]),
    ("bench_feed.py", ["encode-memory", "--sizes", "500,2000,8000", "--baseline-sizes", "500,2000"]),
    ("bench_feed.py", ["prepare", "--images", "400"]),
    ("bench_feed.py", ["resume", "--late", "2000"]),
    ("bench_feed.py", ["loader", "--images", "1024"]),
    ("bench_feed.py", ["overhead", "--steps", "40", "--repeats", "3"]),
    ("bench_stream.py", []),
    ("bench_checksum.py", ["--images", "512", "--rounds", "7"]),
    ("bench_inpaint.py", ["--images", "48"]),
    ("bench_eval.py", ["--steps", "12"]),
    ("bench_families.py", ["--steps", "20"]),
):
    print(f"== {script} {' '.join(args)}", flush=True)
    module = f"bench.{script.removesuffix('.py')}"  # as modules: they share helpers through `bench.`
    subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=HERE.parent)
