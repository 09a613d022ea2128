"""Parameter sets shared by the tests."""

# The paper's algorithm (sortLSH blocks + samples, no window or sinks), whatever the package
# default is: tests of the hyper method spread this into their own parameters.
PAPER_ALGO = {"method": "hyper", "window": 0, "sinks": 0}
