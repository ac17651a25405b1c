"""Triton Inference Server export of a bundle's tail (see `server.triton.export`)."""
