"""Training a stage with Ray Train + DeepSpeed: the driver (`driver.run_stage`), what every worker runs
(`worker.train_func`), the starting model (`model_setup`), the optimisation schedule (`schedule`), stage 0
of the tiny recipe (`stage0/`), and fitting the dpn routers on held-out data (`route_calibration`)."""
