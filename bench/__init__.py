"""Benchmarks that run this PortSentry and Debian's PortSentry 1.2 side by side (see bench/run)."""
