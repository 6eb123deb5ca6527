"""The worker's Celery application: ``celery -A worker.celery_app worker``.

Same broker and serializer configuration as the API's sender (``app.queue.make_celery``); this
side also registers the tasks.
"""

from app.db.session import end_idle_transactions
from app.queue import make_celery
from app.settings import get_settings

# A worker stopped mid-transaction must not hold its row locks over the others (app/db/session.py).
end_idle_transactions(get_settings().db_idle_transaction_seconds)
celery_app = make_celery(get_settings())
celery_app.conf.update(include=["worker.tasks"])
app = celery_app
