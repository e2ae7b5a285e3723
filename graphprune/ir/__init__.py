"""Graph IR and its frontends (torch dispatch recorder, torch.export)."""
