"""Speed and memory of every estimator side by side: ``python -m benchmarks`` (``make bench``).

Modules: ``workloads`` (tasks and sizes), ``naive`` (the textbook forward-mode baseline),
``timing`` (in-process, interleaved timings and the lower bound), ``memory`` (peak memory in a
fresh process per measurement), ``report`` (tables, targets, plots), ``cli`` (the entry point);
``optimizer_step`` (``python -m benchmarks.optimizer_step``): forward mode's cost per inner step
for SGD and AdamW, generic tangents against the SGD fast path. Results and their reading:
docs/benchmarks.md.
"""
