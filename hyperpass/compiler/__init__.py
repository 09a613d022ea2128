"""The compiler front end: find attention in Dynamo graphs and rewrite it into the op.

- :mod:`~hyperpass.compiler.backend`: ``hyperpass.backend``, the ``torch.compile`` backend;
- :mod:`~hyperpass.compiler.rewrite`: the pass (options, decision, graph surgery);
- :mod:`~hyperpass.compiler.training`: training graphs keep select's block lists for the
  backward;
- :mod:`~hyperpass.compiler.sites` / :mod:`~hyperpass.compiler.handwritten` /
  :mod:`~hyperpass.compiler.gqa`: what a site is, hand-written attention, ``repeat_kv``;
- :mod:`~hyperpass.compiler.masks`: masks classified by how the graph built them;
- :mod:`~hyperpass.compiler.report` / :mod:`~hyperpass.compiler.explain`: what it did, and why.

Leaves never import the orchestrator: masks, fx_utils, sites, gqa and handwritten are imported by
rewrite and training, which backend imports, which explain imports. Must not import the kernels.
"""
