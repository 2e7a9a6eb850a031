"""The CPU XLA defaults are added once, never over a user's own setting."""
import os

from jaxdefense import xla_flags


def test_cpu_defaults_respect_user_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  added = xla_flags.set_cpu_defaults()
  flags = os.environ["XLA_FLAGS"]
  assert flags.startswith("--xla_force_host_platform_device_count=2")
  for flag in added:
    assert flags.count(flag.split("=")[0]) == 1
  assert xla_flags.set_cpu_defaults() == []  # Second call: nothing more.
  user = "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"
  monkeypatch.setenv("XLA_FLAGS", user)
  assert xla_flags.set_cpu_defaults() == [] and os.environ["XLA_FLAGS"] == user
