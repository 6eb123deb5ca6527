"""Job request bodies and stand-in executor programs used across suites."""


def job_body(model_id: str, dataset_id: str, **overrides) -> dict:
    """A small, valid KD job (2 epochs into an mlp[32]); keyword overrides replace top-level fields."""
    return {"teacher_model_id": model_id, "dataset_id": dataset_id, "student": {"family": "mlp", "hidden": [32]},
            "steps": [{"kind": "distill", "epochs": 2}], **overrides}


#: An executor that, on a first attempt, reports progress 0.3, waits for the release request, checkpoints
#: ("epoch 7", plus a finished step's export) and exits; on a later attempt it reports the checkpoint it
#: resumed from ("resumed" event) and succeeds.
RELEASING_EXECUTOR = """
    import time
    assert open("inputs/teacher", "rb").read(1)  # the inputs are there, readable
    if os.path.exists("checkpoints/checkpoint.pt"):  # the next attempt: resumed, finish
        send({"type": "event", "event": "resumed", "message": open("checkpoints/checkpoint.pt").read()})
        send({"type": "result", "status": "succeeded", "metrics": {}, "artifacts": []})
        sys.exit(0)
    send({"type": "progress", "progress": {"fraction": 0.3}})
    while not os.path.exists("release-requested"):
        time.sleep(0.05)
    os.makedirs("checkpoints/artifacts", exist_ok=True)
    open("checkpoints/artifacts/step0.onnx", "w").write("a finished step's export")
    open("checkpoints/checkpoint.pt", "w").write("epoch 7")
    send({"type": "event", "event": "checkpoint_saved", "message": "saved", "level": "debug"})
    sys.exit(0)
"""


def run_until_released(job_id: str, settings) -> tuple[str, float]:
    """Run ``job_id`` (with :data:`RELEASING_EXECUTOR`) in a thread, ask the worker to shut down once it runs;
    returns how the attempt ended and how many seconds the release took."""
    import threading
    import time

    from app.db.models import Job
    from app.db.session import session_scope
    from tests.support.wait import wait_until
    from worker import runner

    def fraction() -> float | None:
        with session_scope() as s:
            return (s.get(Job, job_id).progress or {}).get("fraction")

    result = {}
    t = threading.Thread(target=lambda: result.setdefault("ended", runner.run_job(job_id, settings)))
    t.start()
    try:
        wait_until(lambda: fraction() == 0.3, 30, "the job running")
        began = time.monotonic()
        runner.RELEASE.set()
        t.join(30)
        return result.get("ended", "still running"), time.monotonic() - began
    finally:
        runner.RELEASE.clear()
