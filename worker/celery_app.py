"""The worker's Celery application: ``celery -A worker.celery_app worker``.

Same broker and serializer configuration as the API's sender (``app.queue.make_celery``); this
side also registers the tasks.
"""

from app.queue import make_celery
from app.settings import get_settings

celery_app = make_celery(get_settings())
celery_app.conf.update(include=["worker.tasks"])
app = celery_app
