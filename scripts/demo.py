"""`make demo`: the tiny pipeline end to end, then PNG curves and a summary table."""

import sys
import time

from rlhf.runtime.tracking import quiet_hf_progress
from rlhf.stages.pipeline import run_pipeline, summarize
from rlhf.tools.plot import plot_run

RECIPE, RUN = "configs/tiny", "runs/tiny"

if __name__ == "__main__":
    quiet_hf_progress()
    start = time.time()
    run_pipeline(RECIPE, sys.argv[1:])
    plots = plot_run(RUN)
    print("\n" + summarize(RUN))
    print(f"\nplots: {', '.join(str(p) for p in plots)}")
    print(f"demo wall time: {time.time() - start:.0f} s")
