"""Our entry chained into the node's primary CNI config, and our bundle in its bin dir: what the runtime loads.

Never enters a netns or runs nft; knows no pod and no agent process.
"""
