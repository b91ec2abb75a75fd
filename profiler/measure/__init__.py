"""The measure layer: models, workload, sweep, workers, live tracking and the one recording lifecycle."""
