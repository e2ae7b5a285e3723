"""Passes over an Analysis: importance criteria and budgeted selection. Passes read tensors, never modify a model."""
