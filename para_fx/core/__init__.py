"""Compiling: capture, placements, the mesh, the ranks' agreement, and the backend that runs the passes."""
