"""Loopback emulators of the providers blastd talks to, for tests, the demo and benchmarks."""
