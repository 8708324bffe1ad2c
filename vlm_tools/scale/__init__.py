"""Past one machine: the same engine as autoscaled replicas under Ray Serve (``vlm-tools serve --scale ray``).

An MCP ingress deployment (stateless streamable HTTP, the one-process server's gate, limits, errors and progress)
sends each request to the deployment of the model that serves its tool; each model replica owns one in-process
engine and model, and Ray Serve adds and removes replicas with the load. A call naming an ``image_id`` goes to the
replica that keeps that image's encoding (:mod:`~vlm_tools.scale.affinity`). Importing this package does not
import Ray; :mod:`~vlm_tools.scale.app` does.
"""
