"""The measurements: memorization, copy similarity, FID, alignment; evaluate, compare, frontier, report."""
