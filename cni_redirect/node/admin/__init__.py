"""The admin's commands beside the agent: `inspect` and `doctor` (read-only), `uninstall`."""
