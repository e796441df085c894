"""Run a command and print its peak resident memory (bytes) as the last line: peak_rss.py CMD ARGS..."""

import resource
import subprocess
import sys

if __name__ == "__main__":
    completed = subprocess.run(sys.argv[1:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux reports KiB
    print(f"peak_rss_bytes={peak_kib * 1024}")
    sys.exit(completed.returncode)
