"""Routing a query to a weighted mix of experts: keyword stage, semantic stage, hybrid fusion and gating."""
