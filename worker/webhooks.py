"""The leader's webhook sender: due deliveries out, a pool of threads, one attempt in flight per endpoint.

Runs beside the dispatch and reaper loops (:class:`worker.dispatcher.Dispatcher`), only while this process
holds the dispatcher lease. Each pass frees the slots of finished attempts and claims that many due
deliveries (:func:`app.webhooks.delivery.claim_due`, conditional per row); a slow receiver holds one slot,
never the loop, and never more than one slot. ``python -m worker.webhooks`` runs the sender alone, leading
like a worker would (operators' tool: webhooks without a job worker on the box).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta

from app.clock import utcnow
from app.db.models import WebhookDelivery
from app.db.session import end_idle_transactions, session_scope
from app.settings import Settings, get_settings
from app.webhooks import delivery
from worker.dispatcher import Leadership

log = logging.getLogger("distillery.webhooks")
#: Finished deliveries are kept this long for ``GET /v1/webhooks/{id}/deliveries``, then deleted.
KEEP_FINISHED = timedelta(days=30)
PRUNE_EVERY_SECONDS = 600.0


class WebhookSender:
    """``run()`` loops until ``stop`` is set, sending while ``leader`` holds the lease."""

    def __init__(self, settings: Settings, leader: Leadership, stop: threading.Event, interval: float):
        self.settings, self.leader, self.stop, self.interval = settings, leader, stop, interval
        self.pool = ThreadPoolExecutor(max_workers=settings.webhook_concurrency,
                                       thread_name_prefix="distillery-webhook")
        self.in_flight: dict[str, Future] = {}  # endpoint id -> its attempt
        self._pruned = 0.0

    def run(self) -> None:
        try:
            while not self.stop.wait(self.interval):
                try:
                    if self.leader.held():
                        self.pass_once()
                except Exception:
                    log.exception("webhook pass failed; trying again")
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def pass_once(self) -> int:
        """Start attempts for as many due deliveries as there are free slots; returns how many started."""
        self.in_flight = {e: f for e, f in self.in_flight.items() if not f.done()}
        free = self.settings.webhook_concurrency - len(self.in_flight)
        if free <= 0:
            return 0
        claims = delivery.claim_due(self.settings, free, busy=set(self.in_flight))
        for claim in claims:
            self.in_flight[claim.endpoint_id] = self.pool.submit(self._attempt, claim)
        self._prune()
        return len(claims)

    def _attempt(self, claim: delivery.Claim) -> None:
        outcome = delivery.send(claim, self.settings)
        try:
            delivery.record(claim, outcome, self.settings)
        except Exception:  # the database is away: the claim runs out and the attempt is made again
            log.exception("could not record the attempt of webhook delivery %s", claim.delivery_id)

    def _prune(self) -> None:
        now = utcnow()
        if now.timestamp() - self._pruned < PRUNE_EVERY_SECONDS:
            return
        self._pruned = now.timestamp()
        with session_scope() as s:
            s.execute(WebhookDelivery.__table__.delete().where(WebhookDelivery.status != delivery.PENDING,
                                                               WebhookDelivery.created_at < now - KEEP_FINISHED))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    end_idle_transactions(settings.db_idle_transaction_seconds)  # as in every worker process (worker/celery_app.py)
    leader = Leadership(f"{socket.gethostname()}:{os.getpid()}:webhooks")
    stop = threading.Event()
    log.info("webhook sender started")
    try:
        WebhookSender(settings, leader, stop, settings.dispatch_interval_seconds).run()
    except KeyboardInterrupt:
        pass
    finally:
        leader.release()


if __name__ == "__main__":
    main()
