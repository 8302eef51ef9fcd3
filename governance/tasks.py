from celery import shared_task

from r3mes_site import metrics

from .actions import do_close_due_proposals


@shared_task(name="governance.tasks.close_due_proposals", ignore_result=True)
def close_due_proposals():
    """Beat, every R3MES_GOV_CLOSE_INTERVAL seconds. Safe with several beats or workers: each
    proposal is claimed by a conditional UPDATE, so it is closed once."""
    done = do_close_due_proposals()
    metrics.jobs.labels(job="governance_close_due", outcome="ok").inc()
    return {str(pk): outcome for pk, outcome in done.items()}
