"""The ops, one module per op family: its public functions, input checks, eager reference, fake
kernels and backend registrations. An op ``X``'s whole path: ``vidstream/ops/X.py``,
``csrc/{cpu,cuda}/X.cpp``, ``csrc/kernels/X.*``, ``triton_kernels/X.py``, ``tests/test_X.py``,
``bench/bench_X.py`` (CONTRIBUTING.md). The public functions are exported by ``vidstream``;
here each name is its module (``vidstream.ops.select_blocks`` is the module of
``vidstream.select_blocks``)."""
