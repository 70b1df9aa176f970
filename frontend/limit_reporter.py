"""Keeps a frontend's part of its API-key holders' limits current (controller/limit_shares.py).

Every second it tells the controller how many calls each holder asked of this frontend, and takes
the parts it answers. A controller out of reach for ALONE_AFTER_S (restarting, or gone) leaves the
frontend limiting as if it were the only one: a holder may then get more than its limits across
frontends for a while, never less.
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
from moecluster.protos import controller_pb2, controller_pb2_grpc
from moecluster.wire.rate_limits import LimitShares

log = logging.getLogger(__name__)
REPORT_EVERY_S = 1.0
ALONE_AFTER_S = 10.0


class LimitReporter(threading.Thread):
    def __init__(self, stub: controller_pb2_grpc.ControllerStub, shares: LimitShares, frontend_id: str, metadata=(),
                 every_s: float = REPORT_EVERY_S):
        super().__init__(daemon=True, name="limit-report")
        self.stub, self.shares, self.frontend_id, self.metadata, self.every_s = stub, shares, frontend_id, metadata, every_s
        self.stopped = threading.Event()

    def run(self) -> None:
        answered = time.monotonic()
        while not self.stopped.wait(self.every_s):
            asked = self.shares.take_asked()
            demand = controller_pb2.LimitDemand(frontend_id=self.frontend_id, holders=list(asked),
                                                calls=list(asked.values()))
            try:
                reply = self.stub.ShareLimits(demand, timeout=5, metadata=self.metadata)
                self.shares.update(dict(zip(reply.holders, reply.shares)), reply.others)
                answered = time.monotonic()
            except (grpc.RpcError, ValueError) as err:  # ValueError: parts out of range, from a controller gone wrong
                log.debug("limit report failed (%s)", err)
                if time.monotonic() - answered > ALONE_AFTER_S:
                    self.shares.alone()
