"""The run's directory: paths and atomic writes, the lock, the recorded config, metrics."""
