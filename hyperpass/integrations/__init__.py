"""Ways to reach the op without editing a model, and ways to deploy it: ``patching`` (eager
routing and per-module compile), ``cli`` (``hyperpass run``), ``hf`` (transformers'
``attn_implementation``), ``onnx/`` (export with a custom node), ``tensorrt`` (the plugin).
Each imports the op (and, where it compiles, the compiler); nothing imports them."""
