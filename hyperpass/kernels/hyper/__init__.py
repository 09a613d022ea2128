"""sortLSH hashing and sorting, the approximated and exact-leaf kernels, the recursion plan,
and their launcher (``launch.py``)."""
