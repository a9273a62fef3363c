"""Background image jobs: the job model and converters, the stores (SQLite, Redis), the runner, webhooks."""
