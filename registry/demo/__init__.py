"""Example Module classes and the seeded demo registry."""
