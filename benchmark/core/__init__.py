"""What every part of `benchmark` shares: user errors, signal handling, the compute device and the platform."""
