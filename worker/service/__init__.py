"""The job service: how an analysis becomes a job that runs exactly once and ends in a final state.

Celery app and task (`celery_app`, `tasks`), the runner that claims a row, heartbeats and runs the
pipeline (`runner`), every job-row write conditioned on the claim (`jobstore`), the reaper and
outbox delivery (`sweeper`, `webhooks`), and the in-process worker of embedded mode (`embedded`).
It calls the analysis library (`worker.pipeline` and below) and the API's services (`app.events`,
`app.verdicts`), never API routers; nothing in the analysis library imports it.
"""
