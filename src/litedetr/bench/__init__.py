"""What the benchmarks (``benchmarks/``) and the ``litedetr bench`` and ``flops`` commands reuse.

- :mod:`~litedetr.bench.flops`: the FLOP counter, per component, with fvcore's conventions.
- :mod:`~litedetr.bench.timing`: latency and peak memory of calls, and the detector calls to time.
- :mod:`~litedetr.bench.attention`: the attention-op benchmark (two-pass KDA included).
- :mod:`~litedetr.bench.runs`: the compared models on the demo's budget, and runs reused once finished.
"""
