"""The node's pods: what every sandbox should have against what its netns holds, and repair of the difference.

Reads our entry through `chaining`; knows no agent process.
"""
