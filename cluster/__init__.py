"""Cluster side: autoscaling from queue depth, a pipeline simulator, multi-node placement."""
