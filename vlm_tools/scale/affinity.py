"""Follow-ups go where the image already is: a Ray Serve request router that ranks a model's replicas for each
``image_id`` by rendezvous hashing.

Every ingress ranks the same way, so a follow-up through any of them reaches the replica that encoded the image
(:class:`ImageAffinityRouter`).
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

IMAGE_KEY = "image_id"
"""The keyword argument of a model replica's call that names the image."""


def affinity(image_id: str, replica_id: str) -> int:
    """The rendezvous score of a replica for an image: stable across processes (unlike ``hash``)."""
    digest = hashlib.blake2b(f"{image_id}\x00{replica_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(image_id: str, replica_ids: list[str]) -> list[str]:
    """``replica_ids`` from the image's first choice to its last."""
    return sorted(replica_ids, key=lambda replica: affinity(image_id, replica), reverse=True)


class ImageAffinityRouter(RequestRouter):
    """Ranks replicas by :func:`affinity` of the request's ``image_id``: Ray Serve sends the request to the first
    one in the ranking that is below its ``max_ongoing_requests``, and waits (backing off) when all are full.

    Every ingress replica ranks the same way for the same image (the ranking is a pure function of the image id and
    the replica ids), so a follow-up on an image — through any ingress — reaches the replica that encoded it, where its
    encoding and, for Molmo2, its KV prefix are kept. When that replica is saturated the next in the ranking takes the
    request (and encodes the image again); when replicas come or go only the images whose top replica changed move. A
    request without an image id goes to the least loaded replica.
    """

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return [list(candidate_replicas)]
        pending_request.routing_context.should_backoff = True  # sleep between rounds when every replica is full
        image_id = pending_request.kwargs.get(IMAGE_KEY)
        if not image_id:
            return [list(candidate_replicas)]  # one group: the least loaded replica takes it
        by_id = {replica.replica_id.unique_id: replica for replica in candidate_replicas}
        return [[by_id[replica]] for replica in ranked(str(image_id), list(by_id))]
