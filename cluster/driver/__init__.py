"""The driver side of `dip train`: start or attach to Ray, plan the resume, launch Ray Train's
TorchTrainer, handle signals and the elastic grow hook, report the outcome."""
