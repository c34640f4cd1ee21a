"""MLflow tracking: a logger that never blocks the step (a background queue), run opening and
finishing, system metrics, live MFU, and the final model as an MLflow LoggedModel."""
