"""The run's directory: paths and atomic writes, the lease, the recorded config, metrics."""
