"""Run every benchmark in bench/ and print their results (`make bench`)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
for script, args in (("bench_prefilter.py", ["--rows", "10000000"]), ("bench_download.py", ["--urls", "2000"]),
                     ("bench_encode.py", ["--images", "64"]), ("bench_score.py", ["--images", "256"]),
                     ("bench_loader.py", ["--images", "512"])):
    print(f"== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], check=True, cwd=HERE)
