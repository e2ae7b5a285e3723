"""Channel analysis (element ties, pins, masked states, components) and the cost model."""
