"""The agent's process: the loop, signals, ownership of the node, the HTTP port, probes, metrics, the node guard.

Builds on `chaining` and `pods`; the HTTP port and the probe are given callables, not the agent.
"""
