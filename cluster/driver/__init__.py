"""The driver side of `dip train`, one module per phase of a run:

prepare.py (paths, resolved config, shards) -> resume.py (plan_resume: continue a checkpoint or refuse)
-> ray_start.py (start/attach Ray, the workers' environment) -> fit.py (MLflow run, TorchTrainer.fit)
-> report.py (summary, model card); signals.py turns SIGTERM / Ctrl-C into checkpoint-and-stop within
the grace period; elastic.py is Ray Train's grow hook; launch.py runs the phases in order.
Registration of `dip train` (cluster/cli/train.py) imports none of this until the handler runs."""
