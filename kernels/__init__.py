"""Triton kernels of hyperpass (imported as ``hyperpass.kernels``). Not yet implemented."""
