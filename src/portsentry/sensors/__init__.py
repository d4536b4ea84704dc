"""Sensors turn packets and connections into Probe records for the engine."""
