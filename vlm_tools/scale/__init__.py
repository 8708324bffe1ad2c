"""Past one machine: the same engine as autoscaled replicas under Ray Serve (``vlm-tools serve --scale ray``).

An MCP ingress sends each request to the replicas of the model that serves its tool (see
:func:`~vlm_tools.scale.app.build_app`), a call naming an ``image_id`` to the replica that keeps that image's encoding
(:mod:`~vlm_tools.scale.affinity`). Importing this package does not import Ray; :mod:`~vlm_tools.scale.app` does.
"""
