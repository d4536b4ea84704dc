"""Responders carry out the blocking steps the engine decides on."""
