"""What runs on each training worker: the run (setup -> loop -> finish) around a DeepSpeed engine,
the step, recovery from non-finite steps, stop and resize control, per-interval reporting, the
training EMA and the run's random streams."""
