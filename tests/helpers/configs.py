"""Parameter sets shared by the tests."""

# The paper's algorithm (sortLSH blocks + samples, no window or sinks), whatever the package
# default is: tests of the hyper method spread this into their own parameters.
PAPER_ALGO = {"method": "hyper", "window": 0, "sinks": 0}

# A small hyper config whose approximation engages at a few dozen tokens: the deployment tests
# (ONNX, TensorRT) export and run it.
SMALL_HYPER = dict(
    **PAPER_ALGO,
    min_len=16,
    block_size=16,
    sample_size=16,
    min_seq_len=32,
)
