"""moduleserve tests."""
