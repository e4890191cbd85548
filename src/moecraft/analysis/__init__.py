"""Routing analysis (expert usage, concentration, overlap, before/after), PNG plots and the HTML report."""
